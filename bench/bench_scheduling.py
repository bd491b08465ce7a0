"""Scheduling overhead on the real stack: tiny jobs per hour with 1, 2 and 4 worker processes.

    .venv/bin/python bench/bench_scheduling.py [--workers 1 2 4] [--jobs 8] [--budget-s 170]

For each worker count: a throw-away PostgreSQL database (127.0.0.1:5432), queues of its own
on the Redis at 127.0.0.1:6379 (db 12), and N `cnn worker` processes. Once all N are live in
the `workers` table (their start, TensorFlow's import, is not counted), one warm-up job per
worker runs (the first job of a process builds the net and traces its steps), then `--jobs`
tiny jobs are submitted at once through app.jobs.service.submit_job (what POST /jobs calls:
a committed row, then a Celery message) and the clock runs until the last one ends.

A tiny job: NET I, 1 epoch, `--train-limit` training images (500), batch 128; it still
loads the cached data set, evaluates on the 10,000 test images and registers its model, so
"overhead" here is everything but the epoch: queueing, claiming, loading, evaluating,
publishing. Printed per worker count: jobs/hour; the dispatch time (submit to claim of the
warm-up jobs, each of which found an idle worker: the Redis message and the fenced claim);
and per measured job the medians of the queue wait (created to started), the run (started
to finished) and the epoch's own seconds.
"""

from __future__ import annotations

import argparse
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

from stack import ARCHIVE, CACHE, PG, env_for, wait_for  # noqa: E402

from app.config import Settings  # noqa: E402

REDIS = "redis://127.0.0.1:6379/12"


class Fleet:
    """N worker processes on one fresh database and queues of their own."""

    def __init__(self, count: int, workdir: Path, args: argparse.Namespace) -> None:
        import psycopg

        from app.migrate import upgrade

        self.count, self.args = count, args
        self.database = f"cnn_sched_{uuid.uuid4().hex[:8]}"
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{self.database}"')
        upgrade(f"{PG}/{self.database}")
        tag = uuid.uuid4().hex[:8]
        self.settings = Settings(
            _env_file=None,
            DATABASE_URL=f"{PG}/{self.database}",
            CELERY_BROKER_URL=REDIS,
            TRAINING_QUEUE=f"training-sched-{tag}",
            MAINTENANCE_QUEUE=f"maintenance-sched-{tag}",
            STATE_DIR=workdir,
            CACHE_DIR=CACHE,
            CIFAR10_SOURCE=str(ARCHIVE.resolve()),
            AUTH="off",
            MAX_ACTIVE_JOBS_PER_KEY=10_000,
        )
        from app.db import session_factory

        self.sessions = session_factory(self.settings)
        self.procs: list[subprocess.Popen[bytes]] = []
        for i in range(count):
            log = (workdir / f"worker-{i}.log").open("wb")
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "app.cli", "worker"],
                    env=env_for(self.settings),
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def live_workers(self) -> int:
        from app.fleet.records import list_workers

        with self.sessions() as session:
            return list_workers(session, self.settings, include_lost=False, limit=1000)[1]

    def submit(self, n: int) -> list[uuid.UUID]:
        from app.auth import AUTH_OFF
        from app.jobs.service import submit_job
        from app.schemas import JobCreate

        ids = []
        with self.sessions() as session:
            for _ in range(n):
                body = JobCreate(
                    net="net1",
                    epochs=1,
                    train_limit=self.args.train_limit,
                    model_name=f"sched-{uuid.uuid4().hex[:6]}",
                )
                job, _ = submit_job(session, body, None, principal=AUTH_OFF, settings=self.settings)
                ids.append(job.id)
        return ids

    def jobs(self, ids: list[uuid.UUID]) -> list[Any]:
        from sqlalchemy import select

        from app.models import Job

        with self.sessions() as session:
            rows = list(session.scalars(select(Job).where(Job.id.in_(ids))))
            session.expunge_all()
            return rows

    def epoch_seconds(self, ids: list[uuid.UUID]) -> list[float]:
        from sqlalchemy import select

        from app.models import EpochMetric

        with self.sessions() as session:
            return list(
                session.scalars(select(EpochMetric.seconds).where(EpochMetric.job_id.in_(ids)))
            )

    def wait_done(self, ids: list[uuid.UUID], timeout: float) -> list[Any]:
        terminal = {"succeeded", "failed", "cancelled"}

        def done() -> list[Any] | None:
            rows = self.jobs(ids)
            return rows if all(str(r.status) in terminal for r in rows) else None

        return wait_for(done, timeout, f"{len(ids)} jobs to end", interval=0.1)

    def close(self) -> None:
        import psycopg
        import redis

        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.sessions.kw["bind"].dispose()
        with redis.Redis.from_url(REDIS) as conn:
            conn.delete(self.settings.TRAINING_QUEUE, self.settings.MAINTENANCE_QUEUE)
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


def measure(count: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-sched-{count}-") as tmp:
        fleet = Fleet(count, Path(tmp), args)
        try:
            started = time.monotonic()
            wait_for(
                lambda: fleet.live_workers() == count, 300, f"{count} live workers", interval=0.2
            )
            ready = time.monotonic() - started
            warm = fleet.wait_done(fleet.submit(count), args.budget_s)
            assert all(str(r.status) == "succeeded" for r in warm), [r.error for r in warm]
            # The warm-up jobs each found an idle worker: submit to claim is pure dispatch.
            dispatch = [(r.started_at - r.created_at).total_seconds() for r in warm]
            begin = time.monotonic()
            ids = fleet.submit(args.jobs)
            rows = fleet.wait_done(ids, args.budget_s)
            elapsed = time.monotonic() - begin
            failed = [r.error for r in rows if str(r.status) != "succeeded"]
            assert not failed, failed
            waits = [(r.started_at - r.created_at).total_seconds() for r in rows]
            runs = [(r.finished_at - r.started_at).total_seconds() for r in rows]
            return {
                "workers": count,
                "jobs": len(rows),
                "seconds": elapsed,
                "jobs_per_hour": len(rows) / elapsed * 3600,
                "dispatch_median_ms": statistics.median(dispatch) * 1000,
                "wait_median_s": statistics.median(waits),
                "run_median_s": statistics.median(runs),
                "epoch_median_s": statistics.median(fleet.epoch_seconds(ids)),
                "workers_up_s": ready,
                "load": os.getloadavg()[0],
            }
        finally:
            fleet.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--jobs", type=int, default=8, help="measured jobs per worker count")
    parser.add_argument("--train-limit", type=int, default=500)
    parser.add_argument("--budget-s", type=float, default=170, help="most seconds for the jobs")
    args = parser.parse_args()
    if not ARCHIVE.is_file():
        print(f"the CIFAR-10 archive is not at {ARCHIVE.resolve()}", file=sys.stderr)
        return 2
    print(
        f"{'workers':>7} {'jobs':>5} {'seconds':>8} {'jobs/hour':>10} {'dispatch':>9} {'wait p50':>9} "
        f"{'run p50':>8} {'epoch p50':>9} {'up in':>6} {'load':>5}",
        flush=True,
    )
    for count in args.workers:
        r = measure(count, args)
        print(
            f"{r['workers']:>7} {r['jobs']:>5} {r['seconds']:>7.1f}s {r['jobs_per_hour']:>10.0f} "
            f"{r['dispatch_median_ms']:>7.0f}ms "
            f"{r['wait_median_s']:>8.1f}s {r['run_median_s']:>7.1f}s {r['epoch_median_s']:>8.1f}s "
            f"{r['workers_up_s']:>5.0f}s {r['load']:>5.1f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
