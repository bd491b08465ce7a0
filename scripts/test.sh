#!/usr/bin/env bash
# Sets everything up and runs the whole test suite: lint, then pytest (unit + integration).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/services.sh
.venv/bin/ruff check app worker migrations tests bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
