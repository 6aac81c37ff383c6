"""Convert an HF Llama checkpoint or a GGUF file into a duojax checkpoint with a DuoAttention layout.

Usage::

    python -m duojax.convert --hf meta-llama/Llama-2-7b-hf --pattern PATTERN_DIR --sparsity 0.5 \\
        --mesh tp=4 --dtype bf16 --out ckpt/
    python -m duojax.convert --gguf model.gguf --out ckpt/ --verify

The output directory holds

* ``params/``: an orbax (OCDBT) checkpoint of the parameter tree of :mod:`duojax.models.params`, KV heads of every
  layer already permuted into the layout (retrieval heads first in each of the ``tp`` shards);
* ``duojax.json``: the metadata (see :func:`build_metadata`): model config, the binary pattern in the ORIGINAL head
  order and its realised sparsity, sink, window, the head permutation per layer (new-to-old), the resulting layout,
  the tp it was balanced for, source and revision, dtype, duojax version;
* ``config.json`` (HF style) and the tokenizer files (``tokenizer.json`` ...), when the source has a tokenizer.

HF safetensors are streamed one tensor at a time (bf16 stays bf16 via ``ml_dtypes``): each tensor is read,
transposed into the duojax layout, head-permuted (q/k/v/o) and cast, written into the orbax checkpoint, and dropped,
so host memory stays near the largest tensor. (A GGUF file is dequantized whole by :func:`duojax.io.load_gguf`.)

Everything is written into a temporary sibling directory that is renamed to ``--out`` at the end; an interrupted or
failed run leaves nothing at ``--out``. An existing ``--out`` is refused unless ``--force``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from duojax.config import DuoSpec, LlamaConfig
from duojax.loading import abstract_params

log = logging.getLogger("duojax.convert")

METADATA_FILE = "duojax.json"
FORMAT = "duojax.checkpoint"
FORMAT_VERSION = 1
DEFAULT_SINK, DEFAULT_WINDOW = 128, 256
HUB_ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer*"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "tokenizer.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_ATTN_PROJ = ("q", "k", "v", "o")


class ConvertError(ValueError):
  """A conversion input is unusable; the message names the value and what was expected."""


def duojax_version() -> str:
  try:
    from importlib.metadata import version
    return version("duojax")
  except Exception:  # not installed: read pyproject.toml of the checkout
    try:
      text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
      m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
      return m.group(1) if m else "unknown"
    except OSError:
      return "unknown"


def peak_rss_mb() -> float:
  """Peak resident set size of this process in MiB (``ru_maxrss``)."""
  kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kb / 1024 if sys.platform != "darwin" else kb / 2**20


# ----------------------------------------------------------------------------------------------- sources


@dataclasses.dataclass
class Source:
  """An opened, validated model source. ``tensors()`` yields ``(param path, array)`` in the duojax layout
  (kernels ``[in, out]``), original head order, stored dtype, one at a time."""

  kind: str                     # "hf" | "gguf"
  path: str                     # local directory / file
  config: LlamaConfig
  tensors: Callable[[], Iterator[tuple[tuple, np.ndarray]]]
  num_tensors: int
  largest_tensor_bytes: int
  repo_id: str | None = None
  revision: str | None = None
  tokenizer: Any = None         # duojax.io.Tokenizer built in memory (GGUF)
  tokenizer_dir: str | None = None  # directory holding HF tokenizer files
  reference_params: Callable[[str], dict] | None = None  # dtype -> full params (for --verify)

  def describe(self) -> dict:
    return {"kind": self.kind, "path": os.path.abspath(self.path), "repo_id": self.repo_id,
            "revision": self.revision}


def _hub_download(repo_id: str, revision: str | None) -> str:
  """``snapshot_download`` of the safetensors, json and tokenizer files; hub failures become ConvertError."""
  try:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download
  except ImportError as e:  # pragma: no cover
    raise ConvertError(f"--hf {repo_id!r} is not a local directory and huggingface_hub is not installed") from e
  where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
  try:
    return snapshot_download(repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS)
  except hf_errors.GatedRepoError as e:
    raise ConvertError(
        f"Hub repo {where} is gated: accept its license on https://huggingface.co/{repo_id} and log in "
        f"(`hf auth login` or HF_TOKEN) ({type(e).__name__})") from None
  except hf_errors.RepositoryNotFoundError:
    raise ConvertError(
        f"Hub repo {where} was not found (or is private: log in with `hf auth login` or set HF_TOKEN); "
        "for a local checkpoint pass an existing directory") from None
  except hf_errors.RevisionNotFoundError:
    raise ConvertError(f"Hub repo {repo_id!r} has no revision {revision!r}") from None
  except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as e:
    raise ConvertError(
        f"Hub repo {where} is not in the local Hugging Face cache and the Hub cannot be reached (offline: "
        f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}, or no network); download it first or pass "
        f"a local directory ({type(e).__name__})") from None
  except hf_errors.HfHubHTTPError as e:
    raise ConvertError(f"downloading Hub repo {where} failed: {e}") from None
  except (OSError, ValueError) as e:
    raise ConvertError(f"downloading Hub repo {where} failed ({type(e).__name__}: {e})") from None


def _cache_revision(path: str) -> str | None:
  """The commit hash of an HF cache snapshot directory (``.../snapshots/<sha>``), else None."""
  p = Path(path).resolve()
  if p.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", p.name):
    return p.name
  return None


def open_hf(ref: str, revision: str | None = None) -> Source:
  """Opens an HF Llama checkpoint (local directory or Hub id), checks every tensor name and shape against its
  ``config.json`` (nothing read yet), and returns a streaming :class:`Source`."""
  from safetensors import safe_open

  from duojax.io.hf_names import expected_hf_names, expected_hf_shape, hf_to_path
  from duojax.io.safetensors_import import read_hf_config, read_tensor, shard_files

  repo_id = None
  if os.path.exists(ref):
    if not os.path.isdir(ref):
      raise ConvertError(f"--hf {ref!r} is a file; pass the checkpoint directory (config.json + *.safetensors) "
                         "or use --gguf for a GGUF file")
    path = ref
    revision = revision or _cache_revision(path)
  elif _HUB_ID.match(ref) and not ref.startswith((".", "/")):
    repo_id = ref
    path = _hub_download(ref, revision)
    revision = _cache_revision(path) or revision
  else:
    raise ConvertError(f"--hf {ref!r} is neither an existing directory nor a Hub repo id (owner/name)")

  try:
    config = read_hf_config(path)
  except (OSError, ValueError) as e:
    raise ConvertError(f"cannot read the model config of {path!r}: {e}") from None
  try:
    shards = shard_files(path)
  except (OSError, ValueError) as e:
    raise ConvertError(str(e)) from None

  # Scan every shard's header: names, shapes, dtypes (also detects truncated files) before converting anything.
  found: dict[str, tuple[tuple[int, ...], str, str]] = {}
  by_shard: dict[str, list[str]] = {}
  for shard, listed in shards.items():
    file = os.path.join(path, shard)
    try:
      with safe_open(file, framework="numpy") as f:
        keys = list(f.keys())
        by_shard[shard] = keys if listed is None else [n for n in keys if n in set(listed)]
        for name in keys:
          sl = f.get_slice(name)
          found[name] = (tuple(int(d) for d in sl.get_shape()), sl.get_dtype(), shard)
    except Exception as e:  # SafetensorError, OSError
      raise ConvertError(f"cannot read safetensors file {file}: truncated or corrupt ({e})") from None
    if listed is not None:
      absent = [n for n in listed if n not in keys]
      if absent:
        raise ConvertError(f"{file} lacks tensors {absent[:3]} that model.safetensors.index.json lists for it")

  expected = expected_hf_names(config)
  wanted = set(expected)
  skip = set()
  for name, (shape, dtype, shard) in found.items():
    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_word_embeddings):
      skip.add(name)
      continue
    if name not in wanted:
      try:
        hf_to_path(name)
        why = "the config.json does not have it (does the config match the weights?)"
      except ValueError:
        why = "it is not a Llama weight"
      raise ConvertError(f"unexpected tensor {name!r} in {shard} of {path!r}: {why}")
    want = expected_hf_shape(name, config)
    if shape != want:
      raise ConvertError(
          f"tensor {name!r} in {shard} has shape {shape} but config.json of {path!r} implies {want}: the config "
          "does not match the weights")
    if dtype not in ("F32", "F16", "BF16", "F64"):
      raise ConvertError(f"tensor {name!r} in {shard} has dtype {dtype}; expected a float type (F32/F16/BF16)")
  missing = [n for n in expected if n not in found]
  if missing:
    more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
    raise ConvertError(f"HF checkpoint {path!r} lacks tensors {missing[:3]}{more}")

  itemsize = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
  largest = max(int(np.prod(s)) * itemsize[d] for n, (s, d, _) in found.items() if n not in skip)

  def raw_tensors():
    # One tensor at a time with plain reads (no memory map: see safetensors_import.read_tensor).
    for shard in shards:
      file = os.path.join(path, shard)
      for name in by_shard[shard]:
        if name in skip:
          continue
        try:
          yield name, read_tensor(file, name)
        except (OSError, ValueError, KeyError) as e:
          raise ConvertError(f"cannot read tensor {name!r} from {file}: {e}") from None

  def tensors():
    for name, array in raw_tensors():
      if name in skip:
        continue
      p, transpose = hf_to_path(name)
      if transpose:
        array = np.ascontiguousarray(array.T)
      yield p, array

  def reference_params(dtype):
    from duojax.io.safetensors_import import load_hf_params
    return load_hf_params(path, dtype=dtype)[1]

  tokenizer_dir = path if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
  return Source("hf", path, config, tensors, len(found) - len(skip), largest, repo_id=repo_id, revision=revision,
                tokenizer_dir=tokenizer_dir, reference_params=reference_params)


def open_gguf(file: str, dtype) -> Source:
  """Opens a GGUF Llama file (dequantized whole into ``dtype`` by :func:`duojax.io.load_gguf`)."""
  from duojax.io import load_gguf
  from duojax.io.hf_names import iter_paths

  if not os.path.isfile(file):
    raise ConvertError(f"--gguf {file!r} does not exist or is not a file")
  try:
    config, params, tokenizer = load_gguf(file, dtype=dtype)
  except (OSError, ValueError) as e:
    raise ConvertError(f"cannot import GGUF file {file!r}: {e}") from None
  leaves = list(iter_paths(params))
  largest = max(a.nbytes for _, a in leaves)
  del params

  def tensors():  # hands each array over and drops this source's reference to it
    while leaves:
      yield leaves.pop(0)

  def reference_params(dt):
    return load_gguf(file, dtype=dt)[1]

  return Source("gguf", file, config, tensors, len(leaves), largest,
                revision=f"sha256:{_sha256(file)}", tokenizer=tokenizer, reference_params=reference_params)


def _sha256(file: str) -> str:
  import hashlib
  h = hashlib.sha256()
  with open(file, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      h.update(block)
  return h.hexdigest()


# ----------------------------------------------------------------------------------------------- pattern / layout


@dataclasses.dataclass
class Layout:
  full: np.ndarray          # [L, Hkv] bool, ORIGINAL head order
  perm: np.ndarray          # [L, Hkv] int32, new-to-old
  spec: DuoSpec             # layout after permutation
  tp: int
  pattern_info: dict


def resolve_layout(config: LlamaConfig, *, pattern=None, sparsity=None, threshold=None, sink=None, window=None,
                   tp: int = 1) -> Layout:
  """Loads/binarizes the pattern (or all retrieval heads), checks its shape, and balances it for ``tp``."""
  from duojax.models.reorder import head_permutation
  from duojax.patterns import BinaryPattern, DuoPattern, load_pattern, validate_pattern

  L, H = config.num_hidden_layers, config.num_key_value_heads
  info: dict[str, Any] = {"source": None, "name": None, "sparsity_requested": None, "threshold": None}
  pattern_sink = pattern_window = None
  if pattern is None:
    if sparsity is not None or threshold is not None:
      raise ConvertError("--sparsity/--threshold need --pattern (without a pattern every head is a retrieval head)")
    full = np.ones((L, H), bool)
  else:
    if isinstance(pattern, (str, os.PathLike)):
      try:
        pattern = load_pattern(pattern)
      except (OSError, ValueError) as e:
        raise ConvertError(f"--pattern: {e}") from None
    if isinstance(pattern, DuoPattern):
      if (sparsity is None) == (threshold is None):
        raise ConvertError(
            f"--pattern needs exactly one of --sparsity (target fraction of streaming KV heads) and --threshold "
            f"(retrieval iff gate >= threshold); got sparsity={sparsity}, threshold={threshold}")
      if sparsity is not None and not 0.0 <= float(sparsity) <= 1.0:
        raise ConvertError(f"--sparsity must lie in [0, 1]; got {sparsity}")
      pattern_sink, pattern_window = pattern.sink_size, pattern.recent_size
      info.update(source=str(pattern.source) if pattern.source else None, name=pattern.name,
                  sparsity_requested=None if sparsity is None else float(sparsity),
                  threshold=None if threshold is None else float(threshold))
      try:
        validate_pattern(pattern, L, H)
      except ValueError as e:
        raise ConvertError(f"--pattern: {e}") from None
      binary = pattern.binarize(threshold=threshold, sparsity=sparsity)
    elif isinstance(pattern, BinaryPattern):
      binary = pattern
    else:
      binary = BinaryPattern(np.asarray(pattern, bool))
    try:
      validate_pattern(binary, L, H)
    except ValueError as e:
      raise ConvertError(f"--pattern: {e}") from None
    full = np.asarray(binary.full, bool)
  if tp < 1 or H % tp:
    raise ConvertError(f"tensor-parallel size tp={tp} must divide the number of KV heads ({H}) of the model")
  sink = int(sink if sink is not None else pattern_sink if pattern_sink is not None else DEFAULT_SINK)
  window = int(window if window is not None else pattern_window if pattern_window is not None else DEFAULT_WINDOW)
  perm = np.stack([head_permutation(full[l], tp) for l in range(L)]).astype(np.int32)
  new_full = np.take_along_axis(full, perm, axis=1)
  try:
    spec = DuoSpec(tuple(map(tuple, new_full.tolist())), sink=sink, window=window)
  except ValueError as e:
    raise ConvertError(f"--sink {sink} / --window {window}: {e}") from None
  info["sparsity"] = float(1.0 - full.sum() / full.size)
  return Layout(full, perm, spec, tp, info)


def permute_tensor(path: tuple, array: np.ndarray, perm: np.ndarray, config: LlamaConfig) -> np.ndarray:
  """Applies layer ``path[1]``'s KV-head permutation to one q/k/v/o tensor (others unchanged)."""
  from duojax.models.reorder import permute_layer_heads
  if len(path) != 5 or path[0] != "layers" or path[2] != "attn" or path[3] not in _ATTN_PROJ:
    return array
  layer = {"attn": {name: {} for name in _ATTN_PROJ}}
  layer["attn"][path[3]] = {path[4]: array}
  return permute_layer_heads(layer, perm[int(path[1])], config)["attn"][path[3]][path[4]]


# ----------------------------------------------------------------------------------------------- metadata


def build_metadata(source: Source, layout: Layout, dtype, mesh_sizes: dict, abstract: dict) -> dict:
  from duojax.sharding import path_str
  from duojax.io.hf_names import iter_paths
  return {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "duojax_version": duojax_version(),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "config": source.config.to_hf(),
      "dtype": np.dtype(dtype).name,
      "source": source.describe(),
      "pattern": {**layout.pattern_info, "full": layout.full.astype(int).tolist(),
                  "num_full_per_layer": layout.full.sum(axis=1).astype(int).tolist()},
      "sparsity": layout.pattern_info["sparsity"],
      "sink": layout.spec.sink,
      "window": layout.spec.window,
      "tp": layout.tp,
      "mesh": dict(mesh_sizes),
      "perm": layout.perm.astype(int).tolist(),
      "layout_full": [[int(x) for x in row] for row in layout.spec.full],
      "params": {path_str(p): [list(s.shape), np.dtype(s.dtype).name] for p, s in iter_paths(abstract)},
      "tokenizer": None,
  }


def read_metadata(path: str | os.PathLike) -> dict:
  file = Path(path) / METADATA_FILE
  if not file.is_file():
    raise FileNotFoundError(f"{path} is not a duojax checkpoint: no {METADATA_FILE} (convert one with "
                            "`python -m duojax.convert`)")
  meta = json.loads(file.read_text())
  if meta.get("format") != FORMAT:
    raise ValueError(f"{file}: format {meta.get('format')!r} is not {FORMAT!r}")
  if int(meta.get("format_version", 0)) > FORMAT_VERSION:
    raise ValueError(f"{file}: format_version {meta.get('format_version')} is newer than this duojax supports "
                     f"({FORMAT_VERSION})")
  return meta


def _write_tokenizer(source: Source, tmp: Path, config: LlamaConfig) -> str | None:
  """Copies HF tokenizer files, or saves a GGUF-built tokenizer as tokenizer.json (+ config files)."""
  if source.tokenizer_dir is not None:
    copied = []
    for name in TOKENIZER_FILES:
      f = Path(source.tokenizer_dir) / name
      if f.is_file():
        shutil.copyfile(f, tmp / name)
        copied.append(name)
    return "tokenizer.json" if "tokenizer.json" in copied else None
  tok = source.tokenizer
  if tok is None:
    return None
  tok.tokenizer.save(str(tmp / "tokenizer.json"))
  cfg: dict[str, Any] = {}
  if tok.bos_token_id is not None:
    cfg["bos_token"] = tok.tokenizer.id_to_token(tok.bos_token_id)
  if tok.eos_token_ids:
    cfg["eos_token"] = tok.tokenizer.id_to_token(tok.eos_token_ids[0])
  if tok.chat_template:
    cfg["chat_template"] = tok.chat_template
  (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1) + "\n")
  gen = {"bos_token_id": tok.bos_token_id,
         "eos_token_id": list(tok.eos_token_ids) if len(tok.eos_token_ids) != 1 else tok.eos_token_ids[0]}
  (tmp / "generation_config.json").write_text(json.dumps(gen, indent=1) + "\n")
  return "tokenizer.json"


# ----------------------------------------------------------------------------------------------- conversion


def _tmp_sibling(out: Path, tag: str) -> Path:
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=f".{tag}", dir=out.parent))
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the output the usual directory mode
  return tmp


def convert(*, hf: str | None = None, gguf: str | None = None, out: str | os.PathLike, pattern=None,
            sparsity: float | None = None, threshold: float | None = None, sink: int | None = None,
            window: int | None = None, dtype="bf16", mesh: str | dict | None = None, force: bool = False,
            verify: bool = False, revision: str | None = None, progress: bool = True) -> dict:
  """Converts one source (``hf`` dir/Hub id or ``gguf`` file) into a duojax checkpoint at ``out``; returns its
  metadata (plus ``"stats"``: seconds, peak host memory, largest tensor, and with ``verify`` the comparison).

  Raises :class:`ConvertError` for unusable inputs (nothing is written then).
  """
  from duojax.checkpoint import PARAMS_DIR, TensorStream, save_streaming
  from duojax.models.llama import canonical_dtype
  from duojax.sharding import parse_mesh

  t0 = time.time()
  if (hf is None) == (gguf is None):
    raise ConvertError("pass exactly one source: --hf <hub id or directory> or --gguf <file>")
  out = Path(out)
  if out.exists() and not force:
    raise ConvertError(f"--out {str(out)!r} already exists; pass --force to replace it")
  if out.exists() and not out.is_dir():
    raise ConvertError(f"--out {str(out)!r} exists and is not a directory")
  try:
    np_dtype = np.dtype(canonical_dtype(dtype))
  except ValueError as e:
    raise ConvertError(f"--dtype: {e}") from None
  try:
    mesh_sizes = parse_mesh(mesh)
  except ValueError as e:
    raise ConvertError(f"--mesh: {e}") from None

  source = open_hf(hf, revision) if hf is not None else open_gguf(gguf, np_dtype)
  config = source.config
  layout = resolve_layout(config, pattern=pattern, sparsity=sparsity, threshold=threshold, sink=sink,
                          window=window, tp=mesh_sizes["tp"])
  abstract = abstract_params(config, np_dtype)
  meta = build_metadata(source, layout, np_dtype, mesh_sizes, abstract)
  log.info("converting %s %s: %d layers x %d KV heads, sparsity %.4f, tp=%d, dtype %s", source.kind, source.path,
           config.num_hidden_layers, config.num_key_value_heads, meta["sparsity"], layout.tp, np_dtype.name)

  from tqdm.auto import tqdm
  bar = tqdm(total=source.num_tensors, unit="tensor", desc="convert", disable=not progress, file=sys.stderr)

  def stream():
    for p, array in source.tensors():
      array = permute_tensor(p, array, layout.perm, config)
      if array.dtype != np_dtype:
        array = array.astype(np_dtype)
      yield p, np.ascontiguousarray(array)

  def on_written(p):
    bar.set_postfix_str("/".join(map(str, p)), refresh=False)
    bar.update(1)

  tmp = _tmp_sibling(out, "tmp")
  try:
    save_streaming(tmp / PARAMS_DIR, abstract, TensorStream(stream, on_written))
    bar.close()
    meta["tokenizer"] = _write_tokenizer(source, tmp, config)
    (tmp / "config.json").write_text(json.dumps(config.to_hf(), indent=1) + "\n")
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    stats = {"seconds": None, "peak_rss_mb": None, "largest_tensor_mb": source.largest_tensor_bytes / 2**20}
    if verify:
      stats["verify"] = verify_checkpoint(tmp, source, layout, np_dtype)
    _publish(tmp, out, force)
  except BaseException:
    bar.close()
    _remove_tree(tmp)
    raise
  stats["seconds"] = time.time() - t0
  stats["peak_rss_mb"] = peak_rss_mb()
  log.info("wrote %s in %.1f s; peak host memory (ru_maxrss) %.0f MiB, largest tensor %.0f MiB", out,
           stats["seconds"], stats["peak_rss_mb"], stats["largest_tensor_mb"])
  return {**meta, "stats": stats}


def _remove_tree(path: Path, *, settle: float = 0.2, timeout: float = 10.0) -> None:
  """Deletes ``path`` and makes sure it stays deleted: after a failed save, writes that orbax had already handed
  to its I/O threads can still land for a moment and recreate files under it (seen in CI)."""
  deadline = time.time() + timeout
  while True:
    shutil.rmtree(path, ignore_errors=True)
    if not path.exists():
      time.sleep(settle)
      if not path.exists() or time.time() > deadline:
        return
    elif time.time() > deadline:
      log.warning("could not remove the temporary directory %s", path)
      return


def _publish(tmp: Path, out: Path, force: bool) -> None:
  """Renames ``tmp`` to ``out``; with ``force`` an existing ``out`` is swapped out first and deleted after."""
  if not out.exists():
    os.rename(tmp, out)
    return
  if not force:  # appeared while converting
    raise ConvertError(f"--out {str(out)!r} already exists; pass --force to replace it")
  old = _tmp_sibling(out, "old")
  os.rmdir(old)
  os.rename(out, old)
  try:
    os.rename(tmp, out)
  except BaseException:
    os.rename(old, out)
    raise
  shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- verification


def verify_checkpoint(path: Path, source: Source, layout: Layout, dtype, num_tokens: int = 24) -> dict:
  """Reloads the checkpoint at ``path`` and compares one forward pass on ``num_tokens`` fixed tokens with the
  unconverted model (original head order, same pattern, parameters cast to ``dtype`` the same way).

  Both passes compute in float32 (bf16/fp16 parameters upcast exactly), so the comparison checks the converted
  weights and head permutation, not the rounding of a low-precision forward pass; both use sink 2 / window 4, so
  streaming heads see a window shorter than the sequence. Raises ConvertError when the largest logit difference
  exceeds 1e-4 of the largest |logit|.
  """
  import jax.numpy as jnp

  from duojax.loading import load
  from duojax.models.params import build_model

  config = source.config
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(1, num_tokens)), jnp.int32)
  sink, window = 2, 4
  ref_params = source.reference_params(np.dtype(dtype))
  ref_spec = DuoSpec(tuple(map(tuple, layout.full.tolist())), sink=sink, window=window)
  ref = build_model(config, ref_params, ref_spec, dtype="float32")
  want = np.asarray(ref(tokens, impl="reference"))
  del ref, ref_params
  loaded = load(path, dtype="float32")
  spec = DuoSpec(loaded.duo.full, sink=sink, window=window)
  model = build_model(config, loaded.params, spec, dtype="float32")
  got = np.asarray(model(tokens, impl="reference"))
  rel = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
  same_argmax = float(np.mean(got.argmax(-1) == want.argmax(-1)))
  tol = 1e-4
  result = {"tokens": num_tokens, "max_rel_error": rel, "argmax_agreement": same_argmax, "tolerance": tol,
            "ok": rel <= tol}
  log.info("verify: max relative logit error %.3g (tolerance %.3g), argmax agreement %.3f", rel, tol, same_argmax)
  if not result["ok"]:
    raise ConvertError(f"--verify failed: the converted model's logits differ from the source model's by "
                       f"{rel:.3g} (relative), above {tol}")
  return result


# ----------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m duojax.convert",
      description="Convert an HF Llama checkpoint (safetensors) or a GGUF file into a duojax checkpoint: an orbax "
      "checkpoint of the parameters with KV heads reordered for a DuoAttention pattern (retrieval heads first in "
      "each tensor-parallel shard), plus duojax.json metadata and the tokenizer. Load it with duojax.load(OUT).",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="examples:\n"
      "  python -m duojax.convert --hf togethercomputer/Llama-2-7B-32K-Instruct \\\n"
      "      --pattern attn_patterns/Llama-2-7B-32K-Instruct/RUN --sparsity 0.5 --mesh tp=4 --out llama2-duo\n"
      "  python -m duojax.convert --gguf SmolLM2-135M-Instruct.Q4_1.gguf --dtype fp32 --out smollm2 --verify")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--hf", metavar="ID_OR_DIR",
                   help="HF Llama checkpoint: a local directory (config.json + *.safetensors, single file or "
                   "sharded with model.safetensors.index.json) or a Hub repo id, downloaded with huggingface_hub "
                   "(safetensors, json and tokenizer files only; gated repos need `hf auth login`)")
  src.add_argument("--gguf", metavar="FILE", help="a llama.cpp GGUF file of a Llama model (dequantized)")
  p.add_argument("--revision", help="Hub revision (branch, tag or commit) for --hf ID")
  p.add_argument("--pattern", metavar="DIR",
                 help="DuoAttention pattern directory (full_attention_heads.tsv + config.json). Without it every "
                 "KV head is a retrieval head (plain full attention)")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--sparsity", type=float,
                 help="binarize the pattern to this fraction of streaming KV heads over all layers (e.g. 0.5)")
  g.add_argument("--threshold", type=float, help="binarize the pattern: retrieval head iff gate >= THRESHOLD")
  p.add_argument("--sink", type=int,
                 help=f"attention-sink tokens of streaming heads (default: the pattern's sink_size, else "
                 f"{DEFAULT_SINK})")
  p.add_argument("--window", type=int,
                 help=f"recent-window tokens of streaming heads (default: the pattern's recent_size, else "
                 f"{DEFAULT_WINDOW})")
  p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                 help="parameter dtype of the output (default bf16)")
  p.add_argument("--mesh", default="tp=1",
                 help="mesh the head layout is balanced for, e.g. 'tp=4' or 'dp=2,tp=4' (axes dp, tp; tp must "
                 "divide the KV heads). duojax.load re-balances for another tp. Default tp=1")
  p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist unless --force)")
  p.add_argument("--force", action="store_true",
                 help="replace an existing --out (the new checkpoint is written aside and swapped in at the end)")
  p.add_argument("--verify", action="store_true",
                 help="reload the result and compare a forward pass on a few tokens with the unconverted model "
                 "(loads the whole source model once more)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  return p


class _StderrHandler(logging.StreamHandler):
  """Writes to whatever ``sys.stderr`` is at the time of each record."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    pass


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if not log.handlers:  # our progress lines only (not every library's INFO logs)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.propagate = False
  log.setLevel(logging.INFO)

  def on_sigterm(signum, frame):  # clean up the temporary directory as on Ctrl-C
    raise KeyboardInterrupt(f"signal {signum}")
  previous = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    meta = convert(hf=args.hf, gguf=args.gguf, out=args.out, pattern=args.pattern, sparsity=args.sparsity,
                   threshold=args.threshold, sink=args.sink, window=args.window, dtype=args.dtype, mesh=args.mesh,
                   force=args.force, verify=args.verify, revision=args.revision, progress=not args.quiet)
  except ConvertError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"interrupted; nothing was written to {args.out}", file=sys.stderr)
    return 130
  finally:
    signal.signal(signal.SIGTERM, previous)
  s = meta["stats"]
  print(f"wrote {args.out}: sparsity {meta['sparsity']:.4f}, tp={meta['tp']}, dtype {meta['dtype']}, "
        f"{s['seconds']:.1f} s, peak host memory {s['peak_rss_mb']:.0f} MiB (largest tensor "
        f"{s['largest_tensor_mb']:.0f} MiB)" + (f", verify max rel error {s['verify']['max_rel_error']:.2e}"
                                               if "verify" in s else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
