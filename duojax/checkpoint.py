"""Orbax checkpoints of the duojax parameter tree, written one tensor at a time and restored into shardings.

Writing: :func:`save_streaming` saves an orbax PyTree checkpoint (OCDBT, the standard ``PyTreeCheckpointHandler``
layout) from a tree of :class:`LazyLeaf` placeholders (shape and dtype only) and a *stream* that yields
``(path, numpy array)`` pairs in any order. A custom orbax type handler writes each array as it arrives and drops
it before pulling the next, so host memory stays near one tensor, whatever the model size. The leaves are recorded
as plain numpy arrays (``typestr 'np.ndarray'``), so any orbax reader restores them, as numpy or as sharded
``jax.Array``.

Reading: :func:`param_metadata` gives the stored shapes and dtypes; :func:`restore_params` restores into a tree of
``jax.ShapeDtypeStruct`` targets carrying shardings (and dtypes to cast to).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.futures import future as ocp_future
from orbax.checkpoint._src.serialization import type_handler_registry as ocp_registry
from orbax.checkpoint._src.serialization import type_handlers as ocp_type_handlers

PARAMS_DIR = "params"
INFLIGHT_BYTES = 64 * 2**20  # arrays being written at once (small tensors overlap; big ones go one by one)


class LazyLeaf:
  """A placeholder leaf: the shape and dtype of a parameter whose values a stream provides at save time."""

  def __init__(self, path: tuple, shape, dtype, stream: "TensorStream"):
    self.path = tuple(path)
    self.shape = tuple(int(d) for d in shape)
    self.dtype = np.dtype(dtype)
    self.stream = stream

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  def __repr__(self) -> str:
    return f"LazyLeaf({'/'.join(map(str, self.path))}, {self.shape}, {self.dtype})"


class TensorStream:
  """Yields ``(path, array)`` once each; ``on_written(path)`` is called after each array is written."""

  def __init__(self, iterator_fn: Callable[[], Iterable[tuple[tuple, np.ndarray]]],
               on_written: Callable[[tuple], None] | None = None):
    self._iterator_fn = iterator_fn
    self.on_written = on_written
    self.used = False

  def __iter__(self):
    if self.used:
      raise RuntimeError("a TensorStream can be consumed once only")
    self.used = True
    return iter(self._iterator_fn())


class _StreamingNumpyHandler(ocp_type_handlers.NumpyHandler):
  """Writes :class:`LazyLeaf` values by pulling arrays from their stream (typestr np.ndarray).

  Writes overlap while the arrays in flight total at most ``inflight_bytes``; an array larger than that is written
  alone. Host memory is therefore bounded by ``max(inflight_bytes, largest array)`` plus the array being prepared.
  """

  def __init__(self, inflight_bytes: int):
    super().__init__(deepcopy_host_arrays=False)
    self.inflight_bytes = int(inflight_bytes)

  async def _write_stream(self, values, infos, args):
    by_path = {v.path: (v, info, arg) for v, info, arg in zip(values, infos, args)}
    streams = {id(v.stream): v.stream for v in values}
    if len(streams) != 1:
      raise RuntimeError(f"expected the leaves of one TensorStream, got {len(streams)}")
    stream = next(iter(streams.values()))
    written: set = set()
    pending: dict[asyncio.Task, tuple[tuple, int]] = {}

    async def drain(limit: int) -> None:
      while pending and sum(n for _, n in pending.values()) > limit:
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
          path, _ = pending.pop(task)
          task.result()  # raises the write's error
          if stream.on_written is not None:
            stream.on_written(path)

    try:
      for path, array in stream:
        path = tuple(path)
        if path not in by_path:
          raise ValueError(f"the tensor stream yielded {path!r}, which is not a leaf of the checkpoint tree")
        if path in written:
          raise ValueError(f"the tensor stream yielded {path!r} twice")
        leaf, info, arg = by_path[path]
        array = np.asarray(array)
        if array.shape != leaf.shape or array.dtype != leaf.dtype:
          raise ValueError(f"tensor {'/'.join(map(str, path))} has shape {array.shape} and dtype {array.dtype}; "
                           f"the checkpoint expects {leaf.shape} {leaf.dtype}")
        written.add(path)
        task = asyncio.ensure_future(super()._background_serialize([array], [info], [arg]))
        pending[task] = (path, array.nbytes)
        del array
        await drain(self.inflight_bytes)
      await drain(-1)
    except BaseException:
      for task in pending:
        task.cancel()
      if pending:
        await asyncio.gather(*pending, return_exceptions=True)
      raise
    missing = [p for p in by_path if p not in written]
    if missing:
      raise ValueError(f"the tensor stream ended without {len(missing)} parameters, e.g. "
                       f"{['/'.join(map(str, p)) for p in missing[:3]]}")

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.type_handlers.SaveArgs()] * len(values)
    return [ocp_future.CommitFutureAwaitingContractedSignals(self._write_stream(values, infos, args),
                                                             name="duojax_stream")]


def _registry(inflight_bytes: int):
  handlers = [(LazyLeaf, _StreamingNumpyHandler(inflight_bytes))]
  for ty, handler in ocp_registry._DEFAULT_TYPE_HANDLERS:  # jax.Array etc. (not np.ndarray: same typestr)
    if ty is not np.ndarray:
      handlers.append((ty, handler))
  return ocp_registry.create_type_handler_registry(*handlers)


def lazy_tree(abstract: Any, stream: TensorStream) -> Any:
  """Replaces every ``ShapeDtypeStruct``-like leaf of ``abstract`` (nested dicts) by a :class:`LazyLeaf`."""
  def walk(node, prefix):
    if isinstance(node, dict):
      return {k: walk(v, prefix + (k,)) for k, v in node.items()}
    return LazyLeaf(prefix, node.shape, node.dtype, stream)
  return walk(abstract, ())


def save_streaming(directory: str | os.PathLike, abstract: Any, stream: TensorStream,
                   inflight_bytes: int = INFLIGHT_BYTES) -> None:
  """Writes an orbax checkpoint at ``directory`` (must not exist) of the tree ``abstract`` (nested dicts of
  shape/dtype structs), the values coming from ``stream`` one tensor at a time; writes overlap up to
  ``inflight_bytes`` of arrays in flight (a larger array is written alone)."""
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_registry(inflight_bytes), use_compression=False)
  with ocp.Checkpointer(handler) as checkpointer:
    checkpointer.save(os.fspath(os.path.abspath(directory)), args=ocp.args.PyTreeSave(lazy_tree(abstract, stream)))


def save_params(directory: str | os.PathLike, params: Any) -> None:
  """Writes an in-memory parameter tree (numpy or jax arrays) in the same layout as :func:`save_streaming`."""
  flat = {}

  def walk(node, prefix):
    if isinstance(node, dict):
      return {k: walk(v, prefix + (k,)) for k, v in node.items()}
    flat[prefix] = node
    return jax.ShapeDtypeStruct(np.shape(node), np.dtype(node.dtype))
  abstract = walk(params, ())
  save_streaming(directory, abstract, TensorStream(lambda: ((p, np.asarray(v)) for p, v in flat.items())))


def param_metadata(directory: str | os.PathLike) -> dict:
  """``{"layers/0/attn/q/kernel": (shape, dtype)}`` of the checkpoint at ``directory``."""
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    meta = checkpointer.metadata(os.fspath(os.path.abspath(directory)))
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
  out = {}

  def walk(node, prefix):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, prefix + (str(k),))
    else:
      out["/".join(prefix)] = (tuple(node.shape), np.dtype(node.dtype))
  walk(dict(tree), ())
  return out


def restore_params(directory: str | os.PathLike, target: Any) -> Any:
  """Restores the checkpoint at ``directory`` into ``target``: a tree of ``jax.ShapeDtypeStruct`` with shardings
  (arrays come back as ``jax.Array`` placed by those shardings, cast to the target dtypes)."""
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    return checkpointer.restore(os.fspath(os.path.abspath(directory)),
                                args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))


