"""The HTTP half of scripts/gpu_check.sh (standard library only, so it runs before anything
is installed): `check` submits NET I, waits for `succeeded`, checks the device and calls
/predict; `report FILE` submits the jobs in FILE, waits for them and runs `cnn report`.

Environment: GPU_CHECK_BASE (the API's URL), STATE_DIR (for admin.key), GPU_CHECK_OUT (where
results land, flat), GPU_CHECK_EPOCHS, GPU_CHECK_TRAIN_LIMIT, GPU_CHECK_ALLOW_CPU,
GPU_CHECK_JOB_TIMEOUT, GPU_CHECK_REPORT_TIMEOUT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

BASE = os.environ.get("GPU_CHECK_BASE", "http://127.0.0.1:8000")
STATE = Path(os.environ.get("STATE_DIR", "var"))
OUT = Path(os.environ.get("GPU_CHECK_OUT", "var/gpu-check"))
TERMINAL = ("succeeded", "failed", "cancelled")


def api_key() -> str | None:
    """The admin key the embedded default writes once auth is on (docs/security)."""
    for path in (STATE / "admin.key", Path("var/admin.key")):
        if path.is_file():
            return path.read_text().strip()
    return None


def call(method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    key = api_key()
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(BASE + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw or b"null")
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def wait_healthy(seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if call("GET", "/health", timeout=5)[0] == 200:
                print("API healthy", flush=True)
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"the API did not answer /health within {seconds:.0f} s (see serve.log)")
        time.sleep(1)


def wait_jobs(ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    start = time.monotonic()
    last: dict[str, Any] = {}
    done: dict[str, dict[str, Any]] = {}
    while len(done) < len(ids):
        for job_id in ids:
            if job_id in done:
                continue
            _, body = call("GET", f"/jobs/{job_id}")
            seen = (body.get("status"), (body.get("progress") or {}).get("epoch"))
            if seen != last.get(job_id):
                print(f"  {time.monotonic() - start:7.1f} s  {job_id[:8]}  {seen}", flush=True)
                last[job_id] = seen
            if body.get("status") in TERMINAL:
                done[job_id] = body
        if time.monotonic() - start > timeout:
            print(f"timed out after {timeout:.0f} s waiting for {len(ids) - len(done)} job(s)")
            break
        time.sleep(0.5)
    return done


def check() -> int:
    wait_healthy()
    job: dict[str, Any] = {"net": "net1", "epochs": int(os.environ.get("GPU_CHECK_EPOCHS", "2"))}
    if os.environ.get("GPU_CHECK_TRAIN_LIMIT"):
        job["train_limit"] = int(os.environ["GPU_CHECK_TRAIN_LIMIT"])
    status, body = call("POST", "/jobs", job)
    if status != 202:
        sys.exit(f"POST /jobs answered {status}: {body}")
    job_id = body["id"]
    print("submitted NET I:", job_id, json.dumps(job), flush=True)
    done = wait_jobs([job_id], float(os.environ.get("GPU_CHECK_JOB_TIMEOUT", "600")))
    body = done.get(job_id) or call("GET", f"/jobs/{job_id}")[1]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu_check_job.json").write_text(json.dumps(body, indent=2))
    print(json.dumps({k: body.get(k) for k in ("status", "device", "worker", "error")}))
    if body.get("status") != "succeeded":
        sys.exit(f"the job ended {body.get('status')}: {body.get('error')}")
    device = body.get("device") or ""
    if device.startswith("GPU"):
        print("the job's device names the GPU:", device)
    elif os.environ.get("GPU_CHECK_ALLOW_CPU") == "1":
        print(f"device {device!r} accepted (GPU_CHECK_ALLOW_CPU=1)")
    else:
        sys.exit(f"the job ran on {device!r}, not on a GPU")
    _, history = call("GET", f"/jobs/{job_id}/history")
    for row in history.get("epochs", []):
        print("  epoch", json.dumps(row))
    _, evaluation = call("GET", f"/jobs/{job_id}/evaluation")
    print("test accuracy:", evaluation.get("test_accuracy"))

    pixels = [
        [[(x * 7 + y * 3 + c * 50) % 256 for c in range(3)] for x in range(32)] for y in range(32)
    ]
    model = (body.get("model_version") or {}).get("name") or "net1"
    # The API loads the model on its first request (and JAX compiles its forward pass).
    status, answer = call("POST", "/predict", {"model": model, "instances": [pixels, pixels]}, 600)
    if status != 200:
        sys.exit(f"/predict answered {status}: {answer}")
    rows = answer["predictions"]
    total = sum(rows[0]["probabilities"])
    if len(rows) != 2 or abs(total - 1) > 1e-3:
        sys.exit(f"/predict gave unexpected rows: {answer}")
    print(f"/predict answered {rows[0].get('class_name')} (probabilities sum to {total:.4f})")
    print("GPU CHECK PASSED", flush=True)
    return 0


def report(spec_file: str) -> int:
    wait_healthy()
    spec = json.loads(Path(spec_file).read_text())
    jobs = spec.get("jobs", spec) if isinstance(spec, dict) else spec
    ids = []
    for job in jobs:
        status, body = call("POST", "/jobs", job)
        print("submitted", status, (body or {}).get("id"), json.dumps(job), flush=True)
        if status == 202:
            ids.append(body["id"])
    done = wait_jobs(ids, float(os.environ.get("GPU_CHECK_REPORT_TIMEOUT", "420")))
    for job_id, body in done.items():
        print(f"  {job_id} {body.get('status')} {body.get('device')} {body.get('error') or ''}")
    folder = Path(tempfile.mkdtemp(prefix="cnn-report-"))
    finished = [i for i in ids if done.get(i, {}).get("status") == "succeeded"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "report",
            "--jobs",
            ",".join(finished),
            "--out",
            str(folder),
        ],
        capture_output=True,
        text=True,
        # The report only reads the database and draws: no second process on the card.
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    OUT.mkdir(parents=True, exist_ok=True)
    if (folder / "results.md").is_file():
        (OUT / "results.md").write_text((folder / "results.md").read_text())
        with tarfile.open(OUT / "report.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="report")
        print("report written:", OUT / "results.md", OUT / "report.tar.gz")
    return proc.returncode


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("check", "report"):
        sys.exit("usage: gpu_check.py check | report FILE")
    sys.exit(check() if sys.argv[1] == "check" else report(sys.argv[2]))
