"""GET /workers against real worker processes: PostgreSQL, Redis, uvicorn, `cnn worker`.

A worker appears with its pid, device and the queues its Celery consumer reads; shows the
job it trains while it trains it and is idle after; a SIGTERM marks it stopped, a SIGKILL
leaves it to go lost once its beats stop (HEARTBEAT_TIMEOUT_S, 5 s in these tests).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from app.jobs.queue import worker_queues

from .conftest import Api, Processes, api_stack, wait_for

pytestmark = pytest.mark.slow

# Batches of 32 on 2,000 images: epochs long enough to see the job while it runs.
SLOW_JOB = {"net": "net1", "train_limit": 2000, "batch_size": 32}


@pytest.fixture(scope="module")
def stack(
    fresh_pg_database: Any,
    tmp_path_factory: pytest.TempPathFactory,
    cifar10_archive: Path,
    cifar10_cache: Path,
    cifar10: Any,
) -> Iterator[tuple[Settings, Api]]:
    with api_stack(
        fresh_pg_database(),
        "redis://127.0.0.1:6379/11",
        "workers",
        tmp_path_factory,
        cifar10_cache,
        cifar10_archive,
    ) as stack:
        yield stack


def workers(api: Api, include_lost: bool = False) -> dict[str, dict[str, Any]]:
    response = api.http.get("/workers", params={"include_lost": include_lost})
    assert response.status_code == 200, response.text
    return {w["name"]: w for w in response.json()["workers"]}


def by_pid(api: Api, pid: int, include_lost: bool = False) -> dict[str, Any] | None:
    return next((w for w in workers(api, include_lost).values() if w["pid"] == pid), None)


def test_a_worker_shows_its_queues_and_job_then_stops(stack, processes: Processes):
    settings, api = stack
    proc = processes.worker(settings)
    worker = wait_for(lambda: by_pid(api, proc.pid), 120, "the worker in GET /workers")
    assert worker["state"] == "live" and worker["current_job_id"] is None
    assert sorted(worker["queues"]) == sorted(worker_queues(settings, 0))  # a CPU worker
    assert (worker["device_kind"], worker["device"], worker["gpu_count"]) == ("cpu", "CPU", 0)
    assert worker["keras_backend"] in {"tensorflow", "jax"}
    assert worker["name"].startswith(f"cnn-{proc.pid}@")

    job = api.submit(**SLOW_JOB, epochs=3)
    api.wait_status(job["id"], "running", timeout=120)
    running = wait_for(
        lambda: (w := by_pid(api, proc.pid)) and w["current_job_id"] == job["id"] and w,
        30,
        "the worker to show its job",
    )
    assert running["name"] == api.job(job["id"])["worker"]

    api.wait_status(job["id"], "succeeded", timeout=300)
    wait_for(
        lambda: (w := by_pid(api, proc.pid)) and w["current_job_id"] is None,
        30,
        "the worker to be idle again",
    )

    # A clean shutdown: gone from the live list at once, listed as stopped with include_lost.
    assert proc.stop(signal.SIGTERM, timeout=60) == 0
    assert by_pid(api, proc.pid) is None
    stopped = by_pid(api, proc.pid, include_lost=True)
    assert stopped is not None and stopped["state"] == "stopped"
    assert stopped["stopped_at"] is not None and stopped["current_job_id"] is None


def test_a_killed_worker_goes_lost(stack, processes: Processes):
    settings, api = stack
    proc = processes.worker(settings)
    wait_for(lambda: by_pid(api, proc.pid), 120, "the worker in GET /workers")
    proc.kill()
    # No more beats: after HEARTBEAT_TIMEOUT_S it leaves the live list and reads as lost.
    wait_for(lambda: by_pid(api, proc.pid) is None, settings.HEARTBEAT_TIMEOUT_S + 15, "lost")
    lost = by_pid(api, proc.pid, include_lost=True)
    assert lost is not None and lost["state"] == "lost" and lost["stopped_at"] is None
