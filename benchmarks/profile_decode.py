"""Where a decode step's time goes: GPU kernel time per kernel name, from a jax.profiler (perfetto) trace.

Builds the same random-weight model and cache as ``bench_efficiency.py``, traces ``--steps`` decode steps of the
jitted while-loop decode at one context and prints the kernels by total GPU time per step, plus the sum of
kernel time against the wall time (the gap is launch and loop overhead).

    python benchmarks/profile_decode.py --model llama2-7b --ratio 0.25 --context 131072
    python benchmarks/profile_decode.py --layers 2 --hlo-out decode_hlo.txt   # a 2-layer model's fusions
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_efficiency import MODELS, SINK, WINDOW, duo_spec, gen_sampling, random_cache, random_model, set_length  # noqa: E402

from duojax.generate import Generator  # noqa: E402
from duojax.models import dense as dense_module  # noqa: E402

from benchmarks.decode_options import add_decode_options, apply_decode_options  # noqa: E402


def gpu_kernel_times(trace_dir: pathlib.Path) -> dict[str, list[float]]:
  """Kernel name -> durations (us) of the events on GPU device lanes of the perfetto trace in trace_dir."""
  path = next(trace_dir.rglob("perfetto_trace.json.gz"))
  doc = json.loads(gzip.open(path).read())
  events = doc["traceEvents"] if isinstance(doc, dict) else doc
  gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
              and "GPU" in str(e.get("args", {}).get("name", ""))}
  if not gpu_pids:
    names = sorted({str(e.get("args", {}).get("name")) for e in events if e.get("name") == "process_name"})
    print("no GPU lanes in the trace; process names:", names[:20])
  out = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in gpu_pids:
      out[e["name"]].append(float(e.get("dur", 0.0)))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", choices=sorted(MODELS), default="llama2-7b")
  ap.add_argument("--ratio", type=float, default=0.25)
  ap.add_argument("--context", type=int, default=131072)
  ap.add_argument("--steps", type=int, default=16)
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--xla-projections", action="store_true", help="XLA dots instead of the Mosaic-GPU GEMV")
  ap.add_argument("--layers", type=int, default=0, help="decoder layers (0: the model's own count)")
  ap.add_argument("--hlo-out", default=None, help="write the optimized HLO of the jitted decode loop here")
  add_decode_options(ap)
  args = ap.parse_args(argv)
  apply_decode_options(args)
  if args.xla_projections:
    dense_module.GEMV_MAX_ROWS = 0
  config = MODELS[args.model]
  if args.layers:
    config = dataclasses.replace(config, num_hidden_layers=args.layers)
  dtype = jnp.bfloat16 if args.model != "tiny" else jnp.float32
  duo = duo_spec(config, args.ratio)
  model = random_model(config, duo, dtype)
  gen = Generator(model, None, max_len=args.context + args.steps, impl="auto")
  cache = random_cache(config, duo, gen.max_len, args.context, dtype)
  logits = jnp.zeros((1, config.vocab_size), jnp.float32)
  stop = jnp.asarray([-2], jnp.int32)

  def run(cache, seed):
    cache = set_length(cache, args.context, SINK, WINDOW)
    out, cache = gen._decode(gen.graphdef, gen.state, cache, logits, jax.random.key(seed), stop,
                             max_new_tokens=args.steps, sampling=gen_sampling(), impl=gen.impl, stream=None)
    out.block_until_ready()
    return cache

  if args.hlo_out:
    lowered = gen._decode.lower(gen.graphdef, gen.state, set_length(cache, args.context, SINK, WINDOW), logits,
                                jax.random.key(0), stop, max_new_tokens=args.steps, sampling=gen_sampling(),
                                impl=gen.impl, stream=None)
    pathlib.Path(args.hlo_out).write_text(lowered.compile().as_text())
    print(f"optimized HLO written to {args.hlo_out}")
  cache = run(cache, 0)  # compile
  t0 = time.perf_counter()
  cache = run(cache, 1)
  wall = (time.perf_counter() - t0) * 1e3 / args.steps
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      cache = run(cache, 2)
    times = gpu_kernel_times(pathlib.Path(d))
  total = sum(sum(v) for v in times.values()) / 1e3 / args.steps
  print(f"{args.model} ratio {args.ratio} context {args.context}: wall {wall:.3f} ms/token, "
        f"GPU kernel time {total:.3f} ms/token, {sum(len(v) for v in times.values()) / args.steps:.0f} kernels/token")
  rows = sorted(times.items(), key=lambda kv: -sum(kv[1]))
  print(f"{'ms/token':>9} {'calls/token':>11} {'us/call':>8}  kernel")
  for name, durs in rows[:args.top]:
    print(f"{sum(durs) / 1e3 / args.steps:9.3f} {len(durs) / args.steps:11.1f} {sum(durs) / len(durs):8.1f}  "
          f"{name[:90]}")


if __name__ == "__main__":
  main()
