#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
# GPU-only tests (marked gpu) run on a Hopper machine through benchmarks/gpu_suite.py --stages tests
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile -m "not gpu" "$@"
