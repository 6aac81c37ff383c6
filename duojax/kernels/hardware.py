"""Which attention path can run here: the Hopper (sm_90) Pallas Mosaic-GPU kernels or the pure-JAX reference."""

from __future__ import annotations

import functools
import warnings

import jax

IMPLS = ("auto", "reference", "pallas")


@functools.lru_cache(maxsize=None)
def hopper_device_kind() -> str | None:
  """The device kind of the first GPU if it is a Hopper (compute capability 9.x), else None."""
  try:
    devices = jax.devices("gpu")
  except RuntimeError:
    return None
  if not devices:
    return None
  cc = getattr(devices[0], "compute_capability", None)
  if cc is None or not str(cc).startswith("9"):
    return None
  return devices[0].device_kind


def num_sms(default: int = 132) -> int:
  """The first device's streaming multiprocessor count (``default``, an H100/H200's, where it has none, e.g. on
  the CPU for interpret mode and export). Grids size their waves with it."""
  try:
    n = getattr(jax.devices()[0], "core_count", None)
  except RuntimeError:  # pragma: no cover - no backend at all
    n = None
  return int(n) if n else default


def _describe_backend() -> str:
  try:
    d = jax.devices()[0]
  except RuntimeError:
    return "no device"
  cc = getattr(d, "compute_capability", None)
  return f"{d.platform}:{d.device_kind}" + (f" (compute capability {cc})" if cc else "")


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(what: str) -> None:
  warnings.warn(
      f"duojax: no Hopper GPU found ({_describe_backend()}); {what} runs the pure-JAX reference path. "
      "Pass impl='reference' to silence this warning.", RuntimeWarning, stacklevel=3)


def resolve_impl(impl: str, what: str = "attention") -> str:
  """Maps ``impl`` in {"auto", "reference", "pallas"} to "reference" or "pallas".

  "auto" picks the kernel on Hopper and the reference elsewhere (warning once); "pallas" off Hopper raises.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
  if impl == "reference":
    return "reference"
  if hopper_device_kind() is not None:
    return "pallas"
  if impl == "pallas":
    raise RuntimeError(
        f"impl='pallas' needs a Hopper GPU (sm_90, e.g. H100/H200) for the Mosaic-GPU kernels; found "
        f"{_describe_backend()}. Use impl='auto' or impl='reference'.")
  _warn_fallback_once(what)
  return "reference"
