"""Decode attention configs on one duo layer of the Llama-2-7B efficiency benchmark: 8 retrieval KV heads over a
128k-token cache and 24 streaming heads over a ring of sink 64 + window 256 (B=1, 32 query heads, head_dim 128).

The efficiency benchmark's cache capacity is 131,136 positions (context + decode steps, rounded up to 64), which
is not a multiple of 128, so the default config there uses 64-row blocks. This sweep times that default against
other block sizes, stage counts, CTAs per SM and streaming paths, at that capacity and at a 128-multiple one.

    python benchmarks/sweep_decode_layer.py    # GPU; prints a table, writes decode_layer_sweep_<gpu>.json
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_decode import rel_l2, timeit, timeit_loop  # noqa: E402

from duojax.kernels import decode_mgpu  # noqa: E402
from duojax.kernels.decode import duo_decode_attention  # noqa: E402


def main() -> None:
  B, Hq, D, nf, ns, sink, window, length = 1, 32, 128, 8, 24, 64, 256, 131072
  R = sink + window
  out_dir = pathlib.Path(os.environ.get("OUT") or "benchmarks/results")
  rows, ref = [], None
  variants = [  # (capacity, streaming_impl, config or None)
      (131136, "auto", None),
      (131136, "auto", dict(block_kv=64, num_stages=3)),
      (131136, "auto", dict(block_kv=64, num_stages=2, ctas_per_sm=2)),
      (131136, "kernel", dict(block_kv=64, num_stages=4)),
      (131200, "auto", None),
      (131200, "xla", None),
      (131200, "auto", dict(block_kv=128, num_stages=3)),
      (131200, "fused", dict(block_kv=64, num_stages=2, ctas_per_sm=2)),
      (131200, "fused", dict(block_kv=64, num_stages=4)),
  ]
  ks = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(ks[0], (B, Hq, D), jnp.bfloat16)
  kr = jax.random.normal(ks[3], (B, R, ns, D), jnp.bfloat16)
  vr = jax.random.normal(ks[4], (B, R, ns, D), jnp.bfloat16)
  lengths = jnp.full((B,), length, jnp.int32)
  p = length - 1
  t = jnp.arange(R)
  ring_pos = jnp.where(t < sink, t, p - ((p - t) % window))[None].astype(jnp.int32)
  caches = {L: (jax.random.normal(ks[1], (B, L, nf, D), jnp.bfloat16),
                jax.random.normal(ks[2], (B, L, nf, D), jnp.bfloat16)) for L in sorted({v[0] for v in variants})}
  live = []
  for L, simpl, kw in variants:
    kf, vf = caches[L]
    cfg = None
    if kw is not None:
      fuse = simpl in ("fused", "auto") and R % kw["block_kv"] == 0
      cfg = decode_mgpu.pick_config(L, D, B * nf, other_ctas=B * ns if fuse else 0, **kw)
    fn = jax.jit(lambda *a, simpl=simpl, cfg=cfg: duo_decode_attention(
        *a, sink=sink, window=window, streaming_impl=simpl, impl="pallas", config=cfg))
    args = (q, kf, vf, lengths, kr, vr, ring_pos)
    row = dict(capacity=L, streaming_impl=simpl, config=None if cfg is None else dict(
        block_kv=cfg.block_kv, num_stages=cfg.num_stages, blocks_per_split=cfg.blocks_per_split,
        ctas_per_sm=cfg.ctas_per_sm), kv_bytes=2 * B * (length * nf + R * ns) * D * 2, loop_samples=[],
        host_samples=[])
    try:
      _, out = timeit(fn, *args)
      ref = out if ref is None else ref
      row["rel_l2_vs_first"] = rel_l2(out, ref)
      live.append((row, fn, args))
    except Exception as e:  # noqa: BLE001
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    rows.append(row)
  # Round-robin rounds, order reversed every other round, so that clock drift hits every variant alike.
  for rnd in range(6):
    for row, fn, args in (live if rnd % 2 == 0 else live[::-1]):
      row["loop_samples"].append(timeit_loop(fn, *args, reps=3))
      row["host_samples"].append(timeit(fn, *args, reps=3)[0])
  for row, _, _ in live:
    row["ms"] = statistics.median(row["host_samples"])
    row["loop_ms"] = statistics.median(row["loop_samples"])
    row["tb_s_loop"] = row["kv_bytes"] / (row["loop_ms"] * 1e-3) / 1e12
    print(json.dumps(row), flush=True)
  dev = jax.devices()[0]
  res = dict(device=dev.device_kind, jax_version=jax.__version__,
             date=datetime.datetime.now(datetime.UTC).isoformat(), shape=dict(B=B, Hq=Hq, D=D, nf=nf, ns=ns,
             sink=sink, window=window, length=length), rows=rows)
  print(f"{'capacity':>9} {'streaming':>9} {'config':>34} {'host ms':>8} {'loop ms':>8} {'TB/s':>6}")
  for r in rows:
    c = r["config"]
    cs = "default" if c is None else f"bk{c['block_kv']} st{c['num_stages']} bps{c['blocks_per_split']} x{c['ctas_per_sm']}"
    print(f"{r['capacity']:>9} {r['streaming_impl']:>9} {cs:>34} {r.get('ms', float('nan')):8.4f} "
          f"{r.get('loop_ms', float('nan')):8.4f} {r.get('tb_s_loop', float('nan')):6.2f}")
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / f"decode_layer_sweep_{dev.device_kind.replace(' ', '_')}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
  main()
