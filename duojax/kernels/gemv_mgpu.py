"""Pallas Mosaic-GPU (Hopper, sm_90) GEMV for decode projections: ``y [M, N] = x [M, K] @ w [K, N]``, M <= 64.

A decode step's projections read every weight byte once for a handful of rows, so they are bound by memory
bandwidth. The kernel computes the transposed product ``y^T = w^T @ x^T`` on the tensor cores: a ``[block_k,
block_n]`` tile of ``w`` (N contiguous, as stored) is the left operand read transposed from swizzled shared
memory (wgmma M = ``block_n`` = 64), and the ``[rows, block_k]`` tile of ``x`` (rows = M rounded up to 8) is
the right operand (wgmma N = rows). So the shared memory holds weights, not 64 padded rows of ``x``, and the
accumulator is ``[64, rows]`` float32.

Grid ``(N // block_n, splits)``: each CTA reduces a contiguous range of the K tiles of one column tile through
a ``num_stages``-deep TMA ring and writes a float32 partial ``[block_n, rows]``; ``gemv`` sums the splits in
XLA (float32 accumulation throughout, one rounding to the output dtype, as ``jnp.dot`` with
``preferred_element_type=float32`` followed by a cast). The split count fills the GPU for the shape.

``fast=True`` (GPU) keeps the accumulator in place across the K loop (``pl.run_state``); ``fast=False`` adds
a fresh accumulator per step, which is what the CPU interpreter (``plgpu.InterpretGPUParams()``) can run.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from duojax.kernels.hardware import num_sms
from duojax.kernels.interpret import interpret_params

__all__ = ["GemvConfig", "pick_gemv_config", "gemv", "gemv_multi", "gemv_supported"]

BLOCK_N = 64  # the output-column granularity every weight must have (wgmma M is a multiple of 64)
MAX_ROWS = 64
DEFAULT_BLOCK_N = 64  # preferred column tile (64, 128 or 256); the largest <= this that divides every N is used


@dataclasses.dataclass(frozen=True)
class GemvConfig:
  block_k: int = 128
  num_stages: int = 4
  splits: int = 1
  block_n: int = 64  # output columns per CTA = wgmma M; a weight row segment of 2 * block_n contiguous bytes


def gemv_supported(M: int, K: int, N: int, dtype) -> bool:
  """Whether :func:`gemv` takes these shapes: M <= 64 rows, K and N multiples of 64, bf16/fp16."""
  return (1 <= M <= MAX_ROWS and K % 64 == 0 and N % BLOCK_N == 0
          and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))


def pick_gemv_config(K: int, N: int | tuple[int, ...], *, ctas_per_sm: int = 2, num_stages: int = 4,
                     block_n: int | None = None) -> GemvConfig:
  """Block sizes and a split count that give about ``ctas_per_sm`` CTAs per SM (whole waves) for ``[K, N]``
  (``N``: one width, or the widths of the matrices of one launch)."""
  Ns = (N,) if isinstance(N, int) else tuple(N)
  block_n = block_n or DEFAULT_BLOCK_N
  while block_n > BLOCK_N and any(n % block_n for n in Ns):
    block_n //= 2
  # weight tiles of at most 32 KiB (num_stages of them in flight fit SMEM)
  block_k = 128 if (K % 128 == 0 and block_n <= 128) else 64
  k_tiles = K // block_k
  n_tiles = sum(Ns) // block_n
  slots = num_sms() * ctas_per_sm
  best = None
  for splits in range(1, k_tiles + 1):
    ctas = n_tiles * splits
    per = -(-k_tiles // splits)
    if per < 4 and splits > 1:
      break
    waves = -(-ctas // slots)
    # time ~ waves x (tiles per CTA + about 2 tiles of prologue/epilogue); ties keep fewer splits
    cost = waves * (per + 2)
    if best is None or cost < best[0]:
      best = (cost, splits)
  return GemvConfig(block_k=block_k, num_stages=num_stages, splits=best[1], block_n=block_n)


def _gemv_body(x_ref, *refs, block_k, block_n, num_stages, k_tiles, splits, rows, fast, bounds):
  """One (column tile, split). ``bounds``: the column-tile range ``[lo, hi)`` of each weight matrix."""
  w_refs = refs[:len(bounds)]
  o_ref, x_smem, w_smem, o_smem, x_bar, w_bar = refs[len(bounds):]
  nt = lax.axis_index("n")
  sp = lax.axis_index("s")
  per = -(-k_tiles // splits)
  start = sp * per
  n = jnp.clip(k_tiles - start, 0, per)
  n0 = nt * block_n

  def issue(step, slot):
    k0 = (start + step) * block_k
    for w_ref, (lo, hi) in zip(w_refs, bounds):
      def _copy(w_ref=w_ref, lo=lo):
        plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(k0, block_k), pl.ds(n0 - lo * block_n, block_n)], w_smem.at[slot],
                                w_bar.at[slot])
      if len(bounds) == 1:
        _copy()
      else:
        pl.when((nt >= lo) & (nt < hi))(_copy)
    plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(k0, block_k)], x_smem.at[slot], x_bar.at[slot])

  for i in range(num_stages):
    @pl.when(i < n)
    def _prologue():
      issue(i, i)

  def mma(acc_ref, slot):
    plgpu.barrier_wait(w_bar.at[slot])
    plgpu.barrier_wait(x_bar.at[slot])
    plgpu.wgmma(acc_ref, w_smem.at[slot].transpose((1, 0)), x_smem.at[slot].transpose((1, 0)))

  def refill(j, slot):
    @pl.when(j + num_stages < n)
    def _():
      issue(j + num_stages, slot)

  if fast:
    def run(acc_ref):
      def step(j, carry):
        slot = lax.rem(j, jnp.int32(num_stages))
        mma(acc_ref, slot)
        plgpu.wgmma_wait(0)
        refill(j, slot)
        return carry
      lax.fori_loop(0, n, step, 0)

    acc = pl.run_state(run)(plgpu.ACC.init(
        plgpu.layout_cast(jnp.zeros((block_n, rows), jnp.float32), plgpu.Layout.WGMMA)))
  else:
    def step(j, acc):
      slot = lax.rem(j, jnp.int32(num_stages))

      def one(acc_ref):
        mma(acc_ref, slot)
        return acc_ref[...]

      acc = acc + pl.run_scoped(one, plgpu.ACC((block_n, rows), jnp.float32))
      refill(j, slot)
      return acc

    acc = lax.fori_loop(0, n, step, plgpu.layout_cast(jnp.zeros((block_n, rows), jnp.float32),
                                                      plgpu.Layout.WGMMA))
  o_smem[...] = acc
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_ref.at[sp, pl.ds(n0, block_n)])
  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("config", "fast", "interpret"))
def gemv_partials(x, ws, *, config: GemvConfig, fast: bool = True, interpret: bool = False):
  """Split-K partials of ``x [rows, K] @ concat(ws, axis=1)`` for weights ``ws`` (a tuple of ``[K, N_i]``; rows a
  multiple of 8, <= 64) in one launch: ``[splits, sum N_i, rows]`` float32."""
  rows, K = x.shape
  bn = config.block_n
  bounds, lo = [], 0
  for w in ws:
    assert w.shape[1] % bn == 0, (w.shape, bn)
    bounds.append((lo, lo + w.shape[1] // bn))
    lo += w.shape[1] // bn
  n_tiles = lo
  bk, stages = config.block_k, config.num_stages
  k_tiles = K // bk
  splits = config.splits
  per = -(-k_tiles // splits)
  stages = max(1, min(stages, per))
  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)
  scratch = (
      plgpu.SMEM((stages, rows, bk), x.dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((stages, bk, bn), x.dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((bn, rows), jnp.float32),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
  )
  body = functools.partial(_gemv_body, block_k=bk, block_n=bn, num_stages=stages, k_tiles=k_tiles, splits=splits,
                           rows=rows, fast=fast, bounds=tuple(bounds))
  kwargs = {"interpret": interpret_params(1)} if interpret else {}
  call = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((splits, n_tiles * bn, rows), jnp.float32), scratch_types=scratch,
      grid=(n_tiles, splits), grid_names=("n", "s"), **kwargs)
  return call(x, *ws)


def _check(x, ws):
  if x.ndim != 2:
    raise ValueError(f"gemv needs x [M, K]; got x{tuple(x.shape)}")
  M, K = x.shape
  for w in ws:
    if w.ndim != 2 or w.shape[0] != K:
      raise ValueError(f"gemv needs weights [K={K}, N]; got {tuple(w.shape)}")
    if w.dtype != x.dtype:
      raise ValueError(f"x and the weights must share one dtype; got {x.dtype} and {w.dtype}")
    if not gemv_supported(M, K, w.shape[1], x.dtype):
      raise ValueError(f"gemv takes M <= {MAX_ROWS} rows, K and N multiples of 64 and bf16/fp16; got M={M}, "
                       f"K={K}, N={w.shape[1]}, dtype {x.dtype}")


def gemv_multi(x, ws, *, config: GemvConfig | None = None, fast: bool = True, interpret: bool = False):
  """``[x @ w for w in ws]`` in one launch: ``x [M, K]``, each ``w [K, N_i]`` -> ``[M, N_i]`` in ``x.dtype``.

  Float32 accumulation and one rounding per output (as ``jnp.dot(..., preferred_element_type=float32)`` then a
  cast). Shapes must pass :func:`gemv_supported`; all arrays share a dtype (bf16 or fp16).
  """
  ws = tuple(ws)
  _check(x, ws)
  M, K = x.shape
  Ns = [w.shape[1] for w in ws]
  config = config or pick_gemv_config(K, tuple(Ns))
  rows = -(-M // 8) * 8
  xp = jnp.pad(x, ((0, rows - M), (0, 0))) if rows != M else x
  y = jnp.sum(gemv_partials(xp, ws, config=config, fast=fast, interpret=interpret), axis=0)[:, :M].T
  y = y.astype(x.dtype)
  outs, lo = [], 0
  for N in Ns:
    outs.append(y[:, lo:lo + N])
    lo += N
  return outs


def gemv(x, w, *, config: GemvConfig | None = None, fast: bool = True, interpret: bool = False):
  """``x [M, K] @ w [K, N]`` -> ``[M, N]`` in ``x.dtype`` (float32 accumulation, one rounding); M <= 64."""
  return gemv_multi(x, (w,), config=config, fast=fast, interpret=interpret)[0]
