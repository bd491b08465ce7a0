"""The real stack for fault tests: PostgreSQL, a private Redis, an API process, real workers.

- PostgreSQL: a throw-away database on the shared server (``fresh_pg_database``); faults are
  injected only there (``pg_terminate_backend`` of that database's backends).
- Redis: a private ``redis-server`` on a free port, without persistence, that a test may
  kill and start again; the shared Redis is never touched.
- Data: a tiny CIFAR-10 in the official python format (random pixels, 500 training and 100
  test images) written once per module, so a worker loads it in milliseconds and a job
  (fit, evaluation, registration) takes a second or two. Faults do not depend on pixels.
- Workers: ``cnn worker`` processes started per test through the ``processes`` fixture
  (tests/worker/conftest.py), SIGKILLed at the end of the test.
"""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import redis
from sqlalchemy import select

from app.config import Settings
from app.db import session_factory
from app.migrate import upgrade
from app.models import EpochMetric, Job, ModelVersion
from tests.worker.conftest import (  # noqa: F401  (fixtures re-exported for this folder)
    Api,
    Proc,
    Processes,
    admin_key,
    free_port,
    processes,
    pytest_runtest_makereport,
    wait_api,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]

# Fast enough that a stalled worker is noticed within seconds on a busy 2-core machine.
FAULT_SETTINGS: dict[str, Any] = {
    "HEARTBEAT_INTERVAL_S": 0.5,
    "HEARTBEAT_TIMEOUT_S": 5.0,
    "SWEEP_INTERVAL_S": 1.0,
    "QUEUED_RESEND_S": 3.0,
    # An infrastructure fault is retried in place every second or so.
    "INFRA_BACKOFF_MAX_S": 1.0,
    # These tests are about brokers and workers, not the per-key quota (tests/api/test_security.py).
    "MAX_ACTIVE_JOBS_PER_KEY": 10_000,
}
TINY_JOB: dict[str, Any] = {"net": "net1", "epochs": 1, "batch_size": 32, "train_limit": 256}


def write_tiny_cifar10(folder: Path, train_per_batch: int = 100, test: int = 100) -> Path:
    """The official python layout (data_batch_1..5, test_batch) with random pixels."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else train_per_batch
        batch = {
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


class RedisServer:
    """A private redis-server on a free port that a test may kill and start again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.folder / f"redis-{uuid.uuid4().hex[:6]}.log").open("wb")
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def answers() -> bool:
            try:
                with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1) as conn:
                    return bool(conn.ping())
            except redis.RedisError:
                return False

        wait_for(answers, 20, "the private redis-server to answer")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def restart(self) -> None:
        """What a crash and restart without persistence does: every message is gone."""
        self.kill()
        self.start()


class FaultStack:
    """Settings, the API process (restartable), and direct database access for the checks."""

    def __init__(
        self, settings: Settings, redis_server: RedisServer, procs: Processes, db_name: str
    ) -> None:
        self.settings = settings
        self.redis = redis_server
        self.procs = procs
        self.db_name = db_name
        self.sessions = session_factory(settings)
        self.port = free_port()
        self.key = admin_key(settings)  # the API wants a key (docs/security.md)
        self.api_proc: Proc | None = None
        self.api: Api = self.start_api()

    def start_api(self) -> Api:
        self.api_proc = self.procs.api(self.settings, self.port)
        return Api(self.port, self.key)

    def restart_api(self) -> None:
        assert self.api_proc is not None
        self.api_proc.kill()
        self.api = self.start_api()

    # ------------------------------------------------------------ direct reads
    def job(self, job_id: str | uuid.UUID) -> Job:
        with self.sessions() as session:
            job = session.get(Job, uuid.UUID(str(job_id)))
            assert job is not None
            return job

    def epochs(self, job_id: str | uuid.UUID) -> list[int]:
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(EpochMetric.epoch)
                    .where(EpochMetric.job_id == uuid.UUID(str(job_id)))
                    .order_by(EpochMetric.epoch)
                )
            )

    def versions(self, job_id: str | uuid.UUID) -> list[ModelVersion]:
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(ModelVersion).where(ModelVersion.job_id == uuid.UUID(str(job_id)))
                )
            )

    def wait_terminal(self, job_id: str | uuid.UUID, timeout: float) -> Job:
        def done() -> Job | None:
            job = self.job(job_id)
            return job if job.status in {"succeeded", "failed", "cancelled"} else None

        return wait_for(done, timeout, f"job {job_id} to finish", interval=0.1)

    def assert_succeeded_once(self, job_id: str | uuid.UUID, epochs: int) -> Job:
        """succeeded, every epoch stored exactly once, exactly one registered version."""
        job = self.job(job_id)
        assert job.status == "succeeded", (job.status, job.error)
        assert self.epochs(job_id) == list(range(1, epochs + 1))
        versions = self.versions(job_id)
        assert len(versions) == 1 and job.model_version_id == versions[0].id
        return job

    def checkpoint_dir(self, job_id: str | uuid.UUID) -> Path:
        return self.settings.artifact_dir / "checkpoints" / str(job_id)

    def terminate_backends(self) -> int:
        """pg_terminate_backend on every backend of THIS test database except our own."""
        with psycopg.connect(
            host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.db_name,),
            ).fetchall()
        return len(rows)


@pytest.fixture(scope="module")
def tiny_cifar10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_cifar10(tmp_path_factory.mktemp("tiny-cifar10") / "cifar-10-batches-py")


@pytest.fixture(scope="module")
def fault_stack(
    fresh_pg_database: Callable[[], str],
    tmp_path_factory: pytest.TempPathFactory,
    tiny_cifar10: Path,
) -> Iterator[FaultStack]:
    url = fresh_pg_database()
    upgrade(url)
    folder = tmp_path_factory.mktemp("faults")
    redis_server = RedisServer(folder)
    settings = Settings(
        _env_file=None,
        DATABASE_URL=url,
        CELERY_BROKER_URL=redis_server.url,
        STATE_DIR=folder / "state",
        CIFAR10_SOURCE=str(tiny_cifar10),
        PRECISION="float32",
        **FAULT_SETTINGS,
    )
    procs = Processes(folder)
    try:
        stack = FaultStack(settings, redis_server, procs, url.rsplit("/", 1)[1])
        yield stack
        stack.api.close()
    finally:
        procs.cleanup()
        redis_server.kill()
        session_factory(settings).kw["bind"].dispose()


@pytest.fixture(scope="module")
def worker(fault_stack: FaultStack) -> Proc:
    """One `cnn worker` shared by the tests of the module (TensorFlow loads once)."""
    return fault_stack.procs.worker(fault_stack.settings)


def pid_of(worker_name: str | None) -> int:
    """The process id in a `cnn worker` name (cnn-<pid>@<host>)."""
    assert worker_name and worker_name.startswith("cnn-"), worker_name
    return int(worker_name.split("@", 1)[0].removeprefix("cnn-"))


def skewed_worker_command(skew_s: float) -> list[str]:
    """`cnn worker` in a process whose wall clock runs `skew_s` seconds ahead (or behind)."""
    return [sys.executable, str(ROOT / "tests" / "faults" / "skewed.py"), str(skew_s), "worker"]


def sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))
