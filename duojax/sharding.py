"""Meshes and the one partition-rule table for duojax parameters.

Tensor parallelism is over KV heads: the mesh has axes ``dp`` (data parallel; parameters replicated) and ``tp``
(tensor parallel). With ``tp`` shards, shard ``s`` of every layer holds KV heads ``[s*Hkv/tp, (s+1)*Hkv/tp)`` with
their query groups: q/k/v kernels are split on their output (head) axis, o on its input axis, the MLP's gate/up on
their output axis and down on its input axis; embeddings, norms and the LM head are replicated.

:data:`PARTITION_RULES` maps a regular expression on the parameter path (``"layers/3/attn/q/kernel"``, see
:mod:`duojax.models.params`) to a :class:`~jax.sharding.PartitionSpec`; the first rule whose pattern matches the
whole path wins, and a parameter matching no rule is an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("dp", "tp")

# (regex on "/"-joined parameter path, PartitionSpec). Projections may hold SVD factors u [in, r], v [r, out].
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"embed", P()),                                                  # [V, H] replicated
    (r"layers/\d+/attn/(q|k|v)/kernel", P(None, "tp")),               # [H, heads*D]: head (output) axis
    (r"layers/\d+/attn/(q|k|v)/bias", P("tp")),
    (r"layers/\d+/attn/(q|k|v)/u", P()),
    (r"layers/\d+/attn/(q|k|v)/v", P(None, "tp")),
    (r"layers/\d+/attn/o/(kernel|u)", P("tp", None)),                 # [Hq*D, H]: head (input) axis
    (r"layers/\d+/attn/o/(bias|v)", P()),
    (r"layers/\d+/mlp/(gate|up)/kernel", P(None, "tp")),              # [H, I]: output axis
    (r"layers/\d+/mlp/(gate|up)/bias", P("tp")),
    (r"layers/\d+/mlp/(gate|up)/u", P()),
    (r"layers/\d+/mlp/(gate|up)/v", P(None, "tp")),
    (r"layers/\d+/mlp/down/(kernel|u)", P("tp", None)),               # [I, H]: input axis
    (r"layers/\d+/mlp/down/(bias|v)", P()),
    (r"layers/\d+/(input_norm|post_attn_norm)/scale", P()),
    (r"final_norm/scale", P()),
    (r"lm_head/kernel", P()),                                         # [H, V] replicated
)

_COMPILED = tuple((re.compile(pattern), spec) for pattern, spec in PARTITION_RULES)


# ----------------------------------------------------------------------------------------------- meshes


def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
  """``"tp=4"`` / ``"dp=2,tp=4"`` (or a mapping) -> ``{"dp": 2, "tp": 4}``; absent axes are 1.

  Raises ValueError on unknown axis names, repeated axes, or sizes that are not positive ints.
  """
  sizes = {"dp": 1, "tp": 1}
  if spec is None:
    return sizes
  if isinstance(spec, Mapping):
    items = [(str(k), v) for k, v in spec.items()]
  else:
    text = str(spec).strip()
    if not text:
      return sizes
    items = []
    for part in text.split(","):
      name, eq, value = part.partition("=")
      if not eq:
        raise ValueError(f"mesh spec {spec!r}: {part.strip()!r} is not of the form axis=size (e.g. 'dp=2,tp=4')")
      items.append((name.strip(), value.strip()))
  seen = set()
  for name, value in items:
    if name not in AXES:
      raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; allowed axes: {', '.join(AXES)}")
    if name in seen:
      raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
    seen.add(name)
    try:
      size = int(value)
      if isinstance(value, float) or (isinstance(value, str) and not value.isdigit()):
        raise ValueError
    except (TypeError, ValueError):
      raise ValueError(f"mesh spec {spec!r}: size of axis {name!r} must be a positive int; got {value!r}") from None
    if size < 1:
      raise ValueError(f"mesh spec {spec!r}: size of axis {name!r} must be a positive int; got {size}")
    sizes[name] = size
  return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, devices=None) -> Mesh:
  """A ``('dp', 'tp')`` mesh with Auto axis types over ``devices`` (default: all devices).

  The product of the axis sizes must equal the number of devices; ``spec=None`` puts every device on ``tp``.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec) if spec is not None else {"dp": 1, "tp": len(devices)}
  n = sizes["dp"] * sizes["tp"]
  if n != len(devices):
    raise ValueError(
        f"mesh {format_mesh(sizes)} has {n} devices but {len(devices)} are available; the product of the axis "
        f"sizes must equal the device count (e.g. dp={max(1, len(devices) // sizes['tp'])},tp={sizes['tp']})")
  grid = np.asarray(devices, dtype=object).reshape(sizes["dp"], sizes["tp"])
  return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def format_mesh(sizes: Mapping[str, int] | Mesh) -> str:
  if isinstance(sizes, Mesh):
    sizes = dict(sizes.shape)
  return ",".join(f"{a}={int(sizes.get(a, 1))}" for a in AXES)


def mesh_tp(mesh: Mesh | None) -> int:
  """Size of the ``tp`` axis of ``mesh`` (1 for None or a mesh without one)."""
  if mesh is None:
    return 1
  return int(dict(mesh.shape).get("tp", 1))


# ----------------------------------------------------------------------------------------------- rules


def path_str(path) -> str:
  """``("layers", 3, "attn", "q", "kernel")`` or a jax key path -> ``"layers/3/attn/q/kernel"``."""
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        key = getattr(key, attr)
        break
    parts.append(str(key))
  return "/".join(parts)


def spec_for(path) -> P:
  """The PartitionSpec of the parameter at ``path`` (first matching rule); ValueError if no rule matches."""
  name = path if isinstance(path, str) else path_str(path)
  for regex, spec in _COMPILED:
    if regex.fullmatch(name):
      return spec
  raise ValueError(f"parameter {name!r} matches no partition rule in duojax.sharding.PARTITION_RULES; add a rule "
                   "for it")


def param_specs(params) -> Any:
  """A tree of PartitionSpecs with the structure of ``params``."""
  return jax.tree_util.tree_map_with_path(lambda p, _: spec_for(p), params)


def _check_divisible(name: str, shape, spec: P, mesh: Mesh) -> None:
  sizes = dict(mesh.shape)
  for dim, axis in enumerate(tuple(spec)):
    if axis is None:
      continue
    axes = axis if isinstance(axis, tuple) else (axis,)
    n = math.prod(sizes.get(a, 1) for a in axes)
    if shape[dim] % n:
      raise ValueError(f"parameter {name!r} of shape {tuple(shape)}: dimension {dim} ({shape[dim]}) is not "
                       f"divisible by mesh axis {axis!r} of size {n}")


def param_shardings(params, mesh: Mesh) -> Any:
  """A tree of NamedShardings (from :data:`PARTITION_RULES`) for ``params`` (arrays or ShapeDtypeStructs)."""
  def one(path, x):
    name = path_str(path)
    spec = spec_for(name)
    _check_divisible(name, x.shape, spec, mesh)
    return NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(one, params)


def shard_params(params, mesh: Mesh) -> Any:
  """``params`` placed on ``mesh`` by the partition rules (``jax.device_put``)."""
  return jax.device_put(params, param_shardings(params, mesh))
