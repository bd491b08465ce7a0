#!/usr/bin/env bash
# Sets everything up and runs the whole test suite: lint, then pytest (unit + integration).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/services.sh
.venv/bin/ruff check app worker migrations tests bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
# The framework code again on the JAX backend (CPU), when the whole suite was asked for.
# Compiled programs are cached under var/, so later runs skip most of JAX's compiling.
if [ $# -eq 0 ] && .venv/bin/python -c "import jax" 2>/dev/null; then
  KERAS_BACKEND=jax JAX_COMPILATION_CACHE_DIR="$PWD/var/jax-test-cache" \
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
    .venv/bin/python -m pytest tests/ml -p no:cacheprovider
fi
