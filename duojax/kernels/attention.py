"""Public duo attention entry point: the Hopper Pallas kernel where it can run, the pure-JAX reference elsewhere."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from duojax.kernels.hardware import resolve_impl
from duojax.kernels.reference import duo_attention_reference
from duojax.kernels.validation import KERNEL_HEAD_DIMS, check_attention_args

__all__ = ["duo_attention"]

_IMPLS = ("auto", "pallas", "reference", "interpret")


def _kernel_head_dim(d: int) -> int:
  for size in KERNEL_HEAD_DIMS:
    if d <= size:
      return size
  raise ValueError(
      f"head_dim {d} is larger than the kernel supports (head dims {KERNEL_HEAD_DIMS}; smaller ones are "
      "zero-padded to the next of these). Use impl='reference'.")


def duo_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, num_full_kv_heads: int, sink: int, window: int,
                  q_offset: int = 0, sm_scale: float | None = None, impl: str = "auto"):
  """DuoAttention prefill: full causal attention on retrieval heads, sink + window attention on the rest.

  Args:
    q: ``[B, Sq, Hq, D]`` queries (bfloat16 or float16 for the kernel; the reference also takes float32).
    k, v: ``[B, Sk, Hkv, D]`` keys and values with ``Sk = q_offset + Sq`` (the cache holds the ``q_offset``
      earlier tokens followed by the ``Sq`` new ones); ``Hq % Hkv == 0``. Query head ``h`` reads KV head
      ``h // (Hq // Hkv)`` (grouped-query attention).
    num_full_kv_heads: ``nf``; KV heads ``[0, nf)`` are retrieval (full causal) heads, ``[nf, Hkv)`` streaming
      heads. ``0 <= nf <= Hkv``.
    sink: number of leading tokens every streaming query sees (``>= 0``).
    window: a streaming query sees the last ``window`` tokens up to and including its own (``>= 1``).
    q_offset: position of the first query (a Python int ``>= 0``); query ``i`` is at ``q_offset + i``.
    sm_scale: score scale, default ``1 / sqrt(D)`` (of the caller's D, also when D is padded inside).
    impl: ``"auto"`` (the Pallas Mosaic-GPU kernel on a Hopper GPU, else the reference with one warning),
      ``"pallas"`` (the kernel; raises off Hopper), ``"reference"`` (pure JAX) or ``"interpret"`` (the kernel
      through Mosaic-GPU's CPU interpreter: slow, for tests).

  Mask: query at position ``p = q_offset + i`` sees key ``j`` iff ``j <= p`` and, on a streaming head,
  ``j < sink or j > p - window``. Lengths need no rounding: the kernel pads internally.

  Returns:
    ``(out, lse)``: ``out`` ``[B, Sq, Hq, D]`` in ``q.dtype``; ``lse`` ``[B, Hq, Sq]`` float32, the natural-log
    log-sum-exp of each row's scaled visible scores.

  Raises:
    ValueError: bad shapes, dtypes, head counts, ``num_full_kv_heads``, ``sink``, ``window``, ``q_offset``,
      ``Sk != q_offset + Sq`` or an unknown ``impl``.
    RuntimeError: ``impl="pallas"`` without a Hopper GPU.
  """
  if impl not in _IMPLS:
    raise ValueError(f"impl must be one of {_IMPLS}; got {impl!r}")
  check_attention_args(q, k, v, num_full_kv_heads=num_full_kv_heads, sink=sink, window=window,
                       check_dtype=impl in ("pallas", "interpret"))
  if not isinstance(q_offset, int) or isinstance(q_offset, bool) or q_offset < 0:
    raise ValueError(f"q_offset must be a Python int >= 0 (position of the first query); got {q_offset!r}")
  Sq, D = q.shape[1], q.shape[3]
  if k.shape[1] != q_offset + Sq:
    raise ValueError(
        f"k/v length must be q_offset + Sq = {q_offset} + {Sq} = {q_offset + Sq}; got {k.shape[1]}")
  if sm_scale is not None:
    sm_scale = float(sm_scale)
  if impl == "interpret":
    path = "interpret"
  else:
    path = resolve_impl(impl, "duo_attention")
    if path == "pallas" and not any(q.dtype == d for d in (jnp.bfloat16, jnp.float16)):
      if impl == "pallas":
        raise ValueError(f"the Pallas kernel takes bfloat16 or float16; got {q.dtype}")
      path = "reference"  # auto: float32 inputs run the reference
  if path == "reference":
    return duo_attention_reference(q, k, v, num_full_kv_heads=num_full_kv_heads, sink=sink, window=window,
                                   q_offset=q_offset, sm_scale=sm_scale)

  from duojax.kernels.prefill_mgpu import duo_prefill_mgpu  # noqa: PLC0415 (keeps Pallas off the import path)

  dk = _kernel_head_dim(D)
  scale = (1.0 / math.sqrt(D)) if sm_scale is None else sm_scale
  if dk != D:
    pad = ((0, 0), (0, 0), (0, 0), (0, dk - D))
    q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
  out, lse = duo_prefill_mgpu(q, k, v, num_full_kv_heads=num_full_kv_heads, sink=sink, window=window,
                              q_offset=q_offset, sm_scale=scale, interpret=path == "interpret")
  if dk != D:
    out = out[..., :D]
  return out, lse
