"""One functional dense for every projection: a plain ``kernel`` or SVD factors ``u``, ``v``."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

PARAM_NAMES = ("kernel", "u", "v", "bias")
GEMV_MAX_ROWS = 16  # decode-sized inputs: at most this many rows take the Mosaic-GPU GEMV on the kernel path
GEMV_MIN_MATRICES = 1  # and only launches of at least this many projections (q/k/v, gate/up: 2+)


def dense(params: Mapping[str, jax.Array], x: jax.Array, *, dtype=None) -> jax.Array:
  """``y = x @ kernel (+ bias)`` or, for SVD-factored weights, ``y = (x @ u) @ v (+ bias)``.

  Shapes: ``x [..., in]``; ``kernel [in, out]``; ``u [in, rank]``, ``v [rank, out]``; ``bias [out]``.
  Computes in ``dtype`` (default ``x.dtype``) with float32 accumulation.
  """
  dtype = dtype or x.dtype
  x = x.astype(dtype)
  has_bias = params.get("bias") is not None
  if "kernel" in params:
    if "u" in params or "v" in params:
      raise ValueError("a dense layer holds either 'kernel' or the factors 'u' and 'v', not both")
    # Without a bias, a dot that outputs ``dtype`` directly (XLA still accumulates in float32 and rounds once,
    # as the cast below would). On an H200 XLA then picks faster batch-1 GEMVs: 36% less GEMV time per Llama-2-7B
    # decode step (benchmarks/profile_decode.py), 3-50% standalone (benchmarks/bench_gemv.py).
    y = jnp.einsum("...i,io->...o", x, params["kernel"].astype(dtype),
                   preferred_element_type=jnp.float32 if has_bias else None)
  elif "u" in params and "v" in params:
    h = jnp.einsum("...i,ir->...r", x, params["u"].astype(dtype), preferred_element_type=jnp.float32)
    y = jnp.einsum("...r,ro->...o", h.astype(dtype), params["v"].astype(dtype),
                   preferred_element_type=jnp.float32)
  else:
    raise ValueError(f"a dense layer needs 'kernel' or both 'u' and 'v'; got {sorted(params)}")
  if has_bias:
    y = y.astype(jnp.float32) + params["bias"].astype(jnp.float32)
  return y.astype(dtype)


def _gemv_applies(params_list, x, dtype) -> bool:
  from duojax.kernels.gemv_mgpu import gemv_supported  # noqa: PLC0415 (Mosaic-GPU imports only when asked)
  rows = math.prod(x.shape[:-1])
  if rows > GEMV_MAX_ROWS or len(params_list) < GEMV_MIN_MATRICES:
    return False
  for p in params_list:
    if set(k for k in p if p[k] is not None) != {"kernel"}:
      return False
    w = p["kernel"]
    if w.dtype != dtype or not gemv_supported(rows, w.shape[0], w.shape[1], dtype):
      return False
  return True


def dense_group(params_list, x: jax.Array, *, dtype=None, impl: str = "reference") -> list[jax.Array]:
  """``[dense(p, x) for p in params_list]`` (projections of one input, e.g. q, k, v or gate, up).

  On the kernel path (``impl`` "auto" or "pallas" on a Hopper GPU), decode-sized inputs (at most
  ``GEMV_MAX_ROWS`` rows) with plain bias-free ``kernel`` weights in the compute dtype run as ONE Mosaic-GPU
  GEMV launch (:func:`duojax.kernels.gemv_mgpu.gemv_multi`: float32 accumulation, one rounding, as ``dense``).
  Only on a single-device process: weights sharded over a mesh keep XLA's partitioned dot (a custom call would
  gather them). Anything else runs :func:`dense` per projection.
  """
  dtype = jnp.dtype(dtype or x.dtype)
  if impl in ("auto", "pallas") and jax.device_count() == 1:
    from duojax.kernels.hardware import hopper_device_kind  # noqa: PLC0415
    if hopper_device_kind() is not None and _gemv_applies(params_list, x, dtype):
      from duojax.kernels.gemv_mgpu import gemv_multi  # noqa: PLC0415
      lead = x.shape[:-1]
      ys = gemv_multi(x.astype(dtype).reshape(-1, x.shape[-1]), [p["kernel"] for p in params_list])
      return [y.reshape(*lead, y.shape[-1]) for y in ys]
  return [dense(p, x, dtype=dtype) for p in params_list]
