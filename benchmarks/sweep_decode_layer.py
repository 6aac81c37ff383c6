"""Decode attention configs on single layers of the efficiency benchmark's models (B=1, 32 query heads, head_dim
128, ring of sink 64 + window 256): Llama-2-7B duo (8 retrieval KV heads x 128k + 24 streaming) and all-full
(32 x 128k), Llama-3-8B duo (4 x 899,744 + 4 streaming) and all-full (8 x 899,744).

The efficiency benchmark's cache capacities (context + decode steps, rounded up to 64) are not multiples of 128,
so the default config there uses 64-row blocks. This sweep times the default against other block sizes, stage
counts, CTAs per SM and streaming paths, at that capacity and at a 128-multiple one (or, with ``--ctas-per-sm``,
64-row blocks at the given CTAs per SM only). Variants are timed round-robin (in-jit loops and host-timed calls).

    python benchmarks/sweep_decode_layer.py                       # Llama-2 duo layer, every variant
    python benchmarks/sweep_decode_layer.py --shapes llama2-duo25 llama2-full llama3-duo50 llama3-full \
        --ctas-per-sm 1 2 3
    python benchmarks/sweep_decode_layer.py --shapes llama2-duo25 llama3-duo50 --host-ring   # ring hosting
"""

from __future__ import annotations

import argparse
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
from duojax.kernels.decode import duo_decode_attention, ring_fuses  # noqa: E402


SHAPES = {  # name: (Hq, nf, ns, context, capacity) at head_dim 128, sink 64 + window 256, B=1
    "llama2-duo25": (32, 8, 24, 131072, 131136),
    "llama2-full": (32, 32, 0, 131072, 131136),
    "llama3-duo50": (32, 4, 4, 899744, 899776),
    "llama3-full": (32, 8, 0, 899744, 899776),
}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--shapes", nargs="*", default=["llama2-duo25"], choices=sorted(SHAPES))
  ap.add_argument("--ctas-per-sm", nargs="*", type=int, default=None,
                  help="only sweep 64-row blocks with these CTAs per SM (2 stages for 2+, 4 for 1)")
  ap.add_argument("--stages", nargs="*", type=int, default=None,
                  help="with --ctas-per-sm: these K/V stage counts for each CTAs-per-SM value (default 2 for 2+, 4 "
                       "for 1)")
  ap.add_argument("--other-ctas", nargs="*", type=int, default=None,
                  help="only sweep the default 64-row blocks with the split count chosen for this many streaming "
                       "CTAs sharing the wave (pick_config's other_ctas; the default passes the streaming CTAs)")
  ap.add_argument("--host-ring", action="store_true",
                  help="only compare the fused duo launch's schedules (64-row blocks, 2 stages, 2 CTAs per SM): "
                       "streaming CTAs in the wave (the default), every slot a retrieval split with separate "
                       "streaming CTAs, and every slot a retrieval split hosting the rings (host_ring)")
  args = ap.parse_args()
  out_dir = pathlib.Path(os.environ.get("OUT") or "benchmarks/results")
  all_rows = []
  for shape in args.shapes:
    all_rows += sweep(shape, args.ctas_per_sm, args.other_ctas, args.stages, args.host_ring)
  dev = jax.devices()[0]
  res = dict(device=dev.device_kind, jax_version=jax.__version__,
             date=datetime.datetime.now(datetime.UTC).isoformat(), rows=all_rows)
  print(f"{'shape':>13} {'capacity':>9} {'streaming':>9} {'config':>26} {'host ms':>8} {'loop ms':>8} {'TB/s':>6}")
  for r in all_rows:
    c = r["config"]
    cs = ("default" if c is None else f"bk{c['block_kv']} st{c['num_stages']} bps{c['blocks_per_split']} "
          f"x{c['ctas_per_sm']} o{c['other_ctas']}" + (" host" if c.get("host_ring") else ""))
    print(f"{r['shape']:>13} {r['capacity']:>9} {r['streaming_impl']:>9} {cs:>26} {r.get('ms', float('nan')):8.4f} "
          f"{r.get('loop_ms', float('nan')):8.4f} {r.get('tb_s_loop', float('nan')):6.2f}")
  out_dir.mkdir(parents=True, exist_ok=True)
  tag = ("" if args.shapes == ["llama2-duo25"] else "_" + "_".join(args.shapes)) + (
      "_other_ctas" if args.other_ctas else "") + ("_stages" if args.stages else "") + (
      "_host_ring" if args.host_ring else "")
  (out_dir / f"decode_layer_sweep{tag}_{dev.device_kind.replace(' ', '_')}.json").write_text(
      json.dumps(res, indent=1))


def sweep(shape: str, ctas_per_sm, other_ctas=None, stages=None, host_ring=False) -> list[dict]:
  Hq, nf, ns, length, cap = SHAPES[shape]
  B, D, sink, window = 1, 128, 64, 256
  R = sink + window
  rows, ref = [], None
  if host_ring:
    base = dict(block_kv=64, num_stages=2, ctas_per_sm=2)
    variants = [(cap, "auto", base), (cap, "auto", base | dict(other_ctas=0)),
                (cap, "auto", base | dict(other_ctas=0, host_ring=True))]
  elif other_ctas:
    variants = [(cap, "auto", dict(block_kv=64, num_stages=2, ctas_per_sm=2, other_ctas=o)) for o in other_ctas]
  elif ctas_per_sm:
    variants = [(cap, "auto", dict(block_kv=64, num_stages=st, ctas_per_sm=c)) for c in ctas_per_sm
                for st in (stages or [4 if c == 1 else 2])]
  else:
    variants = [  # (capacity, streaming_impl, config or None)
        (cap, "auto", None),
        (cap, "auto", dict(block_kv=64, num_stages=3)),
        (cap, "auto", dict(block_kv=64, num_stages=2, ctas_per_sm=2)),
        (cap, "kernel", dict(block_kv=64, num_stages=4)),
        (cap + 64, "auto", None),
        (cap + 64, "xla", None),
        (cap + 64, "auto", dict(block_kv=128, num_stages=3)),
        (cap + 64, "fused", dict(block_kv=64, num_stages=2, ctas_per_sm=2)),
        (cap + 64, "fused", dict(block_kv=64, num_stages=4)),
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
      fuse = ring_fuses(ns, R, kw["block_kv"], simpl)  # the streaming CTAs share the launch's wave
      kw = dict(other_ctas=B * ns if fuse else 0) | kw
      cfg = decode_mgpu.pick_config(L, D, B * nf, **kw)
    fn = jax.jit(lambda *a, simpl=simpl, cfg=cfg: duo_decode_attention(
        *a, sink=sink, window=window, streaming_impl=simpl, impl="pallas", config=cfg))
    args = (q, kf, vf, lengths, kr, vr, ring_pos)
    row = dict(shape=shape, capacity=L, streaming_impl=simpl, config=None if cfg is None else dict(
        block_kv=cfg.block_kv, num_stages=cfg.num_stages, blocks_per_split=cfg.blocks_per_split,
        ctas_per_sm=cfg.ctas_per_sm, other_ctas=kw["other_ctas"], host_ring=cfg.host_ring),
        kv_bytes=2 * B * (length * nf + R * ns) * D * 2, loop_samples=[], host_samples=[])
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
  return rows


if __name__ == "__main__":
  main()
