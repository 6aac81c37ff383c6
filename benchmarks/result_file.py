"""Writing a benchmark's result JSON: ``<stem>_<device>.json`` under ``out``, headed by the device name, the jax
version and the date."""

from __future__ import annotations

import datetime
import json
import pathlib

import jax


def write_result(out, stem: str, **fields) -> pathlib.Path:
  """Writes ``{device, jax_version, date, **fields}`` to ``out/<stem>_<device kind>.json`` (spaces as ``_``),
  creating ``out`` if needed, and returns the path."""
  dev = jax.devices()[0].device_kind
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{stem}_{dev.replace(' ', '_')}.json"
  path.write_text(json.dumps(dict(device=dev, jax_version=jax.__version__, date=datetime.date.today().isoformat(),
                                  **fields), indent=1))
  return path
