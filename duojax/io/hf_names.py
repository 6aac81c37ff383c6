"""Names of HF Llama tensors and duojax parameter paths, both ways.

An HF ``nn.Linear`` weight is ``[out, in]``; the duojax ``kernel`` is ``[in, out]``, so those are transposed.
Paths index the parameter tree documented in :mod:`duojax.models.params`, e.g.
``("layers", 3, "attn", "q", "kernel")``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

Path = tuple[Any, ...]

_ATTN = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
_MLP = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_NORMS = {"input_layernorm": "input_norm", "post_attention_layernorm": "post_attn_norm"}
_ATTN_INV = {v: k for k, v in _ATTN.items()}
_MLP_INV = {v: k for k, v in _MLP.items()}
_NORMS_INV = {v: k for k, v in _NORMS.items()}

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_to_path(name: str) -> tuple[Path, bool]:
  """The duojax path of HF tensor ``name`` and whether its value must be transposed; ValueError if unknown."""
  if name == "model.embed_tokens.weight":
    return ("embed",), False
  if name == "model.norm.weight":
    return ("final_norm", "scale"), False
  if name == "lm_head.weight":
    return ("lm_head", "kernel"), True
  m = _LAYER_RE.match(name)
  if m:
    i, rest = int(m.group(1)), m.group(2).split(".")
    if len(rest) == 3 and rest[0] in ("self_attn", "mlp") and rest[2] in ("weight", "bias"):
      table = _ATTN if rest[0] == "self_attn" else _MLP
      if rest[1] in table:
        group = "attn" if rest[0] == "self_attn" else "mlp"
        if rest[2] == "weight":
          return ("layers", i, group, table[rest[1]], "kernel"), True
        return ("layers", i, group, table[rest[1]], "bias"), False
    if len(rest) == 2 and rest[0] in _NORMS and rest[1] == "weight":
      return ("layers", i, _NORMS[rest[0]], "scale"), False
  raise ValueError(f"unknown HF Llama tensor name {name!r}")


def path_to_hf(path: Path) -> str:
  """The HF tensor name of duojax parameter ``path`` (the inverse of :func:`hf_to_path`)."""
  path = tuple(path)
  if path == ("embed",):
    return "model.embed_tokens.weight"
  if path == ("final_norm", "scale"):
    return "model.norm.weight"
  if path == ("lm_head", "kernel"):
    return "lm_head.weight"
  if len(path) >= 4 and path[0] == "layers":
    i = int(path[1])
    if len(path) == 5 and path[2] in ("attn", "mlp") and path[4] in ("kernel", "bias"):
      table = _ATTN_INV if path[2] == "attn" else _MLP_INV
      if path[3] in table:
        module = "self_attn" if path[2] == "attn" else "mlp"
        leaf = "weight" if path[4] == "kernel" else "bias"
        return f"model.layers.{i}.{module}.{table[path[3]]}.{leaf}"
    if len(path) == 4 and path[2] in _NORMS_INV and path[3] == "scale":
      return f"model.layers.{i}.{_NORMS_INV[path[2]]}.weight"
  raise ValueError(f"parameter path {path!r} has no HF Llama tensor name")


def set_path(tree: dict, path: Path, value) -> None:
  """Sets ``tree[path[0]][path[1]]... = value``, creating intermediate dicts."""
  node = tree
  for key in path[:-1]:
    node = node.setdefault(key, {})
  node[path[-1]] = value


def get_path(tree: Mapping, path: Path):
  node = tree
  for key in path:
    node = node[key]
  return node


def iter_paths(tree: Mapping, prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
  """``(path, leaf)`` for every leaf of a nested dict, in insertion order."""
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from iter_paths(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def expected_hf_names(config) -> list[str]:
  """Every HF tensor name a checkpoint of ``config`` (a :class:`~duojax.config.LlamaConfig`) must hold."""
  names = ["model.embed_tokens.weight"]
  for i in range(config.num_hidden_layers):
    p = f"model.layers.{i}"
    for proj in _ATTN:
      names.append(f"{p}.self_attn.{proj}.weight")
      if config.attention_bias:
        names.append(f"{p}.self_attn.{proj}.bias")
    for proj in _MLP:
      names.append(f"{p}.mlp.{proj}.weight")
      if config.mlp_bias:
        names.append(f"{p}.mlp.{proj}.bias")
    names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
  names.append("model.norm.weight")
  if not config.tie_word_embeddings:
    names.append("lm_head.weight")
  return names


def expected_hf_shape(name: str, config) -> tuple[int, ...]:
  """The shape HF tensor ``name`` has in a checkpoint of ``config``."""
  c = config
  path, transpose = hf_to_path(name)
  H, I, V = c.hidden_size, c.intermediate_size, c.vocab_size
  q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
  if path == ("embed",):
    return (V, H)
  if path[0] in ("final_norm",) or (len(path) == 4 and path[-1] == "scale"):
    return (H,)
  if path == ("lm_head", "kernel"):
    return (V, H)
  in_out = {"q": (H, q), "k": (H, kv), "v": (H, kv), "o": (q, H), "gate": (H, I), "up": (H, I), "down": (I, H)}
  fin, fout = in_out[path[3]]
  if path[-1] == "bias":
    return (fout,)
  return (fout, fin)


def params_to_hf_tensors(params: Mapping) -> dict[str, np.ndarray]:
  """The parameter tree as HF-named numpy arrays (kernels transposed to ``[out, in]``, contiguous).

  Keeps each array's dtype (``ml_dtypes.bfloat16`` included). SVD-factored projections are rejected.
  """
  out = {}
  for path, value in iter_paths(params):
    if path[-1] in ("u", "v"):
      raise ValueError(f"parameter {path!r} is an SVD factor; HF checkpoints hold plain weights only")
    name = path_to_hf(path)
    arr = np.asarray(value)
    if path[-1] == "kernel":
      arr = arr.T
    out[name] = np.ascontiguousarray(arr)
  return out
