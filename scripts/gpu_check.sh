#!/usr/bin/env bash
# The whole service on a GPU host that has JAX + CUDA and no TensorFlow (docs/gpu.md):
# install the missing dependencies from .whl/ (made beforehand by scripts/gpu_wheels.sh),
# start `cnn serve` on the embedded default (SQLite + file broker) with KERAS_BACKEND=jax,
# submit NET I, wait for `succeeded`, check that the job's device names the GPU, call
# /predict. Optional steps, each writing into $OUT as soon as it is done:
#   GPU_CHECK_REPORT=1  submit scripts/report_jobs.json through the service, wait, `cnn report`
#   GPU_CHECK_BENCH=1   then (service stopped) run bench/bench_gpu.py
#
#   OUT=/tmp/out GPU_CHECK_REPORT=1 GPU_CHECK_BENCH=1 scripts/gpu_check.sh
#
# Knobs: PYTHON (python3), WHEEL_DIR (.whl), GPU_CHECK_TARGET (site dir for the wheels),
# GPU_CHECK_EPOCHS (2), GPU_CHECK_TRAIN_LIMIT (unset = all 50,000 images),
# GPU_CHECK_ALLOW_CPU=1 (accept a CPU device: for proving the script on a CPU-only host),
# GPU_CHECK_BENCH_ARGS (extra arguments for bench_gpu.py), CIFAR10_SOURCE.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
WHEELS="${WHEEL_DIR:-$REPO/.whl}"
OUT="${OUT:-$REPO/var/gpu-check}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.txt"
: > "$LOG"
say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
fail() { say "FAILED: $*"; exit 1; }

STATE="${GPU_CHECK_STATE:-$(mktemp -d /tmp/cnn-gpu-state.XXXXXX)}"
TARGET="${GPU_CHECK_TARGET:-$(mktemp -d /tmp/cnn-gpu-site.XXXXXX)}"
export KERAS_BACKEND="${KERAS_BACKEND:-jax}"
export STATE_DIR="$STATE"
export CACHE_DIR="${CACHE_DIR:-$STATE/cache}"  # decoded CIFAR-10, shared by service and bench
# No standby worker: a second JAX process on the card is not needed for a few-minute check.
export SERVE_STANDBY_WORKER="${SERVE_STANDBY_WORKER:-false}"
export PYTHONPATH="$REPO:$TARGET${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -z "${CIFAR10_SOURCE:-}" ]; then
  for candidate in "$WHEELS/cifar10-jpeg.tar.gz" "$REPO/../shared/data/cifar10-jpeg.tar.gz"; do
    [ -f "$candidate" ] && { CIFAR10_SOURCE="$candidate"; break; }
  done
fi
export CIFAR10_SOURCE="${CIFAR10_SOURCE:-keras}"

say "python: $("$PY" --version 2>&1); backend $KERAS_BACKEND; data $CIFAR10_SOURCE"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.util
print("tensorflow installed:", importlib.util.find_spec("tensorflow") is not None)
try:
    import jax
    print("jax", jax.__version__, "devices:", [f"{d.platform}:{d.device_kind}" for d in jax.devices()])
except Exception as exc:  # noqa: BLE001
    print("jax unavailable:", exc)
EOF
command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | tee -a "$LOG" || true

# 1. dependencies from the wheel folder (no index, no dependency resolution)
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  start=$(date +%s)
  "$PY" -m pip install --quiet --no-compile --no-index --no-deps --target "$TARGET" "$WHEELS"/*.whl 2>&1 \
    | grep -v -i "warning" | tee -a "$LOG" || true
  say "installed $(ls "$WHEELS"/*.whl | wc -l) wheels into $TARGET in $(( $(date +%s) - start )) s"
else
  say "no wheels in $WHEELS: using the packages already importable"
fi
"$PY" -c "import keras, fastapi, sqlalchemy, celery, alembic, orjson; print('keras', keras.__version__, 'backend', keras.backend.backend())" 2>&1 | tee -a "$LOG"

# 2. the service on the embedded default
PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
BASE="http://127.0.0.1:$PORT"
"$PY" -m app.cli serve --host 127.0.0.1 --port "$PORT" > "$OUT/serve.log" 2>&1 &
SERVE_PID=$!
stop_service() {
  if kill -0 "$SERVE_PID" 2>/dev/null; then
    kill -TERM "$SERVE_PID" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL "$SERVE_PID" 2>/dev/null || true
  fi
}
trap stop_service EXIT
say "cnn serve (pid $SERVE_PID) on $BASE, STATE_DIR=$STATE"

# The HTTP steps are in scripts/gpu_check.py (no curl needed; reads STATE_DIR/admin.key).
export GPU_CHECK_BASE="$BASE" GPU_CHECK_OUT="$OUT"
if ! "$PY" scripts/gpu_check.py check 2>&1 | tee -a "$LOG"; then
  fail "service check (see gpu_check.txt and serve.log)"
fi

# 3. optional: the course's report jobs through the same service
if [ "${GPU_CHECK_REPORT:-0}" = 1 ]; then
  if [ -f scripts/report_jobs.json ] && "$PY" -m app.cli report --help >/dev/null 2>&1; then
    "$PY" scripts/gpu_check.py report scripts/report_jobs.json 2>&1 | tee -a "$LOG" \
      || say "report step failed"
  else
    say "GPU_CHECK_REPORT=1 but scripts/report_jobs.json or 'cnn report' is missing: skipped"
  fi
fi

stop_service
trap - EXIT
say "service stopped"

# 4. optional: the benchmark, with the GPU to itself
if [ "${GPU_CHECK_BENCH:-0}" = 1 ]; then
  # shellcheck disable=SC2086
  "$PY" bench/bench_gpu.py --out "$OUT/bench_gpu" ${GPU_CHECK_BENCH_ARGS:-} 2>&1 \
    | grep -v -E "^(WARNING|I0000|W0000|E0000)" | tee -a "$LOG" || say "bench_gpu.py failed"
fi
say "done; outputs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
