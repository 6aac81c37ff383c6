"""Pure-JAX duo *decode* attention over the duo KV cache: the spec every decode kernel is tested against.

Cache layout (one layer):

* retrieval (full) KV heads: ``k_full``, ``v_full`` ``[B, L, nf, D]``; ``lengths`` ``[B]`` int32 is the number
  of valid positions of each sequence, the current token included (already appended). The query sits at
  position ``p = lengths[b] - 1`` and sees keys ``t < lengths[b]``.
* streaming KV heads: ``k_ring``, ``v_ring`` ``[B, R, ns, D]`` with ``R = sink + window`` slots and
  ``ring_pos`` ``[B, R]`` int32, the position stored in each slot (``-1`` for an empty slot). A slot is visible
  iff ``0 <= pos <= p`` and (``pos < sink`` or ``pos > p - window``).
* ``q`` ``[B, Hq, D]``, one token per sequence; ``G = Hq // (nf + ns)`` query heads per KV head; query heads
  ``[0, nf*G)`` are retrieval heads, ``[nf*G, Hq)`` streaming heads.

Softmax in float32. Returns ``out`` ``[B, Hq, D]`` in ``q.dtype`` and ``lse`` ``[B, Hq]`` float32 (natural log;
``-inf`` for a row that sees nothing, whose output is 0).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from duojax.kernels.reference import visible_mask

__all__ = ["duo_decode_reference", "decode_streaming_visible"]


def decode_streaming_visible(ring_pos, lengths, *, sink: int, window: int):
  """``[B, R]`` bool: which ring slots the current query (position ``lengths - 1``) sees."""
  p = (lengths.astype(jnp.int32) - 1)[:, None]
  return visible_mask(p, ring_pos.astype(jnp.int32), True, sink=sink, window=window)


def attend(q, k, v, visible, scale, *, low_precision: bool = False):
  """Softmax attention of grouped decode queries over a cache, rows that see nothing give 0 (lse ``-inf``).

  q ``[B, H, G, D]``, k/v ``[B, S, H, D]``, visible ``[B, S]`` bool -> out ``[B, H, G, D]`` f32, lse ``[B, H, G]``.
  Softmax is float32. ``low_precision``: the matmuls run in k/v's dtype (q and P cast to it) with float32
  accumulation, as a bf16/fp16 kernel would; otherwise everything is float32 at HIGHEST precision (reference).
  """
  if low_precision:
    mm = dict(preferred_element_type=jnp.float32)
    q = q.astype(k.dtype)
  else:
    mm = dict(precision=jax.lax.Precision.HIGHEST)
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  s = jnp.einsum("bhgd,bshd->bhgs", q, k, **mm)
  s = jnp.where(visible[:, None, None, :], s * scale, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m_safe)
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum("bhgs,bshd->bhgd", p.astype(v.dtype), v, **mm)
  o = o / jnp.where(l == 0, 1.0, l)[..., None]
  lse = jnp.where(l > 0, m_safe[..., 0] + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
  return o, lse


def merge_heads(outs, lses, shape, dtype):
  """Per-kind parts ``[B, h, G, D]`` / ``[B, h, G]`` (retrieval heads first) -> out ``shape`` = ``[B, Hq, D]`` in
  ``dtype`` and lse ``[B, Hq]``."""
  B, Hq, _ = shape
  out = jnp.concatenate(outs, axis=1).reshape(shape).astype(dtype)
  lse = jnp.concatenate(lses, axis=1).reshape(B, Hq)
  return out, lse


def duo_decode_reference(q, k_full, v_full, lengths, k_ring, v_ring, ring_pos, *, sink: int, window: int,
                         sm_scale: float | None = None):
  """Duo decode attention in plain JAX (see the module docstring for shapes and the mask).

  Returns ``(out [B, Hq, D] q.dtype, lse [B, Hq] float32)``. Shapes are assumed valid (``duo_decode_attention``
  checks them).
  """
  B, Hq, D = q.shape
  nf = k_full.shape[2]
  ns = k_ring.shape[2]
  G = Hq // (nf + ns)
  scale = (1.0 / math.sqrt(D)) if sm_scale is None else float(sm_scale)
  qf = q.astype(jnp.float32).reshape(B, nf + ns, G, D)
  lengths = lengths.astype(jnp.int32)
  outs, lses = [], []
  if nf:
    L = k_full.shape[1]
    vis = jnp.arange(L, dtype=jnp.int32)[None, :] < lengths[:, None]
    o, lse = attend(qf[:, :nf], k_full, v_full, vis, scale)
    outs.append(o)
    lses.append(lse)
  if ns:
    vis = decode_streaming_visible(ring_pos, lengths, sink=sink, window=window)
    o, lse = attend(qf[:, nf:], k_ring, v_ring, vis, scale)
    outs.append(o)
    lses.append(lse)
  return merge_heads(outs, lses, (B, Hq, D), q.dtype)
