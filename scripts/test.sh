#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
# GPU-only tests (marked gpu) run on a Hopper machine through benchmarks/gpu_suite.py --stages tests
# --dist load: a worker that crashes (pytest-timeout ends a hung test) costs only its test; with loadfile xdist
# reruns that test on each replacement worker.
rm -rf .test-hangs
rc=0
.venv/bin/python -m pytest -q -n 2 --dist load -m "not gpu" "$@" || rc=$?
for f in .test-hangs/*.txt; do
  [ -s "$f" ] && { echo "=== hung test: $f"; cat "$f"; }
done
exit $rc
