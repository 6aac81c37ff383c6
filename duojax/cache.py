"""The duo KV cache and the attention steps that read and fill it (chunked prefill and decode).

Per layer (KV heads in retrieval-first order of that layer's layout):

* retrieval heads: ``k_full``, ``v_full`` ``[B, max_len, nf, D]``; slot ``t`` holds position ``t``.
* streaming heads: a ring of ``sink + window`` slots, ``k_ring``, ``v_ring`` ``[B, sink + window, ns, D]``, and
  ``ring_pos [B, sink + window]`` int32, the position each slot holds (-1: empty). Position ``t`` lives in
  slot ``t`` if ``t < sink`` else ``sink + (t - sink) % window``, so the streaming part is constant in the
  context and the ring evicts exactly the positions the mask no longer shows (``t <= p - window``, ``t >= sink``).

``DuoCache.lengths [B]`` counts the tokens stored per sequence. The mask is the one of
:mod:`duojax.kernels.reference`: query ``p`` sees key ``t`` iff ``t <= p`` and, on a streaming head,
``t < sink or t > p - window``. Chunked prefill followed by decode gives what one forward pass gives.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from duojax.config import DuoSpec, LlamaConfig
from duojax.kernels.dispatch import duo_attention_any, retrieval_first_order


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
  k_full: jax.Array  # [B, max_len, nf, D]
  v_full: jax.Array  # [B, max_len, nf, D]
  k_ring: jax.Array  # [B, sink + window, ns, D]
  v_ring: jax.Array  # [B, sink + window, ns, D]
  ring_pos: jax.Array  # [B, sink + window] int32, -1 = empty


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DuoCache:
  layers: tuple[LayerCache, ...]
  lengths: jax.Array  # [B] int32, tokens stored per sequence

  @property
  def max_len(self) -> int:
    return self.layers[0].k_full.shape[1]

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]


def init_cache(config: LlamaConfig, duo: DuoSpec, batch: int, max_len: int, dtype=jnp.bfloat16) -> DuoCache:
  """An empty cache for ``batch`` sequences of up to ``max_len`` tokens."""
  if batch < 1 or max_len < 1:
    raise ValueError(f"batch and max_len must be >= 1; got batch={batch}, max_len={max_len}")
  D, R = config.head_dim, duo.sink + duo.window
  layers = []
  for full in duo.full:
    nf = sum(full)
    ns = len(full) - nf
    layers.append(LayerCache(
        k_full=jnp.zeros((batch, max_len, nf, D), dtype), v_full=jnp.zeros((batch, max_len, nf, D), dtype),
        k_ring=jnp.zeros((batch, R, ns, D), dtype), v_ring=jnp.zeros((batch, R, ns, D), dtype),
        ring_pos=jnp.full((batch, R), -1, jnp.int32)))
  return DuoCache(tuple(layers), jnp.zeros((batch,), jnp.int32))


def cache_bytes(cache: DuoCache) -> dict[str, int]:
  """Bytes held by the retrieval and the streaming parts of the cache."""
  full = sum(l.k_full.nbytes + l.v_full.nbytes for l in cache.layers)
  ring = sum(l.k_ring.nbytes + l.v_ring.nbytes + l.ring_pos.nbytes for l in cache.layers)
  return {"retrieval": full, "streaming": ring, "total": full + ring}


def ring_slot(pos, sink: int, window: int):
  """Ring slot of position ``pos`` (array or int)."""
  return jnp.where(pos < sink, pos, sink + (pos - sink) % window)


def _split_heads(q, k, v, full):
  """Gathers heads into retrieval-first order; returns (q, k, v, nf, inverse query-head order or None)."""
  Hkv = k.shape[2]
  G = q.shape[2] // Hkv
  order = retrieval_first_order(full)
  nf = int(sum(full))
  if np.array_equal(order, np.arange(Hkv)):
    return q, k, v, nf, None
  q_order = (order[:, None] * G + np.arange(G)[None, :]).reshape(-1)
  return q[:, :, q_order], k[:, :, order], v[:, :, order], nf, np.argsort(q_order)


def _ring_write_chunk(lc: LayerCache, ks, vs, start: int, valid_len, sink: int, window: int):
  """Writes chunk positions ``start + i`` (only those ``< valid_len[b]``) into the ring; keeps the newest."""
  R = sink + window
  C = ks.shape[1]
  slots = jnp.arange(R, dtype=jnp.int32)[None, :]  # [1, R]
  last = jnp.minimum(valid_len, start + C)[:, None] - 1  # [B, 1] last valid position of this chunk
  j = slots - sink
  t_window = last - jnp.mod(last - sink - j, window)  # newest position <= last that maps to slot (s >= sink)
  t = jnp.where(slots < sink, slots, t_window)
  take = (t >= start) & (t <= last) & ((slots < sink) | (t >= sink))  # [B, R]
  idx = jnp.clip(t - start, 0, C - 1)
  new_k = jnp.take_along_axis(ks, idx[:, :, None, None], axis=1).astype(lc.k_ring.dtype)
  new_v = jnp.take_along_axis(vs, idx[:, :, None, None], axis=1).astype(lc.v_ring.dtype)
  sel = take[:, :, None, None]
  return (jnp.where(sel, new_k, lc.k_ring), jnp.where(sel, new_v, lc.v_ring),
          jnp.where(take, t, lc.ring_pos).astype(jnp.int32))


def _ring_in_position_order(start: int, sink: int, window: int) -> tuple[np.ndarray, int]:
  """Ring slots holding positions ``< start`` in increasing position order, and the virtual query offset.

  Before eviction starts (``start <= sink + window``) slot ``t`` holds position ``t``. After, the ring holds
  the sinks ``[0, sink)`` and ``[start - window, start)``; laid out contiguously, the streaming mask on the
  virtual positions (queries from ``sink + window``) is the same as on the real ones.
  """
  if start <= sink + window:
    return np.arange(start), start
  oldest = start - window
  window_slots = sink + (oldest - sink + np.arange(window)) % window
  return np.concatenate([np.arange(sink), window_slots]), sink + window


def chunk_step(q, k, v, lc: LayerCache, *, full, start: int, valid_len, sink: int, window: int, impl: str):
  """Attention for a chunk of ``C`` tokens at static positions ``start .. start + C - 1``, and the new cache.

  ``q [B, C, Hq, D]``, ``k/v [B, C, Hkv, D]`` (heads in the layer's layout order); ``valid_len [B]``: tokens of
  each sequence's prompt (positions past it are padding and are not written into the ring).
  """
  q, k, v, nf, inv = _split_heads(q, k, v, full)
  B, C, Hq, D = q.shape
  G = Hq // k.shape[2]
  max_len = lc.k_full.shape[1]
  if start + C > max_len:
    raise ValueError(f"chunk ends at position {start + C}, past the cache length {max_len}")
  k_full = jax.lax.dynamic_update_slice(lc.k_full, k[:, :, :nf].astype(lc.k_full.dtype), (0, start, 0, 0))
  v_full = jax.lax.dynamic_update_slice(lc.v_full, v[:, :, :nf].astype(lc.v_full.dtype), (0, start, 0, 0))
  if start == 0:
    out, _ = duo_attention_any(q, k, v, num_full_kv_heads=nf, sink=sink, window=window, impl=impl)
  else:
    outs = []
    if nf:
      o, _ = duo_attention_any(q[:, :, :nf * G], k_full[:, :start + C].astype(q.dtype),
                               v_full[:, :start + C].astype(q.dtype), num_full_kv_heads=nf, sink=sink,
                               window=window, q_offset=start, impl=impl)
      outs.append(o)
    if nf < k.shape[2]:
      slots, q_offset = _ring_in_position_order(start, sink, window)
      ks = jnp.concatenate([lc.k_ring[:, slots].astype(q.dtype), k[:, :, nf:]], axis=1)
      vs = jnp.concatenate([lc.v_ring[:, slots].astype(q.dtype), v[:, :, nf:]], axis=1)
      o, _ = duo_attention_any(q[:, :, nf * G:], ks, vs, num_full_kv_heads=0, sink=sink, window=window,
                               q_offset=q_offset, impl=impl)
      outs.append(o)
    out = jnp.concatenate(outs, axis=2)
  k_ring, v_ring, ring_pos = _ring_write_chunk(lc, k[:, :, nf:], v[:, :, nf:], start, valid_len, sink, window)
  if inv is not None:
    out = out[:, :, inv]
  return out, LayerCache(k_full, v_full, k_ring, v_ring, ring_pos)


def _ring_pos_after_write(ring_pos, lengths, sink: int, window: int):
  """``ring_pos [B, R]`` after each sequence writes its token at position ``lengths[b]``."""
  return ring_pos.at[jnp.arange(ring_pos.shape[0]), ring_slot(lengths, sink, window)].set(lengths)


def _write_row(cache, pos, new, *, may_overflow: bool):
  """``cache [B, N, h, D]`` with ``new [B, 1, h, D]`` written at row ``pos[b]``, in place inside the decode loop.

  ``may_overflow``: ``pos[b]`` can reach ``N`` (a full retrieval cache); such a write is dropped and the cache
  keeps its last row. Otherwise ``pos`` is always in ``[0, N)`` (ring slots).

  Batch > 1: a scatter of one row per sequence (a vmapped dynamic_update_slice lowers to a select over the whole
  cache, a full read and write of it every step). Batch 1: dynamic slices, one in-place kernel each. XLA turns a
  one-row scatter into an update guarded by an in-bounds test that reads the old row in a second kernel, whatever
  the scatter mode (HLO scatters always skip out-of-bounds rows); the drop is spelled instead as a dynamic_slice
  and a dynamic_update_slice at one clamped row, which XLA fuses into one kernel."""
  new = new.astype(cache.dtype)
  B, N = cache.shape[:2]
  if B > 1:
    return cache.at[jnp.arange(B), pos].set(new[:, 0], mode="drop")
  if not may_overflow:
    return lax.dynamic_update_slice(cache, new, (0, pos[0], 0, 0))
  row = jnp.minimum(pos[0], N - 1)
  old = lax.dynamic_slice(cache, (0, row, 0, 0), new.shape)
  return lax.dynamic_update_slice(cache, jnp.where(pos[0] < N, new, old), (0, row, 0, 0))


def decode_step(q, k, v, lc: LayerCache, *, full, lengths, sink: int, window: int, impl: str, ring_pos=None):
  """Attention for one new token per sequence at position ``lengths[b]``, and the new cache.

  ``q [B, 1, Hq, D]``, ``k/v [B, 1, Hkv, D]``; ``lengths [B]``: tokens already cached (the new token's position).
  ``ring_pos [B, sink + window]``: the ring positions after this token's write, if already computed (they are
  the same in every layer; :func:`decode` computes them once per step, so the visibility mask derived from
  them is one computation for all layers).
  """
  from duojax.kernels.decode import duo_decode_attention
  q, k, v, nf, inv = _split_heads(q, k, v, full)
  k_full = _write_row(lc.k_full, lengths, k[:, :, :nf], may_overflow=True)
  v_full = _write_row(lc.v_full, lengths, v[:, :, :nf], may_overflow=True)
  slot = ring_slot(lengths, sink, window)
  k_ring = _write_row(lc.k_ring, slot, k[:, :, nf:], may_overflow=False)
  v_ring = _write_row(lc.v_ring, slot, v[:, :, nf:], may_overflow=False)
  if ring_pos is None:
    ring_pos = _ring_pos_after_write(lc.ring_pos, lengths, sink, window)
  out = duo_decode_attention(q[:, 0], k_full, v_full, lengths + 1, k_ring, v_ring, ring_pos, sink=sink,
                             window=window, impl=impl)[:, None]
  if inv is not None:
    out = out[:, :, inv]
  return out, LayerCache(k_full, v_full, k_ring, v_ring, ring_pos)


def prefill_chunk(model, tokens, cache: DuoCache, *, start: int, valid_len, impl: str = "auto",
                  logits_at=None):
  """Runs ``tokens [B, C]`` at positions ``start..start+C-1`` through ``model``, filling ``cache``.

  Returns ``(logits, cache)``: logits ``[B, C, V]``, or ``[B, 1, V]`` at chunk index ``logits_at [B]``.
  """
  B, C = tokens.shape
  positions = jnp.broadcast_to(start + jnp.arange(C, dtype=jnp.int32), (B, C))
  step = functools.partial(chunk_step, start=start, valid_len=valid_len, sink=model.duo.sink,
                           window=model.duo.window, impl=impl)
  logits, layers = model(tokens, positions, cache=cache.layers, cache_step=step, impl=impl, logits_at=logits_at)
  lengths = jnp.clip(valid_len, 0, start + C).astype(jnp.int32)
  return logits, DuoCache(layers, lengths)


def decode(model, tokens, cache: DuoCache, *, impl: str = "auto"):
  """One decode step: ``tokens [B]`` at positions ``cache.lengths``; returns ``(logits [B, V], cache)``."""
  positions = cache.lengths[:, None]
  sink, window = model.duo.sink, model.duo.window
  # Every layer's ring holds the same positions (they depend on the lengths only): update them once.
  ring_pos = _ring_pos_after_write(cache.layers[0].ring_pos, cache.lengths, sink, window)
  step = functools.partial(decode_step, lengths=cache.lengths, sink=sink, window=window, impl=impl,
                           ring_pos=ring_pos)
  logits, layers = model(tokens[:, None], positions, cache=cache.layers, cache_step=step, impl=impl)
  return logits[:, 0], DuoCache(layers, cache.lengths + 1)
