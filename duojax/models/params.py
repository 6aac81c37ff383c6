"""Moving parameter pytrees in and out of the NNX model.

The parameter pytree (a plain nested dict, the same layout everywhere in duojax: importers, reordering,
checkpoints) is::

    {"embed": [V, H],
     "layers": {i: {"attn": {"q": {"kernel": [H, Hq*D]}, "k": {"kernel": [H, Hkv*D]},
                             "v": {"kernel": [H, Hkv*D]}, "o": {"kernel": [Hq*D, H]}},   # (+ "bias")
                    "mlp": {"gate": {"kernel": [H, I]}, "up": {"kernel": [H, I]}, "down": {"kernel": [I, H]}},
                    "input_norm": {"scale": [H]}, "post_attn_norm": {"scale": [H]}}},
     "final_norm": {"scale": [H]},
     "lm_head": {"kernel": [H, V]}}                                                        # absent when tied

A projection may hold SVD factors ``{"u": [in, r], "v": [r, out]}`` instead of ``kernel``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from duojax.config import DuoSpec, LlamaConfig
from duojax.models.llama import Linear, Llama


def model_params(model: Llama) -> dict:
  """The model's parameters as a plain nested dict (arrays shared, not copied)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _shapes(tree) -> dict:
  return jax.tree.map(lambda x: tuple(x.shape), tree)


def build_model(config: LlamaConfig, params: dict, duo: DuoSpec | None = None, *, dtype="float32") -> Llama:
  """A :class:`Llama` holding ``params`` (cast to ``dtype``); raises if the tree does not match the config.

  Projections given as SVD factors (``u``, ``v``) replace the model's ``kernel``.
  """
  model = nnx.eval_shape(lambda: Llama(config, duo, dtype=dtype, rngs=nnx.Rngs(0)))
  _swap_factored_projections(model, params)
  expected = _shapes(model_params(model))
  got = _shapes(params)
  if expected != got:
    raise ValueError(f"parameters do not match the model config: {_first_difference(expected, got)}")
  cast = jax.tree.map(lambda x: jnp.asarray(x, model.dtype), params)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, cast)
  nnx.update(model, state)
  return model


def _swap_factored_projections(model: Llama, params: dict) -> None:
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, Linear):
      continue
    sub = params
    for key in path:
      if not isinstance(sub, dict) or key not in sub:
        sub = None
        break
      sub = sub[key]
    if isinstance(sub, dict) and "u" in sub and "v" in sub:
      del node.kernel
      node.u = nnx.Param(jnp.asarray(sub["u"]))
      node.v = nnx.Param(jnp.asarray(sub["v"]))


def _first_difference(expected, got, prefix="") -> str:
  if isinstance(expected, dict) and isinstance(got, dict):
    for key in expected:
      if key not in got:
        return f"missing parameter {prefix}{key}"
    for key in got:
      if key not in expected:
        return f"unexpected parameter {prefix}{key}"
    for key in expected:
      diff = _first_difference(expected[key], got[key], f"{prefix}{key}/")
      if diff:
        return diff
    return ""
  if expected != got:
    return f"{prefix.rstrip('/')} has shape {got}, the config implies {expected}"
  return ""
