"""Prefill attention latency: duojax (full, streaming, duo mix) vs cuDNN, tokamax and the XLA reference.

Options follow Light-DuoAttention's benchmark (batch sizes, sequence lengths, heads, head_dim, recent/sink sizes,
warm-up and timed iterations) plus ``--full-ratio`` (retrieval-head share of the duo mix), ``--configs``
(duojax block configs to sweep, ``BQxBKVxSTAGES``) and ``--out``. One run times everything on the same GPU.

Timing: a jitted function is called back to back ``--inner`` times, then ``block_until_ready``; the per-call
time of that chunk is one sample; the reported time is the median of ``--num-iters`` samples (after
``--num-warmup`` calls). All kernels of one shape are compiled and warmed first, then sampled round-robin (one
chunk of each per round), so that GPU clock and thermal drift during the run do not favour the kernels timed
first. Effective TFLOP/s = 4*S*K*H*D*B / t, K = S/2 for causal, K = sink + window for
streaming (K = window for the sliding-window baselines); the duo mix counts its heads' shares.

A failing baseline records its error string and the run goes on.

Run (GPU machine, repo root; tokamax wheels and tokamax_env.sh copied into .whl/):
  source .whl/tokamax_env.sh .whl; PYTHONPATH=. python3 benchmarks/bench_attention.py --seqlens 4096 16384 65536
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import statistics
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.timing import calls_per_chunk, chunk_samples  # noqa: E402
from duojax.kernels.reference import duo_attention_reference  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
  p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384, 65536])
  p.add_argument("--num-heads", type=int, default=32)
  p.add_argument("--num-kv-heads", type=int, default=None, help="default: num-heads (MHA)")
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--recent-size", type=int, default=256)
  p.add_argument("--sink-size", type=int, default=128)
  p.add_argument("--baseline-window", type=int, default=384, help="sliding-window baselines: keys seen per query")
  p.add_argument("--full-ratio", type=float, default=0.25)
  p.add_argument("--num-warmup", type=int, default=3)
  p.add_argument("--num-iters", type=int, default=10)
  p.add_argument("--inner", type=int, default=0, help="calls per sample (0: auto, ~20 ms per sample)")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
  p.add_argument("--configs", nargs="*", default=[],
                 help="duojax block configs to sweep, e.g. default 64x128x2 64x128x2p")
  p.add_argument("--skip", nargs="*", default=[], help="names of kernels to skip")
  p.add_argument("--alt-kernel", nargs="*", default=[],
                 help="python files defining another duo_prefill_mgpu (e.g. an older version) to time too")
  p.add_argument("--xla-max-seqlen", type=int, default=4096, help="XLA reference only up to this length")
  p.add_argument("--out", default=None, help="directory for JSON/PNG (default benchmarks/results and $OUT)")
  return p.parse_args(argv)


_CONFIG_RE = r"(\d+)x(\d+)x(\d+)(?:-(\d+))?(?:f(\d+))?([a-z]*)"


def parse_config(text: str):
  """'64x128x2' -> BlockConfig(64, 128, 2); '-192': full heads of duo layers step over 192 keys
  (full_block_kv); 'f4': 4 streaming query heads per CTA in duo layers (stream_fold); suffix letters: 'p'
  persistent, 'm' mbarrier ping-pong, 'r' no reduction scratch (reduction_scratch_bytes=0), 'u'
  unsafe_no_auto_barriers, 'c' mbarrier consumed-slot signals (default: hardware named barriers), 'w' no
  window-only masks (full masks on every window-edge block), 'e' eager Q prefetch (at the start of each
  persistent tile). Example: '64x128x2-192f4ru'."""
  from duojax.kernels.prefill_mgpu import BlockConfig  # noqa: PLC0415
  m = re.fullmatch(_CONFIG_RE, text)
  if m is None or set(m.group(6)) - set("pmrucwe"):
    raise ValueError(f"bad block config {text!r}; expected e.g. 64x128x2, 64x128x2-192f4ru")
  bq, bkv, st = (int(m.group(i)) for i in (1, 2, 3))
  flags = m.group(6)
  return BlockConfig(bq, bkv, st, persistent="p" in flags, named_barriers="m" not in flags,
                     reduction_scratch_bytes=0 if "r" in flags else None, no_auto_barriers="u" in flags,
                     named_consumed="c" not in flags, window_mask="w" not in flags,
                     defer_q_prefetch="e" not in flags,
                     full_block_kv=int(m.group(4)) if m.group(4) else None,
                     stream_fold=int(m.group(5)) if m.group(5) else 1)


def parse_config_arg(text: str):
  """A ``--configs`` entry: 'default' -> None (the kernel's own choice), 'default:row_fold=8,half_steps=0' ->
  ``(text, overrides)`` (each layer kind's default blocks with those fields replaced; ints, 0/1 for bools),
  anything else -> :func:`parse_config`."""
  if text == "default":
    return None
  if text.startswith("default:"):
    from duojax.kernels.prefill_mgpu import BlockConfig  # noqa: PLC0415
    fields = {f.name: f.type for f in dataclasses.fields(BlockConfig)}
    overrides = {}
    for item in text.split(":", 1)[1].split(","):
      name, _, value = item.partition("=")
      if name not in fields or not value:
        raise ValueError(f"bad override {item!r} in {text!r}; fields: {', '.join(fields)}")
      overrides[name] = None if value == "none" else bool(int(value)) if fields[name] == "bool" else int(value)
    return (text, overrides)
  return parse_config(text)


def config_name(c) -> str:
  return (f"{c.block_q}x{c.block_kv}x{c.stages}" + (f"-{c.full_block_kv}" if c.full_block_kv else "")
          + (f"f{c.stream_fold}" if c.stream_fold > 1 else "") + ("p" if c.persistent else "")
          + ("" if c.named_barriers else "m") + ("r" if c.reduction_scratch_bytes == 0 else "")
          + ("u" if c.no_auto_barriers else "") + ("" if c.named_consumed else "c")
          + ("" if c.window_mask else "w") + ("" if c.defer_q_prefetch else "e"))


def time_fn(fn, args, *, warmup: int, iters: int, inner: int):
  """(median ms, calls per chunk, per-call ms of each sample); ``inner <= 0`` sizes chunks to ~20 ms."""
  chunk_samples(fn, args, warmup=warmup, samples=0, inner=0)
  if inner <= 0:
    inner = calls_per_chunk(fn, args)
  samples = [t * 1e3 for t in chunk_samples(fn, args, warmup=0, samples=iters, inner=inner)]
  return (statistics.median(samples) if samples else None), inner, samples


def gpu_name() -> str:
  d = jax.devices()[0]
  return d.device_kind.replace(" ", "_").replace("/", "_") if d.platform == "gpu" else d.platform


def main(argv=None):
  args = parse_args(argv)
  from duojax.kernels.prefill_mgpu import default_config, duo_prefill_mgpu, layer_kind

  H, D = args.num_heads, args.head_dim
  Hkv = args.num_kv_heads or H
  dtype = jnp.dtype(args.dtype)
  sink, window, bw = args.sink_size, args.recent_size, args.baseline_window
  nf_mix = int(round(Hkv * args.full_ratio))
  # None: the kernel's own choice (default blocks; persistent grid when every head is streaming).
  configs = [parse_config_arg(c) for c in args.configs] or [None]

  try:
    import tokamax  # noqa: PLC0415
    tokamax_err = None
  except Exception as e:  # noqa: BLE001
    tokamax, tokamax_err = None, f"{type(e).__name__}: {e}"

  kernels = {}
  for cfg in configs:
    tag = "" if cfg is None else f"[{cfg[0]}]" if isinstance(cfg, tuple) else f"[{config_name(cfg)}]"

    def duo(nf, cfg=cfg):
      if isinstance(cfg, tuple):  # the default blocks of the layer's kind, with fields overridden
        cfg = dataclasses.replace(default_config(D, layer_kind(nf, Hkv)), **cfg[1])
      return jax.jit(lambda q, k, v: duo_prefill_mgpu(q, k, v, num_full_kv_heads=nf, sink=sink, window=window,
                                                      config=cfg)[0])

    kernels[f"duojax_full{tag}"] = ("causal", lambda cfg=cfg, duo=duo: duo(Hkv))
    kernels[f"duojax_streaming{tag}"] = ("streaming", lambda cfg=cfg, duo=duo: duo(0))
    kernels[f"duojax_mix{tag}"] = ("mix", lambda cfg=cfg, duo=duo: duo(nf_mix))

  for path in args.alt_kernel:
    import importlib.util  # noqa: PLC0415
    stem = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"alt_{stem}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)

    def alt(nf, mod=mod):
      return jax.jit(lambda q, k, v: mod.duo_prefill_mgpu(q, k, v, num_full_kv_heads=nf, sink=sink,
                                                          window=window)[0])

    kernels[f"{stem}_full"] = ("causal", lambda alt=alt: alt(Hkv))
    kernels[f"{stem}_streaming"] = ("streaming", lambda alt=alt: alt(0))
    kernels[f"{stem}_mix"] = ("mix", lambda alt=alt: alt(nf_mix))

  def cudnn(window_size):
    kw = dict(implementation="cudnn", is_causal=True)
    if window_size is not None:
      kw["local_window_size"] = (window_size - 1, 0)
    return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **kw))

  def tk(window_size):
    if tokamax is None:
      raise RuntimeError(f"tokamax unavailable: {tokamax_err}")
    kw = dict(implementation="mosaic", is_causal=True)
    if window_size is not None:
      kw["local_window_size"] = (window_size - 1, 0)
    return jax.jit(lambda q, k, v: tokamax.dot_product_attention(q, k, v, **kw))

  kernels["cudnn_causal"] = ("causal", lambda: cudnn(None))
  kernels[f"cudnn_window{bw}"] = ("window", lambda: cudnn(bw))
  kernels["tokamax_causal"] = ("causal", lambda: tk(None))
  kernels[f"tokamax_window{bw}"] = ("window", lambda: tk(bw))
  kernels["xla_reference_mix"] = ("mix", lambda: jax.jit(lambda q, k, v: duo_attention_reference(
      q, k, v, num_full_kv_heads=nf_mix, sink=sink, window=window)[0]))
  kernels = {n: kv for n, kv in kernels.items() if n not in args.skip}

  results = []
  for B in args.batch_sizes:
    for S in args.seqlens:
      key = jax.random.key(S + B)
      kq, kk, kv_ = jax.random.split(key, 3)
      q = jax.random.normal(kq, (B, S, H, D), dtype)
      k = jax.random.normal(kk, (B, S, Hkv, D), dtype)
      v = jax.random.normal(kv_, (B, S, Hkv, D), dtype)
      keys = {"causal": S / 2, "streaming": min(S, sink + window), "window": min(S, bw)}
      keys["mix"] = (nf_mix * keys["causal"] + (Hkv - nf_mix) * keys["streaming"]) / Hkv
      # Compile and warm every kernel, then take the samples round-robin (one chunk of each kernel per
      # round), so that clock and thermal drift over the run hit every kernel alike.
      live = []
      for name, (kind, make) in kernels.items():
        if name.startswith("xla_reference") and S > args.xla_max_seqlen:
          continue
        rec = dict(name=name, kind=kind, batch=B, seqlen=S, heads=H, kv_heads=Hkv, head_dim=D)
        results.append(rec)
        try:
          fn = make()
          _, inner, _ = time_fn(fn, (q, k, v), warmup=args.num_warmup, iters=0, inner=args.inner)
          live.append((rec, fn, inner, []))
        except Exception as e:  # noqa: BLE001
          rec.update(error=f"{type(e).__name__}: {str(e)[:500]}")
          traceback.print_exc(limit=2)
          print(f"B={B} S={S:<6} {name:<34} {rec['error'][:200]}", flush=True)
      for _ in range(args.num_iters):
        for rec, fn, inner, samples in live:
          samples.extend(time_fn(fn, (q, k, v), warmup=0, iters=1, inner=inner)[2])
      for rec, fn, inner, samples in live:
        ms = statistics.median(samples)
        flops = 4.0 * B * S * keys[rec["kind"]] * H * D
        rec.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12, inner=inner, samples_ms=samples)
        print(f"B={B} S={S:<6} {rec['name']:<34} {ms:.4f} ms {rec['tflops']:.0f} TFLOP/s "
              f"min {min(samples):.4f}", flush=True)

  dev = jax.devices()[0]
  meta = dict(device=dev.device_kind, platform=dev.platform, jax_version=jax.__version__,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              dtype=args.dtype, heads=H, kv_heads=Hkv, head_dim=D, sink=sink, window=window, baseline_window=bw,
              full_ratio=args.full_ratio, num_full_kv_heads_mix=nf_mix,
              configs=[(f"default: {config_name(default_config(D, 'duo'))} (duo), "
                        f"{config_name(default_config(D, 'full'))} (full), "
                        f"{config_name(default_config(D, 'streaming'))} (streaming)")
                       if c is None else c[0] if isinstance(c, tuple) else config_name(c) for c in configs],
              tokamax=getattr(tokamax, "__version__", None) if tokamax else tokamax_err,
              timing=("median over num_iters samples of back-to-back jitted calls; samples taken round-robin "
                      "over the kernels of one shape"), argv=sys.argv[1:])
  doc = dict(meta=meta, results=results)

  # Table.
  print("\n" + "=" * 78)
  print(f"{meta['device']}  jax {meta['jax_version']}  {args.dtype} H={H} Hkv={Hkv} D={D} "
        f"sink={sink} window={window} mix nf={nf_mix}/{Hkv}")
  names = list(dict.fromkeys(r["name"] for r in results))
  cols = sorted({(r["batch"], r["seqlen"]) for r in results})
  print(f"{'kernel':<34}" + "".join(f"{f'B{b} S{s}':>22}" for b, s in cols))
  for n in names:
    row = f"{n:<34}"
    for b, s in cols:
      r = next((r for r in results if r["name"] == n and r["batch"] == b and r["seqlen"] == s), None)
      row += f"{'-':>22}" if r is None else (f"{'ERR':>22}" if "ms" not in r else
                                              f"{r['ms']:>10.4f}ms {r['tflops']:>6.0f}TF")
    print(row)

  out_dirs = [args.out] if args.out else [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")]
  if os.environ.get("OUT") and not args.out:
    out_dirs.append(os.environ["OUT"])
  for d in out_dirs:
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"attention_{gpu_name()}.json")
    with open(path, "w") as f:
      json.dump(doc, f, indent=1)
    print("wrote", path)
    try:
      plot(results, os.path.join(d, f"attention_{gpu_name()}.png"), meta)
    except Exception as e:  # noqa: BLE001
      print("plot failed:", e)
  return doc


def plot(results, path, meta):
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(8, 5))
  for name in dict.fromkeys(r["name"] for r in results):
    pts = sorted((r["seqlen"], r["ms"]) for r in results if r["name"] == name and "ms" in r and r["batch"] == 1)
    if pts:
      ax.plot(*zip(*pts), marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("sequence length")
  ax.set_ylabel("latency (ms)")
  ax.set_title(f"prefill attention, {meta['device']}, {meta['dtype']}, H={meta['heads']}, D={meta['head_dim']}, "
               f"sink {meta['sink']} + window {meta['window']}", fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print("wrote", path)


if __name__ == "__main__":
  main()
