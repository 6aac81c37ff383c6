"""Probe: how fast does a bare TMA stream read HBM, by access pattern, arrays per stage and size?

Session 15 found weight tiles streaming at about 3.8 TB/s in every GEMV layout it tried (including pre-tiled,
fully contiguous 16 KB copies and a TMA stream with no compute), while the decode attention kernel reads K/V at
4.55. This probe isolates the TMA stream: each CTA runs a ring of ``stages`` slots, waits for a slot and
refills it, with no compute. Patterns (bf16, boxes of ``rows x 128`` = 16 KB at 64 rows):

  heads     arrays ``[S, H * 128]`` read as the decode kernel reads a cache ``[S, H, 128]``: grid
            ``(splits, H)``, CTA ``(s, h)`` reads rows ``[s * S / splits, ...)`` of column block ``h`` (each
            box 64 segments of 256 B at a stride of ``H * 256`` B)
  contig    arrays ``[S, 128]``: grid ``(ctas,)``, each CTA reads its own contiguous range of rows (each box
            16 KB contiguous)
  kn        arrays ``[K, N]`` read as the GEMV reads weights: grid ``(N / 64, 1)``, CTA ``n`` reads boxes of
            ``128 x 64`` (128 segments of 128 B at a stride of ``2 N`` B) down its column strip

``arrays=2`` reads two arrays per stage into two slots (K and V); ``arrays=1`` reads one array per stage with
twice the stages (the same bytes in flight). Timed host-side: chunks of back-to-back calls, round-robin.

Sizes: about 1074, 101 and 34 MB per kernel. A call runs one kernel on each of about 1 GB of distinct arrays,
back to back, as a decode step runs one projection per layer.

References in the same run:
- duojax's decode attention (its combine included) on the same bytes as ``heads``, read as a 32-KV-head cache;
- duojax's GEMV over 8 Llama-2 q,k,v layers (its partial sum included);
- XLA's float32 sum over 1 GiB.

``--chain``: chains of ten 101 MB streams, each followed by small dependent XLA kernels (a decode layer's glue).
They run with and without L2 prefetches (``plgpu.async_prefetch``), either of the next kernel's first boxes at
each kernel's end, or of a kernel's own boxes ahead of its ring.

    python benchmarks/probe_tma_stream.py --out DIR
    python benchmarks/probe_tma_stream.py --chain --out DIR
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks.result_file import write_result  # noqa: E402
from benchmarks.timing import chunk_samples, round_robin  # noqa: E402
from duojax.kernels import gemv_mgpu  # noqa: E402
from duojax.kernels.decode import duo_decode_attention  # noqa: E402
from duojax.kernels.hardware import num_sms  # noqa: E402


def stream(arrs, *, pattern: str, stages: int, splits: int = 1, ctas: int = 0, box_rows: int = 64,
           next_arrs=(), next_pf: int = 0, ahead: int = 0, dep=None, pdl: str = "off", interpret: bool = False):
  """Read every byte of ``arrs`` (one or two bf16 arrays of one shape) through a TMA ring; returns each CTA's
  last slot of the first array (so the copies have a consumer).

  ``ahead``: each CTA also issues L2 prefetches (``plgpu.async_prefetch``) of its own boxes ``ahead`` steps
  beyond the ring. ``next_arrs``/``next_pf``: at its end each CTA prefetches the first ``next_pf`` boxes that
  the same CTA of the next kernel (same pattern and shape) reads first. ``dep``: an unused input that orders
  the launch after the kernel that makes it. ``pdl``: programmatic dependent launch. ``"exit"``: the kernel issues
its first ``stages`` copies, then waits for the previous kernel (``griddepcontrol_wait``, as a GEMV must before
it reads its input), and its dependents launch as its CTAs exit; ``"early"``: it also lets its dependents launch
right after that wait (``griddepcontrol_launch_dependents``)."""
  A = len(arrs)
  NA = len(next_arrs)
  extra = () if dep is None else (dep,)
  shape = arrs[0].shape
  if pattern == "heads":
    S, W = shape
    H = W // 128
    grid, names = (splits, H), ("s", "h")
    box = (box_rows, 128)
    n_steps = S // splits // box_rows
  elif pattern == "contig":
    S, _ = shape
    grid, names = (ctas,), ("c",)
    box = (box_rows, 128)
    n_steps = S // ctas // box_rows
  elif pattern == "kn":
    K, N = shape
    grid, names = (N // 64,), ("c",)
    box = (128, 64)
    n_steps = K // 128
  else:
    raise ValueError(f"pattern {pattern!r}; allowed: heads, contig, kn")
  assert n_steps >= stages, (pattern, shape, n_steps, stages)

  def src(ref, step):
    if pattern == "heads":
      s, h = lax.axis_index("s"), lax.axis_index("h")
      return ref.at[pl.ds((s * n_steps + step) * box_rows, box_rows), pl.ds(h * 128, 128)]
    c = lax.axis_index("c")
    if pattern == "contig":
      return ref.at[pl.ds((c * n_steps + step) * box_rows, box_rows), :]
    return ref.at[pl.ds(step * 128, 128), pl.ds(c * 64, 64)]

  def body(*refs):
    in_refs, nxt = refs[:A], refs[A:A + NA]
    o_ref, smem, bar = refs[A + NA + len(extra):]

    def prefetch(refs_, step):
      for r in refs_:
        plgpu.async_prefetch(src(r, step))

    def issue(step, slot):
      for a in range(A):
        plgpu.copy_gmem_to_smem(src(in_refs[a], step), smem.at[a, slot], bar.at[a * stages + slot])

    for i in range(stages):
      issue(i, i)
    if pdl != "off":
      plgpu.griddepcontrol_wait()
    if pdl == "early":
      plgpu.griddepcontrol_launch_dependents()
    for i in range(stages, min(stages + ahead, n_steps)):
      prefetch(in_refs, i)

    def step(j, carry):
      slot = lax.rem(j, jnp.int32(stages))
      for a in range(A):
        plgpu.barrier_wait(bar.at[a * stages + slot])

      @pl.when(j + stages < n_steps)
      def _():
        issue(j + stages, slot)

      if ahead:
        @pl.when(j + stages + ahead < n_steps)
        def _():
          prefetch(in_refs, j + stages + ahead)
      return carry

    lax.fori_loop(0, n_steps, step, None)
    for i in range(next_pf):
      prefetch(nxt, i)
    cta = lax.axis_index(names[0]) * (grid[1] if len(grid) > 1 else 1) + (
        lax.axis_index(names[1]) if len(grid) > 1 else 0)
    plgpu.copy_smem_to_gmem(smem.at[0, lax.rem(jnp.int32(n_steps - 1), jnp.int32(stages))], o_ref.at[cta])
    plgpu.wait_smem_to_gmem(0)

  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)
  n_ctas = grid[0] * (grid[1] if len(grid) > 1 else 1)
  scratch = [plgpu.SMEM((A, stages) + box, jnp.bfloat16, transforms=(tiling, swizzle)),
             plgpu.Barrier(num_barriers=A * stages)]
  kwargs = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
  return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((n_ctas,) + box, jnp.bfloat16), scratch_types=scratch,
                      grid=grid, grid_names=names, **kwargs)(*arrs, *next_arrs, *extra)


def reference_cases(key):
  """duojax's GEMV over 8 Llama-2 q,k,v layers and XLA's float32 sum over 1 GiB."""
  x = normal(jax.random.key(99), (1, 4096))
  ws = [tuple(0.02 * normal(jax.random.fold_in(key, 100 + 3 * i + j), (4096, 4096)) for j in range(3))
        for i in range(8)]
  big = normal(jax.random.key(5), (512 * 1024 * 1024,))
  return [("duojax GEMV q,k,v 101MB x 8", jax.jit(lambda x, ws: [gemv_mgpu.gemv_multi(x, w) for w in ws]),
           (x, ws), 8 * 3 * 4096 * 4096 * 2),
          ("XLA float32 sum 1074MB", jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), (big,), big.size * 2)]


def glue(out):
  """Four small dependent XLA kernels on a 4096-vector, like a decode layer's norms and residual adds."""
  v = out.reshape(-1)[:4096].astype(jnp.float32)
  v = v * lax.rsqrt(jnp.mean(v * v) + 1e-6)
  v = jnp.tanh(v) + 1.0
  v = v / jnp.sum(jnp.abs(v))
  return jnp.cumsum(v)


def chain_cases(key, layers: int = 10):
  """Chains of ``layers`` 101 MB streams, each followed by glue that the next stream waits for."""
  S = 6144
  sets = [normal(jax.random.fold_in(key, 500 + i), (2 * S * 32, 128)) for i in range(layers)]
  nbytes = layers * sets[0].size * 2
  contig = dict(pattern="contig", stages=4, ctas=256)
  kn = dict(pattern="kn", stages=4)
  kn_sets = [a.reshape(S // 2, 16384) for a in sets]
  cases = []
  for label, kw, arrays in (("contig", contig, sets), ("kn", kn, kn_sets)):
    variants = [(False, 0, 0), (True, 0, 0), (True, 2, 0), (True, 4, 0), (True, 8, 0), (True, 0, 4), (True, 0, 8),
                (True, 4, 4)] if label == "contig" else [(True, 0, 0), (True, 4, 0), (True, 8, 0), (True, 0, 4)]
    for with_glue, next_pf, ahead in variants:
      def f(arrays, kw=kw, with_glue=with_glue, next_pf=next_pf, ahead=ahead):
        outs, dep = [], None
        for i, a in enumerate(arrays):
          nxt = (arrays[i + 1],) if next_pf and i + 1 < len(arrays) else ()
          o = stream((a,), **kw, next_arrs=nxt, next_pf=next_pf if nxt else 0, ahead=ahead, dep=dep)
          dep = glue(o) if with_glue else None
          outs.append(o if dep is None else dep)
        return outs
      name = (f"{label} 101MB x {layers}, {'glue' if with_glue else 'no glue'}, next-kernel prefetch {next_pf}, "
              f"ahead {ahead}")
      cases.append((name, jax.jit(f), (arrays,), nbytes))
  return cases


def pdl_cases(key):
  """Chains of bare streams with no glue between them (as a layer whose glue lives in its kernels would run),
  with programmatic dependent launch off, at CTA exit, or early: 10 x 101 MB and 31 x 34 MB."""
  cases = []
  for S, layers in ((6144, 10), (2048, 31)):
    sets = [normal(jax.random.fold_in(key, 700 + 50 * layers + i), (2 * S * 32, 128)) for i in range(layers)]
    nbytes = layers * sets[0].size * 2
    for pdl in ("off", "exit", "early"):
      def f(arrays, pdl=pdl):
        return [stream((a,), pattern="contig", stages=4, ctas=256, pdl=pdl) for a in arrays]
      cases.append((f"contig {sets[0].size * 2 / 1e6:.0f}MB x {layers}, no glue, PDL {pdl}", jax.jit(f), (sets,),
                    nbytes))
  return cases


def normal(key, shape):
  return jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32).astype(jnp.bfloat16))(key)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--sizes-mb", nargs="*", type=int, default=[1074, 101, 34])
  ap.add_argument("--chain", action="store_true",
                  help="instead: chains of 101 MB streams with small XLA kernels between them, with and without "
                       "L2 prefetches (of the next kernel's first boxes, or of the kernel's own boxes ahead)")
  ap.add_argument("--pdl", action="store_true",
                  help="instead: chains of streams with no glue, programmatic dependent launch off / at exit / early")
  ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
  args = ap.parse_args(argv)
  slots = 2 * num_sms()
  cases = []  # (name, fn, args, bytes per call)
  key = jax.random.key(0)
  if args.chain:
    cases = chain_cases(key)
  if args.pdl:
    cases = pdl_cases(key)
  for mb in ([] if args.chain or args.pdl else args.sizes_mb):
    # ~mb MB per kernel; a call runs one kernel on each of `layers` distinct array sets (about 1 GB per call,
    # none of it left in L2 from the previous kernel), as a decode step runs one kernel per layer
    S = max(1024, (mb * 10 ** 6 // (2 * 32 * 256)) // 1024 * 1024)
    layers = max(1, 1074 // mb)
    nbytes = 2 * S * 32 * 256
    sets = [[normal(jax.random.fold_in(key, 1000 * mb + 2 * i + t), (S, 32 * 128)) for t in range(2)]
            for i in range(layers)]
    splits = max(1, slots // 32)
    ctas = slots
    while (S * 32) % (ctas * 64):
      ctas -= 1
    views = {  # view name -> per set, the arrays the kernel reads (two arrays or one of twice the rows)
        "a2": [a2 for a2 in sets],
        "a1": [[jnp.concatenate(a2, axis=0)] for a2 in sets],
    }
    views["c2"] = [[a.reshape(S * 32, 128) for a in a2] for a2 in views["a2"]]
    views["c1"] = [[a1[0].reshape(2 * S * 32, 128)] for a1 in views["a1"]]
    views["kn"] = [[a1[0].reshape(S // 2, 16384)] for a1 in views["a1"]]
    for name, view, kw in [
        ("heads x2 arrays (stages 2)", "a2", dict(pattern="heads", stages=2, splits=splits)),
        ("heads x1 array (stages 4)", "a1", dict(pattern="heads", stages=4, splits=2 * splits)),
        ("contig x2 arrays (stages 2)", "c2", dict(pattern="contig", stages=2, ctas=ctas)),
        ("contig x1 array (stages 4)", "c1", dict(pattern="contig", stages=4, ctas=ctas)),
        ("contig x1 array (stages 2, 128-row boxes)", "c1", dict(pattern="contig", stages=2, ctas=ctas,
                                                                  box_rows=128)),
        ("kn x1 array (stages 4)", "kn", dict(pattern="kn", stages=4)),
    ]:
      fn = jax.jit(lambda sets, kw=kw: [stream(arrs, **kw) for arrs in sets])
      cases.append((f"{name} {nbytes / 1e6:.0f}MB x {layers}", fn, (views[view],), nbytes * layers))
    lengths = jnp.full((1,), S, jnp.int32)
    ring = jnp.zeros((1, 320, 0, 128), jnp.bfloat16)
    q = normal(jax.random.fold_in(key, 7), (1, 32, 128))

    def attn(q, sets, lengths=lengths, ring=ring, S=S):
      return [duo_decode_attention(q, k.reshape(1, S, 32, 128), v.reshape(1, S, 32, 128), lengths, ring, ring,
                                   jnp.zeros((1, 320), jnp.int32), sink=64, window=256, impl="pallas")
              for k, v in sets]
    cases.append((f"duojax decode attention (32 heads x {S}) {nbytes / 1e6:.0f}MB x {layers}", jax.jit(attn),
                  (q, views["a2"]), nbytes * layers))
  if not (args.chain or args.pdl):
    cases += reference_cases(key)

  for name, fn, fargs, _ in cases:
    jax.block_until_ready(fn(*fargs))
  def host_timer(fn, fargs):
    return lambda: statistics.median(chunk_samples(fn, fargs, warmup=1, samples=3, inner=10))
  samples = round_robin([host_timer(fn, fargs) for _, fn, fargs, _ in cases], args.rounds)
  rows = []
  print(f"{'case':>75} {'us':>9} {'TB/s':>6}")
  for (name, _, _, nbytes), ts in zip(cases, samples):
    t = statistics.median(ts)
    rows.append(dict(case=name, bytes=nbytes, us=t * 1e6, tb_s=nbytes / t / 1e12, samples_us=[s * 1e6 for s in ts]))
    print(f"{name:>75} {t * 1e6:9.1f} {nbytes / t / 1e12:6.2f}", flush=True)
  write_result(args.out, f"tma_stream_probe{'_chain' if args.chain else ''}{'_pdl' if args.pdl else ''}",
               note="bare TMA streams (no compute) by pattern, arrays per stage and size; host-timed chunks of 10 "
                    "calls", rows=rows)

if __name__ == "__main__":
  main()
