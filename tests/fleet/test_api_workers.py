"""GET /workers on PostgreSQL: who is live, lost or stopped, the scopes, the bounds.

The rows are written with app/fleet/records.py, the functions a worker's Presence thread
calls; tests/worker/test_workers_e2e.py has a real worker process write them.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from app.fleet import records
from app.fleet.records import WorkerInfo
from app.models import Worker, utcnow


def info(name: str, **changes: object) -> WorkerInfo:
    values: dict[str, object] = {
        "name": name,
        "host": "box-1",
        "pid": 4242,
        "device_kind": "cpu",
        "device": "CPU",
        "gpu_count": 0,
        "keras_backend": "tensorflow",
        "queues": ["maintenance", "training"],
    }
    values.update(changes)
    return WorkerInfo(**values)  # type: ignore[arg-type]


def silent_for(session_factory, name: str, seconds: float) -> None:
    with session_factory() as session:
        session.execute(
            update(Worker)
            .where(Worker.name == name)
            .values(last_heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )
        session.commit()


@pytest.fixture
def fleet(clean_db, session_factory, settings):
    """Three workers: a live GPU worker running a job, one lost, one stopped cleanly."""
    job = uuid.uuid4()
    with session_factory() as session:
        records.register(
            session,
            info(
                "gpu-a@box-2",
                host="box-2",
                device_kind="gpu",
                device="GPU:0 NVIDIA H100",
                gpu_count=4,
                keras_backend="jax",
                queues=["train.gpu4", "train.any"],
            ),
        )
        assert records.beat(session, "gpu-a@box-2", job)
        records.register(session, info("cpu-lost@box-1"))
        records.register(session, info("cpu-stopped@box-1"))
        records.mark_stopped(session, "cpu-stopped@box-1")
    silent_for(session_factory, "cpu-lost@box-1", settings.HEARTBEAT_TIMEOUT_S + 5)
    return job


def test_lists_the_live_workers_with_their_device_queues_and_job(client, fleet):
    response = client.get("/workers")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["total"] == 1 and body["limit"] == 200
    (worker,) = body["workers"]
    assert worker["name"] == "gpu-a@box-2"
    assert (worker["host"], worker["device_kind"], worker["device"]) == (
        "box-2",
        "gpu",
        "GPU:0 NVIDIA H100",
    )
    assert worker["gpu_count"] == 4 and worker["keras_backend"] == "jax"
    assert worker["queues"] == ["train.gpu4", "train.any"]
    assert worker["current_job_id"] == str(fleet)
    assert worker["state"] == "live" and worker["stopped_at"] is None


def test_include_lost_shows_lost_and_stopped_workers(client, fleet):
    body = client.get("/workers", params={"include_lost": "true"}).json()
    states = {w["name"]: w["state"] for w in body["workers"]}
    assert states == {
        "cpu-lost@box-1": "lost",
        "cpu-stopped@box-1": "stopped",
        "gpu-a@box-2": "live",
    }
    assert [w["name"] for w in body["workers"]] == sorted(states)  # by name
    stopped = next(w for w in body["workers"] if w["state"] == "stopped")
    assert stopped["current_job_id"] is None and stopped["stopped_at"] is not None


def test_a_beat_brings_a_lost_worker_back_and_clears_its_job(client, fleet, session_factory):
    with session_factory() as session:
        assert records.beat(session, "cpu-lost@box-1", None)
        assert records.beat(session, "gpu-a@box-2", None)
    body = client.get("/workers").json()
    assert [w["name"] for w in body["workers"]] == ["cpu-lost@box-1", "gpu-a@box-2"]
    assert all(w["current_job_id"] is None for w in body["workers"])


def test_a_beat_for_a_forgotten_row_says_so(db_session):
    assert records.beat(db_session, "never-registered@nowhere", None) is False


def test_limit_bounds_the_page_but_not_the_total(client, clean_db, session_factory):
    with session_factory() as session:
        for i in range(5):
            records.register(session, info(f"w{i}@box"))
    body = client.get("/workers", params={"limit": 2}).json()
    assert [w["name"] for w in body["workers"]] == ["w0@box", "w1@box"]
    assert body["total"] == 5 and body["limit"] == 2


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "many"])
def test_limit_out_of_bounds_is_422(client, expect_error, limit):
    expect_error(client.get("/workers", params={"limit": limit}), 422, "validation_error")


def test_needs_a_key_with_the_read_scope(client, api_key, expect_error, fleet):
    expect_error(client.get("/workers", headers={"Authorization": ""}), 401, "unauthorized")
    train_only = api_key("train,predict")
    response = client.get("/workers", headers={"Authorization": f"Bearer {train_only}"})
    expect_error(response, 403, "forbidden")
    reader = api_key("read")
    response = client.get("/workers", headers={"Authorization": f"Bearer {reader}"})
    assert response.status_code == 200 and response.json()["total"] == 1


def test_the_sweep_forgets_workers_gone_for_long(clean_db, session_factory, settings):
    from app.jobs.sweeper import forget_workers_once

    with session_factory() as session:
        records.register(session, info("old@box"))
        records.register(session, info("recent-lost@box"))
        records.register(session, info("live@box"))
    silent_for(session_factory, "old@box", settings.WORKER_FORGET_S + 10)
    silent_for(session_factory, "recent-lost@box", settings.HEARTBEAT_TIMEOUT_S + 10)
    forget_workers_once(settings)
    with session_factory() as session:
        kept = sorted(session.scalars(select(Worker.name)))
    assert kept == ["live@box", "recent-lost@box"]


def test_registering_again_replaces_the_row(db_session):
    records.register(db_session, info("same@box", pid=1))
    records.beat(db_session, "same@box", uuid.uuid4())
    records.mark_stopped(db_session, "same@box")
    records.register(db_session, info("same@box", pid=2))
    row = db_session.get(Worker, "same@box")
    db_session.refresh(row)
    assert (row.pid, row.current_job_id, row.stopped_at) == (2, None, None)
