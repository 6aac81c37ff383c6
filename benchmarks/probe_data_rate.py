"""Probe: does the HBM streaming rate of duojax's decode kernels depend on the values streamed?

Session 15 found the decode GEMV's weight tiles streaming at about 3.8 TB/s and the decode attention kernel's K/V
tiles at 4.55 TB/s, with no launch, layout or tiling difference that explained it. One difference left is the
data: the efficiency benchmark's weights are ``0.02 * normal`` and its cache is ``normal(0, 1)``. This probe
times the same kernels on the same shapes with the streamed array filled five ways:

  zeros   every element 0
  ones    every element 1.0 (a constant, nonzero bit pattern)
  w002    0.02 * normal (the benchmark's weights; trained Llama weights have a similar scale)
  n1      normal(0, 1) (the benchmark's cache)
  bits    uniformly random 16-bit patterns with the exponent's top bit cleared (no inf or NaN)

Kernels (bf16, B=1, one H200):
  gemv qkv   duojax's Mosaic-GPU GEMV, Llama-2 q,k,v (4096 x 3 x 4096), 8 distinct layers per call, host-timed
  gemv down  the same, Llama-2 down (11008 x 4096)
  attn full  duojax's decode attention, Llama-2 all-full layer (32 KV heads x 128k, capacity 131136), in-jit
             loop of chained calls
  xla sum    XLA's float32 sum over 1 GiB, host-timed

Variants run round-robin (six rounds, order reversed every other round); the table gives medians.

    python benchmarks/probe_data_rate.py --out DIR
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench_decode import timeit_loop  # noqa: E402
from result_file import write_result  # noqa: E402
from timing import chunk_samples, round_robin  # noqa: E402

from duojax.kernels import gemv_mgpu  # noqa: E402
from duojax.kernels.decode import duo_decode_attention  # noqa: E402

DISTS = ("zeros", "ones", "w002", "n1", "bits")


def fill(kind: str, key, shape) -> jax.Array:
  """A bf16 array of ``shape`` filled as ``kind`` says (see the module docstring)."""
  @jax.jit
  def make(key):
    if kind == "zeros":
      return jnp.zeros(shape, jnp.bfloat16)
    if kind == "ones":
      return jnp.ones(shape, jnp.bfloat16)
    if kind == "w002":
      return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(jnp.bfloat16)
    if kind == "n1":
      return jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16)
    if kind == "bits":
      b = jax.random.bits(key, shape, jnp.uint16) & jnp.uint16(0xBFFF)
      return jax.lax.bitcast_convert_type(b, jnp.bfloat16)
    raise ValueError(f"unknown fill {kind!r}; allowed: {DISTS}")
  return make(key)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--dists", nargs="*", default=list(DISTS), choices=DISTS)
  ap.add_argument("--kernels", nargs="*", default=["gemv qkv", "gemv down", "attn full", "xla sum"])
  ap.add_argument("--rounds", type=int, default=6)
  ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
  args = ap.parse_args(argv)

  cases = []  # (kernel, dist, fn, fn_args, bytes, timer)
  key = jax.random.key(0)
  x = jax.random.normal(jax.random.key(99), (1, 4096), jnp.float32).astype(jnp.bfloat16)
  xd = jax.random.normal(jax.random.key(98), (1, 11008), jnp.float32).astype(jnp.bfloat16)
  q = jax.random.normal(jax.random.key(97), (1, 32, 128), jnp.bfloat16)
  L, length, nf = 131136, 131072, 32
  lengths = jnp.full((1,), length, jnp.int32)
  empty_ring = jnp.zeros((1, 320, 0, 128), jnp.bfloat16)
  ring_pos = jnp.zeros((1, 320), jnp.int32)
  gemv_layers = jax.jit(lambda x, ws: [gemv_mgpu.gemv_multi(x, w) for w in ws])
  attn = jax.jit(lambda q, k, v: duo_decode_attention(q, k, v, lengths, empty_ring, empty_ring, ring_pos,
                                                       sink=64, window=256, impl="pallas"))
  xsum = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  for di, dist in enumerate(args.dists):
    k = jax.random.fold_in(key, di)
    if "gemv qkv" in args.kernels:
      ws = [tuple(fill(dist, jax.random.fold_in(k, 10 * i + j), (4096, 4096)) for j in range(3)) for i in range(8)]
      cases.append(("gemv qkv", dist, gemv_layers, (x, ws), 8 * 3 * 4096 * 4096 * 2, "host"))
    if "gemv down" in args.kernels:
      ws = [(fill(dist, jax.random.fold_in(k, 100 + i), (11008, 4096)),) for i in range(8)]
      cases.append(("gemv down", dist, gemv_layers, (xd, ws), 8 * 11008 * 4096 * 2, "host"))
    if "attn full" in args.kernels:
      kc = fill(dist, jax.random.fold_in(k, 200), (1, L, nf, 128))
      vc = fill(dist, jax.random.fold_in(k, 201), (1, L, nf, 128))
      cases.append(("attn full", dist, attn, (q, kc, vc), 2 * length * nf * 128 * 2, "loop"))
    if "xla sum" in args.kernels:
      a = fill(dist, jax.random.fold_in(k, 300), (512 * 1024 * 1024,))
      cases.append(("xla sum", dist, xsum, (a,), a.size * 2, "host"))

  for c in cases:  # compile and warm
    jax.block_until_ready(c[2](*c[3]))

  def timer(fn, fargs, kind):
    if kind == "loop":
      return lambda: timeit_loop(fn, *fargs, n=20, reps=3)
    return lambda: statistics.median(chunk_samples(fn, fargs, warmup=1, samples=3, inner=10)) * 1e3
  samples = round_robin([timer(fn, fargs, kind) for _, _, fn, fargs, _, kind in cases], args.rounds)

  rows = []
  print(f"{'kernel':>10} {'data':>6} {'us':>9} {'TB/s':>6}")
  for i, (kern, dist, _, _, nbytes, kind) in enumerate(cases):
    ms = statistics.median(samples[i])
    per = 8 if kern.startswith("gemv") else 1
    rows.append(dict(kernel=kern, data=dist, timer=kind, bytes=nbytes, ms=ms, us_per_unit=ms * 1e3 / per,
                     tb_s=nbytes / (ms * 1e-3) / 1e12, samples_ms=samples[i]))
    print(f"{kern:>10} {dist:>6} {ms * 1e3 / per:9.1f} {nbytes / (ms * 1e-3) / 1e12:6.2f}", flush=True)
  write_result(args.out, "data_rate_probe",
               note="same kernels and shapes, streamed array filled five ways; us per layer for the GEMV rows",
               rows=rows)

if __name__ == "__main__":
  main()
