"""Probe, not a library path: how fast could a decode layer's four projections run in ONE persistent kernel?

Issue 5's Llama-2 2.5x needs the per-launch costs of the decode step cut (``NOTES_decode.md``, sessions 14-15):
each GEMV launch pays about 4 us on top of streaming its weights. This probe measures what a persistent grid
would pay instead. One launch runs the projections of ``--layers`` Llama-2-7B layers in order (q,k,v; o;
gate,up; down; then the next layer). Between two projections every CTA waits at a grid-wide barrier, a GMEM
semaphore that each CTA increments and then waits on until all have. Before it waits, a CTA issues the first
weight tiles of its next projection, because weights do not depend on the previous result: the TMA ring runs
on from one projection into the next. Each projection splits its (column tile, K tile) items equally over the
CTAs (stream-K) and writes float32 partials. ``--barrier off`` drops the barriers (a streaming bound);
``--layout nk`` stores the weights transposed; ``--x-fixed`` and ``--no-mma`` are diagnostics that drop the
per-step input copies and the wgmma (their products are wrong and are reported as such).

What the probe leaves out: a fused layer would also sum the partials, add the residual, normalize, apply RoPE and
run attention between the projections. Here each projection reads a fixed input ``x`` instead of the previous
result, so this is a bound on the GEMV part only. The first layer's partials are checked against a float64
product.

Compared in the same run: the shipped split-K GEMV kernel, one launch per projection
(``gemv_mgpu.gemv_partials``, kernel only), and XLA's dots.

    python benchmarks/probe_gemv_chain.py --layers 4

Results and reading: ``NOTES_decode.md``, session 15; ``results/gemv_chain_probe_session15_NVIDIA_H200.json``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.result_file import write_result  # noqa: E402
from benchmarks.timing import chunk_samples  # noqa: E402
from duojax.kernels import gemv_mgpu  # noqa: E402
from duojax.kernels.hardware import num_sms  # noqa: E402

LAYER = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]  # Llama-2-7B: q,k,v; o; gate,up; down
ROWS = 8


def _owner(item, ctas, total):
  """The CTA whose equal share ``[c * total // ctas, (c + 1) * total // ctas)`` holds ``item``."""
  return ((item + 1) * ctas + total - 1) // total - 1


def _pieces(n_tiles, k_tiles, ctas):
  total = n_tiles * k_tiles
  return max(_owner(t * k_tiles + k_tiles - 1, ctas, total) - _owner(t * k_tiles, ctas, total) + 1
             for t in range(n_tiles))


def chain(xs, ws, *, ctas, stages, block_k=128, block_n=64, barrier=True, nk=False, tiled=False, x_fixed=False,
          mma=True, interpret=False):
  """``[x_p @ w_p for each p]`` as float32 partials ``[pieces_p, N_p, ROWS]``, all in one persistent launch.

  ``nk``: the weights are stored transposed, ``w_p [N, K]`` (HF's ``nn.Linear`` layout): a tile is ``block_n``
  rows of ``2 * block_k`` contiguous bytes instead of ``block_k`` rows of ``2 * block_n``.
  ``tiled``: the weights are stored as ``[N // block_n, K, block_n]``, so each column tile is one contiguous
  block and every TMA copy reads ``2 * block_k * block_n`` contiguous bytes.
  ``x_fixed`` (a diagnostic; wrong products): every step multiplies the first K tile of ``x``, loaded once, so
  the steps issue and wait for weight copies only. ``mma=False`` (a diagnostic): no wgmma at all, the TMA stream
  alone."""
  P = len(ws)
  geo = []
  for x, w in zip(xs, ws):
    K, N = (w.shape[1], w.shape[0] * w.shape[2]) if tiled else (w.shape[::-1] if nk else w.shape)
    n_tiles, k_tiles = N // block_n, K // block_k
    geo.append((n_tiles, k_tiles, _pieces(n_tiles, k_tiles, ctas)))
  assert all(nt * kt >= ctas for nt, kt, _ in geo), "every CTA needs an item in every projection"

  def body(*refs):
    x_refs, w_refs, o_refs = refs[:P], refs[P:2 * P], refs[2 * P:3 * P]
    x_smem, w_smem, o_smem, z_smem, x_bar, w_bar = refs[3 * P:]
    c = lax.axis_index("c")
    # One counter for the whole grid. A kernel's scratch semaphores are per CTA, so this is a global one, which
    # persists across launches: each CTA adds 1 per barrier (P per launch) and CTA 0 takes the launch's P * ctas
    # back off at the end, once every CTA has passed its last wait.
    sem = pl.get_global(plgpu.SemaphoreType.REGULAR) if barrier and not interpret else None
    z_smem[...] = jnp.zeros((block_n, ROWS), jnp.float32)
    plgpu.commit_smem()

    def span(p):
      n_tiles, k_tiles, _ = geo[p]
      total = n_tiles * k_tiles
      return c * total // ctas, (c + 1) * total // ctas

    def issue_w(p, item, slot):
      k_tiles = geo[p][1]
      nt = item // k_tiles
      k_rows, n_cols = pl.ds((item - nt * k_tiles) * block_k, block_k), pl.ds(nt * block_n, block_n)
      if tiled:
        src = w_refs[p].at[nt, k_rows, :]
      else:
        src = w_refs[p].at[n_cols, k_rows] if nk else w_refs[p].at[k_rows, n_cols]
      plgpu.copy_gmem_to_smem(src, w_smem.at[slot], w_bar.at[slot])

    def issue_x(p, item, slot):
      if x_fixed:
        return
      k_tiles = geo[p][1]
      nt = item // k_tiles
      plgpu.copy_gmem_to_smem(x_refs[p].at[:, pl.ds((item - nt * k_tiles) * block_k, block_k)],
                              x_smem.at[slot], x_bar.at[slot])

    def w_tile(slot):  # the wgmma A operand [block_n, block_k]
      return w_smem.at[slot] if nk else w_smem.at[slot].transpose((1, 0))

    def slot_of(base, j):
      return lax.rem(base + j, jnp.int32(stages))

    if x_fixed:
      for i in range(stages):
        plgpu.copy_gmem_to_smem(x_refs[0].at[:, pl.ds(0, block_k)], x_smem.at[i], x_bar.at[i])
        plgpu.barrier_wait(x_bar.at[i])
    # phase 0: weights and inputs of the first ``stages`` steps
    start0, end0 = span(0)
    for i in range(stages):
      @pl.when(i < end0 - start0)
      def _():
        issue_w(0, start0 + i, slot_of(jnp.int32(0), i))
        issue_x(0, start0 + i, slot_of(jnp.int32(0), i))

    base = c - c  # a traced zero: a literal base made the step loop return a constant the lowering rejects
    for p in range(P):
      n_tiles, k_tiles, pieces = geo[p]
      total = n_tiles * k_tiles
      start, end = span(p)
      n = end - start

      nstart, n_next = (span(p + 1)[0], span(p + 1)[1] - span(p + 1)[0]) if p + 1 < P else (None, None)

      def refill(j, p=p, start=start, n=n, base=base, nstart=nstart, n_next=n_next):
        @pl.when(j + stages < n)
        def _():
          s = slot_of(base, j + stages)
          issue_w(p, start + j + stages, s)
          issue_x(p, start + j + stages, s)

        if n_next is not None:  # the ring runs on into the next projection: its weights need no barrier
          @pl.when((j + stages >= n) & (j + stages - n < n_next))
          def _():
            s = slot_of(base, j + stages)
            issue_w(p + 1, nstart + j + stages - n, s)
            if sem is None:
              issue_x(p + 1, nstart + j + stages - n, s)

      def segment(s, carry, p=p, start=start, end=end, base=base, refill=refill, k_tiles=k_tiles, total=total,
                  pieces=pieces):
        nt = start // k_tiles + s
        a = jnp.maximum(start, nt * k_tiles) - start
        b = jnp.minimum(end, (nt + 1) * k_tiles) - start

        def run(acc_ref):
          def step(j, carry):
            slot = slot_of(base, j)
            plgpu.barrier_wait(w_bar.at[slot])
            if not x_fixed:
              plgpu.barrier_wait(x_bar.at[slot])
            if mma:
              plgpu.wgmma(acc_ref, w_tile(slot), x_smem.at[slot].transpose((1, 0)))
              plgpu.wgmma_wait(0)
            refill(j)
            return carry
          lax.fori_loop(a, b, step, None)

        if interpret:
          def step(j, acc):
            slot = slot_of(base, j)

            def one(acc_ref):
              plgpu.barrier_wait(w_bar.at[slot])
              plgpu.barrier_wait(x_bar.at[slot])
              plgpu.wgmma(acc_ref, w_tile(slot), x_smem.at[slot].transpose((1, 0)))
              return acc_ref[...]
            acc = acc + pl.run_scoped(one, plgpu.ACC((block_n, ROWS), jnp.float32))
            refill(j)
            return acc
          acc = lax.fori_loop(a, b, step, plgpu.layout_cast(jnp.zeros((block_n, ROWS), jnp.float32),
                                                             plgpu.Layout.WGMMA))
        else:
          acc = pl.run_state(run)(plgpu.ACC.init(plgpu.layout_cast(jnp.zeros((block_n, ROWS), jnp.float32),
                                                                   plgpu.Layout.WGMMA)))
        first = nt * k_tiles
        owner0 = _owner(first, ctas, total)
        plgpu.wait_smem_to_gmem(0)
        o_smem[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_refs[p].at[c - owner0, pl.ds(nt * block_n, block_n)])
        if pieces > 1:
          @pl.when(start <= first)
          def _():
            used = _owner(first + k_tiles - 1, ctas, total) - owner0 + 1

            def zero(q, carry):
              plgpu.copy_smem_to_gmem(z_smem, o_refs[p].at[q, pl.ds(nt * block_n, block_n)])
              return carry
            lax.fori_loop(used, pieces, zero, None)
        return carry

      lax.fori_loop(0, (end - 1) // k_tiles - start // k_tiles + 1, segment, None)
      base = base + n
      if p + 1 < P:
        for i in range(stages):  # next-projection steps the ring did not reach (only when n < stages)
          @pl.when((i < n_next) & (i < stages - n))
          def _(i=i, nstart=nstart, base=base, p=p):
            issue_w(p + 1, nstart + i, slot_of(base, i))
            if sem is None:
              issue_x(p + 1, nstart + i, slot_of(base, i))
        plgpu.wait_smem_to_gmem(0)
        if sem is not None:  # the interpreter has no GMEM semaphores (its CTAs need no barrier: fixed inputs)
          pl.semaphore_signal(sem, 1)
          plgpu.semaphore_wait(sem, (p + 1) * ctas, decrement=False, memory_scope="gpu")
          for i in range(stages):  # the inputs of the steps already in flight, now that they are final
            @pl.when(i < n_next)
            def _(i=i, nstart=nstart, base=base, p=p):
              issue_x(p + 1, nstart + i, slot_of(base, i))
    plgpu.wait_smem_to_gmem(0)
    if sem is not None:
      pl.semaphore_signal(sem, 1)

      @pl.when(c == 0)
      def _reset():
        plgpu.semaphore_wait(sem, P * ctas, decrement=True, memory_scope="gpu")

  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)
  scratch = [
      plgpu.SMEM((stages, ROWS, block_k), jnp.bfloat16, transforms=(tiling, swizzle)),
      plgpu.SMEM((stages, block_n, block_k) if nk else (stages, block_k, block_n), jnp.bfloat16,
                 transforms=(tiling, swizzle)),
      plgpu.SMEM((block_n, ROWS), jnp.float32),
      plgpu.SMEM((block_n, ROWS), jnp.float32),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
  ]
  out_type = [jax.ShapeDtypeStruct((pieces, nt * block_n, ROWS), jnp.float32) for nt, _, pieces in geo]
  kwargs = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
  return plgpu.kernel(body, out_type=out_type, scratch_types=scratch, grid=(ctas,), grid_names=("c",),
                      **kwargs)(*xs, *ws)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--ctas-per-sm", type=int, nargs="*", default=[1, 2])
  ap.add_argument("--stages", type=int, default=0, help="0: 8 at 1 CTA per SM, 4 at 2")
  ap.add_argument("--barrier", choices=("on", "off"), default="on",
                  help="off: no grid barrier between projections (a streaming bound; the inputs are fixed anyway)")
  ap.add_argument("--baselines", choices=("on", "off"), default="on")
  ap.add_argument("--layout", choices=("kn", "nk", "tiled"), default="kn",
                  help="the persistent chain's weights: kn as stored, nk transposed, tiled [N/64, K, 64]")
  ap.add_argument("--block-k", type=int, default=128)
  ap.add_argument("--shape", default="", help="KxN: every projection has this shape instead of Llama-2's four")
  ap.add_argument("--x-fixed", action="store_true", help="diagnostic: no per-step x copies (wrong products)")
  ap.add_argument("--no-mma", action="store_true", help="diagnostic: the TMA stream alone, no wgmma")
  ap.add_argument("--tag", default="")
  ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
  args = ap.parse_args(argv)
  layer = [tuple(int(v) for v in args.shape.split("x"))] * 4 if args.shape else LAYER
  shapes = layer * args.layers
  key = jax.random.key(0)
  ws, xs = [], []
  for i, (K, N) in enumerate(shapes):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    ws.append((jax.random.normal(k1, (K, N), jnp.float32) / np.sqrt(K)).astype(jnp.bfloat16))
    x0 = jax.random.normal(k2, (K,), jnp.float32).astype(jnp.bfloat16)
    xs.append(jnp.zeros((ROWS, K), jnp.bfloat16).at[0].set(x0))  # one real row, padded to wgmma's N = 8
  nbytes = sum(K * N * 2 for K, N in shapes)
  sms = num_sms()
  variants = {}
  for cps in args.ctas_per_sm:
    stages = args.stages or (8 if cps == 1 else 4) * 128 // args.block_k
    name = (f"persistent chain, {cps} CTA/SM, {stages} stages, block_k {args.block_k}, barrier {args.barrier}, "
            f"weights {args.layout}" + (", x fixed (diagnostic)" if args.x_fixed else "")
            + (", no wgmma (diagnostic)" if args.no_mma else ""))
    fn = functools.partial(chain, ctas=sms * cps, stages=stages, barrier=args.barrier == "on",
                           nk=args.layout == "nk", tiled=args.layout == "tiled", block_k=args.block_k,
                           x_fixed=args.x_fixed, mma=not args.no_mma)
    # the re-laid-out copies are made once, outside the timed call
    variants[name] = jax.jit(fn) if args.layout == "kn" else _with_layout(jax.jit(fn), args.layout)
  if args.baselines == "on":
    add_baselines(variants, shapes)
  rows = []
  for name, fn in variants.items():
    rows.append(measure(name, fn, xs, ws, nbytes, args.layers))
  print(f"ideal at 4.55 TB/s (the decode attention kernel's rate): {nbytes / args.layers / 4.55e6:.1f} us/layer")
  write_result(args.out, f"gemv_chain_probe{args.tag}", layers=args.layers, shapes=shapes, bytes=nbytes, rows=rows)


def _with_layout(fn, layout, block_n=64):
  """``fn`` taking ``[K, N]`` weights, for a kernel that reads them as ``[N, K]`` ("nk") or ``[N // block_n, K,
  block_n]`` ("tiled"); the copies are made once and cached."""
  cache = {}

  def relayout(w):
    if layout == "nk":
      return jnp.asarray(w.T)
    K, N = w.shape
    return jnp.asarray(w.reshape(K, N // block_n, block_n).transpose(1, 0, 2))

  def call(xs, ws):
    key = id(ws)
    if key not in cache:
      cache.clear()
      cache[key] = [relayout(w) for w in ws]
    return fn(xs, cache[key])
  return call


def add_baselines(variants, shapes):
  configs = [gemv_mgpu.pick_gemv_config(K, N) for K, N in shapes]
  variants["shipped split-K GEMV, one launch per projection"] = jax.jit(
      lambda xs, ws: [gemv_mgpu.gemv_partials(x, (w,), config=cfg) for x, w, cfg in zip(xs, ws, configs)])
  variants["XLA dot, one per projection"] = jax.jit(
      lambda xs, ws: [jnp.einsum("rk,kn->rn", x[:1], w) for x, w in zip(xs, ws)])


def measure(name, fn, xs, ws, nbytes, layers):
  out = fn(xs, ws)
  errs = []
  if not name.startswith("XLA"):
    for p in range(4):
      y = np.asarray(jnp.sum(out[p], axis=0)[:, 0], np.float64)
      ref = np.asarray(xs[p][0], np.float64) @ np.asarray(ws[p], np.float64)
      errs.append(float(np.max(np.abs(y - ref)) / np.max(np.abs(ref))))
  samples = chunk_samples(fn, (xs, ws), warmup=2, samples=7, inner=10)
  t = statistics.median(samples)
  row = dict(variant=name, us_per_layer=t / layers * 1e6, tb_s=nbytes / t / 1e12,
             max_rel_err_first_layer=max(errs) if errs else None,
             samples_us_per_layer=[s / layers * 1e6 for s in samples])
  print(f"{name}: {row['us_per_layer']:7.1f} us/layer  {row['tb_s']:.2f} TB/s  "
        f"rel err {row['max_rel_err_first_layer']}", flush=True)
  return row


if __name__ == "__main__":
  main()
