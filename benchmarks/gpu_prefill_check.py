"""GPU correctness of the duo prefill kernel against a float64 numpy oracle.

A covering set of cases (lengths 1000/4096/4097/16384, GQA groups 1/4/8, head_dim 64/128/256 plus one padded
head_dim, sink 0/4/128, window 1/64/256/1000, q_offset 0/1024, nf none/some/all, bf16 and fp16), not the full
product. Before each case, NaN-filled buffers of the kernel's (padded) output and lse sizes are allocated and
freed, so the allocator hands that NaN memory to the kernel's outputs; every element of out and lse must then be
non-NaN (an unwritten tile would show). The output and lse are compared with a float64 numpy oracle on a sample
of query rows (all rows up to 1100 rows; otherwise the first and last 192 rows, the rows around the sink/window
edges and 256 random rows), blocked over rows to keep memory small. Pass: rel L2 error of out <= 1e-2 and
max |lse - lse_ref| <= 1e-2 on every case.

Writes JSON to $OUT (if set) and benchmarks/results/prefill_correctness_<gpu>.json.
Run: PYTHONPATH=. python3 benchmarks/gpu_prefill_check.py [--quick] [--config 64x128x2p]
(``--config default:field=value,...``: every layer kind's default blocks at head_dim 128 with those fields set.)
(``--impl interpret --cases NAME`` runs one case through the CPU interpreter as a smoke test.)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from duojax.kernels.attention import duo_attention  # noqa: E402
from duojax.kernels.interpret import use_synchronous_cpu_dispatch  # noqa: E402

# (name, B, Sq, Hq, Hkv, D, nf, sink, window, q_offset, dtype)
CASES = [
    ("s1000_g1_d128_some", 1, 1000, 8, 8, 128, 2, 4, 64, 0, "bfloat16"),
    ("s4096_g4_d128_some", 1, 4096, 8, 2, 128, 1, 128, 256, 0, "bfloat16"),
    ("s4097_g8_d64_none_off", 1, 4097, 8, 1, 64, 0, 0, 1, 1024, "bfloat16"),
    ("s4097_g1_d256_all_fp16", 1, 4097, 4, 4, 256, 4, 4, 1000, 0, "float16"),
    ("s16384_g4_d128_some", 1, 16384, 8, 2, 128, 1, 128, 256, 0, "bfloat16"),
    ("s1000_g1_d64_all_off", 2, 1000, 4, 4, 64, 4, 0, 1000, 1024, "bfloat16"),
    ("s4096_g1_d256_none_off", 1, 4096, 4, 4, 256, 0, 128, 1000, 1024, "bfloat16"),
    ("s16384_g8_d64_none_off_fp16", 1, 16384, 8, 1, 64, 0, 4, 64, 1024, "float16"),
    ("s4097_g1_d128_some_fp16", 1, 4097, 4, 4, 128, 2, 0, 256, 0, "float16"),
    ("s1000_g4_d256_some", 1, 1000, 8, 2, 256, 1, 128, 1, 0, "bfloat16"),
    ("s1000_g4_d96pad_some", 1, 1000, 8, 2, 96, 1, 4, 64, 1024, "bfloat16"),
    ("s4097_g4_d128_all_off", 1, 4097, 8, 2, 128, 2, 128, 256, 1024, "bfloat16"),
    ("s1000_g1_d128_none", 1, 1000, 4, 4, 128, 0, 128, 256, 0, "bfloat16"),
]
QUICK = {"s1000_g1_d128_some", "s4097_g8_d64_none_off", "s4097_g1_d256_all_fp16", "s16384_g4_d128_some"}


def sample_rows(Sq, q_offset, sink, window, rng):
  if Sq <= 1100:
    return np.arange(Sq)
  rows = set(range(192)) | set(range(Sq - 192, Sq))
  for edge in (sink + window - q_offset, window - q_offset, 2 * window - q_offset):
    rows |= {r for r in range(edge - 64, edge + 64) if 0 <= r < Sq}
  rows |= set(rng.choice(Sq, size=min(256, Sq), replace=False).tolist())
  return np.array(sorted(rows))


def oracle(q, k, v, rows, *, nf, sink, window, q_offset, block=128):
  """float64 out [B, len(rows), Hq, D] and lse [B, Hq, len(rows)] for the given query rows."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, _, Hq, D = q.shape
  Sk, Hkv = k.shape[1], k.shape[2]
  G = Hq // Hkv
  scale = 1.0 / np.sqrt(D)
  out = np.zeros((B, len(rows), Hq, D))
  lse = np.full((B, Hq, len(rows)), -np.inf)
  kpos = np.arange(Sk)
  for r0 in range(0, len(rows), block):
    rr = rows[r0:r0 + block]
    qpos = q_offset + rr
    kmax = int(qpos.max()) + 1
    causal = kpos[None, :kmax] <= qpos[:, None]
    local = (kpos[None, :kmax] < sink) | (kpos[None, :kmax] > qpos[:, None] - window)
    for h in range(Hq):
      kh = h // G
      vis = causal if kh < nf else (causal & local)
      s = np.einsum("bqd,bkd->bqk", q[:, rr, h], k[:, :kmax, kh]) * scale
      s = np.where(vis[None], s, -np.inf)
      m = s.max(-1, keepdims=True)
      w = np.exp(s - m)
      l = w.sum(-1, keepdims=True)
      out[:, r0:r0 + len(rr), h] = np.einsum("bqk,bkd->bqd", w / l, v[:, :kmax, kh])
      lse[:, h, r0:r0 + len(rr)] = (m + np.log(l))[..., 0]
  return out, lse


def run_case(case, seed, impl="pallas"):
  name, B, Sq, Hq, Hkv, D, nf, sink, window, q_offset, dt = case
  dtype = jnp.dtype(dt)
  ks = jax.random.split(jax.random.key(seed), 3)
  Sk = q_offset + Sq
  q = jax.random.normal(ks[0], (B, Sq, Hq, D), dtype)
  k = jax.random.normal(ks[1], (B, Sk, Hkv, D), dtype)
  v = jax.random.normal(ks[2], (B, Sk, Hkv, D), dtype)
  fn = jax.jit(lambda q, k, v: duo_attention(q, k, v, num_full_kv_heads=nf, sink=sink, window=window,
                                             q_offset=q_offset, impl=impl))
  # Poison: run once on NaN-filled buffers of the same shape first, so memory the allocator hands back to the
  # real call is likely to hold NaNs (XLA reuses freed buffers); then require no NaN in the real outputs.
  sq_pad = -(-Sq // 128) * 128
  dk = next(d for d in (64, 128, 256) if d >= D)
  poison = (jnp.full((B, sq_pad, Hq, dk), jnp.nan, dtype), jnp.full((B, Hq, sq_pad), jnp.nan, jnp.float32))
  jax.block_until_ready(poison)
  del poison
  t0 = time.perf_counter()
  out, lse = jax.block_until_ready(fn(q, k, v))
  t_first = time.perf_counter() - t0
  out = np.asarray(out.astype(jnp.float32))
  lse = np.asarray(lse)
  rec = dict(name=name, B=B, Sq=Sq, Hq=Hq, Hkv=Hkv, D=D, nf=nf, sink=sink, window=window, q_offset=q_offset,
             dtype=dt, compile_and_run_s=round(t_first, 2))
  rec["nan_out"] = int(np.isnan(out).sum())
  rec["nan_lse"] = int(np.isnan(lse).sum())
  rng = np.random.default_rng(seed)
  rows = sample_rows(Sq, q_offset, sink, window, rng)
  ro, rl = oracle(np.asarray(q.astype(jnp.float32)), np.asarray(k.astype(jnp.float32)),
                  np.asarray(v.astype(jnp.float32)), rows, nf=nf, sink=sink, window=window, q_offset=q_offset)
  o = out[:, rows].astype(np.float64)
  rec["rows_checked"] = int(len(rows))
  rec["rel_l2"] = float(np.linalg.norm(o - ro) / np.linalg.norm(ro))
  rec["lse_max_abs_err"] = float(np.abs(lse[:, :, rows] - rl).max())
  rec["ok"] = bool(rec["nan_out"] == 0 and rec["nan_lse"] == 0 and rec["rel_l2"] <= 1e-2
                   and rec["lse_max_abs_err"] <= 1e-2)
  return rec


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out", default=None)
  p.add_argument("--impl", default="pallas", help="'interpret' runs the CPU interpreter (smoke test only)")
  p.add_argument("--cases", nargs="*", default=None, help="names of cases to run (default all)")
  p.add_argument("--config", default=None,
                 help="kernel block config for every case, e.g. 64x128x2p, or default:field=value,... (head_dim 128)")
  args = p.parse_args(argv)
  if args.impl == "interpret":
    use_synchronous_cpu_dispatch()  # the Mosaic-GPU interpreter can hang under asynchronous CPU dispatch
  if args.config:
    # At head_dim 128: a block config (the other head dims keep their block sizes and take its flags), or
    # default:field=value,... (each layer kind's default blocks with those fields set, e.g.
    # default:half_steps=0,stream_fold=8; the other head dims keep their defaults, whose SMEM may have no room
    # for what the overrides ask).
    from benchmarks.bench_attention import parse_config_arg  # noqa: PLC0415
    from duojax.kernels import prefill_mgpu  # noqa: PLC0415
    cfg = parse_config_arg(args.config)
    orig = prefill_mgpu.default_config

    def config_for(hd, heads="duo"):
      default = orig(hd, heads)
      if cfg is None or (isinstance(cfg, tuple) and hd != 128):
        return default
      if isinstance(cfg, tuple):
        return dataclasses.replace(default, **cfg[1])
      if hd == 128:
        return cfg
      return dataclasses.replace(
          cfg, **{f: getattr(default, f) for f in ("block_q", "block_kv", "stages", "full_block_kv")})

    prefill_mgpu.default_config = config_for
  cases = [c for c in CASES if (not args.quick or c[0] in QUICK) and (args.cases is None or c[0] in args.cases)]
  results = []
  for i, case in enumerate(cases):
    try:
      rec = run_case(case, seed=1000 + i, impl=args.impl)
    except Exception as e:  # noqa: BLE001
      traceback.print_exc(limit=3)
      rec = dict(name=case[0], ok=False, error=f"{type(e).__name__}: {str(e)[:800]}")
    results.append(rec)
    print(json.dumps({k: rec.get(k) for k in ("name", "ok", "rel_l2", "lse_max_abs_err", "nan_out",
                                              "compile_and_run_s", "error")}), flush=True)
  dev = jax.devices()[0]
  doc = dict(device=dev.device_kind, jax_version=jax.__version__, config=args.config or "default",
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             all_ok=all(r["ok"] for r in results), results=results)
  print("ALL OK" if doc["all_ok"] else "FAILURES", f"({sum(r['ok'] for r in results)}/{len(results)})")
  name = dev.device_kind.replace(" ", "_") if dev.platform == "gpu" else dev.platform
  if args.out:
    dirs = [args.out]
  elif dev.platform != "gpu":  # a CPU smoke run is not a result: keep it out of benchmarks/results
    dirs = [os.environ.get("OUT") or tempfile.gettempdir()]
  else:
    dirs = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")]
    if os.environ.get("OUT"):
      dirs.append(os.environ["OUT"])
  for d in dirs:
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"prefill_correctness_{name}.json"), "w") as f:
      json.dump(doc, f, indent=1)
    print("wrote", os.path.join(d, f"prefill_correctness_{name}.json"))
  return 0 if doc["all_ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
