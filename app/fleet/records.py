"""The `workers` table: register, beat, stop, list, forget. Plain functions on a Session.

A worker's row is its own: only that process writes it (by its Celery node name), so none of
these writes race with another worker. The sweep deletes rows lost for WORKER_FORGET_S.
Every timestamp is the database's clock (db_now), as for the jobs' heartbeats, so hosts whose
clocks disagree still agree on who is lost.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import rowcount
from app.jobs.execution.common import db_now
from app.models import Worker, as_utc

WorkerState = Literal["live", "lost", "stopped"]


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker process says about itself when it registers."""

    name: str
    host: str
    pid: int
    device_kind: str
    device: str
    gpu_count: int
    keras_backend: str
    queues: list[str] = field(default_factory=list)


def register(session: Session, info: WorkerInfo) -> None:
    """Insert or replace this worker's row (a restarted worker may keep its WORKER_NAME)."""
    now = db_now(session)
    session.merge(
        Worker(
            name=info.name,
            host=info.host,
            pid=info.pid,
            device_kind=info.device_kind,
            device=info.device,
            gpu_count=info.gpu_count,
            queues=list(info.queues),
            keras_backend=info.keras_backend,
            current_job_id=None,
            started_at=now,
            last_heartbeat_at=now,
            stopped_at=None,
        )
    )
    session.commit()


def beat(
    session: Session, name: str, current_job: uuid.UUID | None, queues: list[str] | None = None
) -> bool:
    """Stamp the heartbeat and the current job; False when the row is gone (register again)."""
    values: dict[str, object] = {
        "last_heartbeat_at": db_now(session),
        "current_job_id": current_job,
        "stopped_at": None,
    }
    if queues is not None:
        values["queues"] = list(queues)
    result = session.execute(update(Worker).where(Worker.name == name).values(**values))
    session.commit()
    return rowcount(result) == 1


def mark_stopped(session: Session, name: str) -> None:
    """A clean shutdown: no current job, stopped now (listed only with include_lost)."""
    now = db_now(session)
    session.execute(
        update(Worker)
        .where(Worker.name == name)
        .values(current_job_id=None, stopped_at=now, last_heartbeat_at=now)
    )
    session.commit()


def state(worker: Worker, settings: Settings, now: datetime) -> WorkerState:
    """live, stopped (shut down cleanly) or lost (no beat for HEARTBEAT_TIMEOUT_S before `now`,
    the database's clock)."""
    if worker.stopped_at is not None:
        return "stopped"
    seen = as_utc(worker.last_heartbeat_at)
    assert seen is not None
    if now - seen > timedelta(seconds=settings.HEARTBEAT_TIMEOUT_S):
        return "lost"
    return "live"


def list_workers(
    session: Session, settings: Settings, *, include_lost: bool, limit: int
) -> tuple[list[Worker], int, datetime]:
    """Live workers (or every row still kept) by name, how many in all, and the database's
    time they were judged at (for `state`)."""
    now = db_now(session)
    query = select(Worker)
    if not include_lost:
        alive_since = now - timedelta(seconds=settings.HEARTBEAT_TIMEOUT_S)
        query = query.where(Worker.stopped_at.is_(None), Worker.last_heartbeat_at >= alive_since)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = list(session.scalars(query.order_by(Worker.name).limit(limit)))
    return rows, total, now


def forget_gone(session: Session, settings: Settings) -> list[str]:
    """Delete the rows of workers silent for WORKER_FORGET_S (lost or stopped long ago)."""
    before = db_now(session) - timedelta(seconds=settings.WORKER_FORGET_S)
    names = list(
        session.scalars(
            delete(Worker).where(Worker.last_heartbeat_at < before).returning(Worker.name)
        )
    )
    session.commit()
    return names
