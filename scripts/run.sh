#!/usr/bin/env bash
# Sets everything up and starts the service: API on http://127.0.0.1:8000 plus one worker.
# With no DATABASE_URL / CELERY_BROKER_URL this is the embedded default (SQLite + a
# server-less broker under ./var). CIFAR10_SOURCE defaults to the shared JPEG archive
# when it is there, else to the Keras download.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ -z "${CIFAR10_SOURCE:-}" ] && [ -f ../shared/data/cifar10-jpeg.tar.gz ]; then
  export CIFAR10_SOURCE="$(cd .. && pwd)/shared/data/cifar10-jpeg.tar.gz"
fi
exec .venv/bin/cnn serve "$@"
