"""One functional dense for every projection: a plain ``kernel`` or SVD factors ``u``, ``v``."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

PARAM_NAMES = ("kernel", "u", "v", "bias")


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
