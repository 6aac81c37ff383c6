"""Imports a llama.cpp GGUF Llama model (any quantization ``gguf`` can dequantize) into duojax parameters.

llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` for its interleaved (GPT-J style) RoPE; the
importer undoes that so the weights fit duojax's rotate-half RoPE (as HF's ``LlamaForCausalLM``).
"""

from __future__ import annotations

import os
import re

import numpy as np

from duojax.config import LlamaConfig, RopeScaling
from duojax.io.tokenizer import Tokenizer, tokenizer_from_gguf
from duojax.models.rope import rope_inv_freq

SUPPORTED_ARCHITECTURES = ("llama",)

_GLOBAL = {"token_embd.weight": (("embed",), False),
           "output_norm.weight": (("final_norm", "scale"), False),
           "output.weight": (("lm_head", "kernel"), True)}
_BLOCK = {"attn_q": ("attn", "q"), "attn_k": ("attn", "k"), "attn_v": ("attn", "v"), "attn_output": ("attn", "o"),
          "ffn_gate": ("mlp", "gate"), "ffn_up": ("mlp", "up"), "ffn_down": ("mlp", "down")}
_BLOCK_NORMS = {"attn_norm": "input_norm", "ffn_norm": "post_attn_norm"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def gguf_name_to_path(name: str) -> tuple[tuple, bool] | None:
  """The duojax path of GGUF tensor ``name`` and whether to transpose it, or None if it is not a Llama weight."""
  if name in _GLOBAL:
    return _GLOBAL[name]
  m = _BLOCK_RE.match(name)
  if not m:
    return None
  i, kind, leaf = int(m.group(1)), m.group(2), m.group(3)
  if kind in _BLOCK:
    group, proj = _BLOCK[kind]
    return ("layers", i, group, proj, "kernel" if leaf == "weight" else "bias"), leaf == "weight"
  if kind in _BLOCK_NORMS and leaf == "weight":
    return ("layers", i, _BLOCK_NORMS[kind], "scale"), False
  return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's ``w.reshape(n_head, 2, hd // 2, ...).swapaxes(1, 2)`` on the rows (axis 0) of ``w``."""
  rows = w.shape[0]
  if rows % (2 * n_head):
    raise ValueError(f"cannot undo the RoPE row permutation: {rows} rows for {n_head} heads")
  return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open(path: str):
  import gguf
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path!r}")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # bad magic, truncated header or data: the reader raises ValueError/IndexError/...
    raise ValueError(f"cannot read {path!r} as GGUF (not a GGUF file, or truncated/corrupt): {e}") from e


def _meta(reader, key: str, default=None):
  f = reader.fields.get(key)
  if f is None:
    return default
  return f.contents()


def config_from_gguf(reader, path: str = "<gguf>") -> LlamaConfig:
  """The :class:`LlamaConfig` described by the metadata of an open GGUF reader."""
  arch = _meta(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"GGUF file {path!r} has general.architecture {arch!r}; duojax imports only "
                     f"{' / '.join(repr(a) for a in SUPPORTED_ARCHITECTURES)}")

  def need(key: str):
    value = _meta(reader, f"{arch}.{key}")
    if value is None:
      raise ValueError(f"GGUF file {path!r} lacks metadata key {arch}.{key}")
    return value

  hidden = int(need("embedding_length"))
  heads = int(need("attention.head_count"))
  kv = int(_meta(reader, f"{arch}.attention.head_count_kv", heads))
  head_dim = int(_meta(reader, f"{arch}.attention.key_length", hidden // heads))
  tokens = _meta(reader, "tokenizer.ggml.tokens")
  names = {t.name for t in reader.tensors}
  if tokens is not None:
    vocab = len(tokens)
  elif _meta(reader, f"{arch}.vocab_size") is not None:
    vocab = int(_meta(reader, f"{arch}.vocab_size"))
  elif "token_embd.weight" in names:
    vocab = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[-1])
  else:
    raise ValueError(f"GGUF file {path!r} has no token list, {arch}.vocab_size or token_embd.weight")
  theta = float(_meta(reader, f"{arch}.rope.freq_base", 10000.0))
  scaling = RopeScaling()
  stype = _meta(reader, f"{arch}.rope.scaling.type")
  if stype not in (None, "none"):
    if stype != "linear":
      raise ValueError(f"GGUF file {path!r}: rope scaling type {stype!r} is not supported (only 'linear')")
    scaling = RopeScaling("linear", factor=float(_meta(reader, f"{arch}.rope.scaling.factor", 1.0)))
  if "rope_freqs.weight" in names:
    scaling = _llama3_scaling(reader, head_dim, theta, path)
  bos = _meta(reader, "tokenizer.ggml.bos_token_id")
  eos = [_meta(reader, k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
  return LlamaConfig(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
      num_hidden_layers=int(need("block_count")), num_attention_heads=heads, num_key_value_heads=kv,
      head_dim=head_dim, rms_norm_eps=float(_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=theta, rope_scaling=scaling,
      max_position_embeddings=int(_meta(reader, f"{arch}.context_length", 4096)),
      tie_word_embeddings="output.weight" not in names,
      attention_bias="blk.0.attn_q.bias" in names, mlp_bias="blk.0.ffn_up.bias" in names,
      bos_token_id=None if bos is None else int(bos),
      eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)))


def _llama3_scaling(reader, head_dim: int, theta: float, path: str) -> RopeScaling:
  """llama.cpp stores Llama 3.1 RoPE scaling as per-frequency divisors (``rope_freqs``); map to HF's llama3."""
  from gguf.quants import dequantize
  t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
  divisors = dequantize(t.data, t.tensor_type).reshape(-1).astype(np.float64)
  base = rope_inv_freq(head_dim, theta, RopeScaling())
  for factor in (8.0, 32.0, 16.0, 4.0, 2.0):
    for orig in (8192, 4096, 16384):
      cand = RopeScaling("llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=orig)
      if np.allclose(base / rope_inv_freq(head_dim, theta, cand), divisors, rtol=1e-3):
        return cand
  raise ValueError(f"GGUF file {path!r}: rope_freqs does not match any supported llama3 RoPE scaling")


def load_gguf(path: str | os.PathLike, dtype="float32") -> tuple[LlamaConfig, dict, Tokenizer | None]:
  """``(config, params, tokenizer)`` from a GGUF Llama file; params (numpy, ``dtype``) in the layout of
  :mod:`duojax.models.params`, dequantized from whatever quantization the file holds. ``tokenizer`` is None
  when the file carries no ``tokenizer.ggml.*`` metadata.
  """
  from gguf.quants import dequantize

  from duojax.models.llama import canonical_dtype

  path = os.fspath(path)
  np_dtype = np.dtype(canonical_dtype(dtype))
  reader = _open(path)
  config = config_from_gguf(reader, path)
  tokenizer = tokenizer_from_gguf(reader, path) if "tokenizer.ggml.model" in reader.fields else None
  params: dict = {"layers": {i: {} for i in range(config.num_hidden_layers)}}
  seen = set()
  for t in reader.tensors:
    target = gguf_name_to_path(t.name)
    if target is None:
      if t.name == "rope_freqs.weight":
        continue
      raise ValueError(f"GGUF file {path!r} holds tensor {t.name!r}, which is not a Llama weight")
    p, transpose = target
    if p[0] == "layers" and p[1] >= config.num_hidden_layers:
      raise ValueError(f"GGUF file {path!r} holds tensor {t.name!r} beyond block_count "
                       f"{config.num_hidden_layers}")
    try:
      w = dequantize(t.data, t.tensor_type)
    except Exception as e:
      raise ValueError(f"cannot dequantize tensor {t.name!r} ({t.tensor_type.name}) of {path!r}: {e}") from e
    w = np.array(w, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))  # HF order [out, in]
    if p[-2:] in (("q", "kernel"), ("q", "bias")):
      w = unpermute_rows(w, config.num_attention_heads)
    elif p[-2:] in (("k", "kernel"), ("k", "bias")):
      w = unpermute_rows(w, config.num_key_value_heads)
    if transpose:
      w = w.T
    node = params
    for key in p[:-1]:
      node = node.setdefault(key, {})
    node[p[-1]] = np.ascontiguousarray(w).astype(np_dtype, copy=False)
    seen.add(p)
  _check_complete(params, config, seen, path)
  return config, params, tokenizer


def _check_complete(params: dict, config: LlamaConfig, seen: set, path: str) -> None:
  from duojax.io.hf_names import expected_hf_names, expected_hf_shape, hf_to_path
  missing = []
  for name in expected_hf_names(config):
    p, transpose = hf_to_path(name)
    if p not in seen:
      missing.append(_path_to_gguf(p))
      continue
    node = params
    for key in p:
      node = node[key]
    shape = expected_hf_shape(name, config)
    shape = shape[::-1] if transpose else shape
    if tuple(node.shape) != shape:
      raise ValueError(f"GGUF tensor {_path_to_gguf(p)!r} has shape {tuple(node.shape)} (duojax layout), "
                       f"expected {shape} from the metadata")
  if missing:
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    raise ValueError(f"GGUF file {path!r} lacks tensors {missing[:5]}{more}")


def _path_to_gguf(p: tuple) -> str:
  for name, (q, _) in _GLOBAL.items():
    if q == p:
      return name
  inv = {v: k for k, v in _BLOCK.items()}
  if p[2] in _BLOCK_NORMS.values():
    kind = {v: k for k, v in _BLOCK_NORMS.items()}[p[2]]
    return f"blk.{p[1]}.{kind}.weight"
  return f"blk.{p[1]}.{inv[(p[2], p[3])]}.{'weight' if p[4] == 'kernel' else 'bias'}"
