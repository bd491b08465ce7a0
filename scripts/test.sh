#!/usr/bin/env bash
# Sets everything up and runs the whole test suite: lint, then pytest (unit + integration).
# The end-to-end tests need the real CIFAR-10 archive at ../shared/data/cifar10-jpeg.tar.gz
# (beside the repository); without it this script fails instead of letting them skip.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHIVE=../shared/data/cifar10-jpeg.tar.gz
if [ ! -f "$ARCHIVE" ]; then
  echo "error: the CIFAR-10 archive is missing at $(pwd)/$ARCHIVE; the end-to-end tests need it" >&2
  exit 1
fi
export CNN_REQUIRE_CIFAR10=1
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
