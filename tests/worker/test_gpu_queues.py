"""Jobs land where they can run, and Celery's traps (issue 19), with real processes.

PostgreSQL, Redis, an API server through HTTP and real Celery worker processes. A job that
asks for 2 GPUs is never taken by a worker without GPUs (it waits, queued, on train.gpu2,
and the worker's sweep re-sends it there, not to train.any), while a gpus-0 job runs as it
always has. A worker owning two devices (the CPU split in two by XLA, on JAX) runs a
2-GPU job data-parallel to the end. With a Redis visibility timeout far shorter than the
job, Redis hands the message out again mid-fit; the claim in the database still lets the
job run exactly once.

These use their own Redis database (14): a visibility timeout of 2 s makes a worker restore
every unacknowledged message of its database older than 2 s, which must not reach the
queues of other test runs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select, update

from app.config import Settings
from app.db import session_factory
from app.jobs.queue import any_queue, gpu_queue
from app.models import EpochMetric, Job, JobEvent

from .conftest import Api, Processes, api_stack, wait_for

pytestmark = pytest.mark.slow

REDIS_DB = 14
SMALL_JOB = {"net": "net1", "train_limit": 2000, "epochs": 1}


def _redis() -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)


@pytest.fixture(scope="module")
def stack(
    fresh_pg_database: Any,
    tmp_path_factory: pytest.TempPathFactory,
    cifar10_archive: Path,
    cifar10_cache: Path,
    cifar10: Any,
) -> Iterator[tuple[Settings, Api]]:
    redis_url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    with api_stack(
        fresh_pg_database(), redis_url, "gpus", tmp_path_factory, cifar10_cache, cifar10_archive
    ) as (settings, api):
        try:
            yield settings, api
        finally:
            with _redis() as conn:
                conn.flushdb()


def _job(settings: Settings, job_id: str) -> Job:
    with session_factory(settings)() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        return job


def test_a_two_gpu_job_waits_while_a_cpu_worker_runs_the_any_device_job(
    stack: tuple[Settings, Api], processes: Processes
):
    settings, api = stack
    waiting = api.submit(**SMALL_JOB, gpus=2, batch_size=64)
    assert waiting["waiting_for"] == "a worker with at least 2 GPUs (WORKER_GPUS >= 2)"
    # As if that send had failed: the worker's sweep must send it again, to train.gpu2.
    with _redis() as conn:
        assert conn.llen(gpu_queue(settings, 2)) == 1
        conn.delete(gpu_queue(settings, 2))
    with session_factory(settings)() as session:
        session.execute(
            update(Job).where(Job.id == uuid.UUID(waiting["id"])).values(enqueued_at=None)
        )
        session.commit()
    plain = api.submit(**SMALL_JOB)

    cpu = processes.worker(settings.model_copy(update={"WORKER_GPUS": 0}))
    api.wait_status(plain["id"], "succeeded", timeout=300)
    with _redis() as conn:
        wait_for(lambda: conn.llen(gpu_queue(settings, 2)) == 1, 30, "the sweep's re-send")
        assert conn.llen(any_queue(settings)) == 0

    job = api.job(waiting["id"])
    assert job["status"] == "queued" and job["attempts"] == 0 and job["worker"] is None
    assert job["enqueued_at"] is not None  # sent again, by the sweep
    assert job["waiting_for"] == waiting["waiting_for"]
    assert _job(settings, waiting["id"]).claims == 0
    log = cpu.log_path.read_text()
    assert f"job {waiting['id']} claimed" not in log and f"job {waiting['id']} not run" not in log


def test_a_job_longer_than_the_visibility_timeout_runs_exactly_once(
    stack: tuple[Settings, Api], processes: Processes
):
    settings, api = stack
    short = settings.model_copy(update={"CELERY_VISIBILITY_TIMEOUT_S": 2, "WORKER_GPUS": 0})
    first = processes.worker(short)
    job = api.submit(**SMALL_JOB | {"epochs": 6, "batch_size": 32})
    api.wait_status(job["id"], "running", timeout=180)
    # A second worker scans for unacknowledged messages older than the visibility timeout
    # when it starts (later every 100 s, kombu's unacked_restore_interval x _throttle): it
    # puts the running job's message back on the queue and takes it.
    workers = [first, processes.worker(short)]
    done = api.wait_status(job["id"], "succeeded", timeout=400)

    refused = [w for w in workers if f"job {job['id']} not run by" in w.log_path.read_text()]
    assert refused, "Redis never redelivered the job: it ended within the visibility timeout"
    assert done["attempts"] == 1
    assert _job(settings, job["id"]).claims == 1
    with session_factory(settings)() as session:
        epochs = session.scalars(
            select(EpochMetric.epoch).where(EpochMetric.job_id == uuid.UUID(job["id"]))
        ).all()
        events = session.execute(
            select(JobEvent.kind, JobEvent.status, func.count())
            .where(JobEvent.job_id == uuid.UUID(job["id"]))
            .group_by(JobEvent.kind, JobEvent.status)
        ).all()
    assert sorted(epochs) == [1, 2, 3, 4, 5, 6]
    counts = {(kind, status): n for kind, status, n in events}
    assert counts[("epoch", None)] == 6 and counts[("status", "running")] == 1, counts


def test_a_two_gpu_job_trains_data_parallel_on_a_worker_with_two_devices(
    stack: tuple[Settings, Api], processes: Processes, monkeypatch: pytest.MonkeyPatch
):
    """The whole path on a worker owning two devices: the CPU split in two by XLA, on JAX."""
    settings, api = stack
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    processes.worker(settings.model_copy(update={"WORKER_GPUS": 2}))
    job = api.submit(**SMALL_JOB | {"epochs": 2, "gpus": 2, "batch_size": 64})
    done = api.wait_status(job["id"], "succeeded", timeout=400)
    assert done["device"] == "2 x CPU" and done["attempts"] == 1
    assert done["waiting_for"] is None and done["model_version"] is not None
    assert api.epochs(job["id"]) == [1, 2]
    assert done["evaluation"]["test_loss"] > 0
