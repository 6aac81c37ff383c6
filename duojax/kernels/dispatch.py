"""The one attention dispatch the model uses: reference on any backend, Mosaic-GPU kernels on Hopper.

A layer's layout is a per-KV-head tuple ``full`` (True = retrieval head). Kernels and the reference take the
retrieval heads first (``num_full_kv_heads``); any other layout (e.g. retrieval-first inside each
tensor-parallel shard) is gathered into that order here and scattered back.
"""

from __future__ import annotations

import numpy as np

from duojax.kernels.hardware import resolve_impl
from duojax.kernels.reference import duo_attention_reference


def retrieval_first_order(full: tuple[bool, ...]) -> np.ndarray:
  """KV-head indices with retrieval heads first, stable within each kind."""
  full = np.asarray(full, bool)
  return np.concatenate([np.flatnonzero(full), np.flatnonzero(~full)]).astype(np.int32)


def duo_attention_any(q, k, v, *, num_full_kv_heads: int, sink: int, window: int, q_offset=0,
                      impl: str = "auto"):
  """``(out, lse)`` of duo attention with retrieval heads first, on the path ``impl`` picks."""
  if resolve_impl(impl) == "reference":
    return duo_attention_reference(q, k, v, num_full_kv_heads=num_full_kv_heads, sink=sink, window=window,
                                   q_offset=q_offset)
  from duojax.kernels.attention import duo_attention  # Mosaic-GPU; imported only on Hopper
  return duo_attention(q, k, v, num_full_kv_heads=num_full_kv_heads, sink=sink, window=window,
                       q_offset=q_offset, impl=impl)  # "auto" lets float32 inputs fall back to the reference


def prefill_attention(q, k, v, *, full: tuple[bool, ...], sink: int, window: int, q_offset=0,
                      impl: str = "auto"):
  """Duo attention output ``[B, Sq, Hq, D]`` for ``q [B, Sq, Hq, D]``, ``k/v [B, Sk, Hkv, D]``.

  ``full[h]`` marks KV head ``h`` as a retrieval head. Key ``j`` is at position ``j``, query ``i`` at
  ``q_offset + i``; the duo mask of :mod:`duojax.kernels.reference` applies.
  """
  Hkv = k.shape[2]
  if len(full) != Hkv:
    raise ValueError(f"layout has {len(full)} KV heads but k has {Hkv}")
  order = retrieval_first_order(full)
  nf = int(sum(full))
  if np.array_equal(order, np.arange(Hkv)):
    out, _ = duo_attention_any(q, k, v, num_full_kv_heads=nf, sink=sink, window=window, q_offset=q_offset,
                               impl=impl)
    return out
  G = q.shape[2] // Hkv
  q_order = (order[:, None] * G + np.arange(G)[None, :]).reshape(-1)
  out, _ = duo_attention_any(q[:, :, q_order], k[:, :, order], v[:, :, order], num_full_kv_heads=nf,
                             sink=sink, window=window, q_offset=q_offset, impl=impl)
  return out[:, :, np.argsort(q_order)]
