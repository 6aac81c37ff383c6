"""Batch-1 decode projections (GEMV, y[1, N] = x[1, K] @ W[K, N], bf16) in XLA: weight bytes read per second for
the formulations XLA may pick a kernel for, at the Llama-7B/8B projection shapes. Decode reads every weight once
per token, so this rate bounds the non-attention part of the per-token latency.

    python benchmarks/bench_gemv.py
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp


def einsum_f32acc(x, w):
  return jnp.einsum("bi,io->bo", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def mul_reduce(x, w):
  return jnp.sum(x.astype(jnp.float32)[:, :, None] * w.astype(jnp.float32)[None], axis=1).astype(x.dtype)


def einsum_bf16out(x, w):
  return jnp.einsum("bi,io->bo", x, w)


VARIANTS = {"einsum_f32acc": einsum_f32acc, "mul_reduce": mul_reduce, "einsum_bf16out": einsum_bf16out}


def bench(fn, x, w, iters=50):
  f = jax.jit(fn)
  jax.block_until_ready(f(x, w))
  samples = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(iters):
      y = f(x, w)
    jax.block_until_ready(y)
    samples.append((time.perf_counter() - t0) / iters)
  return statistics.median(samples)


def main():
  rows = []
  for K, N in ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (4096, 32000)):
    w = (0.02 * jax.random.normal(jax.random.key(0), (K, N), jnp.float32)).astype(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (1, K), jnp.float32).astype(jnp.bfloat16)
    ref = einsum_f32acc(x, w).astype(jnp.float32)
    for name, fn in VARIANTS.items():
      t = bench(fn, x, w)
      err = float(jnp.max(jnp.abs(fn(x, w).astype(jnp.float32) - ref)))
      rows.append(dict(K=K, N=N, variant=name, us=t * 1e6, tb_s=w.nbytes / t / 1e12, max_abs_diff=err))
      print(f"K={K:>6} N={N:>6} {name:>16}: {t * 1e6:8.1f} us  {w.nbytes / t / 1e12:5.2f} TB/s  diff {err:.2e}",
            flush=True)
  out = os.environ.get("OUT")
  if out:
    with open(os.path.join(out, "gemv.json"), "w") as f:
      json.dump(dict(device=jax.devices()[0].device_kind, jax_version=jax.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
