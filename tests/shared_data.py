"""``../shared`` beside the repository: test data that is never copied into it (DuoAttention's published patterns,
HF's SmolLM2 tokenizer files).

Outside CI a missing file skips the checks that read it. CI always has ``../shared`` (and ``.ci/run`` sets
``CI``), so there a missing file is a failure: a green CI run never means "skipped for want of data".
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


def in_ci() -> bool:
  return bool(os.environ.get("CI"))


def _message(path: Path) -> str:
  return f"{path} not present (test data from ../shared)"


def _missing(path: Path) -> None:
  message = _message(path)
  if in_ci():
    pytest.fail(f"{message}; CI must have it", pytrace=False)
  pytest.skip(message)


def require_shared(path: Path) -> Path:
  """``path`` if it exists; else skips the test (fails it under CI)."""
  if not path.exists():
    _missing(path)
  return path


def optional_shared(path: Path) -> Path | None:
  """``path`` if it exists, else None for checks a test leaves out; under CI a missing path fails the test."""
  if path.exists():
    return path
  if in_ci():
    _missing(path)
  return None


def needs_shared(path: Path) -> pytest.MarkDecorator:
  """Skips the marked tests when ``path`` is missing, except under CI, where they run (and fail on it)."""
  return pytest.mark.skipif(not path.exists() and not in_ci(), reason=_message(path))
