#!/usr/bin/env bash
# Fills .whl/ with everything a GPU host with JAX + CUDA (and no TensorFlow) lacks to run this
# service: the pure-Python and manylinux wheels of its other
# dependencies for CPython 3.12, and a copy of the CIFAR-10 archive. scripts/gpu_check.sh
# installs them there with `pip install --no-index --no-deps --target ...`.
#
#   scripts/gpu_wheels.sh            # run here, where the package index is reachable
#
# That host already has (docs/gpu.md): jax 0.11.2 + the CUDA 13 plugin, numpy, pillow,
# matplotlib, httpx, pyyaml, jinja2 (+markupsafe), prometheus-client, h5py, ml-dtypes,
# absl-py, rich, click, anyio, h11, tqdm, psutil. Versions are pinned to this checkout's
# .venv, so both machines run the same code. Everything stays < 64 MiB with the archive.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${WHEEL_DIR:-.whl}"  # WHEEL_PYTHON=3.11 for a local proof on this machine
PY="${PYTHON_BIN:-.venv/bin/python}"
mkdir -p "$OUT"
rm -f "$OUT"/*.whl

PACKAGES=(
  keras namex optree
  fastapi starlette annotated-doc opentelemetry-api importlib-metadata zipp
  pydantic pydantic-core pydantic-settings python-dotenv annotated-types
  typing-extensions typing-inspection
  sqlalchemy greenlet alembic mako
  uvicorn python-multipart orjson
  celery kombu billiard vine amqp tzlocal tzdata python-dateutil six
  click-didyoumean click-repl click-plugins prompt-toolkit wcwidth
  packaging sniffio idna
)

# name==version from the local environment where it has the package, else the newest.
pinned=()
freeze="$("$PY" -m pip freeze 2>/dev/null | tr 'A-Z_' 'a-z-')"
for pkg in "${PACKAGES[@]}"; do
  version="$(printf '%s\n' "$freeze" | sed -n "s/^${pkg}==//p" | head -n1)"
  pinned+=("${pkg}${version:+==$version}")
done

"$PY" -m pip download --quiet --only-binary=:all: --no-deps \
  --python-version "${WHEEL_PYTHON:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any \
  -d "$OUT" "${pinned[@]}"

# The data, so the host needs no download (CIFAR10_SOURCE points at it).
ARCHIVE="${CIFAR10_ARCHIVE:-../shared/data/cifar10-jpeg.tar.gz}"
if [ -f "$ARCHIVE" ]; then
  cp -f "$ARCHIVE" "$OUT/cifar10-jpeg.tar.gz"
fi
ls -1 "$OUT" | sed 's/^/  /'
du -sh "$OUT"
