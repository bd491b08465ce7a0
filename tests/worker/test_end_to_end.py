"""The whole service through HTTP with real processes: uvicorn, Celery workers, `cnn serve`.

PostgreSQL + Redis (one API server for the module, workers started and SIGKILLed per test)
and the embedded default (SQLite + the filesystem broker under `cnn serve`). Jobs train
NET I on a 2,000-image subset of the real JPEG CIFAR-10 archive.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select

from app.config import Settings
from app.db import session_factory
from app.files import file_digest
from app.jobs.queue import worker_queues
from app.ml.params import MAX_GPUS
from app.models import EpochMetric, Job
from app.registry.store import LocalArtifactStore

from .conftest import (
    FAST_ROBUSTNESS,
    Api,
    Processes,
    api_stack,
    free_port,
    wait_api,
    wait_for,
)

pytestmark = pytest.mark.slow

REDIS_DB = 11
SMALL_JOB = {"net": "net1", "train_limit": 2000}
# Batches of 32 make an epoch of 1,600 images last long enough to be hit mid-way.
SLOW_JOB = {**SMALL_JOB, "batch_size": 32}


class Stack:
    """PostgreSQL + Redis settings, one API server, and direct database access for checks."""

    def __init__(self, settings: Settings, api: Api) -> None:
        self.settings = settings
        self.api = api
        self.sessions = session_factory(settings)

    def job_row(self, job_id: str) -> Job:
        with self.sessions() as session:
            job = session.get(Job, uuid.UUID(job_id))
            assert job is not None
            return job

    def epoch_rows(self, job_id: str) -> list[EpochMetric]:
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(EpochMetric)
                    .where(EpochMetric.job_id == uuid.UUID(job_id))
                    .order_by(EpochMetric.epoch)
                )
            )


def _forget_redis_messages(settings: Settings) -> None:
    """Drop our queues and the unacked copies SIGKILLed workers left in Redis."""
    queues = set(worker_queues(settings, MAX_GPUS))
    with redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB) as conn:
        conn.delete(*queues)
        for tag, raw in conn.hgetall("unacked").items():
            _message, _exchange, routing_key = json.loads(raw)
            if routing_key in queues:
                conn.hdel("unacked", tag)
                conn.zrem("unacked_index", tag)


@pytest.fixture(scope="module")
def stack(
    fresh_pg_database: Any,
    tmp_path_factory: pytest.TempPathFactory,
    cifar10_archive: Path,
    cifar10_cache: Path,
    cifar10: Any,
) -> Iterator[Stack]:
    redis_url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    with api_stack(
        fresh_pg_database(), redis_url, "e2e", tmp_path_factory, cifar10_cache, cifar10_archive
    ) as (settings, api):
        try:
            yield Stack(settings, api)
        finally:
            _forget_redis_messages(settings)


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# ------------------------------------------------------------------ PostgreSQL + Redis
def test_job_trains_through_http_on_a_celery_worker(stack: Stack, processes: Processes, cifar10):
    processes.worker(stack.settings)
    job = stack.api.submit(**SMALL_JOB, epochs=2)
    assert job["status"] == "queued" and job["enqueued_at"] is not None

    done = stack.api.wait_status(job["id"], "succeeded", timeout=300)
    assert done["progress"] == {"epoch": 2, "epochs": 2}
    assert done["attempts"] == 1
    assert done["device"] == "CPU"  # no GPU here; a GPU worker records "GPU:0 <name>"
    assert done["worker"].startswith("cnn-")
    assert done["parameters"]["precision"] in {"float32", "mixed_bfloat16"}  # `auto` resolved
    stack.api.check_finished_job(done, 2, cifar10)

    # The registered artifact is the .keras file the registry describes.
    store = LocalArtifactStore(stack.settings.artifact_dir)
    version = done["model_version"]
    path = store.model_path(version["name"], version["version"])
    detail = stack.api.http.get(f"/models/{version['name']}").json()
    assert path.is_file() and path.stat().st_size > 0
    assert file_digest(path)[0] in json.dumps(detail)
    assert not store.checkpoint_dir(job["id"]).exists()  # a finished job keeps no checkpoint


def test_worker_killed_mid_epoch_resumes_from_its_checkpoint(stack: Stack, processes: Processes):
    from app.ml.training import checkpoint_epoch

    job = stack.api.submit(**SLOW_JOB, epochs=3)
    job_id = job["id"]
    first = processes.worker(stack.settings)
    wait_for(lambda: stack.epoch_rows(job_id), 240, "epoch 1 to be stored", interval=0.02)
    first.kill()
    killed_at = datetime.now(UTC)

    # Killed during epoch 2: neither its row nor its checkpoint exists.
    assert [row.epoch for row in stack.epoch_rows(job_id)] == [1]
    store = LocalArtifactStore(stack.settings.artifact_dir)
    assert checkpoint_epoch(store.checkpoint_dir(job_id)) == 1
    first_worker = stack.job_row(job_id).worker

    processes.worker(stack.settings)
    done = stack.api.wait_status(job_id, "succeeded", timeout=180)
    rows = stack.epoch_rows(job_id)
    assert [row.epoch for row in rows] == [1, 2, 3]  # each once: no gap, no duplicate
    # Epoch 1 is the row written before the kill (resumed, not retrained); 2 and 3 came after.
    assert _utc(rows[0].created_at) < killed_at < _utc(rows[1].created_at)
    assert done["attempts"] == 2
    assert done["worker"] != first_worker
    assert stack.api.epochs(job_id) == [1, 2, 3]


def test_cancel_stops_a_running_fit_and_a_queued_job_never_runs(stack: Stack, processes: Processes):
    queued = stack.api.submit(**SMALL_JOB, epochs=2)
    response = stack.api.http.post(f"/jobs/{queued['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"

    # The worker now gets the cancelled job's message first, and must skip it.
    processes.worker(stack.settings)
    running = stack.api.submit(**SLOW_JOB, epochs=50)
    stack.api.wait_status(running["id"], "running", timeout=120)
    wait_for(lambda: stack.epoch_rows(running["id"]), 240, "epoch 1 to be stored")
    asked_at = time.monotonic()
    response = stack.api.http.post(f"/jobs/{running['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["cancel_requested"] is True

    done = stack.api.wait_status(running["id"], "cancelled", timeout=60)
    assert time.monotonic() - asked_at < 10  # within a batch or so, not at the end of the fit
    epochs = stack.api.epochs(running["id"])
    assert epochs == list(range(1, len(epochs) + 1)) and 1 <= len(epochs) < 50
    assert done["model_version"] is None and done["finished_at"] is not None
    assert (
        not LocalArtifactStore(stack.settings.artifact_dir).checkpoint_dir(running["id"]).exists()
    )

    never = stack.api.job(queued["id"])
    assert never["status"] == "cancelled"
    assert (never["attempts"], never["started_at"], never["worker"]) == (0, None, None)
    assert stack.api.epochs(queued["id"]) == []
    again = stack.api.http.post(f"/jobs/{running['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_terminal"


def test_job_that_keeps_killing_its_worker_fails_at_the_attempt_limit(
    stack: Stack, processes: Processes
):
    settings = stack.settings.model_copy(update={"MAX_ATTEMPTS": 2})
    job_id = stack.api.submit(**SLOW_JOB, epochs=3)["id"]
    for attempt in (1, 2):
        worker = processes.worker(settings)
        wait_for(
            lambda n=attempt: stack.job_row(job_id).attempts >= n,
            120,
            f"attempt {attempt} to claim the job",
            interval=0.05,
        )
        worker.kill()  # as an out-of-memory kill would, every time
    processes.worker(settings)
    failed = stack.api.wait_status(job_id, "failed", timeout=60)
    assert failed["attempts"] == 2
    assert "worker died 2 times (attempt limit 2)" in failed["error"]
    assert failed["finished_at"] is not None


# ------------------------------------------------------------------ the embedded default
def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def _worker_named(serve_pid: int, name: str) -> int | None:
    """The child of `cnn serve` started with WORKER_NAME=name (it also keeps a standby)."""
    for pid in _children(serve_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if f"WORKER_NAME={name}".encode() in environ:
            return pid
    return None


def _epoch_times(session: Any, job_id: str) -> list[datetime]:
    rows = session.scalars(
        select(EpochMetric)
        .where(EpochMetric.job_id == uuid.UUID(job_id))
        .order_by(EpochMetric.epoch)
    )
    return [row.created_at for row in rows]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_embedded_default_trains_restarts_its_worker_and_stops_on_ctrl_c(
    processes: Processes, tmp_path: Path, cifar10_archive: Path, cifar10_cache: Path, cifar10
):
    settings = Settings(
        _env_file=None,
        STATE_DIR=tmp_path / "state",
        CACHE_DIR=cifar10_cache,
        CIFAR10_SOURCE=str(cifar10_archive),
        **FAST_ROBUSTNESS,
    )
    assert settings.embedded_broker and not settings.DATABASE_URL
    port = free_port()
    command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    serve = processes.start("serve", command, settings)
    wait_api(serve, port, timeout=120)
    # The first start wrote an admin key for the README's curl lines to read.
    api = Api(port, settings.admin_key_file.read_text().strip())
    assert api.http.get("/health").json()["database_backend"] == "sqlite"

    job = api.submit(**SMALL_JOB, epochs=2)
    done = api.wait_status(job["id"], "succeeded", timeout=300)
    api.check_finished_job(done, 2, cifar10)

    # The worker dies mid-fit: `cnn serve` starts another and the job resumes.
    job_id = api.submit(**SLOW_JOB, epochs=3)["id"]
    wait_for(lambda: api.epochs(job_id), 240, "epoch 1 to be stored", interval=0.05)
    first_name = api.job(job_id)["worker"]
    worker_pid = _worker_named(serve.pid, first_name)
    assert worker_pid is not None
    os.kill(worker_pid, signal.SIGKILL)
    resumed = api.wait_status(job_id, "succeeded", timeout=180)
    assert api.epochs(job_id) == [1, 2, 3]
    assert resumed["attempts"] == 2 and resumed["worker"] != first_name
    new_worker_pid = _worker_named(serve.pid, resumed["worker"])
    assert new_worker_pid is not None and new_worker_pid != worker_pid

    # Ctrl-C during a fit: API and worker stop cleanly, the job goes back to the queue
    # without using up an attempt, and the next `cnn serve` finishes it from its checkpoint.
    job_id = api.submit(**SLOW_JOB, epochs=6)["id"]
    wait_for(lambda: api.epochs(job_id), 120, "epoch 1 to be stored", interval=0.05)
    api.close()
    assert serve.stop(signal.SIGINT, timeout=90) == 0
    assert _gone(new_worker_pid)
    with session_factory(settings)() as session:
        row = session.get(Job, uuid.UUID(job_id))
        assert (row.status, row.attempts, row.worker) == ("queued", 0, None)
        stopped_at = row.current_epoch
        before = _epoch_times(session, job_id)
    assert 1 <= stopped_at < 6 and len(before) == stopped_at

    serve = processes.start("serve-again", command, settings)
    wait_api(serve, port, timeout=120)
    api = Api(port, settings.admin_key_file.read_text().strip())
    finished = api.wait_status(job_id, "succeeded", timeout=180)
    assert api.epochs(job_id) == [1, 2, 3, 4, 5, 6]
    assert finished["attempts"] == 1
    with session_factory(settings)() as session:
        after = _epoch_times(session, job_id)
    assert after[:stopped_at] == before  # resumed: the epochs before the stop were not rerun
    api.close()
    assert serve.stop(signal.SIGTERM, timeout=90) == 0
