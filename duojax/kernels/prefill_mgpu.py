"""Duo prefill attention for Hopper (sm_90): a Pallas Mosaic-GPU kernel, FA3 style.

One launch computes every head of a duo layer: KV heads ``[0, nf)`` are full causal (retrieval) heads, the rest
are streaming heads that see only the first ``sink`` keys and the last ``window`` keys up to their own position
(see ``duojax.kernels.reference`` for the exact mask).

Structure (one CTA = ``2 * block_q`` query rows of one query head of one sequence):

* 3 warpgroups: warpgroups 0 and 1 compute (``block_q`` rows each), warpgroup 2 is the TMA producer. K and V
  blocks stream through a ring of ``stages`` swizzled SMEM slots, each slot with a "produced" barrier (TMA
  completion) and a "consumed" signal (both compute warpgroups arrive; the producer waits before refilling:
  hardware named barriers on the GPU, mbarriers in the interpreter). A schedule barrier ping-pongs the two
  compute warpgroups so one runs its softmax while the other's wgmma runs (hardware named barriers on the GPU,
  ``bar.arrive``/``bar.sync`` through inline PTX; an mbarrier rendezvous in the interpreter).
* QK^T and PV with wgmma; on the GPU P stays in registers (register-A wgmma) and the output accumulator is
  carried through ``pl.run_state``. Online softmax in base 2: ``log2(e) * sm_scale`` is folded into one FMA per
  score; ``lse`` is converted to the natural log at the end.
* Block schedule: the CTA's KV steps are a "sink part" (blocks ``[0, s)``) followed by a "window part" (blocks
  ``[lo, hi)``). For a full head ``s = 0`` and ``lo = 0``, ``hi`` = the diagonal block: blocks above the diagonal
  are never loaded. For a streaming head ``s = min(cdiv(sink, block_kv), lo)`` and ``lo`` = the window's first
  block, so the work is ~ (sink + window + tile) keys, independent of the context length. Each compute warpgroup
  walks the CTA's steps in segments: unmasked (whole sink blocks, blocks inside every row's window and below the
  diagonal), fully masked (causal & (sink | window): partial sink block, window's left edge), window-only
  masked (left-edge blocks with no sink key and no key past the warpgroup's first row), causal-only masked
  (diagonal blocks) and skipped (steps that only the other warpgroup needs: it still waits on the slot's
  barriers so the barrier parities stay in step, and arrives on the consumed barriers). Masks compare a column
  iota with per-row thresholds (1-4 compares and a select per score). With 128-key steps, a boundary block
  whose visible keys all lie in one 64-key half for every row of the warpgroup (the last causal block of a
  warpgroup that ends mid-block, a streaming window's first block) computes only that half (``half_steps``).
* Scheduling: a ``(heads, B, q_tiles)`` grid, heads fastest. The query heads of one GQA group are adjacent, so
  CTAs that read the same K/V tiles run at the same time and share them through L2 (GQA groups are not folded
  into one CTA). Query tiles run in reverse order (largest causal tiles first) so the light tiles fill the
  tail. Each kind of CTA compiles its own code (``_Plan``; the head kind is a Python bool, so a full head's
  CTA has no sink or window segments). A duo layer's full-head CTAs run one tile each. A CTA with several
  streaming tiles runs them back to back, the K/V ring running on across them (short streaming tiles then
  share one CTA's start-up and drain). Two layouts:
  - ``stream_first`` (the head_dim-128 default): one streaming CTA per SM takes the streaming tiles round
    robin, and all of them launch before the first full-head CTA (the grid's first rows). The streaming tiles
    then run before the full heads' tiles share the GPU with them (streaming tiles that do share it run
    slower), and the full heads' light tiles fill the tail.
  - otherwise (head_dim 64 and 256): each row of the grid holds the query tile's ``nf * G`` full-head CTAs,
    then streaming CTAs that run ``stream_fold`` streaming query heads of that query tile (default 1); the
    two kinds share every wave.
  At head_dim 128, duo layers step over 192 keys on full heads and 128 on streaming heads (``full_block_kv``;
  streaming steps use the first 128 rows of the 192-row K/V slots). The looped streaming CTAs stage their
  output in the other 64 rows, so each tile's Q buffer is free for the next tile's Q as soon as the tile's
  last QK^T is done.
  When every head is streaming (``nf == 0``) the default is a persistent grid (one CTA per SM, static
  round-robin over the same tile order): the K/V ring, the next tile's Q load (double buffered Q, issued
  after the tile's sink steps) and the previous tile's output store overlap across tiles (16k: 0.28 ms vs
  0.34 ms).
* Any length: the last query tile and key block reach past the arrays' ends; the TMA loads read zeros there
  and the TMA stores drop the rows past the end (lengths are only rounded up to a multiple of 8, the TMA
  tiling, so 16k or 1000 tokens are never copied). Keys past ``Sk - 1`` lie after every real query, so the
  causal rule masks them. The interpreter pads q to whole tiles and k/v to whole blocks instead.
* Blocks (``default_config``): 64 query rows per warpgroup; 128 keys per step (64 at head_dim 256), or 192 for
  full heads at head_dim 128 (fewer, wider steps amortize the per-step barriers and row reductions).

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

from duojax.kernels.hardware import num_sms
from duojax.kernels.interpret import interpret_params

__all__ = ["BlockConfig", "default_config", "duo_prefill_mgpu", "layer_kind"]

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_FULL_WINDOW = 1 << 30  # "infinite" window for full heads
_NUM_WARPGROUPS = 3  # two compute warpgroups and the TMA producer


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  block_q: int = 64      # query rows per compute warpgroup (CTA = 2 * block_q rows)
  block_kv: int = 128    # keys per pipeline step
  stages: int = 2        # K/V SMEM ring depth
  persistent: bool = False  # one CTA per SM looping over tiles (K/V ring and Q prefetch run across tiles)
  named_barriers: bool = True  # hardware named barriers for the warpgroup ping-pong (GPU only)
  # SMEM reserved for cross-warp reductions (None: Mosaic's default, 2 KiB). The row reductions here stay
  # inside each warp (WGMMA layout), so 0 is safe and frees the room a third K/V stage needs at D=128.
  reduction_scratch_bytes: int | None = None
  # Mosaic GPU's unsafe_no_auto_barriers: no automatic warpgroup barriers around SMEM loads/stores. The kernel's
  # only SMEM stores are the epilogue's, followed by commit_smem before the TMA store (tokamax runs the same way).
  no_auto_barriers: bool = False
  # Consumed-slot signals as hardware named barriers (consumers bar.arrive, producer bar.sync; GPU only, at
  # most 3 stages) instead of mbarriers.
  named_consumed: bool = True
  # Window-edge blocks with no sink key and no key past the warpgroup's first row use a window-only mask.
  window_mask: bool = True
  # Persistent grid with double-buffered Q: wait for the previous tile's stores and prefetch the next tile's Q
  # after this tile's sink steps instead of before its first step.
  defer_q_prefetch: bool = True
  # Duo layers: the full heads' step width (None: block_kv; the streaming heads step over block_kv keys, in
  # the first block_kv rows of the full_block_kv-row K/V slots).
  full_block_kv: int | None = None
  # Duo layers: streaming query heads per CTA, run back to back (the K/V ring and the Q loads run on across
  # them, as in the persistent grid); 1: one tile per CTA.
  stream_fold: int = 1
  # Duo layers: the streaming tiles (streaming query heads fastest, then batch, then query tiles from the
  # last) go round robin to ``stream_ctas`` CTAs (None: one per SM) that launch before every full-head CTA: a
  # ``(full query heads, B, streaming rows + q_tiles)`` grid whose first rows hold them. Off (``stream_fold``
  # applies instead): full and streaming CTAs are interleaved in every row of the grid.
  stream_first: bool = False
  stream_ctas: int | None = None
  # 128-key steps whose visible keys all lie in one 64-key half for every row of the warpgroup (the last
  # causal block, a streaming window's first block) compute only that half (QK^T and PV with N/K = 64).
  half_steps: bool = True

  def __post_init__(self):
    if self.block_q % 64 or self.block_kv % 64 or (self.full_block_kv or 64) % 64:
      raise ValueError(f"block sizes must be multiples of 64; got {self}")
    if self.full_block_kv is not None and self.full_block_kv < self.block_kv:
      raise ValueError(f"full_block_kv must be >= block_kv; got {self}")
    if self.stream_fold < 1:
      raise ValueError(f"stream_fold must be >= 1; got {self}")
    if self.stream_ctas is not None and self.stream_ctas < 1:
      raise ValueError(f"stream_ctas must be >= 1 or None; got {self}")
    if self.stages < 2:
      raise ValueError(f"stages must be >= 2; got {self}")


def layer_kind(num_full_kv_heads: int, num_kv_heads: int) -> str:
  """A layer's kind for :func:`default_config`: "streaming" (no full KV head), "full" (every KV head) or "duo"."""
  if num_full_kv_heads == 0:
    return "streaming"
  return "full" if num_full_kv_heads == num_kv_heads else "duo"


def default_config(head_dim: int, heads: str = "duo") -> BlockConfig:
  """The kernel's default blocks for a layer whose heads are "duo" (some of each kind), "full" or "streaming".

  Block sizes fit SMEM (Q 2*bq*D, K/V 2*stages*bkv*D, 2-byte elements) under 227 KiB.
  * "full" at head_dim 128 steps over 192 keys; the SMEM then needs ``reduction_scratch_bytes=0`` (the row
    reductions stay inside warps) and the kernel runs without automatic warpgroup barriers. H200, same run:
    16k 3.54 vs 3.79 ms and 64k 54.7 vs 58.9 ms against 128-key steps.
  * "duo" at head_dim 128: full heads over 192 keys, streaming heads over 128 (at 192 they would visit 50% more
    keys per row). H200, same run: 16k 1.158 vs 1.205 ms and 64k 15.37 vs 16.70 ms against 128-key steps
    everywhere with one tile per CTA (192-key full steps alone: 1.211 / 15.78; 4 streaming query heads per CTA
    alone: 1.200 / 16.72). The streaming tiles go round robin to one CTA per SM, launched before the full
    heads (``stream_first``). Against 4 streaming query heads per interleaved CTA, same runs (four): 16k
    1.147-1.156 vs 1.161-1.182 ms; 64k 15.37-15.80 vs 15.44-15.62 ms (-1.6% to +2.1%). Streaming tiles that
    share the SMs with full heads run slower: with only 66 streaming CTAs the 16k mix took 1.37 ms. (Head dims
    64 and 256 measured -4% to +7% and +3% with it, so they keep one interleaved tile per CTA.)
  * "streaming" runs a persistent grid (tiles are ~(sink + window) / block_kv steps long, so per-tile latency
    dominates) with mbarrier consumed signals (16k: 0.302 vs 0.308 and 0.309 vs 0.323 ms for named barriers).
  """
  if heads not in ("duo", "full", "streaming"):
    raise ValueError(f"heads must be 'duo', 'full' or 'streaming'; got {heads!r}")
  if head_dim <= 64:
    cfg = BlockConfig(64, 128, 3)
  elif head_dim <= 128:
    cfg = BlockConfig(64, 128, 2)
    if heads == "full":
      cfg = BlockConfig(64, 192, 2, reduction_scratch_bytes=0, no_auto_barriers=True)
    elif heads == "duo":
      cfg = BlockConfig(64, 128, 2, full_block_kv=192, stream_first=True, reduction_scratch_bytes=0,
                        no_auto_barriers=True)
  else:
    cfg = BlockConfig(64, 64, 2)
  if heads == "streaming":
    cfg = dataclasses.replace(cfg, persistent=True, named_consumed=False)
  return cfg


_HALF = 64  # half of a 128-key step

_SCHED_BAR = 10  # named barriers 10 and 11 (Mosaic GPU uses the low ids)
_CONS_BAR = 4    # consumed-slot named barriers: K at 4 .. 4 + stages - 1, V after them (stages <= 3)


def _named_barrier(op: str, barrier_id, num_threads: int = 256) -> None:
  """``bar.arrive``/``bar.sync`` on a hardware named barrier (default: the two compute warpgroups, 256
  threads; the consumed-slot barriers add the producer warpgroup: 384)."""
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # noqa: PLC0415

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WG_SPLAT,))
  def _op(_, bid):
    mgpu_utils.inline_ptx(f"bar.{op} $0, {num_threads};", bid.registers[()], has_side_effects=True,
                          convergent=True)

  _op(jnp.asarray(barrier_id, jnp.int32))


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _round_up(a: int, b: int) -> int:
  return _cdiv(a, b) * b


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How one kind of CTA runs: its heads' kind (a Python bool, so each kind compiles only its own segments), its
  step width, and its tiles: ``n_my`` tiles given by ``tile(j) -> (q_head, batch, q_tile)``. ``looped`` CTAs
  run their tiles back to back (the K/V ring and the Q prefetch run on across tiles); the others run one tile
  with static step counters."""
  full: bool
  bkv: int
  n_my: object
  tile: object
  looped: bool


@functools.partial(
    jax.jit,
    static_argnames=("num_full_kv_heads", "sink", "window", "q_offset", "sm_scale", "config", "interpret",
                     "num_ctas"))
def duo_prefill_mgpu(q, k, v, *, num_full_kv_heads: int, sink: int, window: int, q_offset: int = 0,
                     sm_scale: float | None = None, config: BlockConfig | None = None,
                     interpret: bool = False, num_ctas: int | None = None):
  """Duo prefill attention. ``q [B, Sq, Hq, D]``, ``k/v [B, q_offset + Sq, Hkv, D]``, D in (64, 128, 256).

  Returns ``(out [B, Sq, Hq, D] q.dtype, lse [B, Hq, Sq] float32, natural log)``. Arguments are assumed
  validated (``duojax.kernels.attention.duo_attention`` does that). ``num_ctas`` (tests) replaces the SM count
  as the CTA count of a persistent grid and the streaming CTA count of a ``stream_first`` duo layer.
  """
  B, Sq, Hq, D = q.shape
  Sk, Hkv = k.shape[1], k.shape[2]
  if Sk != q_offset + Sq:
    raise ValueError(f"k/v length ({Sk}) must equal q_offset + Sq ({q_offset} + {Sq})")
  G = Hq // Hkv
  dtype = q.dtype
  nf = num_full_kv_heads
  kinds = layer_kind(nf, Hkv)
  cfg = default_config(D, kinds) if config is None else config
  if cfg.persistent and kinds == "duo":
    raise ValueError("a persistent grid serves layers of one head kind (num_full_kv_heads 0 or all); duo layers "
                     f"fold streaming heads with stream_fold instead; got {cfg} with {nf} of {Hkv} full KV heads")
  bq, stages = cfg.block_q, cfg.stages
  bkv_stream = cfg.block_kv
  bkv_full = cfg.full_block_kv or cfg.block_kv
  bkv_max = max(bkv_full if nf > 0 else 0, bkv_stream if nf < Hkv else 0)
  scale = (1.0 / math.sqrt(D)) if sm_scale is None else float(sm_scale)
  c2 = scale * _LOG2E  # scores -> base-2 logits in one multiply (fused into the exp2 argument's FMA)

  sq_pad = _round_up(Sq, 2 * bq)
  # The interpreter's dynamic slices clamp at the array's end, so it gets zero padding to whole blocks. On the
  # GPU the TMA loads past the end read zeros and the TMA stores past it are dropped, so lengths are only
  # rounded up to the 8-row TMA tiling (no copy at all when they are multiples of 8).
  sq_in = sq_pad if interpret else _round_up(Sq, 8)
  sk_pad = _round_up(Sk, math.lcm(bkv_full, bkv_stream) if interpret else 8)
  if sq_in != Sq:
    q = jnp.pad(q, ((0, 0), (0, sq_in - Sq), (0, 0), (0, 0)))
  if sk_pad != Sk:
    k = jnp.pad(k, ((0, 0), (0, sk_pad - Sk), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, sk_pad - Sk), (0, 0), (0, 0)))
  n_qt = sq_pad // (2 * bq)
  named = cfg.named_barriers and not interpret
  named_cons = cfg.named_consumed and not interpret and stages <= 3

  def i32(x):
    return jnp.asarray(x, jnp.int32)

  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)

  # Grids. Tiles go in launch order heads fastest (a GQA group's query heads are neighbours and share K/V
  # through L2), then batch, then query tiles from the last (largest causal) to the first.
  nfq = nf * G                                   # full query heads come first
  fold = max(1, min(cfg.stream_fold, Hq - nfq))  # streaming query heads per CTA of a duo layer
  n_tiles = Hq * B * n_qt
  stream_first = cfg.stream_first and kinds == "duo"
  if cfg.persistent:
    n_ctas = min(n_tiles, num_ctas or num_sms())
    grid, grid_names = (n_ctas,), ("cta",)
  elif stream_first:
    nsq = Hq - nfq                                 # streaming query heads
    n_st = nsq * B * n_qt                          # streaming tiles
    per = _cdiv(n_st, cfg.stream_ctas or num_ctas or num_sms())  # tiles per streaming CTA
    n_w = _cdiv(n_st, per)                         # streaming CTAs (each has >= 1 tile)
    n_zs = _cdiv(n_w, nfq * B)                     # grid rows that hold them, before the full heads' rows
    grid, grid_names = (nfq, B, n_zs + n_qt), ("heads", "batch", "q_seq")
  else:
    n_x = nfq + _cdiv(Hq - nfq, fold)
    grid, grid_names = (n_x, B, n_qt), ("heads", "batch", "q_seq")
  looped_stream = cfg.persistent or (kinds != "full" and (per > 1 if stream_first else fold > 1))
  elem = jnp.dtype(dtype).itemsize
  kv_bytes = 2 * stages * bkv_max * D * elem
  # Looped streaming CTAs double-buffer Q (the next tile's Q loads while this tile runs) when SMEM has room.
  # (Two Q buffers in the ring rows that 128-key streaming steps leave free in 192-row slots measured slower:
  # the duo mix at 16k took 1.20 vs 1.16 ms, ptxas spilled 132 vs 68 bytes.)
  q_bufs = 2 if (looped_stream and kv_bytes + 4 * bq * D * elem + 2048 <= 227 * 1024) else 1

  def round_robin(worker, n_workers, n_heads, head0=None):
    """Tiles ``worker, worker + n_workers, ...`` of the tile list of ``n_heads`` query heads (from ``head0``),
    ordered heads fastest, then batch, then query tiles from the last: ``(count, tile(j) -> (q_head, batch,
    q_tile))``. The CTAs in flight work on neighbouring tiles and share K/V through L2."""
    def tile(j):
      u = worker + j * n_workers
      h, r = lax.rem(u, i32(n_heads)), lax.div(u, i32(n_heads))
      return h if head0 is None else head0 + h, lax.rem(r, i32(B)), (n_qt - 1) - lax.div(r, i32(B))

    return lax.div(i32(n_heads * B * n_qt - 1) - worker, i32(n_workers)) + 1, tile

  def plans():
    """The CTA kinds of this launch: ``[(condition or None, _Plan)]``."""
    if cfg.persistent:
      n_my, tile = round_robin(lax.axis_index("cta"), n_ctas, Hq)
      return [(None, _Plan(nf == Hkv, bkv_full if nf == Hkv else bkv_stream, n_my, tile, True))]
    if stream_first:
      x, b, z = lax.axis_index("heads"), lax.axis_index("batch"), lax.axis_index("q_seq")
      w = (z * B + b) * nfq + x                        # streaming CTA index (rows z < n_zs)
      n_my, stream_tile = round_robin(w, n_w, nsq, nfq)
      full_plan = _Plan(True, bkv_full, 1, lambda j: (x, b, (n_qt - 1) - (z - n_zs)), False)
      return [(z >= n_zs, full_plan), ((z < n_zs) & (w < n_w), _Plan(False, bkv_stream, n_my, stream_tile, per > 1))]
    x, b, qi = lax.axis_index("heads"), lax.axis_index("batch"), (n_qt - 1) - lax.axis_index("q_seq")
    full_plan = _Plan(True, bkv_full, 1, lambda j: (x, b, qi), False)
    if fold == 1:
      stream_plan = _Plan(False, bkv_stream, 1, lambda j: (x, b, qi), False)
    else:
      h0 = nfq + (x - nfq) * fold
      stream_plan = _Plan(False, bkv_stream, lax.min(i32(fold), Hq - h0), lambda j: (h0 + j, b, qi), True)
    if kinds == "full":
      return [(None, full_plan)]
    if kinds == "streaming":
      return [(None, stream_plan)]
    return [(x < nfq, full_plan), (x >= nfq, stream_plan)]

  def body(q_ref, k_ref, v_ref, out_ref, lse_ref, q_smem3, kv_smem, lse_smem2, p_smem_stream,
           p_smem_full, p_smem_half, k_bar, v_bar, q_bar, k_cons, v_cons, sched_bar):
    wg = lax.axis_index("wg")

    def sched_sync():
      plgpu.barrier_arrive(sched_bar)
      plgpu.barrier_wait(sched_bar)

    # Consumed-slot signals: both compute warpgroups release a slot's K (after QK^T) and V (after PV); the
    # producer waits for the release before it refills the slot.
    def release(cons, first_id, slot):
      if named_cons:
        _named_barrier("arrive", i32(first_id) + slot, 384)
      else:
        plgpu.barrier_arrive(cons.at[slot])

    def await_release(cons, first_id, slot):
      if named_cons:
        _named_barrier("sync", i32(first_id) + slot, 384)
      else:
        plgpu.barrier_wait(cons.at[slot])

    release_k = lambda slot: release(k_cons, _CONS_BAR, slot)
    release_v = lambda slot: release(v_cons, _CONS_BAR + stages, slot)

    # The ping-pong between the compute warpgroups (FA3): a warpgroup issues its QK wgmma, lets the other one
    # go (after_qk), runs its softmax and waits for its turn before PV (before_pv). With named barriers (GPU):
    # warpgroup w arrives on the other's hardware barrier and syncs on its own; with the mbarrier (interpreter
    # too) both rendezvous. Per tile of n steps: warpgroup 1 first waits for warpgroup 0's first QK (start),
    # then each step does one after_qk and one before_pv, except that warpgroup 1 does not wait before its
    # last PV. So every barrier sees its arrivals and syncs alternate: warpgroup 0 never arrives twice on
    # warpgroup 1's barrier before warpgroup 1 syncs (a hardware named barrier would then complete without
    # warpgroup 1, and the next tile of a looped CTA would hang; it did, before, with an extra arrive at the
    # end of each tile).
    if named:
      def sched_after_qk():
        _named_barrier("arrive", _SCHED_BAR + 1 - wg)

      def sched_before_pv(slot, last):
        plgpu.barrier_wait(v_bar.at[slot])
        pl.when((wg == 0) | ~last)(lambda: _named_barrier("sync", _SCHED_BAR + wg))

      def sched_start():
        pl.when(wg == 1)(lambda: _named_barrier("sync", _SCHED_BAR + 1))
    else:
      sched_after_qk = sched_sync

      def sched_before_pv(slot, last):
        go = (wg == 0) | ~last
        pl.when(go)(lambda: plgpu.barrier_arrive(sched_bar))
        plgpu.barrier_wait(v_bar.at[slot])
        pl.when(go)(lambda: plgpu.barrier_wait(sched_bar))

      def sched_start():
        pl.when(wg == 1)(sched_sync)

    def run(plan: _Plan):
      full, bkv, tile = plan.full, plan.bkv, plan.tile
      nkb = _cdiv(sk_pad, bkv)  # key blocks
      ns = _cdiv(sink, bkv)     # blocks holding sink keys
      nsf = sink // bkv         # blocks made only of sink keys
      # K/V slots: the first bkv rows of the ring's bkv_max-row slots (K slot s at s, V slot s at stages + s).
      def k_slot(i, start=0, rows=bkv):
        """Rows ``[start, start + rows)`` of K slot ``i`` (default: the step's block)."""
        return kv_smem.at[i] if (start, rows) == (0, bkv_max) else kv_smem.at[i, pl.ds(start, rows)]

      v_slot = lambda slot, start=0, rows=bkv: k_slot(stages + slot, start, rows)

      def schedule(q_head, qi):
        """The CTA's KV step schedule, shared by the producer and the consumers (traced int32 scalars)."""
        p0 = i32(q_offset) + qi * (2 * bq)            # position of the CTA's first query row
        p1 = p0 + (2 * bq - 1)
        hi_cta = lax.min(lax.div(p1, i32(bkv)) + 1, i32(nkb))
        if full:  # blocks [0, diagonal]
          lo_cta = s_cta = i32(0)
        else:     # the sink blocks, then [the window's first block, diagonal]
          lo_cta = lax.div(lax.max(p0 - (window - 1), i32(0)), i32(bkv))
          s_cta = lax.min(i32(ns), lo_cta)
        return dict(kv_head=lax.div(q_head, i32(G)), hi_cta=hi_cta, lo_cta=lo_cta, s_cta=s_cta,
                    n_cta=s_cta + hi_cta - lo_cta)

      def block_of(t, sch):
        return t if full else jnp.where(t < sch["s_cta"], t, t - sch["s_cta"] + sch["lo_cta"])

      @pl.when(wg < 2)
      def _compute():
        if not interpret:
          plgpu.set_max_registers(232, action="increase")
        lse_smem = lse_smem2.at[wg]
        n_qbuf = 2 if (plan.looped and q_bufs == 2) else 1

        def issue_q(j, buf):  # into this warpgroup's Q buffer (which also stages its output, unless stage_out)
          h, b, qi = tile(j)
          row0 = qi * (2 * bq) + wg * bq
          plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], q_smem3.at[buf, wg], q_bar.at[buf * 2 + wg])

        # Looped CTAs with one Q buffer whose K/V slots have >= bq spare rows (streaming CTAs of a duo layer:
        # 128-key steps in 192-row slots) stage their output in those spare rows (warpgroup w: K slot w), so
        # the next tile's Q can load into the Q buffer as soon as this tile's last QK^T is done, instead of
        # after the output store has drained.
        stage_out = plan.looped and n_qbuf == 1 and bkv_max - bkv >= bq
        if n_qbuf == 2 or stage_out:
          issue_q(i32(0), 0)

        def tile_body(j, g0):
          q_head, b, qi = tile(j)
          sch = schedule(q_head, qi)
          n_cta = sch["n_cta"]
          buf = lax.rem(j, i32(2)) if n_qbuf == 2 else 0
          qo_smem = q_smem3.at[buf, wg]

          def prefetch_next_q():
            # The previous tile's output (in the other Q buffer) and lse stores must have left SMEM first.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            @pl.when(j + 1 < plan.n_my)
            def _():
              issue_q(j + 1, 1 - buf)

          if n_qbuf == 1 and not stage_out:
            if plan.looped:
              plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            issue_q(j, 0)
          elif not cfg.defer_q_prefetch:
            prefetch_next_q()

          def slot_of(t):
            return lax.rem(t if isinstance(g0, int) else g0 + t, i32(stages))

          def wait_next_k(t):
            @pl.when(t + 1 < n_cta)
            def _():
              plgpu.barrier_wait(k_bar.at[slot_of(t + 1)])

          row0 = qi * (2 * bq) + wg * bq            # first row of this warpgroup (padded q index)
          a = i32(q_offset) + row0                  # its position
          bpos = a + (bq - 1)
          lo_cta, s_cta = sch["lo_cta"], sch["s_cta"]
          to_step = lambda blk: blk - lo_cta + s_cta

          plgpu.barrier_wait(q_bar.at[buf * 2 + wg])

          # Segment bounds (block indices), see the module docstring.
          hi_wg = lax.min(lax.div(bpos, i32(bkv)) + 1, i32(nkb))
          if full:
            m0 = i32(0)
          else:
            lo_w_wg = lax.div(lax.max(a - (window - 1), i32(0)), i32(bkv))
            lo_need = lax.min(jnp.where(i32(ns) > lo_cta, lo_cta, lo_w_wg), hi_wg)
            mlo = lax.div(lax.max(bpos - window, i32(-1)) + bkv, i32(bkv))
            m0 = lax.min(lax.max(mlo, lo_need), hi_wg)
          m1 = lax.min(lax.max(lax.div(a + 1, i32(bkv)), m0), hi_wg)
          if stage_out:
            # This warpgroup's last QK^T step: the window part's last step, else the sink part's (-1: none).
            last_qk = jnp.where(hi_wg > lo_need, to_step(hi_wg) - 1, s_cta - 1)
            prefetch_q = lambda: pl.when(j + 1 < plan.n_my)(lambda: issue_q(j + 1, 0))
          window_eff = _FULL_WINDOW if full else window

          m_i = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
          l_i = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
          acc = plgpu.layout_cast(jnp.full((bq, D), 0.0, jnp.float32), plgpu.Layout.WGMMA)

          @pl.when(n_cta > 0)
          def _():
            plgpu.barrier_wait(k_bar.at[slot_of(0)])

          sched_start()

          def skip_step(t, carry):
            slot = slot_of(t)
            release_k(slot)
            sched_after_qk()
            sched_before_pv(slot, t + 1 == n_cta)
            wait_next_k(t)
            release_v(slot)
            return carry

          def compute_step(t, carry, mask: str | None, half: int | None = None):
            """One KV step; ``half`` (0 or 1): only that 64-key half of the 128-key block (the other half is
            invisible to every row of this warpgroup)."""
            acc, m_i, l_i = carry
            slot = slot_of(t)
            bcast = lambda x, shape: lax.broadcast_in_dim(x, shape, [0])
            width, start = (bkv, 0) if half is None else (_HALF, half * _HALF)
            k_ref_s, v_ref_s = k_slot(slot, start, width), v_slot(slot, start, width)

            def compute_qk(acc_ref):
              plgpu.wgmma(acc_ref, qo_smem, k_ref_s.T)
              sched_after_qk()
              return acc_ref[...]

            s = pl.run_scoped(compute_qk, plgpu.ACC((bq, width), jnp.float32))
            release_k(slot)
            if stage_out:  # the Q buffer is free after the tile's last QK^T
              pl.when(t == last_qk)(prefetch_q)
            if mask is not None:
              # Per-row thresholds in block-local key coordinates: key column c (position k0 + c) is causal
              # for row r iff c <= last[r]; inside the window iff c > last[r] - window; a sink iff c < sink - k0.
              k0 = block_of(t, sch) * bkv + start
              rowi = plgpu.broadcasted_iota(jnp.int32, (bq,), 0, layout=plgpu.Layout.WGMMA.reduce(1))
              last = rowi + (a - k0)
              cols = plgpu.broadcasted_iota(jnp.int32, (bq, width), 1, layout=plgpu.Layout.WGMMA)
              if mask == "window":  # no sink key in the block and every key <= the warpgroup's first row
                vis = cols > bcast(last - window_eff, s.shape)
              else:
                vis = cols <= bcast(last, s.shape)
              if mask == "full":
                vis = vis & ((cols < sink - k0) | (cols > bcast(last - window_eff, s.shape)))
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
            if D <= 128:
              l_i = l_i + p.sum(axis=1)
              acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
              sched_before_pv(slot, t + 1 == n_cta)
            else:
              sched_before_pv(slot, t + 1 == n_cta)
              l_i = l_i + p.sum(axis=1)

            if interpret:
              p_smem = (p_smem_half if half is not None else p_smem_full if full else p_smem_stream).at[wg]
              p_smem[...] = p16
              plgpu.commit_smem()

              def compute_pv(acc_ref):
                plgpu.wgmma(acc_ref, p_smem, v_ref_s)
                wait_next_k(t)
                return acc_ref[...]

              acc = acc + pl.run_scoped(compute_pv, plgpu.ACC((bq, D), jnp.float32))
            else:
              def compute_pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_ref_s)
                wait_next_k(t)

              acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
            release_v(slot)
            return acc, m_new, l_i

          nomask_step = functools.partial(compute_step, mask=None)
          mask_step = functools.partial(compute_step, mask="full")        # causal & (sink | window)
          causal_step = functools.partial(compute_step, mask="causal")    # blocks past the window's left edge
          halves = cfg.half_steps and bkv == 2 * _HALF

          def sink_and_window_edge(carry):
            """A streaming head's first segments: the sink blocks, the skipped gap and the masked window edge."""
            # Sink part: whole sink blocks unmasked, the partial one masked.
            seg_sink_nomask = lax.min(s_cta, i32(nsf))
            carry = lax.fori_loop(i32(0), seg_sink_nomask, nomask_step, carry)
            carry = lax.fori_loop(seg_sink_nomask, s_cta, mask_step, carry)
            if n_qbuf == 2 and cfg.defer_q_prefetch:
              # After the sink steps, so that this tile's first steps do not wait for the previous tile's
              # output store to drain (this tile's Q is already in SMEM).
              prefetch_next_q()
            # Window part: skip what only the other warpgroup needs, mask the edges.
            carry = lax.fori_loop(s_cta, to_step(lo_need), skip_step, carry)
            lo = lo_need
            if halves:
              # The window's first block holds no sink key and its first half lies at or before every row's
              # window edge (key k0 + 63 <= a - window): compute its second half only.
              k0 = lo_need * bkv
              hf = ((lo_need < m0) & (k0 >= sink) & (a - window - k0 >= _HALF - 1)).astype(jnp.int32)
              carry = lax.fori_loop(to_step(lo_need), to_step(lo_need) + hf,
                                    functools.partial(compute_step, mask="full", half=1), carry)
              lo = lo_need + hf
            if cfg.window_mask:
              # Inside the masked window edge, the blocks past the sink blocks and wholly at or before the
              # warpgroup's first row need only the window compare (one compare and a select per score).
              w0 = lax.min(lax.max(lo, i32(ns)), m0)
              w1 = lax.min(lax.max(lax.div(a + 1, i32(bkv)), w0), m0)
              carry = lax.fori_loop(to_step(lo), to_step(w0), mask_step, carry)
              carry = lax.fori_loop(to_step(w0), to_step(w1), functools.partial(compute_step, mask="window"),
                                    carry)
              carry = lax.fori_loop(to_step(w1), to_step(m0), mask_step, carry)
            else:
              carry = lax.fori_loop(to_step(lo), to_step(m0), mask_step, carry)
            return carry

          carry = (acc, m_i, l_i)
          if full:  # no sink or window segments to compile (m0 = 0)
            if n_qbuf == 2 and cfg.defer_q_prefetch:
              prefetch_next_q()
          else:
            carry = sink_and_window_edge(carry)
          carry = lax.fori_loop(to_step(m0), to_step(m1), nomask_step, carry)
          if halves:
            # The last causal block's second half lies past every row's diagonal: compute its first half only.
            hl = ((hi_wg > m1) & (bpos - (hi_wg - 1) * bkv < _HALF)).astype(jnp.int32)
            carry = lax.fori_loop(to_step(m1), to_step(hi_wg) - hl, causal_step, carry)
            carry = lax.fori_loop(to_step(hi_wg) - hl, to_step(hi_wg),
                                  functools.partial(compute_step, mask="causal", half=0), carry)
          else:
            carry = lax.fori_loop(to_step(m1), to_step(hi_wg), causal_step, carry)
          carry = lax.fori_loop(to_step(hi_wg), n_cta, skip_step, carry)
          acc, m_i, l_i = carry
          if stage_out:
            pl.when(last_qk < 0)(prefetch_q)  # a tile whose rows of this warpgroup see no key

          l_ok = l_i > 0.0
          inv_l = 1.0 / jnp.where(l_ok, l_i, 1.0)
          acc = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
          o_smem = qo_smem
          if stage_out:
            o_smem = k_slot(wg, bkv, bq)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's output and lse stores
          o_smem[...] = acc.astype(dtype)
          lse_smem[...] = jnp.where(l_ok, m_i * _LN2 + jnp.log(jnp.where(l_ok, l_i, 1.0)), -jnp.inf)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(o_smem, out_ref.at[b, pl.ds(row0, bq), q_head])
          plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, q_head, pl.ds(row0, bq)])
          return g0 + n_cta

        if plan.looped:
          lax.fori_loop(i32(0), plan.n_my, tile_body, i32(0))
        else:
          tile_body(0, 0)  # static zeros: fewer live registers in the one-tile-per-CTA kernel
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

      @pl.when(wg == 2)
      def _producer():
        if not interpret:
          plgpu.set_max_registers(40, action="decrease")

        def tile_body(j, g0):
          q_head, b, qi = tile(j)
          sch = schedule(q_head, qi)
          kv_head = sch["kv_head"]

          def load(t, slot, wait):  # wait: None (fresh slot), True, or a traced bool
            sl = (b, pl.ds(block_of(t, sch) * bkv, bkv), kv_head)

            def wait_released(cons, first_id):
              if wait is True:
                await_release(cons, first_id, slot)
              elif wait is not None:
                pl.when(wait)(lambda: await_release(cons, first_id, slot))

            wait_released(k_cons, _CONS_BAR)
            plgpu.copy_gmem_to_smem(k_ref.at[sl], k_slot(slot), k_bar.at[slot])
            wait_released(v_cons, _CONS_BAR + stages)
            plgpu.copy_gmem_to_smem(v_ref.at[sl], v_slot(slot), v_bar.at[slot])

          if isinstance(g0, int):  # first (only) tile: fill the ring, then wait for each slot's release
            for i in range(stages):
              pl.when(i < sch["n_cta"])(functools.partial(load, i32(i), i, None))

            @pl.loop(i32(stages), lax.max(sch["n_cta"], i32(stages)))
            def _(t):
              load(t, lax.rem(t, i32(stages)), True)
          else:
            @pl.loop(i32(0), sch["n_cta"])
            def _(t):
              g = g0 + t
              load(t, lax.rem(g, i32(stages)), g >= stages)

          return g0 + sch["n_cta"]

        if plan.looped:
          g_end = lax.fori_loop(i32(0), plan.n_my, tile_body, i32(0))
        else:
          g_end = tile_body(0, 0)

        # Observe the last consumed phases too (keeps every barrier's phases consumed; the interpreter checks
        # it).
        @pl.loop(lax.max(g_end - stages, i32(0)), g_end)
        def _(g):
          slot = lax.rem(g, i32(stages))
          await_release(k_cons, _CONS_BAR, slot)
          await_release(v_cons, _CONS_BAR + stages, slot)

    for cond, plan in plans():
      if cond is None:
        run(plan)
      else:
        pl.when(cond)(functools.partial(run, plan))

  smem = lambda shape: plgpu.SMEM(shape, dtype, transforms=(tiling, swizzle))
  scratch = [
      smem((q_bufs, 2, bq, D)),
      smem((2 * stages, bkv_max, D)),  # K ring (slots [0, stages)), then the V ring
      plgpu.SMEM((2, bq), jnp.float32),
      # Interpreter only: P staged through SMEM (streaming and full heads' step widths).
      smem((2, bq, bkv_stream)) if interpret else None,
      smem((2, bq, bkv_full)) if interpret else None,
      smem((2, bq, _HALF)) if interpret else None,
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=2 * q_bufs),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_arrivals=2),
  ]
  out_type = (jax.ShapeDtypeStruct((B, sq_in, Hq, D), dtype),
              jax.ShapeDtypeStruct((B, Hq, sq_pad), jnp.float32))
  kernel = plgpu.kernel(
      body,
      out_type=out_type,
      scratch_types=scratch,
      grid=grid,
      grid_names=grid_names,
      num_threads=_NUM_WARPGROUPS,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          approx_math=True,
          unsafe_no_auto_barriers=cfg.no_auto_barriers,
          **({} if cfg.reduction_scratch_bytes is None
             else dict(reduction_scratch_bytes=cfg.reduction_scratch_bytes))),
      interpret=interpret_params(_NUM_WARPGROUPS) if interpret else None,
  )
  out, lse = kernel(q, k, v)
  return out[:, :Sq], lse[:, :, :Sq]
