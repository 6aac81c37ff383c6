"""Head reordering: a pure function on the parameter pytree that moves each layer's retrieval KV heads first.

Permuting KV heads (with their query groups) permutes the attention heads consistently: rows of the k/v
projections, the G query heads of each KV group in q, and the matching input columns of o (biases too). The
network computes the same function afterwards, with the layout :class:`~duojax.config.DuoSpec` describes.
With ``tp > 1`` the KV heads are dealt to ``tp`` contiguous shards so that every shard gets the same number of
retrieval heads (up to one), retrieval-first inside each shard.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from duojax.config import DuoSpec, LlamaConfig


def head_permutation(full: Sequence[bool], tp: int = 1) -> np.ndarray:
  """New-to-old KV-head indices for one layer (``new[i] = old[perm[i]]``).

  ``tp == 1``: retrieval heads first, stable order. ``tp > 1``: retrieval heads dealt round-robin to ``tp``
  contiguous shards of ``len(full) // tp`` heads, streaming heads filling the rest, retrieval-first per shard.
  """
  full = np.asarray(full, bool)
  H = full.size
  if tp < 1 or H % tp:
    raise ValueError(f"tensor-parallel size tp={tp} must divide the number of KV heads ({H})")
  retrieval, streaming = list(np.flatnonzero(full)), list(np.flatnonzero(~full))
  per_shard = H // tp
  perm = []
  for s in range(tp):
    mine = retrieval[s::tp]
    perm += mine
    take = per_shard - len(mine)
    perm += streaming[:take]
    streaming = streaming[take:]
  return np.asarray(perm, np.int32)


def _take(x, idx, axis, group: int, head_dim: int):
  """Permutes head blocks of ``group * head_dim`` entries along ``axis`` of ``x`` (numpy, or JAX, also traced)."""
  xp = jnp if isinstance(x, jax.Array) else np
  x = xp.asarray(x)
  shape = x.shape
  n_heads = shape[axis] // (group * head_dim)
  x = x.reshape(shape[:axis] + (n_heads, group * head_dim) + shape[axis + 1:])
  x = xp.take(x, idx, axis=axis)
  return x.reshape(shape)


def _permute_out(proj: dict, idx, group: int, head_dim: int) -> dict:
  """A projection whose OUTPUT features are heads (q, k, v): permute kernel/v columns and bias."""
  out = dict(proj)
  for name, axis in (("kernel", 1), ("v", 1), ("bias", 0)):
    if name in proj and proj[name] is not None:
      out[name] = _take(proj[name], idx, axis, group, head_dim)
  return out


def _permute_in(proj: dict, idx, group: int, head_dim: int) -> dict:
  """A projection whose INPUT features are heads (o): permute kernel/u rows."""
  out = dict(proj)
  for name in ("kernel", "u"):
    if name in proj:
      out[name] = _take(proj[name], idx, 0, group, head_dim)
  return out


def permute_layer_heads(layer: dict, perm, config: LlamaConfig) -> dict:
  """Applies a KV-head permutation to one layer's parameters (numpy or JAX arrays; returns a new dict)."""
  G, D = config.num_groups, config.head_dim
  attn = dict(layer["attn"])
  attn["q"] = _permute_out(attn["q"], perm, G, D)
  attn["k"] = _permute_out(attn["k"], perm, 1, D)
  attn["v"] = _permute_out(attn["v"], perm, 1, D)
  attn["o"] = _permute_in(attn["o"], perm, G, D)
  return {**layer, "attn": attn}


def reorder_heads(params: dict, config: LlamaConfig, full, *, sink: int, window: int,
                  tp: int = 1) -> tuple[dict, np.ndarray, DuoSpec]:
  """Reorders every layer's KV heads so that retrieval heads come first (per shard when ``tp > 1``).

  Args:
    params: the parameter tree (layout in :mod:`duojax.models.params`).
    config: the model config.
    full: ``[num_layers, num_kv_heads]`` booleans, True = retrieval head (in the params' current order).
    sink, window: the streaming heads' sizes, recorded in the returned spec.
    tp: number of tensor-parallel shards over KV heads.

  Returns:
    ``(new_params, perm [L, Hkv] int32 new-to-old, DuoSpec of the new layout)``.
  """
  full = np.asarray(full, bool)
  want = (config.num_hidden_layers, config.num_key_value_heads)
  if full.shape != want:
    raise ValueError(f"pattern has shape {full.shape} (layers, KV heads) but the model has {want}")
  perms = np.stack([head_permutation(full[l], tp) for l in range(want[0])])
  layers = {l: permute_layer_heads(params["layers"][l], perms[l], config) for l in range(want[0])}
  new_full = np.take_along_axis(full, perms, axis=1)
  spec = DuoSpec(tuple(map(tuple, new_full.tolist())), sink=sink, window=window)
  return {**params, "layers": layers}, perms, spec
