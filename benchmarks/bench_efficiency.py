"""DuoAttention's efficiency benchmarks, in JAX: decode latency and KV memory against context, prefill latency
against chunk size, and the largest context that fits on one GPU, for all-full attention and duo patterns.

Random bf16 weights in the exact shapes of Llama-2-7B (MHA, 32 KV heads) and Llama-3-8B (GQA, 8 KV heads); every
layer gets the same share of retrieval heads. The all-full baseline is the same code with every head a retrieval
head (as in the paper). Decode timing: the jitted ``lax.while_loop`` decode of :mod:`duojax.generate` over a cache
filled with random values up to ``--contexts`` tokens (one compile per model and pattern: the cache is allocated
at the largest context measured, the kernels read only the first ``length`` positions), ``--decode-steps`` tokens
per timed call, median of ``--iters`` calls. KV memory at each context is the exact size of the duo cache arrays;
the peak device memory of each configuration is read from the allocator.

    python benchmarks/bench_efficiency.py --model llama2-7b --ratios 1.0,0.25 --contexts 16384,65536,131072
    python benchmarks/bench_efficiency.py --model tiny   # CPU smoke test of the same code
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from duojax.cache import DuoCache, LayerCache, cache_bytes, init_cache, ring_slot
from duojax.config import DuoSpec, LlamaConfig
from duojax.generate import Generator
from duojax.models.llama import Llama
from duojax.kernels import gemv_mgpu
from duojax.models import dense as dense_module

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root, for benchmarks.*
from benchmarks.decode_options import add_decode_options, apply_decode_options, decode_options_record  # noqa: E402

MODELS = {
    "llama2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                             max_position_embeddings=4096),
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                             max_position_embeddings=8192),
    "tiny": LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, head_dim=32),
}
SINK, WINDOW = 64, 256  # DuoAttention's deployment sizes (NIAH / LongBench)


def random_model(config: LlamaConfig, duo: DuoSpec, dtype, seed: int = 0) -> Llama:
  """A model with N(0, 0.02) weights, generated on the device one tensor at a time."""
  abstract = nnx.eval_shape(lambda: Llama(config, duo, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  make = jax.jit(lambda k, shape, dt: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dt),
                 static_argnums=(1, 2))
  filled = [make(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, filled))


def random_cache(config: LlamaConfig, duo: DuoSpec, max_len: int, length: int, dtype, seed: int = 1) -> DuoCache:
  """A batch-1 cache of random K/V (allocated directly, never twice) holding ``length`` tokens."""
  shapes = jax.eval_shape(lambda: init_cache(config, duo, 1, max_len, dtype))
  rand = jax.jit(lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(dtype), static_argnums=(1,))
  key = jax.random.key(seed)
  layers = []
  for lc in shapes.layers:
    key, *ks = jax.random.split(key, 5)
    layers.append(LayerCache(rand(ks[0], lc.k_full.shape), rand(ks[1], lc.v_full.shape), rand(ks[2], lc.k_ring.shape),
                             rand(ks[3], lc.v_ring.shape), jnp.zeros(lc.ring_pos.shape, jnp.int32)))
  return set_length(DuoCache(tuple(layers), jnp.zeros((1,), jnp.int32)), length, duo.sink, duo.window)


def set_length(cache: DuoCache, length: int, sink: int, window: int) -> DuoCache:
  """The cache as a run that stored ``length`` tokens leaves it (ring positions included)."""
  slots = np.arange(sink + window)
  last = length - 1
  pos = np.where(slots < sink, slots, last - np.mod(last - sink - (slots - sink), window)).astype(np.int32)
  assert np.array_equal(np.asarray(ring_slot(pos, sink, window)), slots) and length > sink + window
  layers = tuple(dataclasses.replace(lc, ring_pos=jnp.broadcast_to(jnp.asarray(pos), lc.ring_pos.shape))
                 for lc in cache.layers)
  return DuoCache(layers, jnp.full((cache.batch,), length, jnp.int32))


def device_memory() -> dict:
  stats = jax.local_devices()[0].memory_stats() or {}
  return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


def kv_bytes_per_token(config: LlamaConfig, duo: DuoSpec, itemsize: int) -> int:
  return 2 * sum(duo.num_full) * config.head_dim * itemsize


def duo_spec(config: LlamaConfig, ratio: float) -> DuoSpec:
  nf = int(round(ratio * config.num_key_value_heads))
  return DuoSpec.from_num_full((nf,) * config.num_hidden_layers, config.num_key_value_heads, SINK, WINDOW)


def bench_decode(config, ratio, contexts, *, steps, iters, dtype, impl, fit_check, extra_context=None):
  duo = duo_spec(config, ratio)
  model = random_model(config, duo, dtype)
  weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
  itemsize = jnp.dtype(dtype).itemsize
  per_token = kv_bytes_per_token(config, duo, itemsize)
  mem = device_memory()
  free = mem.get("bytes_limit", 0) - mem.get("bytes_in_use", 0)
  margin = 8 * 2**30  # decode-loop temporaries (XLA may copy a layer's K/V) and allocator slack
  fit = (free - margin) // per_token // 64 * 64 if free else None
  if extra_context:
    contexts = sorted(set(contexts) | {extra_context})
  if fit is not None:
    contexts = [c for c in contexts if c + steps <= fit]
  rows = []
  result = {"ratio": ratio, "num_full_per_layer": duo.num_full[0], "weights_bytes": weights,
            "kv_bytes_per_token": per_token, "largest_context_estimate": fit, "rows": rows}
  if not contexts:
    return result
  max_len = max(contexts) + steps
  gen = Generator(model, None, max_len=max_len, impl=impl)
  cache = random_cache(config, duo, gen.max_len, max(contexts), dtype)
  sizes = cache_bytes(cache)
  logits = jnp.zeros((1, config.vocab_size), jnp.float32)
  stop = jnp.asarray([-2], jnp.int32)
  for ctx in sorted(contexts):
    times = []
    for it in range(iters + 1):
      cache = set_length(cache, ctx, SINK, WINDOW)
      t0 = time.perf_counter()
      out, cache = gen._decode(gen.graphdef, gen.state, cache, logits, jax.random.key(it), stop,
                               max_new_tokens=steps, sampling=gen_sampling(), impl=gen.impl, stream=None)
      out.block_until_ready()
      if it:  # the first call compiles / warms up
        times.append((time.perf_counter() - t0) / steps)
    kv = int(sizes["retrieval"] * ctx / gen.max_len + sizes["streaming"])
    rows.append({"context": ctx, "decode_ms_per_token": 1e3 * statistics.median(times),
                 "kv_cache_bytes": kv, "memory_estimate_bytes": weights + kv})
    print(f"  ratio {ratio:.2f} ctx {ctx:>7}: {rows[-1]['decode_ms_per_token']:.3f} ms/token, "
          f"KV {kv / 2**30:.2f} GiB", flush=True)
  result["device_memory"] = device_memory()
  result["cache_capacity_tokens"] = gen.max_len
  del cache
  if fit_check and fit:  # the largest context that fits: allocate it and run decode steps there
    try:
      big = Generator(model, None, max_len=fit, impl=impl)
      cache = set_length(init_cache(config, duo, 1, big.max_len, dtype), fit - 64, SINK, WINDOW)
      out, cache = big._decode(big.graphdef, big.state, cache, logits, jax.random.key(0), stop, max_new_tokens=4,
                               sampling=gen_sampling(), impl=big.impl, stream=None)
      out.block_until_ready()
      result["largest_context_verified"] = int(fit - 64)
      del cache
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
      result["largest_context_verified"] = None
      result["fit_check_error"] = f"{type(e).__name__}: {str(e)[:300]}"
  return result


def gen_sampling():
  from duojax.generate import SamplingConfig
  return SamplingConfig()


def bench_prefill(config, ratio, context, chunks, *, iters, dtype, impl):
  duo = duo_spec(config, ratio)
  model = random_model(config, duo, dtype)
  rows = []
  tokens = jax.random.randint(jax.random.key(3), (1, context), 0, config.vocab_size, jnp.int32)
  valid = jnp.asarray([context], jnp.int32)
  for chunk in chunks:
    gen = Generator(model, None, max_len=context, chunk_size=chunk, impl=impl)
    times = []
    for it in range(iters + 1):
      cache = init_cache(config, duo, 1, gen.max_len, dtype)
      t0 = time.perf_counter()
      logits, cache = gen._prefill(gen.graphdef, gen.state, tokens, valid, cache, chunk_size=chunk, impl=gen.impl)
      logits.block_until_ready()
      if it:
        times.append(time.perf_counter() - t0)
      del cache
    rows.append({"context": context, "chunk": chunk, "prefill_s": statistics.median(times),
                 "device_memory": device_memory()})
    print(f"  ratio {ratio:.2f} prefill {context} chunk {chunk}: {rows[-1]['prefill_s']:.3f} s", flush=True)
  return {"ratio": ratio, "rows": rows}


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for r in results["decode"]:
    xs = [row["context"] / 1024 for row in r["rows"]]
    label = "all full" if r["ratio"] == 1 else f"duo {int(r['ratio'] * 100)}% retrieval"
    axes[0].plot(xs, [row["decode_ms_per_token"] for row in r["rows"]], "o-", label=label)
    axes[1].plot(xs, [row["memory_estimate_bytes"] / 2**30 for row in r["rows"]], "o-", label=label)
  axes[0].set(xlabel="context (k tokens)", ylabel="decode latency (ms / token)", title=results["model"])
  axes[1].set(xlabel="context (k tokens)", ylabel="weights + KV cache (GiB)", title="memory")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", choices=sorted(MODELS), default="llama2-7b")
  ap.add_argument("--ratios", default="1.0,0.5,0.25", help="retrieval-head ratios (1.0 = all full)")
  ap.add_argument("--contexts", default="16384,32768,65536,131072")
  ap.add_argument("--decode-steps", type=int, default=16)
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--prefill-context", type=int, default=0, help="0: no prefill benchmark")
  ap.add_argument("--prefill-ratios", default="1.0,0.25")
  ap.add_argument("--chunks", default="32768")
  ap.add_argument("--fit-check", action="store_true", help="verify the largest context by running there")
  ap.add_argument("--at-full-fit", action="store_true",
                  help="also time every ratio at the largest context all-full attention fits (ratio 1.0 first)")
  ap.add_argument("--impl", default="auto")
  ap.add_argument("--xla-projections", action="store_true",
                  help="decode projections as XLA dots instead of the Mosaic-GPU GEMV (for comparison)")
  ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
  ap.add_argument("--gemv-block-n", type=int, default=0, help="GEMV kernel column tile (0: the default)")
  ap.add_argument("--gemv-min-matrices", type=int, default=0,
                  help="GEMV kernel only for launches of at least this many projections (0: the default)")
  add_decode_options(ap)
  args = ap.parse_args(argv)
  options_tag = apply_decode_options(args)
  if args.gemv_min_matrices:
    dense_module.GEMV_MIN_MATRICES = args.gemv_min_matrices
  if args.xla_projections:
    dense_module.GEMV_MAX_ROWS = 0
  if args.gemv_block_n:
    gemv_mgpu.DEFAULT_BLOCK_N = args.gemv_block_n
  config = MODELS[args.model]
  dtype = jnp.bfloat16 if args.model != "tiny" else jnp.float32
  device = jax.devices()[0]
  results = {"model": args.model, "device": device.device_kind, "platform": device.platform,
             "jax_version": jax.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(),
             "dtype": jnp.dtype(dtype).name, "batch": 1, "sink": SINK, "window": WINDOW,
             "config": dataclasses.asdict(config), "decode": [], "prefill": [],
             "projections": "xla" if args.xla_projections else "gemv kernel where it applies",
             "gemv_block_n": gemv_mgpu.DEFAULT_BLOCK_N, "gemv_min_matrices": dense_module.GEMV_MIN_MATRICES,
             **decode_options_record()}
  contexts = [int(c) for c in args.contexts.split(",")]
  full_fit = None
  for ratio in (float(r) for r in args.ratios.split(",") if r):  # --ratios "": prefill only
    print(f"decode, {args.model}, retrieval ratio {ratio}", flush=True)
    extra = full_fit - args.decode_steps - 64 if (args.at_full_fit and full_fit) else None
    r = bench_decode(config, ratio, contexts, steps=args.decode_steps, iters=args.iters, dtype=dtype,
                     impl=args.impl, fit_check=args.fit_check, extra_context=extra)
    if ratio == 1.0:
      full_fit = r.get("largest_context_verified") or r["largest_context_estimate"]
      if args.at_full_fit and full_fit:  # time all-full there too, once the fit is known
        r_fit = bench_decode(config, ratio, [full_fit - args.decode_steps - 64], steps=args.decode_steps,
                             iters=args.iters, dtype=dtype, impl=args.impl, fit_check=False)
        r["rows"] += r_fit["rows"]
    results["decode"].append(r)
  if args.prefill_context:
    for ratio in (float(r) for r in args.prefill_ratios.split(",")):
      results["prefill"].append(bench_prefill(config, ratio, args.prefill_context,
                                              [int(c) for c in args.chunks.split(",")], iters=max(1, args.iters - 1),
                                              dtype=dtype, impl=args.impl))
  summarize(results)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  tag = device.device_kind.replace(" ", "_") + ("_xla_projections" if args.xla_projections else "")
  tag += f"_gemv{args.gemv_block_n}" if args.gemv_block_n else ""
  tag += f"_gemvmin{args.gemv_min_matrices}" if args.gemv_min_matrices else ""
  tag += options_tag
  (out / f"efficiency_{args.model}_{tag}.json").write_text(json.dumps(results, indent=1))
  plot(results, out / f"efficiency_{args.model}_{tag}.png")


def summarize(results):
  print(f"\n{results['model']} on {results['device']}, jax {results['jax_version']}")
  full = next((r for r in results["decode"] if r["ratio"] == 1.0), None)
  print(f"{'ratio':>6} {'context':>8} {'ms/token':>9} {'speedup':>8} {'KV GiB':>8} {'KV ratio':>8}")
  for r in results["decode"]:
    for row in r["rows"]:
      base = next((b for b in (full or {}).get("rows", []) if b["context"] == row["context"]), None)
      sp = base["decode_ms_per_token"] / row["decode_ms_per_token"] if base else float("nan")
      kr = base["kv_cache_bytes"] / row["kv_cache_bytes"] if base else float("nan")
      print(f"{r['ratio']:>6.2f} {row['context']:>8} {row['decode_ms_per_token']:>9.3f} {sp:>8.2f} "
            f"{row['kv_cache_bytes'] / 2**30:>8.2f} {kr:>8.2f}")
  for r in results["decode"]:
    print(f"ratio {r['ratio']:.2f}: largest context estimate {r['largest_context_estimate']}, verified "
          f"{r.get('largest_context_verified')}")
  for r in results["prefill"]:
    for row in r["rows"]:
      print(f"prefill ratio {r['ratio']:.2f} ctx {row['context']} chunk {row['chunk']}: {row['prefill_s']:.3f} s")


if __name__ == "__main__":
  main()
