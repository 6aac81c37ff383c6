"""Reads HF Llama checkpoints (``config.json`` + safetensors, single file or sharded) without torch.

Tensors are read one at a time (numpy, memory-mapped by safetensors) and keep their stored dtype, bfloat16
included (as ``ml_dtypes.bfloat16``), unless a ``dtype`` is asked for.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np
from safetensors import safe_open

from duojax.config import LlamaConfig
from duojax.io.hf_names import expected_hf_names, expected_hf_shape, hf_to_path, set_path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_RAW_DTYPES = {
    "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
    "I8": np.int8, "U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_,
}


def read_hf_config(path: str | os.PathLike) -> LlamaConfig:
  """The :class:`LlamaConfig` of the HF checkpoint directory ``path`` (its ``config.json``)."""
  file = os.path.join(os.fspath(path), "config.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"no config.json in HF checkpoint directory {os.fspath(path)!r}")
  try:
    with open(file) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{file} is not valid JSON: {e}") from e
  # Newer transformers nest rope settings under ``rope_parameters``.
  rp = d.get("rope_parameters")
  if isinstance(rp, dict):
    d = dict(d)
    d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
    if rp.get("rope_type", "default") != "default" and not d.get("rope_scaling"):
      d["rope_scaling"] = rp
  return LlamaConfig.from_hf(d)


def shard_files(path: str | os.PathLike) -> dict[str, list[str]]:
  """``{shard file: [tensor names]}`` of a checkpoint dir; raises naming the first missing shard file."""
  path = os.fspath(path)
  index = os.path.join(path, INDEX_FILE)
  single = os.path.join(path, SINGLE_FILE)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
      shards.setdefault(shard, []).append(name)
    for shard in shards:
      if not os.path.isfile(os.path.join(path, shard)):
        raise FileNotFoundError(
            f"shard {shard!r} listed in {INDEX_FILE} is missing from {path!r}")
    return shards
  if os.path.isfile(single):
    return {SINGLE_FILE: None}
  raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in HF checkpoint directory {path!r}")


def read_tensor(file: str, name: str) -> np.ndarray:
  """Reads tensor ``name`` of a safetensors file with plain reads into a fresh array (bf16 as ml_dtypes).

  No memory map: a map keeps every page it touched resident until the file closes (up to a whole shard), which
  streaming conversion must avoid.
  """
  with open(file, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    info = header[name]
    begin, end = info["data_offsets"]
    if info["dtype"] not in _RAW_DTYPES:
      raise ValueError(f"tensor {name!r} in {file} has unsupported dtype {info['dtype']}")
    f.seek(8 + n + begin)
    buf = f.read(end - begin)
  if len(buf) != end - begin:
    raise ValueError(f"safetensors file {file} is truncated (tensor {name!r})")
  return np.frombuffer(buf, dtype=_RAW_DTYPES[info["dtype"]]).reshape(info["shape"]).copy()


def _iter_file(file: str, names: list[str] | None) -> Iterator[tuple[str, np.ndarray]]:
  try:
    handle = safe_open(file, framework="numpy")
  except Exception as e:  # SafetensorError, OSError: truncated or corrupt
    raise ValueError(f"cannot read safetensors file {file}: truncated or corrupt ({e})") from e
  with handle as f:
    keys = list(f.keys())
    for name in (keys if names is None else names):
      if name not in keys:
        raise ValueError(f"tensor {name!r} is listed in the index for {file} but that file lacks it")
      try:
        arr = read_tensor(file, name)
      except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"cannot read tensor {name!r} from safetensors file {file}: {e}") from e
      yield name, arr


def iter_hf_tensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
  """Yields ``(HF tensor name, numpy array)`` one tensor at a time, in the stored dtype."""
  path = os.fspath(path)
  for shard, names in shard_files(path).items():
    yield from _iter_file(os.path.join(path, shard), names)


def load_hf_params(path: str | os.PathLike, dtype=None) -> tuple[LlamaConfig, dict]:
  """``(config, params)`` from an HF Llama checkpoint directory; params in the layout of
  :mod:`duojax.models.params` as numpy arrays (stored dtype, or ``dtype`` if given).

  Raises ValueError naming the tensor on a shape that doesn't fit the config, an unknown tensor or a missing one.
  """
  path = os.fspath(path)
  config = read_hf_config(path)
  np_dtype = None
  if dtype is not None:
    from duojax.models.llama import canonical_dtype
    np_dtype = np.dtype(canonical_dtype(dtype))
  expected = expected_hf_names(config)
  wanted = set(expected)
  params: dict = {}
  seen = set()
  for name, arr in iter_hf_tensors(path):
    if name == "lm_head.weight" and config.tie_word_embeddings:
      continue  # some tied checkpoints still store the (identical) head
    if name not in wanted:
      try:
        hf_to_path(name)
        why = "does not fit the config"
      except ValueError:
        why = "is not a Llama tensor"
      if name.endswith("rotary_emb.inv_freq"):
        continue
      raise ValueError(f"unexpected tensor {name!r} in {path!r}: it {why}")
    shape = expected_hf_shape(name, config)
    if tuple(arr.shape) != shape:
      raise ValueError(
          f"tensor {name!r} has shape {tuple(arr.shape)}, expected {shape} from config.json")
    p, transpose = hf_to_path(name)
    if transpose:
      arr = np.ascontiguousarray(arr.T)
    if np_dtype is not None and arr.dtype != np_dtype:
      arr = arr.astype(np_dtype)
    set_path(params, p, arr)
    seen.add(name)
  missing = [n for n in expected if n not in seen]
  if missing:
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    raise ValueError(f"HF checkpoint {path!r} lacks tensors {missing[:5]}{more}")
  return config, _ordered(params, config)


def _ordered(params: dict, config: LlamaConfig) -> dict:
  """Layers as a dict keyed 0..L-1 in order (the tree layout of the model)."""
  layers = params.get("layers", {})
  params["layers"] = {i: layers[i] for i in range(config.num_hidden_layers)}
  return params
