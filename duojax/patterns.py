"""DuoAttention head patterns: load, save, binarize, validate and summarise.

A DuoAttention training run writes a directory ``attn_patterns/<model>/<run>/`` holding

* ``full_attention_heads.tsv``: ``np.savetxt(gates, delimiter="\\t")``, one row per layer, one column per KV head,
  the raw learned gate ``alpha`` of each KV head (may be slightly negative or exactly 1.0);
* ``config.json``: the run's arguments, among them ``sink_size`` and ``recent_size`` (the training-time sizes of
  the streaming heads' attention sink and recent window).

:class:`DuoPattern` holds the gates (clipped to ``[0, 1]``) and that config; :meth:`DuoPattern.binarize` turns it
into a :class:`BinaryPattern` (``True`` = retrieval head with full attention, ``False`` = streaming head with
sink + recent window), either by threshold (``alpha >= threshold``) or by a target sparsity (fraction of
streaming KV heads, one global quantile over layers x heads, as in DuoAttention).

Tie rule for binarization by sparsity (DuoAttention itself breaks ties with random noise; duojax is
deterministic): all ``(layer, head)`` gates are ordered by a stable sort on (descending gate, ascending layer,
ascending head) and the first ``retrieval_count(L * H, sparsity)`` of them become retrieval heads, where
``retrieval_count`` rounds ``(1 - sparsity) * L * H`` to the nearest whole head, halves rounding up (towards more
retrieval heads). Without ties this is exactly DuoAttention's ``alpha >= quantile(alpha, sparsity)`` (linear
interpolation); with ties at the cut, earlier layers, then lower head indices, win.

Run ``python -m duojax.patterns <dir> [--sparsity S]`` to print the shape and sparsity of every pattern under
``<dir>``.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = [
    "GATES_FILE",
    "CONFIG_FILE",
    "DuoPattern",
    "BinaryPattern",
    "load_pattern",
    "save_pattern",
    "find_patterns",
    "binarize",
    "retrieval_count",
    "validate_pattern",
    "validate_for_config",
    "retrieval_first_permutation",
    "num_full",
    "pattern_summary",
    "main",
]

GATES_FILE = "full_attention_heads.tsv"
CONFIG_FILE = "config.json"
_BINARY_FORMAT = "duojax.binary_pattern"
_BINARY_VERSION = 1


class _ModelConfig(Protocol):
  num_hidden_layers: int
  num_key_value_heads: int


# ----------------------------------------------------------------------------------------------- argument checks


def _check_real(name: str, value: Any) -> float:
  """Returns ``value`` as a finite float; TypeError for non-numbers (and bools), ValueError for nan/inf."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a real number; got {value!r} of type {type(value).__name__}")
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"{name} must be finite; got {value!r}")
  return value


def _check_optional_size(name: str, value: Any, source: str) -> int | None:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
    raise ValueError(f"{name} must be an int >= 0 or None{source}; got {value!r}")
  return int(value)


def _check_count(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be an int >= 1; got {value!r}")
  return int(value)


def _frozen(array: np.ndarray) -> np.ndarray:
  array = np.array(array, copy=True)
  array.setflags(write=False)
  return array


# ----------------------------------------------------------------------------------------------- binarization


def retrieval_count(num_heads: int, sparsity: float) -> int:
  """Number of retrieval heads among ``num_heads`` for a target ``sparsity`` (fraction of streaming heads).

  ``round((1 - sparsity) * num_heads)`` with halves rounded up, clamped to ``[0, num_heads]``; ``sparsity >= 1``
  gives 0 and ``sparsity <= 0`` gives ``num_heads``.
  """
  num_heads = _check_count("num_heads", num_heads)
  sparsity = _check_real("sparsity", sparsity)
  if sparsity >= 1.0:
    return 0
  if sparsity <= 0.0:
    return num_heads
  # Round to 9 decimals first so that e.g. (1 - 0.9) * 5 = 0.4999999999999999 counts as the half it means.
  exact = round((1.0 - sparsity) * num_heads, 9)
  return min(num_heads, max(0, math.floor(exact + 0.5)))


def binarize(gates: np.ndarray, *, threshold: float | None = None, sparsity: float | None = None) -> BinaryPattern:
  """Binarizes a ``[layers, kv_heads]`` gate matrix; pass exactly one of ``threshold`` and ``sparsity``.

  * ``threshold``: a head is a retrieval head iff ``gate >= threshold``.
  * ``sparsity``: target fraction of streaming KV heads over all layers x heads; exactly
    ``retrieval_count(L * H, sparsity)`` heads are retrieval heads, chosen by the stable order (descending gate,
    ascending layer, ascending head) -- see the module docstring for the tie rule.
  """
  if (threshold is None) == (sparsity is None):
    raise ValueError(
        "pass exactly one of threshold= (retrieval iff gate >= threshold) and sparsity= (target fraction of "
        f"streaming KV heads); got threshold={threshold!r}, sparsity={sparsity!r}")
  gates = np.asarray(gates, dtype=np.float64)
  if gates.ndim != 2 or gates.shape[0] < 1 or gates.shape[1] < 1:
    raise ValueError(f"gates must be a non-empty 2-D array [layers, kv_heads]; got shape {gates.shape}")
  if threshold is not None:
    threshold = _check_real("threshold", threshold)
    return BinaryPattern(gates >= threshold)
  sparsity = _check_real("sparsity", sparsity)
  flat = gates.ravel()  # row-major: flat index = layer * H + head, so ascending index = (layer, head) order
  keep = retrieval_count(flat.size, sparsity)
  order = np.argsort(-flat, kind="stable")  # descending gate; stable keeps ascending (layer, head) among ties
  full = np.zeros(flat.size, dtype=bool)
  full[order[:keep]] = True
  return BinaryPattern(full.reshape(gates.shape))


# ----------------------------------------------------------------------------------------------- head reordering


def retrieval_first_permutation(full_row: Sequence[bool] | np.ndarray) -> np.ndarray:
  """KV-head indices of one layer with retrieval heads first, each group in ascending (stable) order.

  ``perm[j]`` is the original KV head placed at position ``j``; the first ``num_full(full_row)`` positions are the
  retrieval heads. Used to reorder q/k/v/o weights so that a layer's retrieval heads are contiguous.
  """
  row = np.asarray(full_row)
  if row.ndim != 1 or row.dtype != np.bool_:
    raise ValueError(f"full_row must be a 1-D bool array (one layer's KV heads); got dtype {row.dtype}, "
                     f"shape {row.shape}")
  return np.argsort(~row, kind="stable").astype(np.int64)


def num_full(full_row: Sequence[bool] | np.ndarray) -> int:
  """Number of retrieval (full-attention) KV heads in one layer's bool row."""
  row = np.asarray(full_row)
  if row.ndim != 1 or row.dtype != np.bool_:
    raise ValueError(f"full_row must be a 1-D bool array; got dtype {row.dtype}, shape {row.shape}")
  return int(row.sum())


# ----------------------------------------------------------------------------------------------- dataclasses


class _LayerHeadGrid:
  """``shape``, ``num_layers`` and ``num_kv_heads`` of a pattern held as one ``[layers, kv_heads]`` array
  (``_grid``)."""

  _grid: np.ndarray

  @property
  def shape(self) -> tuple[int, int]:
    """``(num_layers, num_kv_heads)``."""
    return (int(self._grid.shape[0]), int(self._grid.shape[1]))

  @property
  def num_layers(self) -> int:
    return self.shape[0]

  @property
  def num_kv_heads(self) -> int:
    return self.shape[1]


@dataclass(frozen=True, eq=False)
class BinaryPattern(_LayerHeadGrid):
  """Which KV heads are retrieval heads: ``full[layer, kv_head]`` is True for full attention.

  The array is stored as a read-only copy. Equality compares the arrays.
  """

  full: np.ndarray

  def __post_init__(self) -> None:
    full = np.asarray(self.full)
    if full.dtype != np.bool_:
      raise ValueError(f"BinaryPattern.full must be a bool array; got dtype {full.dtype}")
    if full.ndim != 2 or full.shape[0] < 1 or full.shape[1] < 1:
      raise ValueError(f"BinaryPattern.full must be non-empty 2-D [layers, kv_heads]; got shape {full.shape}")
    object.__setattr__(self, "full", _frozen(full))

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, BinaryPattern):
      return NotImplemented
    return self.full.shape == other.full.shape and bool(np.array_equal(self.full, other.full))

  __hash__ = None  # type: ignore[assignment]

  def __repr__(self) -> str:
    return f"BinaryPattern(shape={self.shape}, sparsity={self.sparsity:.4f}, num_full={self.num_full_per_layer})"

  @property
  def _grid(self) -> np.ndarray:
    return self.full

  @property
  def num_full_per_layer(self) -> tuple[int, ...]:
    """Number of retrieval KV heads in each layer."""
    return tuple(int(n) for n in self.full.sum(axis=1))

  @property
  def num_full_total(self) -> int:
    return int(self.full.sum())

  @property
  def sparsity(self) -> float:
    """Fraction of streaming KV heads over all layers x heads."""
    return 1.0 - self.num_full_total / self.full.size

  def retrieval_first_permutations(self) -> np.ndarray:
    """``[L, Hkv]`` int array: row ``l`` is :func:`retrieval_first_permutation` of layer ``l``."""
    return np.stack([retrieval_first_permutation(row) for row in self.full])

  def reordered(self) -> BinaryPattern:
    """The pattern after retrieval-first reordering: each layer's retrieval heads moved to the front."""
    return BinaryPattern.from_num_full(self.num_full_per_layer, self.num_kv_heads)

  # --- constructors ---

  @classmethod
  def all_full(cls, num_layers: int, num_kv_heads: int) -> BinaryPattern:
    """Every head a retrieval head (plain full attention; sparsity 0)."""
    return cls(np.ones((_check_count("num_layers", num_layers), _check_count("num_kv_heads", num_kv_heads)), bool))

  @classmethod
  def all_streaming(cls, num_layers: int, num_kv_heads: int) -> BinaryPattern:
    """Every head a streaming head (sparsity 1)."""
    return cls(np.zeros((_check_count("num_layers", num_layers), _check_count("num_kv_heads", num_kv_heads)), bool))

  @classmethod
  def from_num_full(cls, num_full_per_layer: Sequence[int], num_kv_heads: int) -> BinaryPattern:
    """The first ``num_full_per_layer[l]`` KV heads of layer ``l`` are retrieval heads (retrieval-first order)."""
    num_kv_heads = _check_count("num_kv_heads", num_kv_heads)
    counts = list(num_full_per_layer)
    if not counts:
      raise ValueError("num_full_per_layer must name at least one layer")
    for layer, n in enumerate(counts):
      if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= n <= num_kv_heads:
        raise ValueError(f"num_full_per_layer[{layer}] must be an int in [0, {num_kv_heads}]; got {n!r}")
    full = np.arange(num_kv_heads)[None, :] < np.asarray(counts, dtype=np.int64)[:, None]
    return cls(full)

  # --- JSON metadata ---

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable dict; :meth:`from_dict` inverts it. ``full`` is a list of 0/1 rows."""
    return {
        "format": _BINARY_FORMAT,
        "version": _BINARY_VERSION,
        "shape": list(self.shape),
        "full": self.full.astype(np.int64).tolist(),
        "num_full_per_layer": list(self.num_full_per_layer),
        "sparsity": self.sparsity,
    }

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> BinaryPattern:
    """Inverse of :meth:`to_dict`; checks the format tag, shape, 0/1 entries and the redundant counts."""
    if not isinstance(data, Mapping):
      raise ValueError(f"BinaryPattern.from_dict expects a mapping; got {type(data).__name__}")
    if data.get("format") != _BINARY_FORMAT or data.get("version") != _BINARY_VERSION:
      raise ValueError(f"not a {_BINARY_FORMAT} v{_BINARY_VERSION} dict: format={data.get('format')!r}, "
                       f"version={data.get('version')!r}")
    rows = data.get("full")
    if (not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows)
        or len({len(r) for r in rows}) != 1):
      raise ValueError("BinaryPattern dict 'full' must be a non-empty list of equal-length lists of 0/1")
    if not all(isinstance(v, (bool, int)) and v in (0, 1) for r in rows for v in r):
      raise ValueError("BinaryPattern dict 'full' entries must be 0/1 (or booleans)")
    pattern = cls(np.asarray(rows, dtype=np.int64).astype(bool))
    if "shape" in data and list(data["shape"]) != list(pattern.shape):
      raise ValueError(f"BinaryPattern dict shape {data['shape']} does not match 'full' of shape {pattern.shape}")
    if "num_full_per_layer" in data and list(data["num_full_per_layer"]) != list(pattern.num_full_per_layer):
      raise ValueError("BinaryPattern dict num_full_per_layer does not match 'full'")
    return pattern


@dataclass(frozen=True, eq=False)
class DuoPattern(_LayerHeadGrid):
  """Learned DuoAttention gates of one model plus the training run's config.

  Attributes:
    gates: float64 ``[num_layers, num_kv_heads]`` gate values ``alpha``, clipped to ``[0, 1]`` (read-only copy).
    sink_size: attention-sink tokens of streaming heads during training (``config.json``), or None.
    recent_size: recent-window tokens of streaming heads during training (``config.json``), or None.
    source: the ``full_attention_heads.tsv`` it was loaded from, or None.
    config: the run's full ``config.json`` (empty if there was none).
  """

  gates: np.ndarray
  sink_size: int | None = None
  recent_size: int | None = None
  source: Path | None = None
  config: Mapping[str, Any] = field(default_factory=dict)

  def __post_init__(self) -> None:
    try:
      gates = np.asarray(self.gates, dtype=np.float64)
    except (TypeError, ValueError) as e:
      raise ValueError(f"DuoPattern.gates must be a numeric 2-D array [layers, kv_heads]: {e}") from None
    if gates.ndim != 2 or gates.shape[0] < 1 or gates.shape[1] < 1:
      raise ValueError(f"DuoPattern.gates must be a non-empty 2-D array [layers, kv_heads]; got shape {gates.shape}")
    if not np.all(np.isfinite(gates)):
      raise ValueError("DuoPattern.gates must be finite (found nan or inf)")
    object.__setattr__(self, "gates", _frozen(np.clip(gates, 0.0, 1.0)))
    object.__setattr__(self, "sink_size", _check_optional_size("sink_size", self.sink_size, ""))
    object.__setattr__(self, "recent_size", _check_optional_size("recent_size", self.recent_size, ""))
    if self.source is not None:
      object.__setattr__(self, "source", Path(self.source))
    object.__setattr__(self, "config", dict(self.config or {}))

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, DuoPattern):
      return NotImplemented
    return (self.gates.shape == other.gates.shape and bool(np.array_equal(self.gates, other.gates))
            and self.sink_size == other.sink_size and self.recent_size == other.recent_size
            and dict(self.config) == dict(other.config))

  __hash__ = None  # type: ignore[assignment]

  def __repr__(self) -> str:
    return (f"DuoPattern(shape={self.shape}, sink_size={self.sink_size}, recent_size={self.recent_size}, "
            f"source={str(self.source) if self.source else None!r})")

  @property
  def _grid(self) -> np.ndarray:
    return self.gates

  @property
  def name(self) -> str:
    """``<model>/<run>`` from the source path (the two directories above the tsv), or ``"<in-memory>"``."""
    if self.source is None:
      return "<in-memory>"
    parts = self.source.resolve().parent.parts
    return "/".join(parts[-2:])

  def binarize(self, threshold: float | None = None, sparsity: float | None = None) -> BinaryPattern:
    """See :func:`binarize`: exactly one of ``threshold`` and ``sparsity``."""
    return binarize(self.gates, threshold=threshold, sparsity=sparsity)


# ----------------------------------------------------------------------------------------------- file I/O


def _resolve_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
  """Returns ``(tsv, config)`` for a pattern directory or a tsv file path."""
  p = Path(path)
  if p.is_dir():
    tsv = p / GATES_FILE
    if not tsv.is_file():
      found = sorted(str(f.parent) for f in p.rglob(GATES_FILE))[:5]
      hint = f"; pattern directories found below it: {found}" if found else ""
      raise FileNotFoundError(
          f"no {GATES_FILE} in directory {p}: expected a DuoAttention pattern directory "
          f"({GATES_FILE} + optional {CONFIG_FILE}) or the path of the tsv file{hint}")
    return tsv, p / CONFIG_FILE
  if p.is_file():
    return p, p.parent / CONFIG_FILE
  raise FileNotFoundError(
      f"pattern path {p} does not exist: expected a DuoAttention pattern directory ({GATES_FILE} + optional "
      f"{CONFIG_FILE}) or the path of a {GATES_FILE} file")


def _read_gates(tsv: Path) -> np.ndarray:
  try:
    text = tsv.read_text(encoding="utf-8")
  except UnicodeDecodeError:
    raise ValueError(f"{tsv} is not a text file: expected tab-separated gate values, one row per layer") from None
  rows: list[list[float]] = []
  first_line = 0
  for lineno, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    values = []
    for col, token in enumerate(line.split(), start=1):
      try:
        value = float(token)
      except ValueError:
        raise ValueError(f"{tsv}, line {lineno}, column {col}: {token!r} is not a number; expected tab-separated "
                         "gate values, one row per layer and one column per KV head") from None
      if not math.isfinite(value):
        raise ValueError(f"{tsv}, line {lineno}, column {col}: gate value {token!r} is not finite")
      values.append(value)
    if rows and len(values) != len(rows[0]):
      raise ValueError(f"{tsv}: ragged rows: line {lineno} has {len(values)} values but line {first_line} has "
                       f"{len(rows[0])}; expected one row per layer with one column per KV head")
    if not rows:
      first_line = lineno
    rows.append(values)
  if not rows:
    raise ValueError(f"{tsv} is empty: expected tab-separated gate values, one row per layer and one column per "
                     "KV head")
  return np.asarray(rows, dtype=np.float64)


def _read_config(path: Path) -> dict[str, Any]:
  if not path.is_file():
    return {}
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}); expected the DuoAttention run config") from None
  if not isinstance(config, dict):
    raise ValueError(f"{path} must hold a JSON object (the run config); got {type(config).__name__}")
  return config


def load_pattern(path: str | os.PathLike[str]) -> DuoPattern:
  """Loads a DuoAttention pattern from its directory (``full_attention_heads.tsv`` + optional ``config.json``) or
  from the tsv file itself (then ``config.json`` beside it is read if present). Gates are clipped to ``[0, 1]``.

  Raises FileNotFoundError for a missing path/tsv and ValueError for an empty, non-numeric or ragged tsv or an
  invalid config; each message names the file and what was expected.
  """
  tsv, config_path = _resolve_paths(path)
  gates = _read_gates(tsv)
  config = _read_config(config_path)
  where = f" in {config_path}"
  return DuoPattern(
      gates=gates,
      sink_size=_check_optional_size("sink_size", config.get("sink_size"), where),
      recent_size=_check_optional_size("recent_size", config.get("recent_size"), where),
      source=tsv,
      config=config,
  )


def find_patterns(root: str | os.PathLike[str]) -> list[Path]:
  """Sorted pattern directories at or below ``root`` (every directory holding a ``full_attention_heads.tsv``)."""
  root = Path(root)
  if (root / GATES_FILE).is_file():
    return [root]
  return sorted(f.parent for f in root.rglob(GATES_FILE))


def save_pattern(pattern: DuoPattern, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
  """Writes ``pattern`` in DuoAttention's format: ``full_attention_heads.tsv`` (``np.savetxt`` with tabs, ``%.18e``,
  exact for float64) and ``config.json`` (the run config with ``sink_size``/``recent_size`` set from the pattern).

  A new directory is written to a temporary sibling and renamed into place, so it never appears half-written. An
  existing directory is refused unless ``overwrite=True``; then each file is replaced atomically (other files in
  it are left alone). Returns the directory.
  """
  if not isinstance(pattern, DuoPattern):
    raise TypeError(f"save_pattern expects a DuoPattern; got {type(pattern).__name__}")
  directory = Path(directory)
  config = dict(pattern.config)
  for key in ("sink_size", "recent_size"):
    value = getattr(pattern, key)
    if value is not None:
      config[key] = value
  config_text = json.dumps(config, indent=2, sort_keys=False) + "\n"

  def write_into(d: Path) -> None:
    np.savetxt(d / (GATES_FILE + ".tmp"), pattern.gates, delimiter="\t")
    (d / (CONFIG_FILE + ".tmp")).write_text(config_text, encoding="utf-8")
    os.replace(d / (CONFIG_FILE + ".tmp"), d / CONFIG_FILE)
    os.replace(d / (GATES_FILE + ".tmp"), d / GATES_FILE)

  if directory.exists():
    if not directory.is_dir():
      raise NotADirectoryError(f"cannot save a pattern to {directory}: it exists and is not a directory")
    if not overwrite:
      raise FileExistsError(f"pattern directory {directory} already exists; pass overwrite=True to replace its "
                            f"{GATES_FILE} and {CONFIG_FILE}")
    write_into(directory)
    return directory
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
  try:
    write_into(tmp)
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


# ----------------------------------------------------------------------------------------------- validation


def validate_pattern(pattern: DuoPattern | BinaryPattern, num_layers: int, num_kv_heads: int):
  """Returns ``pattern`` if its shape is ``(num_layers, num_kv_heads)``; otherwise a ValueError naming both."""
  if not isinstance(pattern, (DuoPattern, BinaryPattern)):
    raise TypeError(f"expected a DuoPattern or BinaryPattern; got {type(pattern).__name__}")
  num_layers = _check_count("num_layers", num_layers)
  num_kv_heads = _check_count("num_kv_heads", num_kv_heads)
  if pattern.shape != (num_layers, num_kv_heads):
    where = ""
    if isinstance(pattern, DuoPattern) and pattern.source is not None:
      where = f" ({pattern.source})"
    raise ValueError(
        f"pattern shape {pattern.shape} (layers, kv heads){where} does not match the model's "
        f"({num_layers}, {num_kv_heads}) (layers, kv heads)")
  return pattern


def validate_for_config(pattern: DuoPattern | BinaryPattern, config: _ModelConfig):
  """:func:`validate_pattern` against any object with ``num_hidden_layers`` and ``num_key_value_heads``."""
  try:
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
  except AttributeError:
    raise TypeError(f"model config {type(config).__name__} must expose num_hidden_layers and "
                    "num_key_value_heads") from None
  return validate_pattern(pattern, layers, kv_heads)


# ----------------------------------------------------------------------------------------------- summary and CLI


def pattern_summary(pattern: DuoPattern, sparsity: float | None = None) -> dict[str, Any]:
  """Shape, sink/recent sizes, gate range and the sparsity at threshold 0.5 (DuoAttention's default); with
  ``sparsity`` also the binarization at that target (realised sparsity and retrieval heads per layer)."""
  at_half = pattern.binarize(threshold=0.5)
  summary: dict[str, Any] = {
      "name": pattern.name,
      "shape": list(pattern.shape),
      "sink_size": pattern.sink_size,
      "recent_size": pattern.recent_size,
      "min_gate": float(pattern.gates.min()),
      "max_gate": float(pattern.gates.max()),
      "num_gates_at_1": int((pattern.gates == 1.0).sum()),
      "num_gates_at_0": int((pattern.gates == 0.0).sum()),
      "sparsity_at_threshold_0.5": at_half.sparsity,
      "num_full_per_layer_at_threshold_0.5": list(at_half.num_full_per_layer),
  }
  if sparsity is not None:
    b = pattern.binarize(sparsity=sparsity)
    summary["requested_sparsity"] = float(sparsity)
    summary["realised_sparsity"] = b.sparsity
    summary["num_full_per_layer"] = list(b.num_full_per_layer)
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m duojax.patterns",
      description="Print the shape and sparsity of DuoAttention patterns (every directory at or below PATH that "
      f"holds a {GATES_FILE}).")
  parser.add_argument("path", help="a pattern directory, a tsv file, or a directory containing pattern directories")
  parser.add_argument("--sparsity", type=float, default=None,
                      help="also binarize to this target fraction of streaming KV heads")
  parser.add_argument("--json", action="store_true", help="print one JSON object per pattern")
  args = parser.parse_args(argv)

  target = Path(args.path)
  paths = [target] if target.is_file() else find_patterns(target) if target.is_dir() else []
  if not paths:
    parser.error(f"no {GATES_FILE} at or below {target}")
  for p in paths:
    try:
      summary = pattern_summary(load_pattern(p), args.sparsity)
    except (OSError, ValueError, TypeError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    if args.json:
      print(json.dumps(summary))
      continue
    line = (f"{summary['name']}: shape {tuple(summary['shape'])}, sink {summary['sink_size']}, recent "
            f"{summary['recent_size']}, gates [{summary['min_gate']:.3g}, {summary['max_gate']:.3g}], sparsity@0.5 "
            f"{summary['sparsity_at_threshold_0.5']:.4f}")
    if args.sparsity is not None:
      line += (f", sparsity {summary['realised_sparsity']:.4f} (requested {args.sparsity}), full/layer "
               f"{summary['num_full_per_layer']}")
    print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
