"""Batch-1 decode projections (GEMV, ``y [1, N] = x [1, K] @ W [K, N]``, bf16): weight bytes read per second,
XLA's dot against duojax's Mosaic-GPU GEMV (``duojax.kernels.gemv_mgpu``), at the Llama-2-7B / Llama-3-8B
projection shapes (fused QKV and gate/up included). Decode reads every weight once per token, so this rate
bounds the non-attention part of the per-token latency.

Each timed call runs the projection over ``--layers`` distinct weight matrices (as a decode step runs one per
layer), so the weights do not sit in L2 between calls and the launch overhead is that of a jitted step.

    python benchmarks/bench_gemv.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.timing import chunk_samples  # noqa: E402
from duojax.kernels import gemv_mgpu  # noqa: E402

# name -> (K, [N of each matrix]); several matrices = one projection group (XLA: one dot each; the kernel: one
# launch for the group, as the model runs them)
SHAPES = {
    "llama2 q/o": (4096, [4096]), "llama2 q,k,v": (4096, [4096, 4096, 4096]), "llama2 gate|up": (4096, [11008]),
    "llama2 gate,up": (4096, [11008, 11008]), "llama2 down": (11008, [4096]), "llama2 lm_head": (4096, [32000]),
    "llama3 q,k,v": (4096, [4096, 1024, 1024]), "llama3 gate,up": (4096, [14336, 14336]),
    "llama3 down": (14336, [4096]), "llama3 lm_head": (4096, [128256]),
}


def xla_dot(x, ws):
  return [jnp.einsum("bi,io->bo", x, w) for w in ws]


def pallas(config=None):
  return lambda x, ws: gemv_mgpu.gemv_multi(x, ws, config=config)


def bench(fn, x, ws, samples=7, iters=10):
  f = jax.jit(lambda x, ws: [fn(x, w) for w in ws])
  out = [t / len(ws) for t in chunk_samples(f, (x, ws), warmup=1, samples=samples, inner=iters)]
  return statistics.median(out), out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--sweep", action="store_true", help="also time other split / stage choices of the kernel")
  args = ap.parse_args(argv)
  rows = []
  for name in args.shapes:
    K, Ns = SHAPES[name]
    N = sum(Ns)
    ws = [tuple((0.02 * jax.random.normal(jax.random.key(i * 8 + j), (K, n), jnp.float32)).astype(jnp.bfloat16)
                for j, n in enumerate(Ns)) for i in range(args.layers)]
    x = jax.random.normal(jax.random.key(99), (1, K), jnp.float32).astype(jnp.bfloat16)
    ref = np.asarray(x, np.float64) @ np.concatenate([np.asarray(w, np.float64) for w in ws[0]], axis=1)
    variants = {"xla": xla_dot, "pallas": pallas()}
    if args.sweep:
      base = gemv_mgpu.pick_gemv_config(K, tuple(Ns))
      for cps in (1, 3):
        variants[f"pallas cps{cps}"] = pallas(gemv_mgpu.pick_gemv_config(K, tuple(Ns), ctas_per_sm=cps))
      for bn in (128, 256):
        variants[f"pallas bn{bn}"] = pallas(gemv_mgpu.pick_gemv_config(K, tuple(Ns), block_n=bn))
        variants[f"pallas bn{bn} cps1"] = pallas(gemv_mgpu.pick_gemv_config(K, tuple(Ns), block_n=bn, ctas_per_sm=1))
      variants["pallas stages6"] = pallas(gemv_mgpu.pick_gemv_config(K, tuple(Ns), num_stages=6))
      variants["pallas splits1"] = pallas(gemv_mgpu.GemvConfig(base.block_k, base.num_stages, 1, base.block_n))
      variants["pallas splits x2"] = pallas(gemv_mgpu.GemvConfig(base.block_k, base.num_stages, 2 * base.splits,
                                                                        base.block_n))
    for vname, fn in variants.items():
      t, samples = bench(fn, x, ws)
      y = np.concatenate([np.asarray(a, np.float64) for a in jax.jit(fn)(x, ws[0])], axis=1)
      err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
      cfg = gemv_mgpu.pick_gemv_config(K, tuple(Ns)) if vname == "pallas" else None
      rows.append(dict(shape=name, K=K, N=N, variant=vname, us=t * 1e6, tb_s=K * N * 2 / t / 1e12,
                       rel_err_vs_f64=err, samples_us=[s * 1e6 for s in samples],
                       config=dataclass_dict(cfg)))
      print(f"{name:>15} K={K:>6} N={N:>6} {vname:>15}: {t * 1e6:8.1f} us  {K * N * 2 / t / 1e12:5.2f} TB/s  "
            f"rel err {err:.1e}", flush=True)
  out = os.environ.get("OUT")
  if out:
    with open(os.path.join(out, f"gemv_{jax.devices()[0].device_kind.replace(' ', '_')}.json"), "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, jax_version=jax.__version__,
                     date=datetime.date.today().isoformat(), layers=args.layers, rows=rows), f, indent=1)


def dataclass_dict(cfg):
  import dataclasses
  return None if cfg is None else dataclasses.asdict(cfg)


if __name__ == "__main__":
  main()
