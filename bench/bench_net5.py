"""NET V's recipe through the real service, N seeds: training time, images/s, test accuracy
without and with test-time augmentation, their mean and spread (issue 21).

    .venv/bin/python bench/bench_net5.py [--seeds 3] [--quick] [--json out.json]
    .venv/bin/python bench/bench_net5.py --throughput [--steps 20] [--activation gelu]

The recipe is NET V's entry of scripts/report_jobs_cpu.json (the one the report runs), so
this bench and the report cannot drift apart. Each seed is one job submitted over HTTP to a
`cnn serve` (API and worker, the stack of bench/bench_recovery.py's embedded mode) started
here on a free port with its own state folder, trained on the shared JPEG copy of CIFAR-10
(../shared/data/cifar10-jpeg.tar.gz), evaluated and registered by the worker; the figures
come back from GET /jobs/{id}/history and /jobs/{id}/evaluation. `--quick` trains on 2,000
images for 1 epoch to prove the path in a minute or two (accuracy then means nothing).

`--throughput` needs no service: it times `--steps` training steps of the recipe (batch
1024, the whole training graph: augmentation, net, loss, RecipeSGD) in this process through
app.ml.training.train on random images, after a warm-up epoch of as many steps (tracing),
so 2 x 10 steps by default, and projects the seconds
of a 50,000-image epoch. It prints the CPU model and whether it has avx512_bf16, as the
accuracy run does: the two cores' bfloat16 is what the issue's 30-minute target assumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stack import ARCHIVE, CACHE, free_port, wait_for  # noqa: E402

RECIPES = ROOT / "scripts" / "report_jobs_cpu.json"
EPOCH_IMAGES = 50_000


def recipe() -> dict[str, Any]:
    """NET V's job body from scripts/report_jobs_cpu.json."""
    bodies = json.loads(RECIPES.read_text())
    (body,) = [b for b in bodies if b["net"] == "net5"]
    return dict(body)


def cpu() -> dict[str, Any]:
    """The CPU model, its logical cores and whether it has avx512_bf16 (Linux /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": "unknown", "cores": os.cpu_count(), "avx512_bf16": None}
    model = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line),
        "unknown",
    )
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return {
        "model": model,
        "cores": len(os.sched_getaffinity(0)),
        "avx512_bf16": "avx512_bf16" in flags.split(),
    }


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


# ----------------------------------------------------------------------------- throughput
def throughput(steps: int, activation: str, precision: str) -> dict[str, Any]:
    """Time `steps` training steps of the recipe at batch 1024 after a warm-up epoch."""
    import numpy as np

    from app.ml import nets
    from app.ml.data import Cifar10
    from app.ml.training import TrainConfig, train

    body = recipe()
    batch = int(body["batch_size"])
    body = {k: v for k, v in body.items() if k not in ("model_name", "tta")}
    if activation != nets.NET5_ACTIVATION:  # the same net with another activation, for the ratio
        spec = nets.NETS["net5"]
        nets.NETS["net5"] = type(spec)(
            **{
                **spec.__dict__,
                "builder": lambda **kw: nets.build_net5(activation=activation, **kw),
            }
        )
    rng = np.random.default_rng(0)
    n = batch * steps
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=n)
    data = Cifar10(x, y, x[:batch], y[:batch], source="random")
    config = TrainConfig(**(body | {"epochs": 2, "precision": precision}))
    started = time.perf_counter()
    result = train(config, data)
    first, second = result.epochs
    rate = second.images_per_second
    return {
        "activation": activation,
        "precision": result.precision,
        "device": result.device,
        "batch_size": batch,
        "timed_steps": steps,
        "images_per_second": rate,
        "seconds_per_step": batch / rate,
        "projected_seconds_per_epoch": EPOCH_IMAGES / rate,
        "projected_minutes_for_recipe": EPOCH_IMAGES * int(recipe()["epochs"]) / rate / 60,
        "first_epoch_seconds_with_tracing": first.seconds,
        "wall_seconds": time.perf_counter() - started,
    }


# ----------------------------------------------------------------------------- the service


def start_service(workdir: Path) -> tuple[subprocess.Popen[bytes], Any, Any]:
    """`cnn serve` on a free port with its own state; (process, http client, settings)."""
    import httpx

    from app.config import Settings
    from app.serve import settings_env

    settings = Settings(
        _env_file=None,
        STATE_DIR=workdir / "state",
        CACHE_DIR=CACHE,
        CIFAR10_SOURCE=str(ARCHIVE.resolve()),
    )
    fields = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in fields}
    env.update(settings_env(settings))
    env.update(PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    port = free_port()
    log = (workdir / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

    def up() -> bool:
        try:
            return http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 180, "cnn serve to answer", interval=0.5)
    http.headers["Authorization"] = f"Bearer {settings.admin_key_file.read_text().strip()}"
    return proc, http, settings


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def run_seeds(seeds: int, quick: bool, timeout_s: float) -> dict[str, Any]:
    body = recipe()
    if quick:
        body |= {"train_limit": 2000, "epochs": 1}
    workdir = Path(tempfile.mkdtemp(prefix="bench-net5-"))
    proc, http, _ = start_service(workdir)
    rows: list[dict[str, Any]] = []
    try:
        ids = []
        for seed in range(seeds):
            job = body | {"seed": seed, "model_name": f"bench-net5-{uuid.uuid4().hex[:6]}"}
            response = http.post("/jobs", json=job)
            response.raise_for_status()
            ids.append(response.json()["id"])
        for seed, job_id in enumerate(ids):
            status = wait_for(
                lambda j=job_id: (
                    http.get(f"/jobs/{j}").json()["status"] in {"succeeded", "failed", "cancelled"}
                    and http.get(f"/jobs/{j}").json()["status"]
                ),
                timeout_s,
                f"job {job_id}",
                interval=2.0,
            )
            epochs = http.get(f"/jobs/{job_id}/history").json()["epochs"]
            evaluation = http.get(f"/jobs/{job_id}/evaluation").json()
            train_seconds = sum(e["seconds"] for e in epochs)
            # The history has no images/s: the images the job trained on, over its seconds
            # (validation_split is 0 in the recipe, so the seconds are training alone).
            n_train = job_images(body)
            row = {
                "seed": seed,
                "job_id": job_id,
                "status": status,
                "training_seconds": train_seconds,
                "images_per_second": n_train * len(epochs) / train_seconds
                if train_seconds
                else math.nan,
                "test_accuracy": evaluation.get("test_accuracy"),
                "tta_accuracy": evaluation.get("tta_accuracy"),
                "tta_views": [v["name"] for v in evaluation.get("tta_views") or []],
            }
            rows.append(row)
            print(
                f"seed {seed} job {job_id} {status}: {train_seconds:7.1f} s training, "
                f"{row['images_per_second']:6.0f} img/s, test accuracy "
                f"{_pct(row['test_accuracy'])} plain, {_pct(row['tta_accuracy'])} with TTA",
                flush=True,
            )
    finally:
        http.close()
        stop(proc)
    done = [r for r in rows if r["status"] == "succeeded"]
    summary = {
        key: spread([float(r[key]) for r in done if r[key] is not None])
        for key in ("training_seconds", "images_per_second", "test_accuracy", "tta_accuracy")
    }
    return {"recipe": body, "jobs": rows, "summary": summary, "workdir": str(workdir)}


def job_images(body: dict[str, Any]) -> int:
    """Training images per epoch of a job body: train_limit or 50,000, less the validation."""
    n = body.get("train_limit") or EPOCH_IMAGES
    return int(n * (1.0 - float(body.get("validation_split", 0.2))))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="train_limit 2000, 1 epoch")
    parser.add_argument("--throughput", action="store_true", help="time training steps only")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after as many)")
    parser.add_argument("--activation", default="gelu", choices=("gelu", "relu"))
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per job")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    machine = cpu()
    print(
        f"CPU: {machine['model']} ({machine['cores']} cores), "
        f"avx512_bf16: {'yes' if machine['avx512_bf16'] else 'no'}",
        flush=True,
    )
    if args.throughput:
        out: dict[str, Any] = throughput(args.steps, args.activation, args.precision)
        print(
            f"net5 ({out['activation']}, {out['precision']}, batch {out['batch_size']}): "
            f"{out['images_per_second']:.0f} img/s over {out['timed_steps']} steps "
            f"({out['seconds_per_step']:.2f} s/step), projected "
            f"{out['projected_seconds_per_epoch']:.0f} s per 50,000-image epoch, "
            f"{out['projected_minutes_for_recipe']:.1f} min for the recipe's epochs"
        )
    else:
        if not ARCHIVE.is_file():
            raise SystemExit(f"the shared CIFAR-10 archive {ARCHIVE} is missing")
        out = run_seeds(args.seeds, args.quick, args.timeout)
        for key, figures in out["summary"].items():
            if figures:
                print(
                    f"{key}: mean {figures['mean']:.4f}, std {figures['std']:.4f}, "
                    f"min {figures['min']:.4f}, max {figures['max']:.4f}"
                )
    out["cpu"] = machine
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
