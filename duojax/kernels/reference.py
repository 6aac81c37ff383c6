"""Pure-JAX duo attention: the semantic definition every kernel is tested against.

Layout and mask (fixed for every path in duojax):

* ``q``: ``[B, Sq, Hq, D]``; ``k``, ``v``: ``[B, Sk, Hkv, D]``; ``Hq % Hkv == 0`` (GQA: query head ``h``
  reads KV head ``h // (Hq // Hkv)``).
* KV heads ``[0, num_full_kv_heads)`` are *retrieval* heads; the rest are *streaming* heads.
* Query ``i`` sits at position ``q_offset + i``; key ``j`` at position ``j`` (or ``k_positions[b, j]``
  when given, e.g. for a ring cache; negative positions mark empty slots and are never visible).
* A query at position ``p`` sees a key at position ``t`` iff ``0 <= t <= p`` and, on a streaming head,
  ``t < sink or t > p - window``.
* Softmax in float32; returns ``out`` ``[B, Sq, Hq, D]`` in ``q.dtype`` and ``lse`` ``[B, Hq, Sq]`` float32,
  the natural-log log-sum-exp of the scaled scores of each row (``-inf`` for a row that sees nothing, whose
  output is 0).

Memory is O(block_q * Sk) per step, not O(Sq * Sk): queries are processed in blocks with ``lax.map``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from duojax.kernels.validation import check_attention_args

__all__ = ["duo_attention_reference", "visible_mask"]


def visible_mask(q_pos, k_pos, streaming, *, sink: int, window: int):
  """The duo mask. ``q_pos`` ``[..., Sq, 1]``, ``k_pos`` ``[..., 1, Sk]``, ``streaming`` broadcastable bool.

  Returns a boolean array, True where the key is visible to the query.
  """
  causal = (k_pos <= q_pos) & (k_pos >= 0)
  local = (k_pos < sink) | (k_pos > q_pos - window)
  return causal & (jnp.logical_not(streaming) | local)


def duo_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    num_full_kv_heads: int,
    sink: int,
    window: int,
    q_offset=0,
    k_positions: jax.Array | None = None,
    sm_scale: float | None = None,
    block_q: int = 256,
) -> tuple[jax.Array, jax.Array]:
  """Duo attention in plain JAX (see the module docstring for shapes and the mask).

  Args:
    q, k, v: ``[B, Sq, Hq, D]``, ``[B, Sk, Hkv, D]``, ``[B, Sk, Hkv, D]``.
    num_full_kv_heads: number of leading retrieval KV heads, ``0 <= nf <= Hkv``.
    sink: number of leading positions every streaming query sees, ``>= 0``.
    window: streaming queries see the last ``window`` positions up to their own, ``>= 1``.
    q_offset: position of the first query; an int, a scalar array or a ``[B]`` array (per sequence).
    k_positions: optional ``[B, Sk]`` int positions of the keys (default ``arange(Sk)``).
    sm_scale: score scale, default ``1 / sqrt(D)``.
    block_q: queries per step (memory knob only; the result does not depend on it).

  Returns:
    ``(out [B, Sq, Hq, D] q.dtype, lse [B, Hq, Sq] float32)``.
  """
  check_attention_args(q, k, v, num_full_kv_heads=num_full_kv_heads, sink=sink, window=window,
                       check_dtype=False)
  B, Sq, Hq, D = q.shape
  Sk, Hkv = k.shape[1], k.shape[2]
  G = Hq // Hkv
  scale = (1.0 / math.sqrt(D)) if sm_scale is None else float(sm_scale)

  bq = max(1, min(block_q, Sq))
  nb = -(-Sq // bq)
  pad = nb * bq - Sq
  qf = q.astype(jnp.float32) * scale
  qf = jnp.pad(qf, ((0, 0), (0, pad), (0, 0), (0, 0)))
  qf = qf.reshape(B, nb, bq, Hkv, G, D).transpose(1, 0, 2, 3, 4, 5)  # [nb, B, bq, Hkv, G, D]
  kf = k.astype(jnp.float32)
  vf = v.astype(jnp.float32)

  q_offset = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (B,))
  if k_positions is None:
    k_pos = jnp.broadcast_to(jnp.arange(Sk, dtype=jnp.int32), (B, Sk))
  else:
    if k_positions.shape != (B, Sk):
      raise ValueError(f"k_positions must have shape {(B, Sk)} (batch, keys); got {k_positions.shape}")
    k_pos = k_positions.astype(jnp.int32)
  streaming = (jnp.arange(Hkv) >= num_full_kv_heads)[None, :, None, None, None]  # [1, Hkv, 1, 1, 1]

  def one_block(args):
    qb, start = args  # [B, bq, Hkv, G, D], scalar
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qb, kf, precision=jax.lax.Precision.HIGHEST)
    q_pos = q_offset[:, None] + start + jnp.arange(bq, dtype=jnp.int32)[None, :]  # [B, bq]
    mask = visible_mask(q_pos[:, None, None, :, None], k_pos[:, None, None, None, :], streaming,
                        sink=sink, window=window)
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, vf, precision=jax.lax.Precision.HIGHEST)
    l_q = l[..., 0]  # [B, Hkv, G, bq]
    o = o / jnp.where(l_q == 0, 1.0, l_q).transpose(0, 3, 1, 2)[..., None]
    lse = jnp.where(l_q > 0, m_safe[..., 0] + jnp.log(jnp.where(l_q > 0, l_q, 1.0)), -jnp.inf)
    return o, lse

  starts = jnp.arange(nb, dtype=jnp.int32) * bq
  o, lse = jax.lax.map(one_block, (qf, starts))  # [nb, B, bq, Hkv, G, D], [nb, B, Hkv, G, bq]
  out = o.transpose(1, 0, 2, 3, 4, 5).reshape(B, nb * bq, Hq, D)[:, :Sq]
  lse = lse.transpose(1, 2, 3, 0, 4).reshape(B, Hq, nb * bq)[:, :, :Sq]
  return out.astype(q.dtype), lse
