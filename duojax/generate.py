"""Text generation over the duo KV cache: a jitted chunked prefill, then a decode loop inside jit.

* Prompts are right-padded to a length bucket (powers of two, at least 16, at most ``max_len``), so a new prompt
  length in a seen bucket does not recompile. Each sequence keeps its own length.
* Prefill runs the bucket in chunks of ``chunk_size`` tokens (static positions), filling the cache.
* Decoding is a ``lax.while_loop`` inside one jitted call with the cache donated: sampling (greedy,
  temperature, top-k, top-p), stop tokens, ``max_new_tokens``; an optional callback streams tokens to the host.
* The cache must hold prompt + ``max_new_tokens`` tokens: a request that does not fit is refused up front with
  a ValueError naming the numbers (the retrieval heads keep every token; streaming heads never grow).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from duojax.cache import DuoCache, cache_bytes, decode, init_cache, prefill_chunk
from duojax.kernels.hardware import resolve_impl


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """``temperature == 0``: greedy. ``top_k == 0`` and ``top_p == 1``: no truncation."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0; got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off); got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  tokens: list[list[int]]  # generated ids per prompt (stop token included when one was hit)
  texts: list[str] | None
  stop_reasons: list[str]  # "stop_token" | "max_new_tokens"
  prompt_lengths: list[int]
  prefill_seconds: float
  decode_seconds: float
  attention_impl: str  # "pallas" (Mosaic-GPU kernels) or "reference" (pure JAX)
  cache_bytes: dict[str, int]  # bytes of the KV cache this call used: "retrieval", "streaming", "total"

  @property
  def tokens_per_second(self) -> float:
    n = sum(len(t) for t in self.tokens)
    return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def bucket_length(n: int, max_len: int, minimum: int = 16) -> int:
  """The padded prompt length for ``n`` tokens: the next power of two >= n (>= minimum), capped at max_len."""
  b = max(minimum, 1 << (max(n, 1) - 1).bit_length())
  return min(b, max_len)


def sample_logits(logits, key, sampling: SamplingConfig):
  """``logits [B, V]`` float32 -> token ids ``[B]`` int32."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    cutoff_idx = jnp.sum(cum < sampling.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _prefill(graphdef, state, tokens, valid_len, cache: DuoCache, *, chunk_size: int, impl: str):
  model = nnx.merge(graphdef, state)
  B, bucket = tokens.shape
  last_logits = jnp.zeros((B, model.config.vocab_size), jnp.float32)
  for start in range(0, bucket, chunk_size):
    C = min(chunk_size, bucket - start)
    at = jnp.clip(valid_len - 1 - start, 0, C - 1)
    logits, cache = prefill_chunk(model, tokens[:, start:start + C], cache, start=start, valid_len=valid_len,
                                  impl=impl, logits_at=at)
    inside = (valid_len - 1 >= start) & (valid_len - 1 < start + C)
    last_logits = jnp.where(inside[:, None], logits[:, 0], last_logits)
  return last_logits, cache


def _decode_loop(graphdef, state, cache: DuoCache, logits, key, stop_ids, *, max_new_tokens: int,
                 sampling: SamplingConfig, impl: str, stream: Callable | None):
  model = nnx.merge(graphdef, state)
  B = logits.shape[0]
  out = jnp.full((B, max_new_tokens), -1, jnp.int32)

  def cond(carry):
    i, _, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, cache, logits, key, out, done = carry
    key, sub = jax.random.split(key)
    tok = jnp.where(done, -1, sample_logits(logits, sub, sampling))
    out = out.at[:, i].set(tok)
    if stream is not None:
      jax.experimental.io_callback(stream, None, tok, i, ordered=True)
    done = done | jnp.isin(tok, stop_ids)
    logits, cache = decode(model, jnp.maximum(tok, 0), cache, impl=impl)
    return i + 1, cache, logits, key, out, done

  carry = (jnp.int32(0), cache, logits, key, out, jnp.zeros((B,), bool))
  _, cache, _, _, out, _ = jax.lax.while_loop(cond, body, carry)
  return out, cache


class Generator:
  """Holds a model split into (graphdef, state) and the jitted prefill / decode functions.

  ``Generator(model, tokenizer, max_len=4096).generate(["Hello"], max_new_tokens=32)``. Reuse one Generator
  across calls: prompts in a seen length bucket and the same ``max_new_tokens`` and sampling do not recompile.
  """

  def __init__(self, model, tokenizer=None, *, max_len: int = 4096, chunk_size: int = 4096,
               impl: str = "auto", cache_dtype=None):
    if max_len < 1:
      raise ValueError(f"max_len must be >= 1; got {max_len}")
    if chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    self.model = model
    self.tokenizer = tokenizer
    self.max_len = -(-max_len // 64) * 64  # decode kernels tile the cache by 64
    self.chunk_size = chunk_size
    self.impl = resolve_impl(impl, "generation")
    self.cache_dtype = cache_dtype or model.dtype
    self.graphdef, self.state = nnx.split(model)
    self._prefill = jax.jit(_prefill, static_argnums=(0,), static_argnames=("chunk_size", "impl"),
                            donate_argnames=("cache",))
    self._decode = jax.jit(_decode_loop, static_argnums=(0,),
                           static_argnames=("max_new_tokens", "sampling", "impl", "stream"),
                           donate_argnames=("cache",))

  def _encode(self, prompts) -> list[list[int]]:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
      prompts = [prompts]
    ids = []
    for p in prompts:
      if isinstance(p, str):
        if self.tokenizer is None:
          raise ValueError("text prompts need a tokenizer; pass token ids or give the Generator a tokenizer")
        p = self.tokenizer.encode(p)
      ids.append([int(t) for t in p])
    if not ids:
      raise ValueError("no prompts given")
    for i, p in enumerate(ids):
      if not p:
        raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    return ids

  def generate(self, prompts, *, max_new_tokens: int = 64, sampling: SamplingConfig = SamplingConfig(),
               stop_tokens: Sequence[int] | None = None, seed: int = 0,
               callback: Callable[[str], None] | None = None) -> GenerationResult:
    """Generates for one prompt or a batch (strings or token-id lists of any lengths).

    ``stop_tokens`` defaults to the tokenizer's / config's EOS ids. ``callback`` receives decoded text pieces
    of the first sequence as they are produced.
    """
    ids = self._encode(prompts)
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    lengths = [len(p) for p in ids]
    longest = max(lengths)
    if longest > self.max_len:
      raise ValueError(f"prompt of {longest} tokens is longer than the cache (max_len={self.max_len})")
    if longest + max_new_tokens > self.max_len:
      raise ValueError(
          f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {longest + max_new_tokens} exceeds "
          f"the cache (max_len={self.max_len}); lower max_new_tokens or build the Generator with a larger max_len")
    if stop_tokens is None:
      stop_tokens = self._default_stop_tokens()
    B = len(ids)
    bucket = bucket_length(longest, self.max_len)
    tokens = np.zeros((B, bucket), np.int32)
    for b, p in enumerate(ids):
      tokens[b, :len(p)] = p
    cache = init_cache(self.model.config, self.model.duo, B, self.max_len, self.cache_dtype)
    stream = self._make_stream(callback) if callback else None

    t0 = time.perf_counter()
    logits, cache = self._prefill(self.graphdef, self.state, jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32),
                                  cache, chunk_size=min(self.chunk_size, bucket), impl=self.impl)
    logits.block_until_ready()
    t1 = time.perf_counter()
    stop_ids = jnp.asarray(list(stop_tokens) or [-2], jnp.int32)
    out, cache = self._decode(self.graphdef, self.state, cache, logits, jax.random.key(seed), stop_ids,
                          max_new_tokens=max_new_tokens, sampling=sampling, impl=self.impl, stream=stream)
    out = np.asarray(out)
    t2 = time.perf_counter()

    generated, reasons = [], []
    stop_set = set(int(s) for s in stop_tokens)
    for row in out:
      row = [int(t) for t in row if t >= 0]
      generated.append(row)
      reasons.append("stop_token" if row and row[-1] in stop_set else "max_new_tokens")
    texts = [self.tokenizer.decode(g) for g in generated] if self.tokenizer is not None else None
    return GenerationResult(generated, texts, reasons, lengths, t1 - t0, t2 - t1, self.impl, cache_bytes(cache))

  def _default_stop_tokens(self) -> list[int]:
    tok_eos = getattr(self.tokenizer, "eos_token_ids", None) if self.tokenizer is not None else None
    return list(tok_eos or self.model.config.eos_token_ids)

  def _make_stream(self, callback):
    tokenizer = self.tokenizer
    seen: list[int] = []
    state = {"text": ""}

    def stream(tok, i):
      t = int(np.asarray(tok)[0])
      if int(np.asarray(i)) == 0:
        seen.clear()
        state["text"] = ""
      if t < 0:
        return
      seen.append(t)
      if tokenizer is None:
        callback(f"{t} ")
        return
      text = tokenizer.decode(seen)
      if not text.endswith("\ufffd"):  # wait for complete UTF-8 characters
        callback(text[len(state["text"]):])
        state["text"] = text

    return stream


def generate(model, tokenizer=None, prompts=None, *, max_new_tokens: int = 64, max_len: int | None = None,
             chunk_size: int = 4096, sampling: SamplingConfig = SamplingConfig(), stop_tokens=None, seed: int = 0,
             impl: str = "auto", callback=None) -> GenerationResult:
  """One-shot convenience around :class:`Generator` (builds it each call; keep a Generator to reuse compiles)."""
  gen = Generator(model, tokenizer, max_len=max_len or 4096, chunk_size=chunk_size, impl=impl)
  return gen.generate(prompts, max_new_tokens=max_new_tokens, sampling=sampling, stop_tokens=stop_tokens,
                      seed=seed, callback=callback)
