"""Host-side timing shared by the benchmarks: chunks of back-to-back jitted calls.

A sample is the wall time of ``inner`` calls issued back to back and then synchronised, divided by ``inner``; the
GPU runs the calls without waiting for the host as long as the host stays ahead.
"""

from __future__ import annotations

import time

import jax


def chunk_samples(fn, args, *, warmup: int, samples: int, inner: int) -> list[float]:
  """``samples`` per-call times in seconds, each from a chunk of ``inner`` calls, after ``warmup`` calls."""
  out = None
  for _ in range(warmup):
    out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(samples):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
  return times


def calls_per_chunk(fn, args, *, target_s: float = 0.02, max_calls: int = 1000) -> int:
  """Calls that make a chunk of about ``target_s``, from 10 back-to-back calls (a single call's time would
  include the launch and sync latency and give fast kernels short chunks)."""
  one = min(chunk_samples(fn, args, warmup=0, samples=1, inner=10))
  return int(min(max_calls, max(1, target_s / max(one, 1e-6))))


def round_robin(timers, rounds: int) -> list[list[float]]:
  """``rounds`` samples from each zero-argument timer, taken round-robin: every round calls each timer once, in
  order on even rounds and reversed on odd ones, so that clock drift hits every variant alike. Returns each
  timer's samples."""
  samples = [[] for _ in timers]
  order = list(range(len(timers)))
  for rnd in range(rounds):
    for i in (order if rnd % 2 == 0 else order[::-1]):
      samples[i].append(timers[i]())
  return samples
