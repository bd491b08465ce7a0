"""The S3 artifact store on the real stack: its cost against the folder store, and recovery.

    .venv/bin/python bench/bench_store.py [--parts overhead recovery] [--epochs 20]
        [--train-limit N] [--kills 2]

Both parts run PostgreSQL (a throw-away database on 127.0.0.1:5432), a private
`redis-server`, moto's S3 server (`python -m moto.server`, loopback, as in the tests), one API
process and `cnn worker` processes, each process with a state folder of its own.

- overhead: NET I with the course's settings (batch 128, 20 epochs, the real JPEG CIFAR-10)
  submitted over HTTP to one worker, once with the folder store (ARTIFACT_STORE unset) and
  once with `s3://...`, one after the other on the same machine. Printed: seconds from submit
  to `succeeded` and the sum of the epochs' own seconds, for each, and the ratio S3 / folder.
  With S3 every epoch's checkpoint is uploaded by a background thread while the next epoch
  trains, and the model is published and fetched through the bucket.
- recovery: `bench/bench_recovery.py`'s measurement on the S3 store with two hosts: worker A
  runs the job, worker B (another folder, no shared files) waits; A is SIGKILLed mid-epoch
  and B resumes from the bucket's checkpoint. A new worker in the killed one's folder is
  started at once, so each later kill is also picked up by the other host. Printed: seconds
  from SIGKILL to the next epoch row (default robustness settings: heartbeat timeout 30 s,
  sweep every 5 s).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_recovery import ARCHIVE, PG, Bench, free_port, wait_for  # noqa: E402

from app.config import Settings  # noqa: E402

AWS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    return platform.processor() or "unknown CPU"


API_ARGS = [
    "-m",
    "uvicorn",
    "app.main:create_app",
    "--factory",
    "--host",
    "127.0.0.1",
    "--log-level",
    "warning",
]


class StoreBench(Bench):
    """Bench with the shared parts started once: PostgreSQL, Redis, moto's S3 server."""

    def setup(self) -> None:
        import boto3
        import psycopg

        from app import auth
        from app.db import session_factory
        from app.migrate import upgrade

        os.environ.update(AWS)
        redis_port, s3_port = free_port(), free_port()
        redis_argv = [
            "redis-server",
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]
        self.procs.append(
            subprocess.Popen(redis_argv, stdout=subprocess.DEVNULL, start_new_session=True)
        )
        moto_argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)]
        self.procs.append(
            subprocess.Popen(
                moto_argv,
                stdout=(self.workdir / "moto.log").open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        self.database = f"cnn_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{self.database}"')
        self.url = f"{PG}/{self.database}"
        upgrade(self.url)
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.endpoint = f"http://127.0.0.1:{s3_port}"
        client = boto3.client("s3", endpoint_url=self.endpoint)
        wait_for(lambda: _answers(client), 60, "moto's server", interval=0.2)
        client.create_bucket(Bucket="bench")
        with session_factory(self.host("keys", "s3"))() as session:
            self.key = auth.create_key(session, "bench-store", "admin").key

    def host(self, name: str, store: str) -> Settings:
        """A process's settings: a folder of its own; the folder store's processes share
        its artifact folder (that is what the folder store needs), S3's share the bucket."""
        where: dict[str, Any] = (
            {"ARTIFACT_STORE": "s3://bench/cnn", "S3_ENDPOINT_URL": self.endpoint}
            if store == "s3"
            else {"ARTIFACT_DIR": self.workdir / "shared-artifacts"}
        )
        return self.base_settings(
            self.workdir / name,
            DATABASE_URL=self.url,
            CELERY_BROKER_URL=self.redis_url,
            **where,
        )

    def worker(self, settings: Settings) -> subprocess.Popen[bytes]:
        return self.start("worker", [sys.executable, "-m", "app.cli", "worker"], settings)

    def api(self, settings: Settings) -> httpx.Client:
        port = free_port()
        self.start("api", [sys.executable, *API_ARGS, "--port", str(port)], settings)
        http = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            timeout=60,
            headers={"Authorization": f"Bearer {self.key}"},
        )
        wait_for(lambda: _up(http), 120, "the API", interval=0.2)
        return http

    # ----------------------------------------------------------------- overhead
    def run_job(self, store: str, epochs: int) -> tuple[float, float, float]:
        """NET I on one worker of `store`, served by an API of the same store: seconds from
        submit to succeeded, the sum of the epochs' own seconds, and the worker process's
        CPU seconds meanwhile (all its threads: the fit and the uploads), which a busy
        shared machine disturbs much less than wall time."""
        worker = self.worker(self.host(f"worker-{store}", store))
        http = self.api(self.host(f"api-{store}", store))
        try:
            time.sleep(30)  # the worker loads TensorFlow before the clock starts
            params: dict[str, Any] = {
                "net": "net1",
                "epochs": epochs,
                "model_name": f"bench-{store}",
            }
            if self.args.train_limit:
                params["train_limit"] = self.args.train_limit
            started, cpu_before = time.monotonic(), _cpu_seconds(worker.pid)
            response = http.post("/jobs", json=params)
            response.raise_for_status()
            job_id = response.json()["id"]
            job = wait_for(lambda: _finished(http, job_id), 3600, "the job", interval=0.5)
            total = time.monotonic() - started
            cpu = _cpu_seconds(worker.pid) - cpu_before
            assert job["status"] == "succeeded", job
            rows = http.get(f"/jobs/{job_id}/history").json()["epochs"]
            image = [[[0] * 3] * 32] * 32
            answer = http.post("/predict", json={"model": f"bench-{store}", "instances": [image]})
            assert answer.status_code == 200, answer.text
            return total, sum(row["seconds"] for row in rows), cpu
        finally:
            http.close()
            worker.terminate()
            worker.wait(timeout=60)

    def overhead(self) -> None:
        results = {}
        for store in ("file", "s3"):
            results[store] = total, fit, cpu = self.run_job(store, self.args.epochs)
            print(
                f"  {store:<5} submit to succeeded {total:7.1f} s, epochs {fit:7.1f} s, "
                f"worker CPU {cpu:7.1f} s, load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        ratios = [s3 / folder for s3, folder in zip(results["s3"], results["file"], strict=True)]
        print(
            f"overhead S3 / folder: end to end {ratios[0]:.3f}, epochs {ratios[1]:.3f}, "
            f"worker CPU {ratios[2]:.3f}"
        )

    # ----------------------------------------------------------------- recovery
    def recovery(self) -> list[tuple[float, float]]:
        hosts = {name: self.host(name, "s3") for name in ("host-a", "host-b")}
        http = self.api(self.host("api-recovery", "s3"))
        running = {"host-a": self.worker(hosts["host-a"])}
        time.sleep(30)  # host A has TensorFlow loaded first: it takes the job
        running["host-b"] = self.worker(hosts["host-b"])

        def kill(worker_name: str) -> None:
            pid = int(worker_name.split("@", 1)[0].removeprefix("cnn-"))
            name = next(n for n, p in running.items() if p.pid == pid)
            running[name].kill()
            running[name].wait()
            running[name] = self.worker(hosts[name])  # a new process in the same folder

        try:
            return self.measure(http, kill, epochs=2 * self.args.kills + 3)
        finally:
            http.close()

    def teardown(self) -> None:
        import psycopg

        from app.db import get_engine

        self.cleanup()
        if not hasattr(self, "url"):
            return
        get_engine(Settings(_env_file=None, DATABASE_URL=self.url)).dispose()
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _answers(client: Any) -> bool:
    try:
        client.list_buckets()
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _up(http: httpx.Client) -> bool:
    try:
        return http.get("/health").status_code == 200
    except httpx.HTTPError:
        return False


def _finished(http: httpx.Client, job_id: str) -> dict[str, Any] | None:
    job = http.get(f"/jobs/{job_id}").json()
    return job if job["status"] in {"succeeded", "failed", "cancelled"} else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["overhead", "recovery"])
    parser.add_argument("--epochs", type=int, default=20, help="overhead: epochs of NET I")
    parser.add_argument("--train-limit", type=int, default=None, help="overhead: images (all)")
    parser.add_argument("--kills", type=int, default=2, help="recovery: SIGKILLs, one per epoch")
    parser.add_argument("--set", nargs="*", default=[], help="Settings overrides NAME=VALUE")
    args = parser.parse_args()
    if not ARCHIVE.is_file():
        sys.exit(f"needs the CIFAR-10 archive at {ARCHIVE.resolve()}")
    print(f"CPU: {cpu_name()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-store-"))
    # recovery's job: bench_recovery's defaults (1,600 images in batches of 32).
    args.batch_size, recovery_limit = 32, 2000
    bench = StoreBench(args, workdir)
    ok = False
    try:
        bench.setup()
        if "overhead" in args.parts:
            print("overhead (NET I, batch 128):", flush=True)
            bench.overhead()
        if "recovery" in args.parts:
            print("recovery on S3, the other host resumes:", flush=True)
            limit, args.train_limit = args.train_limit, recovery_limit
            results = bench.recovery()
            args.train_limit = limit
            times = ", ".join(f"{r:.1f}" for r, _ in results)
            print(f"s3 two hosts: seconds from SIGKILL to the next epoch row: {times}")
        ok = True
    finally:
        bench.teardown()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}")


if __name__ == "__main__":
    main()
