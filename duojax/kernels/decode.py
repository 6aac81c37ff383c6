"""Duo decode attention: one new token per sequence against the duo KV cache (retrieval + streaming heads)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from duojax.kernels.decode_reference import (attend, decode_streaming_visible, duo_decode_reference,
                                             merge_heads)
from duojax.kernels.hardware import resolve_impl
from duojax.kernels.validation import KERNEL_DTYPES, SUPPORTED_DTYPES, check_sink_window

__all__ = ["duo_decode_attention", "check_decode_args"]

_KERNEL_HEAD_DIMS = (64, 128, 256)


def _dtype_name(d):
  return jnp.dtype(d).name


def check_decode_args(q, k_full, v_full, lengths, k_ring, v_ring, ring_pos, *, sink, window,
                      kernel: bool = False) -> tuple[int, int, int]:
  """Validates decode arguments; returns ``(nf, ns, G)``. Each error names the value and what is allowed."""
  check_sink_window(sink, window)
  if q.ndim != 3:
    raise ValueError(f"q must be 3-D [batch, query_heads, head_dim] (one token per sequence); got {q.shape}")
  B, Hq, D = q.shape
  for name, x in (("k_full", k_full), ("v_full", v_full), ("k_ring", k_ring), ("v_ring", v_ring)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be 4-D [batch, slots, kv_heads, head_dim]; got {name}{tuple(x.shape)}")
    if x.shape[0] != B or x.shape[3] != D:
      raise ValueError(f"{name} batch and head_dim must match q's (batch {B}, head_dim {D}); got "
                       f"{name}{tuple(x.shape)}")
  if k_full.shape != v_full.shape:
    raise ValueError(f"k_full and v_full must have the same shape; got {tuple(k_full.shape)} and "
                     f"{tuple(v_full.shape)}")
  if k_ring.shape != v_ring.shape:
    raise ValueError(f"k_ring and v_ring must have the same shape; got {tuple(k_ring.shape)} and "
                     f"{tuple(v_ring.shape)}")
  nf, ns = k_full.shape[2], k_ring.shape[2]
  if nf + ns < 1:
    raise ValueError("there must be at least one KV head (k_full.shape[2] + k_ring.shape[2] >= 1)")
  if Hq % (nf + ns) != 0:
    raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the number of KV heads "
                     f"({nf} retrieval + {ns} streaming = {nf + ns})")
  R = k_ring.shape[1]
  if ns and R != sink + window:
    raise ValueError(f"the ring must have sink + window = {sink + window} slots; got {R} (k_ring.shape[1])")
  if ring_pos.shape != (B, R):
    raise ValueError(f"ring_pos must have shape {(B, R)} (batch, ring slots); got {tuple(ring_pos.shape)}")
  if lengths.shape != (B,):
    raise ValueError(f"lengths must have shape {(B,)} (one length per sequence); got {tuple(lengths.shape)}")
  for name, x in (("lengths", lengths), ("ring_pos", ring_pos)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array; got dtype {x.dtype}")
  for name, x in (("k_full", k_full), ("v_full", v_full), ("k_ring", k_ring), ("v_ring", v_ring)):
    if x.dtype != q.dtype:
      raise ValueError(f"q and {name} must share one dtype; got q {q.dtype}, {name} {x.dtype}")
  allowed = KERNEL_DTYPES if kernel else SUPPORTED_DTYPES
  if not any(q.dtype == d for d in allowed):
    raise ValueError(f"unsupported dtype {q.dtype}; allowed: {', '.join(_dtype_name(d) for d in allowed)}")
  G = Hq // (nf + ns)
  if kernel:
    if D not in _KERNEL_HEAD_DIMS:
      raise ValueError(f"the decode kernel supports head_dim in {_KERNEL_HEAD_DIMS}; got {D}")
    if G > 64:
      raise ValueError(f"the decode kernel supports at most 64 query heads per KV head; got {G}")
    L = k_full.shape[1]
    if nf and (L < 64 or L % 64):
      raise ValueError(f"the decode kernel needs the full-cache capacity L (k_full.shape[1]) to be a positive "
                       f"multiple of 64; got {L}")
  return nf, ns, G


def duo_decode_attention(q, k_full, v_full, lengths, k_ring, v_ring, ring_pos, *, sink: int, window: int,
                         sm_scale: float | None = None, impl: str = "auto", return_lse: bool = False,
                         streaming_impl: str = "auto", interpret: bool = False, config=None):
  """Decode attention for one new token per sequence over the duo KV cache of one layer.

  Shapes (B batch, Hq query heads, D head_dim, nf retrieval / ns streaming KV heads, G = Hq // (nf + ns)):

  * ``q`` ``[B, Hq, D]``; query heads ``[0, nf*G)`` read retrieval KV heads (head ``h`` reads KV head
    ``h // G``), heads ``[nf*G, Hq)`` read streaming KV heads.
  * ``k_full``, ``v_full`` ``[B, L, nf, D]`` (``L`` = cache capacity) and ``lengths`` ``[B]`` int: the number
    of valid positions of each sequence, the current token included (it is already in the cache).
  * ``k_ring``, ``v_ring`` ``[B, R, ns, D]`` with ``R = sink + window``, and ``ring_pos`` ``[B, R]`` int: the
    position held by each ring slot, ``-1`` for an empty one (the current token is already written).

  Mask: the query sits at position ``p = lengths[b] - 1``. A retrieval head sees cache positions
  ``t < lengths[b]``. A streaming head sees a ring slot holding position ``t`` iff ``0 <= t <= p`` and
  (``t < sink`` or ``t > p - window``). Scores are scaled by ``sm_scale`` (default ``1/sqrt(D)``); softmax is
  float32.

  Args:
    impl: "auto" (the Pallas Mosaic-GPU kernel on Hopper, the pure-JAX reference elsewhere, warning once),
      "pallas" (raises off Hopper) or "reference".
    return_lse: also return the natural-log log-sum-exp ``[B, Hq]`` float32.
    streaming_impl: for the kernel path: "fused" (retrieval and streaming heads in one kernel launch; the
      block size, 64 or 128 rows, must divide R), "kernel" (a second launch of the kernel over the ring slots;
      needs ``R % 64 == 0``), "xla" (plain JAX over the ring, which is small) or "auto" ("fused" when the
      retrieval block size divides R, e.g. sink 128 + window 256; else "kernel" when ``R % 64 == 0``; else
      "xla"). A "fused" request that the block size does not allow runs as "kernel".
    interpret: run the Pallas kernels in Mosaic-GPU CPU interpret mode (testing; overrides ``impl``).
    config: optional ``decode_mgpu.DecodeConfig`` for the retrieval kernel (tuning).

  Returns:
    ``out`` ``[B, Hq, D]`` in ``q.dtype`` (and ``lse`` if ``return_lse``). A row that sees nothing gets 0.
  """
  if streaming_impl not in ("auto", "fused", "kernel", "xla"):
    raise ValueError(f"streaming_impl must be one of ('auto', 'fused', 'kernel', 'xla'); got {streaming_impl!r}")
  path = "pallas" if interpret else resolve_impl(impl, "duo_decode_attention")
  nf, ns, G = check_decode_args(q, k_full, v_full, lengths, k_ring, v_ring, ring_pos, sink=sink,
                                window=window, kernel=(path == "pallas"))
  if path == "reference":
    out, lse = duo_decode_reference(q, k_full, v_full, lengths, k_ring, v_ring, ring_pos, sink=sink,
                                    window=window, sm_scale=sm_scale)
  else:
    out, lse = _decode_pallas(q, k_full, v_full, lengths, k_ring, v_ring, ring_pos, sink=sink, window=window,
                              sm_scale=sm_scale, nf=nf, ns=ns, G=G, streaming_impl=streaming_impl,
                              interpret=interpret, config=config)
  return (out, lse) if return_lse else out


def ring_fuses(ns: int, R: int, block_kv: int, streaming_impl: str) -> bool:
  """Whether the streaming heads' ring (``R`` slots, ``ns`` heads) runs in the retrieval kernel's launch: when
  ``streaming_impl`` allows it ("auto" or "fused") and the block size divides the ring (measured on an H200 with
  a ring of 320: forcing 64-row blocks onto the retrieval heads cost about what the saved launch gained)."""
  return ns > 0 and R % block_kv == 0 and streaming_impl in ("auto", "fused")


# The fused duo launch runs each streaming ring inside a retrieval CTA (``DecodeConfig.host_ring``) rather than in a
# CTA of its own, so every slot of the wave streams about the same bytes. H200, B=1, in-jit layer loops: Llama-2
# duo layer at 128k 0.1443 vs 0.1468 ms, Llama-3 duo layer at 899,744 0.4311 vs 0.4346 (benchmarks/NOTES_decode.md,
# session 17).
HOST_RING = True


def _duo_config(L: int, D: int, B: int, nf: int, ns: int, block_kv: int, fused: bool):
  """The retrieval kernel's config: with a fused ring and ``HOST_RING``, every CTA of the wave is a retrieval
  split and the splits host the rings (if there are at least ``ns`` of them); else the streaming CTAs get their
  own slots in the wave."""
  from duojax.kernels import decode_mgpu  # noqa: PLC0415 (keeps Mosaic-GPU imports off the reference path)
  if fused and HOST_RING:
    cfg = decode_mgpu.pick_config(L, D, B * nf, block_kv=block_kv, other_ctas=0, host_ring=True)
    if ns <= nf * decode_mgpu.split_layout(L, cfg)[1]:
      return cfg
  return decode_mgpu.pick_config(L, D, B * nf, block_kv=block_kv, other_ctas=B * ns if fused else 0)


def _fold_queries(qg):
  """``[B, H, G, D]`` -> ``[B, H, 64, D]`` (zero rows after the group's G heads)."""
  G = qg.shape[2]
  return jnp.pad(qg, ((0, 0), (0, 0), (0, 64 - G), (0, 0)))


def _decode_pallas(q, k_full, v_full, lengths, k_ring, v_ring, ring_pos, *, sink, window, sm_scale, nf, ns, G,
                   streaming_impl, interpret, config):
  from duojax.kernels import decode_mgpu  # noqa: PLC0415 (keeps Mosaic-GPU imports off the reference path)

  B, Hq, D = q.shape
  scale = (1.0 / math.sqrt(D)) if sm_scale is None else float(sm_scale)
  lengths = lengths.astype(jnp.int32)
  qg = q.reshape(B, nf + ns, G, D)
  fast = not interpret
  outs, lses = [], []
  R = k_ring.shape[1]
  fuses = lambda block_kv: ring_fuses(ns, R, block_kv, streaming_impl)
  if nf:
    L = k_full.shape[1]
    cfg = config
    if cfg is None:
      bk = 128 if (L % 128 == 0 and D <= 128) else 64
      if streaming_impl == "fused" and ns and R % bk:
        bk = 64
      cfg = _duo_config(L, D, B, nf, ns, bk, fuses(bk))
    fused = fuses(cfg.block_kv)
    q_in = qg if (fast and cfg.unpadded_q) else None
    if fused:
      vis = decode_streaming_visible(ring_pos, lengths, sink=sink, window=window)
      bias = jnp.where(vis, 0.0, decode_mgpu.NEG).astype(jnp.float32)
      (o, l2), (o_s, l2_s) = decode_mgpu.decode_partials_duo(
          qg if q_in is not None else _fold_queries(qg), k_full, v_full, lengths, k_ring, v_ring, bias, config=cfg,
          scale=scale, fast=fast, interpret=interpret)
      parts = [decode_mgpu.combine_partials(o, l2, G),
               decode_mgpu.combine_partials(o_s, l2_s, G)]  # streaming: one split, normalisation and lse only
      return merge_heads([o for o, _ in parts], [lse for _, lse in parts], (B, Hq, D), q.dtype)
    o, l2 = decode_mgpu.decode_partials(q_in if q_in is not None else _fold_queries(qg[:, :nf]), k_full, v_full,
                                        lengths, None, config=cfg, scale=scale, fast=fast, interpret=interpret)
    o, lse = decode_mgpu.combine_partials(o, l2, G)
    outs.append(o)
    lses.append(lse)
  if ns:
    use_kernel = streaming_impl in ("kernel", "fused") or (streaming_impl == "auto" and R % 64 == 0)
    if use_kernel and R % 64:
      raise ValueError(f"streaming_impl={streaming_impl!r} needs sink + window to be a multiple of 64; got {R}")
    vis = decode_streaming_visible(ring_pos, lengths, sink=sink, window=window)
    if use_kernel:
      bias = jnp.where(vis, 0.0, decode_mgpu.NEG).astype(jnp.float32)
      cfg = decode_mgpu.DecodeConfig(block_kv=64, num_stages=min(3, R // 64) if D <= 128 else 2,
                                     blocks_per_split=R // 64,
                                     unpadded_q=config.unpadded_q if config is not None else True)
      qk, off = (qg, nf) if (fast and cfg.unpadded_q) else (_fold_queries(qg[:, nf:]), 0)
      o, l2 = decode_mgpu.decode_partials(qk, k_ring, v_ring, None, bias, config=cfg, scale=scale, fast=fast,
                                          interpret=interpret, q_head_offset=off)
      o, lse = decode_mgpu.combine_partials(o, l2, G)
    else:
      o, lse = attend(qg[:, nf:], k_ring, v_ring, vis, scale, low_precision=True)
    outs.append(o)
    lses.append(lse)
  return merge_heads(outs, lses, (B, Hq, D), q.dtype)
