"""Pallas Mosaic-GPU (Hopper, sm_90) decode kernels for the duo KV cache.

Split-K flash-decoding. One CTA (one warpgroup) handles one (sequence, KV head, split). The G query heads of
the KV head's GQA group are the rows of one 64-row wgmma tile: on the GPU the G rows are read straight from
``q`` and the copy engine zero-fills the rest of the 64-row box; in interpret mode q is zero-padded by XLA.
So every K/V byte is read from device memory once for the whole group. K/V tiles of ``block_kv`` rows go
through a ``num_stages``-deep ring of shared-memory slots filled by TMA (one barrier per slot); the CTA
issues the copy for step ``j + num_stages`` as soon as step ``j`` has consumed its slot. Scores are a wgmma
(``Q [64, D] @ K^T``), the softmax is online, base 2, float32, and ``P @ V`` is a second wgmma. Each split
writes a normalised partial output (q.dtype, staged through the query's SMEM slot, trimmed to the group's
rows rounded up to 8) and its base-2 log-sum-exp; a small XLA combine (``combine_partials``) merges them.

Per-sequence lengths: the grid has a static number of splits (chosen from the capacity and the SM count); at
run time each sequence's filled blocks, ``cdiv(lengths[b], block_kv)``, are spread evenly over them, so the
work and the bandwidth follow the context, not the capacity. Only a sequence's last block is masked (by
column index). Streaming heads run the same body over the ``R = sink + window`` ring
slots with an additive float32 bias per slot (0 where visible, -1e30 where not) computed in XLA from
``ring_pos``; ``decode_partials_duo`` runs both kinds of heads in one launch, either with a CTA per ring or
(``host_ring``) with each ring run by a retrieval CTA whose split is shortened by the ring's blocks.

``fast=True`` (GPU) keeps P in registers (register-operand wgmma) and the PV accumulator in place
(``pl.run_state``); ``fast=False`` stages P through shared memory and adds a fresh PV accumulator per step,
which is what the CPU interpreter (``interpret=plgpu.InterpretGPUParams()``) can run.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from duojax.kernels.hardware import num_sms
from duojax.kernels.interpret import interpret_params

__all__ = ["DecodeConfig", "decode_partials", "decode_partials_duo", "combine_partials", "pick_config"]

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
NEG = -1e30  # finite "minus infinity" used inside the kernel (no inf - inf = nan)
ROWS = 64  # wgmma M: the GQA group's query heads padded to this many rows


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  block_kv: int = 128
  num_stages: int = 3
  # Number of splits = cdiv(capacity blocks, blocks_per_split) (None: one split per SM wave); at run time each
  # sequence's filled blocks are spread evenly over the splits.
  blocks_per_split: int | None = None
  ctas_per_sm: int = 1
  p_via_smem: bool = False  # stage P through SMEM even on GPU (the interpret-mode formulation)
  unpadded_q: bool = True  # GPU: read the GQA group's G query rows straight from q (TMA zero-fills to 64)
  trim_output: bool = True  # with an unpadded q: write only the group's rows (rounded up to 8) per split
  # Duo launch: each streaming head's ring runs in a retrieval CTA whose split is shortened by the ring's blocks
  # (every CTA of the wave streams about the same bytes), instead of in a CTA of its own that finishes early.
  host_ring: bool = False


def pick_config(S: int, D: int, n_units: int, *, block_kv: int | None = None, num_stages: int | None = None,
                ctas_per_sm: int | None = None, min_blocks_per_split: int = 4,
                p_via_smem: bool = False, unpadded_q: bool = True, other_ctas: int = 0,
                host_ring: bool = False) -> DecodeConfig:
  """A config for a cache of S positions, head_dim D and n_units = B * KV heads (CTAs before splitting);
  ``other_ctas`` short CTAs of the same launch (the streaming heads) share the wave (pass 0 with ``host_ring``:
  the retrieval CTAs run the rings)."""
  if block_kv is None:
    block_kv = 128 if D <= 128 else 64
  block_kv = min(block_kv, max(64, S))
  if block_kv == 64 and D == 128 and num_stages is None and ctas_per_sm is None:
    # 64-row blocks at D=128: two CTAs per SM with 2 stages each beat one CTA with 4 (H200, in-jit loops: the
    # Llama-2 duo layer at 128k 0.143 vs 0.151 ms, benchmarks/sweep_decode_layer.py; 8 KV heads x 512k 4.34
    # vs 4.13 TB/s, bench_decode.py).
    num_stages, ctas_per_sm = 2, 2
  if num_stages is None:  # about 128 KiB of K/V in flight per SM (measured on an H200: 2 stages of 128 rows at D=128)
    num_stages = max(2, min(4, (128 * 1024) // (2 * block_kv * D * 2)))
  if ctas_per_sm is None:
    ctas_per_sm = 1
  nblocks = -(-S // block_kv)
  target = max(1, num_sms() * ctas_per_sm)
  # floor: a second, partial wave of CTAs would cost as much as a full one
  splits = max(1, min(nblocks // max(1, min_blocks_per_split), (target - other_ctas) // max(1, n_units)))
  bps = -(-nblocks // splits)
  return DecodeConfig(block_kv=block_kv, num_stages=num_stages, blocks_per_split=bps, ctas_per_sm=ctas_per_sm,
                      p_via_smem=p_via_smem, unpadded_q=unpadded_q, host_ring=host_ring)


def split_layout(S: int, config: DecodeConfig) -> tuple[int, int]:
  """``(blocks_per_split, splits)`` of a cache of ``S`` positions (a multiple of ``config.block_kv``) under
  ``config`` (``blocks_per_split=None``: one split over every block)."""
  nblocks = S // config.block_kv
  bps = config.blocks_per_split or nblocks
  return bps, -(-nblocks // bps)


def _split_range(length, sp, *, splits: int, block_kv: int):
  """Blocks ``[start, start + n)`` of split ``sp``: the sequence's ``cdiv(length, block_kv)`` filled blocks are
  spread evenly over the ``splits`` CTAs, so every CTA has work whatever the fill of the cache. (Splitting
  the capacity instead leaves the splits past ``length`` idle: at 128k tokens in a 900k cache only 1/7 of the
  CTAs would read, at a fraction of the bandwidth.)"""
  nblk = lax.div(length + (block_kv - 1), jnp.int32(block_kv))
  per = lax.max(lax.div(nblk + (splits - 1), jnp.int32(splits)), jnp.int32(1))
  start = sp * per
  return start, jnp.clip(nblk - start, 0, per)


def hosted_rings(h, *, nf: int, ns: int):
  """Number of streaming rings retrieval head ``h`` (int32, traced or not) hosts in its first splits
  (``host_ring``): ring ``i`` runs in split ``i // nf`` of retrieval head ``i % nf``, so head ``h`` hosts
  ``cdiv(ns - h, nf)`` (0 for ``h >= ns``)."""
  return lax.div(jnp.int32(ns + nf - 1) - h, jnp.int32(nf))  # non-negative: truncation is the floor


def _hosted_split_range(length, h, sp, *, splits: int, block_kv: int, nf: int, ns: int, ring_blocks: int):
  """Blocks ``[start, start + n)`` of split ``sp`` of retrieval head ``h`` when its first ``k = hosted_rings(h)``
  splits also run a ring of ``ring_blocks`` blocks: ``per = cdiv(nblk + k * ring_blocks, splits)`` blocks of
  work per split, of which a hosting split spends ``ring_blocks`` on its ring. The ranges tile
  ``[0, nblk)``: ``k * (per - ring_blocks) + (splits - k) * per >= nblk``. Returns ``(start, n, hosts)``."""
  rb = jnp.int32(ring_blocks)
  nblk = lax.div(length + (block_kv - 1), jnp.int32(block_kv))
  k = hosted_rings(h, nf=nf, ns=ns)
  per = lax.max(lax.div(nblk + k * rb + (splits - 1), jnp.int32(splits)), jnp.int32(1))
  light = lax.max(per - rb, jnp.int32(0))
  hosts = sp < k
  start = jnp.where(hosts, sp * light, k * light + (sp - k) * per)
  n = jnp.clip(nblk - start, 0, jnp.where(hosts, light, per))
  return start, n, hosts


def _decode_kernel_body(q_ref, k_ref, v_ref, len_ref, bias_ref, o_ref, lse_ref, scratch, *, S, block_kv,
                        splits, has_len, q_head_offset, **kw):
  """One (sequence, KV head, split) of a single cache (retrieval, or the ring with a bias)."""
  b = lax.axis_index("b")
  h = lax.axis_index("h")
  sp = lax.axis_index("s")
  length = jnp.minimum(len_ref[b], jnp.int32(S)) if has_len else jnp.int32(S)
  start_blk, n = _split_range(length, sp, splits=splits, block_kv=block_kv)
  _attend_split(q_ref, k_ref, v_ref, bias_ref, o_ref, lse_ref, scratch, b=b, kv_head=h, q_head=h + q_head_offset,
                out_head=h, sp=sp, start_blk=start_blk, n=n, length=length if has_len else None,
                block_kv=block_kv, **kw)


def _duo_kernel_body(q_ref, kf_ref, vf_ref, len_ref, kr_ref, vr_ref, bias_ref, o_ret_ref, lse_ret_ref, o_str_ref,
                     lse_str_ref, scratch, *, L, R, nf, ns, block_kv, splits, host_ring, **kw):
  """Both caches in one launch. Two schedules:

  * ``host_ring=False``: one CTA per unit of work. CTAs ``c < ns`` run streaming head ``nf + c`` over the ring
    (first, so these short CTAs finish while the long ones stream) and write ``o_str_ref[b, c, 0]``; CTAs
    ``c >= ns`` run split ``sp = (c - ns) % splits`` of retrieval head ``h = (c - ns) // splits`` and write
    ``o_ret_ref[b, h, sp]``.
  * ``host_ring=True``: ``nf * splits`` CTAs, all retrieval splits (``h = c // splits``, ``sp = c % splits``);
    the split hosting ring ``i`` (see :func:`hosted_rings`) first runs streaming head ``nf + i`` over the ring,
    then a retrieval range shortened by the ring's blocks (:func:`_hosted_split_range`).

  Two outputs, so the combine reads each kind's partials without a slice."""
  b = lax.axis_index("b")
  c = lax.axis_index("c")
  zero = jnp.int32(0)

  def streaming(i):
    _attend_split(q_ref, kr_ref, vr_ref, bias_ref, o_str_ref, lse_str_ref, scratch, b=b, kv_head=i, q_head=nf + i,
                  out_head=i, sp=zero, start_blk=zero, n=jnp.int32(R // block_kv), length=None,
                  block_kv=block_kv, **kw)

  def retrieval(h, sp, start_blk, n, length):
    _attend_split(q_ref, kf_ref, vf_ref, None, o_ret_ref, lse_ret_ref, scratch, b=b, kv_head=h, q_head=h,
                  out_head=h, sp=sp, start_blk=start_blk, n=n, length=length, block_kv=block_kv, **kw)

  length = jnp.minimum(len_ref[b], jnp.int32(L))
  if host_ring:
    h = lax.div(c, jnp.int32(splits))
    sp = lax.rem(c, jnp.int32(splits))
    start_blk, n, hosts = _hosted_split_range(length, h, sp, splits=splits, block_kv=block_kv, nf=nf, ns=ns,
                                              ring_blocks=R // block_kv)

    @pl.when(hosts)
    def _ring():
      streaming(sp * nf + h)

    retrieval(h, sp, start_blk, n, length)
    return

  @pl.when(c >= ns)
  def _retrieval():
    h = lax.div(c - ns, jnp.int32(splits))
    sp = lax.rem(c - ns, jnp.int32(splits))
    start_blk, n = _split_range(length, sp, splits=splits, block_kv=block_kv)
    retrieval(h, sp, start_blk, n, length)

  @pl.when(c < ns)
  def _streaming():
    streaming(c)


def _attend_split(q_ref, k_ref, v_ref, bias_ref, o_ref, lse_ref, scratch, *, b, kv_head, q_head, out_head, sp,
                  start_blk, n, length, D, dtype, block_kv, num_stages, scale_log2, fast, q_rows, out_rows):
  """Online-softmax attention of one query group over blocks [start_blk, start_blk + n) of one KV head.

  ``length`` (traced) masks positions >= length (None: no length mask); ``bias_ref`` (or None) adds a per-key
  bias. Writes the normalised partial output and base-2 lse to ``o_ref/lse_ref[b, out_head, sp]``.
  """
  (q_smem, k_smem, v_smem, p_smem, bias_smem, lse_smem), (q_bar, k_bar, v_bar, b_bar) = scratch
  bk = block_kv
  has_len = length is not None
  has_bias = bias_ref is not None
  h = kv_head

  def issue(step, slot):
    row0 = (start_blk + step) * bk
    idx = (b, pl.ds(row0, bk), h)
    plgpu.copy_gmem_to_smem(k_ref.at[idx], k_smem.at[slot], k_bar.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[idx], v_smem.at[slot], v_bar.at[slot])
    if has_bias:
      plgpu.copy_gmem_to_smem(bias_ref.at[b, pl.ds(row0, bk)], bias_smem.at[slot], b_bar.at[slot])

  if q_rows == ROWS:
    plgpu.copy_gmem_to_smem(q_ref.at[b, q_head], q_smem, q_bar.at[0])
  else:
    # Unpadded group of q_rows < 64 query heads: the 64-row TMA box runs past the group's axis and the copy
    # engine zero-fills the out-of-bounds rows (were dims ever merged, they would hold other heads' queries,
    # which is as harmless: rows are independent in both matmuls and only the first q_rows are kept).
    plgpu.copy_gmem_to_smem(q_ref.at[b, q_head, pl.ds(0, ROWS)], q_smem, q_bar.at[0])
  for i in range(num_stages):
    @pl.when(i < n)
    def _prologue():
      issue(i, i)
  plgpu.barrier_wait(q_bar.at[0])

  m0 = plgpu.layout_cast(jnp.full((ROWS,), NEG, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
  l0 = plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
  acc0 = plgpu.layout_cast(jnp.full((ROWS, D), 0.0, jnp.float32), plgpu.Layout.WGMMA)

  def step(j, carry, *, masked):
    acc, m_i, l_i = carry
    slot = lax.rem(j, jnp.int32(num_stages))
    plgpu.barrier_wait(k_bar.at[slot])

    def compute_qk(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
      return acc_ref[...]

    s = pl.run_scoped(compute_qk, plgpu.ACC((ROWS, bk), jnp.float32))
    s = s * scale_log2
    if masked:
      cols = plgpu.broadcasted_iota(jnp.int32, (ROWS, bk), 1, layout=plgpu.Layout.WGMMA)
      s = jnp.where(cols + (start_blk + j) * bk < length, s, NEG)
    if has_bias:
      plgpu.barrier_wait(b_bar.at[slot])
      bias = plgpu.load(bias_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
      s = s + lax.broadcast_in_dim(bias, (ROWS, bk), [1])
    m_new = jnp.maximum(m_i, s.max(axis=1))
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, (ROWS, bk), [0]))
    l_i = l_i * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, (ROWS, D), [0])
    p16 = p.astype(dtype)
    plgpu.barrier_wait(v_bar.at[slot])
    if fast:
      def compute_pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
      acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
    else:
      p_smem[...] = p16
      plgpu.commit_smem()

      def compute_pv(acc_ref):
        plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
        return acc_ref[...]

      acc = acc + pl.run_scoped(compute_pv, plgpu.ACC((ROWS, D), jnp.float32))

    @pl.when(j + num_stages < n)
    def _refill():
      issue(j + num_stages, slot)

    return acc, m_new, l_i

  carry = (acc0, m0, l0)
  if has_len:
    # Only a sequence's last block can hold positions >= length; every other block runs unmasked.
    last_partial = (n > 0) & ((start_blk + n) * bk > length)
    n_unmasked = n - last_partial.astype(jnp.int32)
    carry = lax.fori_loop(0, n_unmasked, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(n_unmasked, n, functools.partial(step, masked=True), carry)
  else:
    carry = lax.fori_loop(0, n, functools.partial(step, masked=False), carry)
  acc, m_i, l_i = carry

  empty = m_i < NEG * 0.5
  l_safe = jnp.where(l_i > 0.0, l_i, 1.0)
  inv = 1.0 / l_safe
  # The queries are no longer needed: their slot stages the output (q.dtype), as in jax's FA3 kernel.
  q_smem[...] = (acc * lax.broadcast_in_dim(inv, (ROWS, D), [0])).astype(dtype)
  lse_smem[...] = jnp.where(empty, -jnp.inf, m_i + jnp.log(l_safe) * (1.0 / LN2))
  plgpu.commit_smem()
  if out_rows == ROWS:
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, out_head, sp])
  else:
    plgpu.copy_smem_to_gmem(q_smem.at[pl.ds(0, out_rows)], o_ref.at[b, out_head, sp])
  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, out_head, sp])
  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("config", "scale", "fast", "interpret", "q_head_offset"))
def decode_partials(qp, k, v, lengths, bias, *, config: DecodeConfig, scale: float, fast: bool = True,
                    interpret: bool = False, q_head_offset: int = 0):
  """Partial split-K decode.

  Args:
    qp: ``[B, Hq', Gq, D]`` query rows per KV head: the GQA group, either zero-padded to ``Gq = 64`` rows or
      (GPU only) unpadded, ``Gq = G < 64``, the copy engine zero-filling the rest; KV head ``h`` reads
      ``qp[:, h + q_head_offset]``. bf16/fp16.
    k, v: ``[B, S, H, D]`` cache, same dtype; ``S % block_kv == 0``.
    lengths: ``[B]`` int32 number of valid positions (keys ``t < lengths[b]``), or None (all S).
    bias: ``[B, S]`` float32 additive score bias (0 or -1e30), or None.

  Returns:
    ``o [B, H, splits, 64, D]`` (q.dtype) normalised per split and ``lse [B, H, splits, 64]`` float32 (base 2,
    ``-inf`` for a split that saw nothing).
  """
  B, _, q_rows, D = qp.shape
  S, H = k.shape[1], k.shape[2]
  assert qp.shape[1] >= H + q_head_offset, (qp.shape, k.shape, q_head_offset)
  assert q_rows == ROWS or (q_rows < ROWS and not interpret), qp.shape
  out_rows = ROWS if (q_rows == ROWS or not config.trim_output) else min(ROWS, -(-q_rows // 8) * 8)
  bk = config.block_kv
  assert S % bk == 0, (S, bk)
  bps, splits = split_layout(S, config)
  stages = max(1, min(config.num_stages, bps))
  fast = fast and not config.p_via_smem
  dtype = qp.dtype
  has_len = lengths is not None
  has_bias = bias is not None

  scratch = _scratch_types(D, dtype, stages, bk, fast, has_bias)
  body = functools.partial(
      _decode_kernel_body, S=S, D=D, dtype=dtype, block_kv=bk, num_stages=stages, splits=splits,
      scale_log2=float(scale) * LOG2E, fast=fast, has_len=has_len, q_rows=q_rows, out_rows=out_rows,
      q_head_offset=q_head_offset)

  def entry(*refs):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    rest = refs[3:]
    len_ref = rest.pop(0) if has_len else None
    bias_ref = rest.pop(0) if has_bias else None
    o_ref, lse_ref, scr = rest[0], rest[1], rest[2:]
    body(q_ref, k_ref, v_ref, len_ref, bias_ref, o_ref, lse_ref, scr)

  out_type = (jax.ShapeDtypeStruct((B, H, splits, out_rows, D), dtype),
              jax.ShapeDtypeStruct((B, H, splits, ROWS), jnp.float32))
  kwargs = {}
  if interpret:
    kwargs["interpret"] = interpret_params(1)
  call = plgpu.kernel(
      entry,
      out_type=out_type,
      scratch_types=scratch,
      grid=(splits, H, B),
      grid_names=("s", "h", "b"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **kwargs,
  )
  args = [qp, k, v]
  if has_len:
    args.append(lengths.astype(jnp.int32))
  if has_bias:
    args.append(bias.astype(jnp.float32))
  return call(*args)


def _scratch_types(D, dtype, stages, bk, fast, has_bias):
  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)
  return (
      (
          plgpu.SMEM((ROWS, D), dtype, transforms=(tiling, swizzle)),
          plgpu.SMEM((stages, bk, D), dtype, transforms=(tiling, swizzle)),
          plgpu.SMEM((stages, bk, D), dtype, transforms=(tiling, swizzle)),
          None if fast else plgpu.SMEM((ROWS, bk), dtype, transforms=(tiling, swizzle)),
          plgpu.SMEM((stages, bk), jnp.float32) if has_bias else None,
          plgpu.SMEM((ROWS,), jnp.float32),
      ),
      (
          plgpu.Barrier(num_barriers=1),
          plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_barriers=stages) if has_bias else None,
      ),
  )


@functools.partial(jax.jit, static_argnames=("config", "scale", "fast", "interpret"))
def decode_partials_duo(qp, k_full, v_full, lengths, k_ring, v_ring, bias, *, config: DecodeConfig, scale: float,
                        fast: bool = True, interpret: bool = False):
  """Retrieval and streaming heads in ONE launch (grid ``(ns + nf * splits, B)``: no idle CTAs).

  Args:
    qp: ``[B, nf + ns, Gq, D]`` (Gq = 64 zero-padded, or, GPU only, the unpadded group G < 64).
    k_full, v_full: ``[B, L, nf, D]``; lengths ``[B]`` int32.
    k_ring, v_ring: ``[B, R, ns, D]``; bias ``[B, R]`` float32 (0 visible, -1e30 not).
    config: ``block_kv`` must divide both L and R; ``blocks_per_split`` splits the full cache; ``host_ring``
      picks the schedule (see ``_duo_kernel_body``; it needs ``ns <= nf * splits``).

  Returns:
    ``(o_ret [B, nf, splits, rows, D], lse_ret [B, nf, splits, 64])``: the retrieval heads' split partials as
    ``decode_partials`` returns them, and ``(o_str [B, ns, 1, rows, D], lse_str [B, ns, 1, 64])``: the streaming
    heads' normalised outputs (one split). lse is base 2.
  """
  B, H, q_rows, D = qp.shape
  L, nf = k_full.shape[1], k_full.shape[2]
  R, ns = k_ring.shape[1], k_ring.shape[2]
  assert H == nf + ns and nf > 0 and ns > 0, (qp.shape, k_full.shape, k_ring.shape)
  assert q_rows == ROWS or (q_rows < ROWS and not interpret), qp.shape
  out_rows = ROWS if (q_rows == ROWS or not config.trim_output) else min(ROWS, -(-q_rows // 8) * 8)
  bk = config.block_kv
  assert L % bk == 0 and R % bk == 0, (L, R, bk)
  bps, splits = split_layout(L, config)
  stages = max(1, min(config.num_stages, max(bps, R // bk)))
  host_ring = config.host_ring
  if host_ring and ns > nf * splits:
    raise ValueError(f"host_ring needs a retrieval split for every streaming ring: ns={ns} > nf * splits = "
                     f"{nf} * {splits}")
  fast = fast and not config.p_via_smem
  dtype = qp.dtype
  scratch = _scratch_types(D, dtype, stages, bk, fast, True)
  body = functools.partial(
      _duo_kernel_body, L=L, R=R, nf=nf, ns=ns, D=D, dtype=dtype, block_kv=bk, num_stages=stages, splits=splits,
      scale_log2=float(scale) * LOG2E, fast=fast, q_rows=q_rows, out_rows=out_rows, host_ring=host_ring)

  def entry(q_ref, kf_ref, vf_ref, len_ref, kr_ref, vr_ref, bias_ref, o_ret_ref, lse_ret_ref, o_str_ref, lse_str_ref,
            *scr):
    body(q_ref, kf_ref, vf_ref, len_ref, kr_ref, vr_ref, bias_ref, o_ret_ref, lse_ret_ref, o_str_ref, lse_str_ref,
         scr)

  C = nf * splits if host_ring else ns + nf * splits
  out_type = (jax.ShapeDtypeStruct((B, nf, splits, out_rows, D), dtype),
              jax.ShapeDtypeStruct((B, nf, splits, ROWS), jnp.float32),
              jax.ShapeDtypeStruct((B, ns, 1, out_rows, D), dtype),
              jax.ShapeDtypeStruct((B, ns, 1, ROWS), jnp.float32))
  kwargs = {"interpret": interpret_params(1)} if interpret else {}
  call = plgpu.kernel(
      entry, out_type=out_type, scratch_types=scratch, grid=(C, B), grid_names=("c", "b"),
      compiler_params=plgpu.CompilerParams(approx_math=True), **kwargs)
  o_ret, lse_ret, o_str, lse_str = call(qp, k_full, v_full, lengths.astype(jnp.int32), k_ring, v_ring,
                                        bias.astype(jnp.float32))
  return (o_ret, lse_ret), (o_str, lse_str)


# Up to this many splits the combine sums them as a chain of elementwise ops, not an XLA reduce: XLA's GPU
# emitter turns a reduce over 32+ elements into reduction kernels of their own (measured on an H200: at 33
# splits, 4 kernels per Llama-2 duo layer instead of 2), but inlines a chain into the consumer's loop fusion.
UNROLL_SPLITS = 128
# From this many splits on, the combine's [B, H, S, G] weights are computed once in a small kernel of their own;
# below, they are recomputed inside the weighted sum for each of the D output columns (H200, Llama-2 at 128k, per
# layer: at 33 splits 5.8 us computed apart vs 6.4 fused; at 8 splits 4.6 apart vs 2.3 fused).
MATERIALIZE_SPLITS = 16


def _over_splits(op, x, reduce_fn):
  """``op``-reduction of ``x [B, H, S, ...]`` over axis 2 (the splits), keeping the axis."""
  S = x.shape[2]
  if S > UNROLL_SPLITS:
    return reduce_fn(x, axis=2, keepdims=True)
  return functools.reduce(op, [lax.slice_in_dim(x, s, s + 1, axis=2) for s in range(S)])


def combine_partials(o, lse2, G: int):
  """Merges split partials: ``o [B, H, S, 64, D]``, ``lse2 [B, H, S, 64]`` (base 2) -> out ``[B, H, G, D]``
  float32 and natural-log lse ``[B, H, G]`` (``-inf`` and out 0 where no split saw anything)."""
  o = o[:, :, :, :G]
  lse2 = lse2[:, :, :, :G]
  m = _over_splits(jnp.maximum, lse2, jnp.max)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp2(lse2 - m_safe)  # 0 for empty splits
  tot = _over_splits(jnp.add, w, jnp.sum)
  w = w / jnp.where(tot > 0, tot, 1.0)
  if o.shape[2] >= MATERIALIZE_SPLITS:
    w, tot = lax.optimization_barrier((w, tot))
  out = _over_splits(jnp.add, w[..., None] * o.astype(jnp.float32), jnp.sum)[:, :, 0]
  tot = tot[:, :, 0]
  lse = jnp.where(tot > 0, (m_safe[:, :, 0] + jnp.log2(jnp.where(tot > 0, tot, 1.0))) * LN2, -jnp.inf)
  return out, lse
