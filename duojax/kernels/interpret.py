"""Mosaic-GPU interpret mode on the CPU: its parameters, and guards against two ways it deadlocks.

The interpreter runs each warpgroup of a CTA as its own XLA CPU computation on its own Python thread, and the
warpgroups block on each other's barriers inside host callbacks. XLA may run those computations on its CPU
thread pool, whose size is ``PJRT_NPROC`` (else ``NPROC``, else the number of CPUs this process may use). When
the pool has fewer threads than the computations that must run at once, a warpgroup waits on a barrier that
the queued one would arrive on, and the call never returns (seen with one CPU: the 3-warpgroup prefill
kernel hangs; with ``PJRT_NPROC=2`` or more it finishes). The pool is sized once, when JAX's CPU backend
starts, so the fix is an environment variable set before that; this module only warns.

A second hazard: the interpreter's callbacks run JAX operations of their own. With asynchronous CPU dispatch
(JAX's default) an eager interpreted decode called twice in a row hangs, the caller's thread and a callback
thread both waiting in XLA's CPU executable semaphore (reproduced in a loop; waiting for the kernel's outputs
before returning does not prevent it). With ``jax.config.update("jax_cpu_enable_async_dispatch", False)``, set
before the first computation (:func:`use_synchronous_cpu_dispatch`), 80 such calls ran; the tests and the CPU
smoke modes of the benchmarks run that way, and this module warns when it is on.
"""

from __future__ import annotations

import functools
import os
import warnings

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu

# XLA's CPU client reads these, first match wins, when it creates its thread pool.
POOL_SIZE_VARIABLES = ("PJRT_NPROC", "NPROC")


def cpu_pool_size() -> int:
  """The size of XLA's CPU thread pool in this process (as XLA computes it; see the module docstring)."""
  for name in POOL_SIZE_VARIABLES:
    value = os.environ.get(name, "")
    if value.strip().isdigit():
      return int(value)
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


@functools.lru_cache(maxsize=None)
def _warn_small_pool(pool: int, needed: int) -> None:
  warnings.warn(
      f"duojax: Mosaic-GPU interpret mode runs {needed - 1} warpgroups at once on XLA's CPU thread pool, which "
      f"has {pool} thread(s) here; with fewer than {needed} the interpreter can deadlock. Set PJRT_NPROC={needed} "
      "(or more) in the environment before JAX starts.", RuntimeWarning, stacklevel=4)


def use_synchronous_cpu_dispatch() -> None:
  """Turns off JAX's asynchronous CPU dispatch, under which the interpreter can hang (module docstring). Call it
  before the first computation: the CPU backend reads the setting when it starts."""
  jax.config.update("jax_cpu_enable_async_dispatch", False)


@functools.lru_cache(maxsize=None)
def _warn_async_dispatch() -> None:
  warnings.warn(
      "duojax: Mosaic-GPU interpret mode can hang under JAX's asynchronous CPU dispatch (the interpreter's "
      "callbacks run JAX operations of their own); call jax.config.update('jax_cpu_enable_async_dispatch', False) "
      "(duojax.kernels.interpret.use_synchronous_cpu_dispatch) before the first computation.", RuntimeWarning,
      stacklevel=4)


def interpret_params(num_warpgroups: int) -> plgpu.InterpretGPUParams:
  """``InterpretGPUParams`` for a kernel with ``num_warpgroups`` warpgroups per CTA.

  Warns once when XLA's CPU thread pool is smaller than ``num_warpgroups + 1`` (the warpgroups plus the
  computation that launched them), the size below which the interpreter can deadlock, and once when JAX's
  asynchronous CPU dispatch is on (see the module docstring).
  """
  needed = num_warpgroups + 1
  pool = cpu_pool_size()
  if num_warpgroups > 1 and pool < needed:
    _warn_small_pool(pool, needed)
  if jax.config.values.get("jax_cpu_enable_async_dispatch", False):
    _warn_async_dispatch()
  return plgpu.InterpretGPUParams()
