"""``duojax.load``: a converted checkpoint (see :mod:`duojax.convert`) restored onto a mesh, ready to run.

Parameters are restored by orbax straight into the shardings of :data:`duojax.sharding.PARTITION_RULES` (no full
host copy), on a mesh of any shape. The KV-head layout is balanced per tensor-parallel shard: if the target mesh's
``tp`` differs from the ``tp`` the checkpoint was balanced for, each layer's heads are permuted again (on device)
with :func:`duojax.models.reorder.head_permutation` of the saved original pattern, so that every shard holds the same
number of retrieval heads (up to one), retrieval-first inside the shard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from duojax.config import DuoSpec, LlamaConfig


class Loaded(NamedTuple):
  """What :func:`load` returns."""

  model: Any            # duojax.models.llama.Llama holding ``params``
  params: dict          # parameter tree of jax.Arrays (sharded on ``mesh``)
  tokenizer: Any        # duojax.io.Tokenizer, or None if the checkpoint has none
  metadata: dict        # duojax.json as saved
  config: LlamaConfig
  duo: DuoSpec          # the layout of ``params`` (retrieval-first per tp shard)
  perm: np.ndarray      # [L, Hkv] new-to-old KV-head indices of ``params`` w.r.t. the original model
  mesh: Mesh | None


def abstract_params(config: LlamaConfig, dtype) -> dict:
  """``jax.ShapeDtypeStruct`` tree of the model's parameters (the layout of :mod:`duojax.models.params`)."""
  from flax import nnx

  from duojax.models.llama import Llama
  from duojax.models.params import model_params
  model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0)))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), model_params(model))


def _permute_attn_fn(config: LlamaConfig):
  from duojax.models.reorder import permute_layer_heads
  return lambda attn, idx: permute_layer_heads({"attn": attn}, idx, config)["attn"]


def rebalance_perms(full: np.ndarray, saved_perm: np.ndarray, tp: int) -> tuple[np.ndarray, np.ndarray]:
  """``(target_perm, relative)``: the new-to-old permutation balanced for ``tp`` (w.r.t. the original order)
  and the permutation to apply to the saved layout (``target[i] = saved[relative[i]]``), per layer."""
  from duojax.models.reorder import head_permutation
  target = np.stack([head_permutation(row, tp) for row in full]).astype(np.int32)
  inverse = np.argsort(saved_perm, axis=1)            # original head -> position in the saved layout
  relative = np.take_along_axis(inverse, target, axis=1).astype(np.int32)
  return target, relative


def load(path: str | os.PathLike, mesh: Mesh | str | None = None, dtype=None) -> Loaded:
  """Loads a converted duojax checkpoint.

  Args:
    path: the directory ``python -m duojax.convert`` wrote.
    mesh: None (one device), a :class:`jax.sharding.Mesh` with axes ``dp``/``tp``, or a spec such as ``"tp=4"``
      or ``"dp=2,tp=4"`` (built over all devices with :func:`duojax.sharding.make_mesh`).
    dtype: parameter/compute dtype (default: the checkpoint's).

  Returns:
    :class:`Loaded` (model, params, tokenizer, metadata, config, duo layout, perm, mesh).
  """
  from duojax.checkpoint import PARAMS_DIR, param_metadata, restore_params
  from duojax.convert import read_metadata
  from duojax.models.llama import canonical_dtype
  from duojax.models.params import build_model
  from duojax.sharding import make_mesh, mesh_tp, parse_mesh, param_shardings, path_str

  path = Path(path)
  meta = read_metadata(path)
  config = LlamaConfig.from_hf(meta["config"])
  dtype = canonical_dtype(dtype or meta["dtype"])
  sizes = None
  if mesh is not None and not isinstance(mesh, Mesh):
    sizes = parse_mesh(mesh)
    tp = sizes["tp"]
  else:
    if mesh is not None and "tp" not in mesh.axis_names:
      raise ValueError(f"mesh axes {mesh.axis_names} lack 'tp'; the partition rules shard over 'tp' (and replicate "
                       "over any other axis): build the mesh with duojax.sharding.make_mesh('dp=..,tp=..')")
    tp = mesh_tp(mesh)
  L, H = config.num_hidden_layers, config.num_key_value_heads
  if tp < 1 or H % tp:
    raise ValueError(f"tensor-parallel size tp={tp} must divide the number of KV heads ({H}) of the model in "
                     f"{path}")
  if sizes is not None:
    mesh = make_mesh(sizes)
  full = np.asarray(meta["pattern"]["full"], bool)
  saved_perm = np.asarray(meta["perm"], np.int32)
  if full.shape != (L, H) or saved_perm.shape != (L, H):
    raise ValueError(f"{path}: pattern {full.shape} / perm {saved_perm.shape} do not match the model's "
                     f"({L}, {H}) (layers, KV heads)")

  abstract = abstract_params(config, dtype)
  stored = param_metadata(path / PARAMS_DIR)
  wanted = {path_str(p): tuple(s.shape) for p, s in jax.tree_util.tree_leaves_with_path(abstract)}
  for name, shape in wanted.items():
    if name not in stored:
      raise ValueError(f"checkpoint {path} lacks parameter {name!r}")
    if tuple(stored[name][0]) != shape:
      raise ValueError(f"checkpoint {path}: parameter {name!r} has shape {stored[name][0]}, the config implies "
                       f"{shape}")
  extra = sorted(set(stored) - set(wanted))
  if extra:
    raise ValueError(f"checkpoint {path} holds parameters the config does not have: {extra[:3]}")

  if mesh is None:
    one = SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one, abstract)
  else:
    shardings = param_shardings(abstract, mesh)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
  params = restore_params(path / PARAMS_DIR, target)

  target_perm, relative = rebalance_perms(full, saved_perm, tp)
  if not np.array_equal(relative, np.broadcast_to(np.arange(H), relative.shape)):
    layers = params["layers"]  # restored just now: updated in place, so each old layer is freed as we go
    out_sh = jax.tree.map(lambda x: x.sharding, layers[0]["attn"])
    donate = (0,) if jax.default_backend() != "cpu" else ()
    permute = jax.jit(_permute_attn_fn(config), out_shardings=out_sh, donate_argnums=donate)
    for l in range(L):
      if not np.array_equal(relative[l], np.arange(H)):
        layers[l]["attn"] = permute(layers[l].pop("attn"), jnp.asarray(relative[l]))

  new_full = np.take_along_axis(full, target_perm, axis=1)
  duo = DuoSpec(tuple(map(tuple, new_full.tolist())), sink=int(meta["sink"]), window=int(meta["window"]))
  model = build_model(config, params, duo, dtype=dtype)
  tokenizer = None
  if meta.get("tokenizer") and (path / meta["tokenizer"]).is_file():
    from duojax.io.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(path)
  return Loaded(model, params, tokenizer, meta, config, duo, target_perm, mesh)
