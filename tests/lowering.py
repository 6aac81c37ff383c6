"""Lowering the GPU path for CUDA on a CPU-only machine: ``jax.export`` for another platform runs every
lowering rule of the Mosaic-GPU kernels (not the interpreter), so GPU-only lowering errors fail in CI."""

from __future__ import annotations

import jax
from jax import export


def mosaic_gpu_launches(fn, *args, **kwargs) -> int:
  """Exports ``fn`` (jitted if it is not) for CUDA and returns how many Mosaic-GPU kernel calls its module has."""
  jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
  exported = export.export(jitted, platforms=["cuda"])(*args, **kwargs)
  assert exported.platforms == ("cuda",)
  return exported.mlir_module().count("custom_call @mosaic_gpu")
