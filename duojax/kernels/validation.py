"""Argument checks shared by every attention path. Each error names the value and what is allowed."""

from __future__ import annotations

import jax.numpy as jnp

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
KERNEL_DTYPES = (jnp.bfloat16, jnp.float16)
KERNEL_HEAD_DIMS = (64, 128, 256)


def check_sink_window(sink, window) -> None:
  if not isinstance(sink, int) or isinstance(sink, bool) or sink < 0:
    raise ValueError(f"sink must be an int >= 0 (number of leading tokens streaming heads keep); got {sink!r}")
  if not isinstance(window, int) or isinstance(window, bool) or window < 1:
    raise ValueError(f"window must be an int >= 1 (number of recent tokens streaming heads keep); got {window!r}")


def check_attention_args(q, k, v, *, num_full_kv_heads, sink, window, check_dtype=True) -> None:
  """Validates shapes ``q [B, Sq, Hq, D]``, ``k/v [B, Sk, Hkv, D]``, head counts, sink, window, dtypes."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        f"q, k, v must be 4-D [batch, seq, heads, head_dim]; got q{tuple(q.shape)}, k{tuple(k.shape)}, "
        f"v{tuple(v.shape)}")
  B, _, Hq, D = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got k{tuple(k.shape)} and v{tuple(v.shape)}")
  if k.shape[0] != B or k.shape[3] != D:
    raise ValueError(
        f"k/v batch and head_dim must match q's (batch {B}, head_dim {D}); got k{tuple(k.shape)}")
  Hkv = k.shape[2]
  if Hkv < 1 or Hq % Hkv != 0:
    raise ValueError(
        f"the number of query heads ({Hq}) must be a multiple of the number of KV heads ({Hkv})")
  if (not isinstance(num_full_kv_heads, int) or isinstance(num_full_kv_heads, bool)
      or not 0 <= num_full_kv_heads <= Hkv):
    raise ValueError(
        f"num_full_kv_heads must be an int in [0, {Hkv}] (the number of KV heads); got {num_full_kv_heads!r}")
  check_sink_window(sink, window)
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(f"q, k, v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
  allowed = KERNEL_DTYPES if check_dtype else SUPPORTED_DTYPES
  if not any(q.dtype == d for d in allowed):
    names = ", ".join(jnp.dtype(d).name for d in allowed)
    raise ValueError(f"unsupported dtype {q.dtype}; allowed: {names}")
