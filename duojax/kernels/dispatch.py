"""The one attention dispatch the model uses: reference on any backend, Mosaic-GPU kernels on Hopper."""

from __future__ import annotations

from duojax.kernels.hardware import resolve_impl
from duojax.kernels.reference import duo_attention_reference


def prefill_attention(q, k, v, *, num_full_kv_heads: int, sink: int, window: int, q_offset: int = 0,
                      impl: str = "auto"):
  """Duo attention output ``[B, Sq, Hq, D]`` for ``q [B, Sq, Hq, D]``, ``k/v [B, Sk, Hkv, D]``.

  Key ``j`` is at position ``j``, query ``i`` at ``q_offset + i``; the duo mask of
  :mod:`duojax.kernels.reference` applies. ``impl``: "auto" | "reference" | "pallas".
  """
  if resolve_impl(impl) == "reference":
    out, _ = duo_attention_reference(q, k, v, num_full_kv_heads=num_full_kv_heads, sink=sink, window=window,
                                     q_offset=q_offset)
    return out
  from duojax.kernels.attention import duo_attention  # Mosaic-GPU; imported only on Hopper
  out, _ = duo_attention(q, k, v, num_full_kv_heads=num_full_kv_heads, sink=sink, window=window,
                         q_offset=q_offset, impl="pallas")
  return out
