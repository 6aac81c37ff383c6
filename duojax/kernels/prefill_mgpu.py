"""Duo prefill attention for Hopper (sm_90): a Pallas Mosaic-GPU kernel, FA3 style.

One launch computes every head of a duo layer: KV heads ``[0, nf)`` are full causal (retrieval) heads, the rest
are streaming heads that see only the first ``sink`` keys and the last ``window`` keys up to their own position
(see ``duojax.kernels.reference`` for the exact mask).

Structure (one CTA = ``2 * block_q`` query rows of one query head of one sequence):

* 3 warpgroups: warpgroups 0 and 1 compute (``block_q`` rows each), warpgroup 2 is the TMA producer. K and V
  blocks stream through a ring of ``stages`` swizzled SMEM slots, each slot with a "produced" barrier (TMA
  completion) and a "consumed" barrier (both compute warpgroups arrive). A schedule barrier ping-pongs the two
  compute warpgroups so one runs its softmax while the other's wgmma runs.
* QK^T and PV with wgmma; on the GPU P stays in registers (register-A wgmma) and the output accumulator is
  carried through ``pl.run_state``. Online softmax in base 2: ``log2(e) * sm_scale`` is folded into one FMA per
  score; ``lse`` is converted to the natural log at the end.
* Block schedule: the CTA's KV steps are a "sink part" (blocks ``[0, s)``) followed by a "window part" (blocks
  ``[lo, hi)``). For a full head ``s = 0`` and ``lo = 0``, ``hi`` = the diagonal block: blocks above the diagonal
  are never loaded. For a streaming head ``s = min(cdiv(sink, block_kv), lo)`` and ``lo`` = the window's first
  block, so the work is ~ (sink + window + tile) keys, independent of the context length. Each compute warpgroup
  walks the CTA's steps in segments: unmasked, masked (boundary blocks: diagonal, window edge, partial sink
  block) and skipped (steps that only the other warpgroup needs: it still waits on the slot's barriers so the
  barrier parities stay in step, and arrives on the consumed barriers).
* Scheduling: the grid is ``(Hq, q_tiles, B)`` with heads fastest. The query heads of one GQA group are
  adjacent, so CTAs that read the same K/V tiles run at the same time and share them through L2. Query tiles run
  in reverse order (largest causal tiles first) so the light tiles fill the tail; full and streaming heads are
  interleaved inside every wave, so a 25%-retrieval layer costs ~ its share of the work.
* Any length: q is padded to a multiple of ``2 * block_q`` and k/v to a multiple of ``block_kv`` (zeros), the
  padding is masked by the causal rule (keys past ``Sk - 1`` lie after every real query) and sliced away.

``interpret=True`` runs the same kernel through Mosaic-GPU's CPU interpreter (for CI). It cannot run wgmma with
a register operand or ``run_state`` accumulators, so only those two pieces switch: P is staged through SMEM and
PV goes into a fresh ``run_scoped`` accumulator that is added to the carried one. Register reallocation is
skipped there too. Everything else (schedule, barriers, masks, softmax, epilogue) is the same code.
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

__all__ = ["BlockConfig", "default_config", "duo_prefill_mgpu"]

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_FULL_WINDOW = 1 << 30  # "infinite" window for full heads


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  block_q: int = 64      # query rows per compute warpgroup (CTA = 2 * block_q rows)
  block_kv: int = 128    # keys per pipeline step
  stages: int = 2        # K/V SMEM ring depth

  def __post_init__(self):
    if self.block_q % 64 or self.block_kv % 64:
      raise ValueError(f"block sizes must be multiples of 64; got {self}")
    if self.stages < 2:
      raise ValueError(f"stages must be >= 2; got {self}")


def default_config(head_dim: int) -> BlockConfig:
  """Block sizes that fit SMEM (Q 2*bq*D, K/V 2*stages*bkv*D, 2-byte elements) under 227 KiB."""
  if head_dim <= 64:
    return BlockConfig(64, 128, 3)
  if head_dim <= 128:
    return BlockConfig(64, 128, 2)
  return BlockConfig(64, 64, 2)


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _round_up(a: int, b: int) -> int:
  return _cdiv(a, b) * b


@functools.partial(
    jax.jit,
    static_argnames=("num_full_kv_heads", "sink", "window", "q_offset", "sm_scale", "config", "interpret"))
def duo_prefill_mgpu(q, k, v, *, num_full_kv_heads: int, sink: int, window: int, q_offset: int = 0,
                     sm_scale: float | None = None, config: BlockConfig | None = None,
                     interpret: bool = False):
  """Duo prefill attention. ``q [B, Sq, Hq, D]``, ``k/v [B, q_offset + Sq, Hkv, D]``, D in (64, 128, 256).

  Returns ``(out [B, Sq, Hq, D] q.dtype, lse [B, Hq, Sq] float32, natural log)``. Arguments are assumed
  validated (``duojax.kernels.attention.duo_attention`` does that).
  """
  B, Sq, Hq, D = q.shape
  Sk, Hkv = k.shape[1], k.shape[2]
  if Sk != q_offset + Sq:
    raise ValueError(f"k/v length ({Sk}) must equal q_offset + Sq ({q_offset} + {Sq})")
  G = Hq // Hkv
  dtype = q.dtype
  cfg = config or default_config(D)
  bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages
  scale = (1.0 / math.sqrt(D)) if sm_scale is None else float(sm_scale)
  c2 = scale * _LOG2E  # scores -> base-2 logits in one multiply (fused into the exp2 argument's FMA)

  sq_pad = _round_up(Sq, 2 * bq)
  sk_pad = _round_up(Sk, bkv)
  if sq_pad != Sq:
    q = jnp.pad(q, ((0, 0), (0, sq_pad - Sq), (0, 0), (0, 0)))
  if sk_pad != Sk:
    k = jnp.pad(k, ((0, 0), (0, sk_pad - Sk), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, sk_pad - Sk), (0, 0), (0, 0)))
  nkb = sk_pad // bkv
  n_qt = sq_pad // (2 * bq)
  ns = _cdiv(sink, bkv)     # blocks holding sink keys
  nsf = sink // bkv         # blocks made only of sink keys
  nf = num_full_kv_heads

  def i32(x):
    return jnp.asarray(x, jnp.int32)

  def cdiv_nonneg(a, b: int):
    return lax.div(a + (b - 1), i32(b))

  def schedule(q_head, qi):
    """The CTA's KV step schedule, shared by the producer and the consumers (traced int32 scalars)."""
    kv_head = lax.div(q_head, i32(G))
    full = kv_head < nf
    p0 = i32(q_offset) + qi * (2 * bq)            # position of the CTA's first query row
    p1 = p0 + (2 * bq - 1)
    hi_cta = lax.min(lax.div(p1, i32(bkv)) + 1, i32(nkb))
    lo_w = lax.div(lax.max(p0 - (window - 1), i32(0)), i32(bkv))
    lo_cta = jnp.where(full, i32(0), lo_w)
    s_cta = jnp.where(full, i32(0), lax.min(i32(ns), lo_w))
    n_cta = s_cta + hi_cta - lo_cta
    return dict(kv_head=kv_head, full=full, p0=p0, hi_cta=hi_cta, lo_cta=lo_cta, s_cta=s_cta, n_cta=n_cta)

  def block_of(t, sch):
    return jnp.where(t < sch["s_cta"], t, t - sch["s_cta"] + sch["lo_cta"])

  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)

  def body(q_ref, k_ref, v_ref, out_ref, lse_ref, qo_smem2, k_smem, v_smem, lse_smem2, p_smem2,
           k_bar, v_bar, q_bar, k_cons, v_cons, sched_bar):
    b = lax.axis_index("batch")
    q_head = lax.axis_index("heads")
    qi = (n_qt - 1) - lax.axis_index("q_seq")  # largest causal tiles first
    wg = lax.axis_index("wg")
    sch = schedule(q_head, qi)
    n_cta = sch["n_cta"]

    def sched_sync():
      plgpu.barrier_arrive(sched_bar)
      plgpu.barrier_wait(sched_bar)

    def wait_next_k(t):
      @pl.when(t + 1 < n_cta)
      def _():
        plgpu.barrier_wait(k_bar.at[lax.rem(t + 1, i32(stages))])

    @pl.when(wg < 2)
    def _compute():
      if not interpret:
        plgpu.set_max_registers(232, action="increase")
      qo_smem = qo_smem2.at[wg]
      lse_smem = lse_smem2.at[wg]
      row0 = qi * (2 * bq) + wg * bq            # first row of this warpgroup (padded q index)
      a = i32(q_offset) + row0                  # its position
      bpos = a + (bq - 1)
      full = sch["full"]
      lo_cta, s_cta = sch["lo_cta"], sch["s_cta"]

      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), q_head], qo_smem, q_bar.at[wg])

      # Segment bounds (block indices), see the module docstring.
      hi_wg = lax.min(lax.div(bpos, i32(bkv)) + 1, i32(nkb))
      lo_w_wg = jnp.where(full, i32(0), lax.div(lax.max(a - (window - 1), i32(0)), i32(bkv)))
      lo_need = jnp.where(i32(ns) > lo_cta, lo_cta, lo_w_wg)
      lo_need = lax.min(lo_need, hi_wg)
      mlo = jnp.where(full, i32(0), lax.div(lax.max(bpos - window, i32(-1)) + bkv, i32(bkv)))
      m0 = lax.min(lax.max(mlo, lo_need), hi_wg)
      m1 = lax.min(lax.max(lax.div(a + 1, i32(bkv)), m0), hi_wg)
      to_step = lambda blk: blk - lo_cta + s_cta
      seg_sink_nomask = lax.min(s_cta, i32(nsf))
      window_eff = jnp.where(full, i32(_FULL_WINDOW), i32(window))

      plgpu.barrier_wait(q_bar.at[wg])

      m_i = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      l_i = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      acc = plgpu.layout_cast(jnp.full((bq, D), 0.0, jnp.float32), plgpu.Layout.WGMMA)

      @pl.when(n_cta > 0)
      def _():
        plgpu.barrier_wait(k_bar.at[0])

      pl.when(wg == 1)(sched_sync)

      def skip_step(t, carry):
        slot = lax.rem(t, i32(stages))
        plgpu.barrier_arrive(k_cons.at[slot])
        sched_sync()
        plgpu.barrier_wait(v_bar.at[slot])
        sched_sync()
        wait_next_k(t)
        plgpu.barrier_arrive(v_cons.at[slot])
        return carry

      def compute_step(t, carry, masked: bool):
        acc, m_i, l_i = carry
        slot = lax.rem(t, i32(stages))

        def compute_qk(acc_ref):
          plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].T)
          sched_sync()
          return acc_ref[...]

        s = pl.run_scoped(compute_qk, plgpu.ACC((bq, bkv), jnp.float32))
        plgpu.barrier_arrive(k_cons.at[slot])
        bcast = lambda x, shape: lax.broadcast_in_dim(x, shape, [0])

        if masked:
          k0 = block_of(t, sch) * bkv
          rows = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA)
          cols = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
          kpos = cols + k0
          diff = (rows + a) - kpos
          vis = (diff >= 0) & ((kpos < sink) | (diff < window_eff))
          s = jnp.where(vis, s, -jnp.inf)
          m_new = jnp.maximum(m_i, s.max(axis=1) * c2)
          m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        else:
          m_new = jnp.maximum(m_i, s.max(axis=1) * c2)
          m_use = m_new
        alpha = jnp.exp2(m_i - m_use)
        p = jnp.exp2(s * c2 - bcast(m_use, s.shape))
        acc = acc * bcast(alpha, acc.shape)
        l_i = l_i * alpha
        p16 = p.astype(dtype)

        def end_softmax_barriers():
          plgpu.barrier_arrive(sched_bar)
          plgpu.barrier_wait(v_bar.at[slot])
          plgpu.barrier_wait(sched_bar)

        if D <= 128:
          l_i = l_i + p.sum(axis=1)
          acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
          end_softmax_barriers()
        else:
          end_softmax_barriers()
          l_i = l_i + p.sum(axis=1)

        if interpret:
          p_smem = p_smem2.at[wg]
          p_smem[...] = p16
          plgpu.commit_smem()

          def compute_pv(acc_ref):
            plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
            wait_next_k(t)
            return acc_ref[...]

          acc = acc + pl.run_scoped(compute_pv, plgpu.ACC((bq, D), jnp.float32))
        else:
          def compute_pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
            wait_next_k(t)

          acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_cons.at[slot])
        return acc, m_new, l_i

      nomask_step = functools.partial(compute_step, masked=False)
      mask_step = functools.partial(compute_step, masked=True)
      carry = (acc, m_i, l_i)
      # Sink part: whole sink blocks unmasked, the partial one masked.
      carry = lax.fori_loop(i32(0), seg_sink_nomask, nomask_step, carry)
      carry = lax.fori_loop(seg_sink_nomask, s_cta, mask_step, carry)
      # Window part: skip what only the other warpgroup needs, mask the edges.
      carry = lax.fori_loop(s_cta, to_step(lo_need), skip_step, carry)
      carry = lax.fori_loop(to_step(lo_need), to_step(m0), mask_step, carry)
      carry = lax.fori_loop(to_step(m0), to_step(m1), nomask_step, carry)
      carry = lax.fori_loop(to_step(m1), to_step(hi_wg), mask_step, carry)
      carry = lax.fori_loop(to_step(hi_wg), n_cta, skip_step, carry)
      acc, m_i, l_i = carry

      pl.when(wg == 0)(sched_sync)

      l_ok = l_i > 0.0
      inv_l = 1.0 / jnp.where(l_ok, l_i, 1.0)
      acc = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
      qo_smem[...] = acc.astype(dtype)
      lse_smem[...] = jnp.where(l_ok, m_i * _LN2 + jnp.log(jnp.where(l_ok, l_i, 1.0)), -jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[b, pl.ds(row0, bq), q_head])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, q_head, pl.ds(row0, bq)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      if not interpret:
        plgpu.set_max_registers(40, action="decrease")
      kv_head = sch["kv_head"]

      def load(t, slot, wait_consumed: bool):
        start = block_of(t, sch) * bkv
        sl = (b, pl.ds(start, bkv), kv_head)
        if wait_consumed:
          plgpu.barrier_wait(k_cons.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_bar.at[slot])
        if wait_consumed:
          plgpu.barrier_wait(v_cons.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_bar.at[slot])

      for i in range(stages):
        @pl.when(i < n_cta)
        def _():
          load(i32(i), i, False)

      @pl.loop(i32(stages), lax.max(n_cta, i32(stages)))
      def _(t):
        load(t, lax.rem(t, i32(stages)), True)

      # Observe the last consumed phases too (keeps every barrier's phases consumed; the interpreter checks it).
      @pl.loop(lax.max(n_cta - stages, i32(0)), n_cta)
      def _(t):
        slot = lax.rem(t, i32(stages))
        plgpu.barrier_wait(k_cons.at[slot])
        plgpu.barrier_wait(v_cons.at[slot])

  smem = lambda shape: plgpu.SMEM(shape, dtype, transforms=(tiling, swizzle))
  scratch = [
      smem((2, bq, D)),
      smem((stages, bkv, D)),
      smem((stages, bkv, D)),
      plgpu.SMEM((2, bq), jnp.float32),
      smem((2, bq, bkv)) if interpret else None,
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2),
  ]
  out_type = (jax.ShapeDtypeStruct((B, sq_pad, Hq, D), dtype),
              jax.ShapeDtypeStruct((B, Hq, sq_pad), jnp.float32))
  kernel = plgpu.kernel(
      body,
      out_type=out_type,
      scratch_types=scratch,
      grid=(Hq, n_qt, B),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )
  out, lse = kernel(q, k, v)
  return out[:, :Sq], lse[:, :, :Sq]
