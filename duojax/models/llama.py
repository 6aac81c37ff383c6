"""A Flax NNX Llama with duo attention: per layer, the leading KV heads are retrieval heads, the rest stream.

Architecture: token embedding, ``num_hidden_layers`` pre-norm decoder layers (RMSNorm, GQA attention with
rotate-half RoPE, RMSNorm, SwiGLU MLP), a final RMSNorm and an LM head (tied to the embedding or separate).
Every projection is applied by :func:`duojax.models.dense.dense`, so a layer may hold a ``kernel`` or SVD
factors ``u``/``v``. Attention runs through one dispatch (``impl="auto"|"reference"|"pallas"``).

Mask (see :mod:`duojax.kernels.reference`): a query at position ``i`` sees key ``j`` iff ``j <= i`` and, on a
streaming KV head, ``j < sink or j > i - window``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from duojax.config import DuoSpec, LlamaConfig
from duojax.kernels.dispatch import prefill_attention
from duojax.models.dense import PARAM_NAMES, dense, dense_group
from duojax.models.rope import apply_rope, rope_inv_freq

SUPPORTED_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def canonical_dtype(dtype) -> jnp.dtype:
  """Maps ``fp32|bf16|fp16`` or a numpy/jax dtype to a supported jnp dtype, or raises naming the choices."""
  aliases = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16"}
  if isinstance(dtype, str) and dtype in aliases:
    name = aliases[dtype]
  else:
    try:
      name = jnp.dtype(dtype).name
    except TypeError:
      name = str(dtype)
  if name not in SUPPORTED_DTYPES:
    raise ValueError(f"unsupported dtype {dtype!r}; allowed: float32 (fp32), bfloat16 (bf16), float16 (fp16)")
  return jnp.dtype(SUPPORTED_DTYPES[name])


class Linear(nnx.Module):
  """A projection holding ``kernel [in, out]`` (or factors ``u [in, r]``, ``v [r, out]``) and maybe ``bias``."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool, param_dtype, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
    if use_bias:
      self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))

  def params(self) -> dict:
    return {n: getattr(self, n)[...] for n in PARAM_NAMES if hasattr(self, n)}

  def __call__(self, x, dtype=None, impl: str = "reference"):
    return dense_group([self.params()], x, dtype=dtype, impl=impl)[0]


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, param_dtype):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...].astype(jnp.float32) * xf.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
  """GQA attention with RoPE; KV heads ``[0, num_full)`` retrieval, the rest streaming."""

  def __init__(self, config: LlamaConfig, full: tuple[bool, ...], *, param_dtype, rngs: nnx.Rngs):
    c = config
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    self.full = tuple(full)
    self.q = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, use_bias=c.attention_bias,
                    param_dtype=param_dtype, rngs=rngs)
    self.k = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, use_bias=c.attention_bias,
                    param_dtype=param_dtype, rngs=rngs)
    self.v = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, use_bias=c.attention_bias,
                    param_dtype=param_dtype, rngs=rngs)
    self.o = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, use_bias=c.attention_bias,
                    param_dtype=param_dtype, rngs=rngs)
    self.config = c

  def __call__(self, x, positions, *, sink, window, impl, layer_cache=None, cache_step=None):
    B, S, _ = x.shape
    q, k, v = dense_group([self.q.params(), self.k.params(), self.v.params()], x, impl=impl)
    q = q.reshape(B, S, self.num_heads, self.head_dim)
    k = k.reshape(B, S, self.num_kv_heads, self.head_dim)
    v = v.reshape(B, S, self.num_kv_heads, self.head_dim)
    inv_freq = rope_inv_freq(self.head_dim, self.config.rope_theta, self.config.rope_scaling)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    if layer_cache is None:
      out = prefill_attention(q, k, v, full=self.full, sink=sink, window=window, impl=impl)
      new_cache = None
    else:
      out, new_cache = cache_step(q, k, v, layer_cache, full=self.full)
    out = out.reshape(B, S, self.num_heads * self.head_dim)
    return self.o(out, impl=impl), new_cache


class MLP(nnx.Module):
  def __init__(self, config: LlamaConfig, *, param_dtype, rngs):
    c = config
    self.gate = Linear(c.hidden_size, c.intermediate_size, use_bias=c.mlp_bias, param_dtype=param_dtype, rngs=rngs)
    self.up = Linear(c.hidden_size, c.intermediate_size, use_bias=c.mlp_bias, param_dtype=param_dtype, rngs=rngs)
    self.down = Linear(c.intermediate_size, c.hidden_size, use_bias=c.mlp_bias, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, impl: str = "reference"):
    gate, up = dense_group([self.gate.params(), self.up.params()], x, impl=impl)
    return self.down(jax.nn.silu(gate) * up, impl=impl)


class DecoderLayer(nnx.Module):
  def __init__(self, config: LlamaConfig, full: tuple[bool, ...], *, param_dtype, rngs):
    self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
    self.attn = Attention(config, full, param_dtype=param_dtype, rngs=rngs)
    self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
    self.mlp = MLP(config, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, positions, **kw):
    h, new_cache = self.attn(self.input_norm(x), positions, **kw)
    x = x + h
    x = x + self.mlp(self.post_attn_norm(x), impl=kw["impl"])
    return x, new_cache


class Llama(nnx.Module):
  """Llama causal LM with a duo attention layout.

  Call: ``model(tokens [B, S] int32) -> logits [B, S, vocab] float32`` (one forward pass with the duo mask).
  With a cache (see :mod:`duojax.cache`), ``model(tokens, positions=..., cache=..., cache_step=...)`` returns
  ``(logits, new_layer_caches)``.
  """

  def __init__(self, config: LlamaConfig, duo: DuoSpec | None = None, *, dtype="float32",
               param_dtype=None, rngs: nnx.Rngs | None = None):
    duo = duo or DuoSpec.all_full(config)
    duo.validate(config)
    self.config = config
    self.duo = duo
    self.dtype = canonical_dtype(dtype)
    param_dtype = canonical_dtype(param_dtype or self.dtype)
    rngs = rngs or nnx.Rngs(0)
    c = config
    self.embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (c.vocab_size, c.hidden_size),
                                                         param_dtype))
    self.layers = nnx.List([DecoderLayer(c, duo.full[i], param_dtype=param_dtype, rngs=rngs)
                            for i in range(c.num_hidden_layers)])
    self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype)
    if not c.tie_word_embeddings:
      self.lm_head = Linear(c.hidden_size, c.vocab_size, use_bias=False, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, tokens, positions=None, *, impl: str = "auto", cache=None, cache_step=None, logits_at=None):
    """``tokens [B, S]`` -> logits ``[B, S, V]`` float32 (``[B, 1, V]`` at rows ``logits_at [B]`` if given)."""
    B, S = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
    new_caches = []
    for i, layer in enumerate(self.layers):
      x, new = layer(x, positions, sink=self.duo.sink, window=self.duo.window, impl=impl,
                     layer_cache=None if cache is None else cache[i], cache_step=cache_step)
      new_caches.append(new)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at.astype(jnp.int32)[:, None, None], axis=1)
    x = self.final_norm(x)
    if self.config.tie_word_embeddings:
      logits = jnp.einsum("bsh,vh->bsv", x, self.embed[...].astype(self.dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = self.lm_head(x, impl=impl).astype(jnp.float32)
    logits = logits.astype(jnp.float32)
    if cache is None:
      return logits
    return logits, tuple(new_caches)
