"""A claimed job's progress: epochs, heartbeats, what the worker retries, whether to stop.

Every write here is fenced by the claim (`owned(token)`): a worker that lost the job
writes nothing and learns so from the False it gets back.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session

from app.db import rowcount
from app.jobs.execution.common import as_uuid, clip, db_now, limit_stalled_write, owned
from app.models import EpochMetric, Job
from app.states import JobStatus

if TYPE_CHECKING:
    from app.ml.training import EpochRecord


class StopReason(StrEnum):
    """Why a worker stops training a job before it ends on its own."""

    CANCEL = "cancel"  # a cancel was requested: finish the job cancelled
    LOST = "lost"  # the job is no longer ours: stop without touching it
    SHUTDOWN = "shutdown"  # the worker shuts down: hand the job back (the runner's own reason)


def _record_values(record: EpochRecord | Mapping[str, Any]) -> dict[str, Any]:
    data: Mapping[str, Any] = record if isinstance(record, Mapping) else record.to_dict()
    return {
        "epoch": int(data["epoch"]),
        "loss": float(data["loss"]),
        "accuracy": float(data["accuracy"]),
        "val_loss": None if data.get("val_loss") is None else float(data["val_loss"]),
        "val_accuracy": None if data.get("val_accuracy") is None else float(data["val_accuracy"]),
        "seconds": float(data["seconds"]),
        "images_per_second": (
            None if data.get("images_per_second") is None else float(data["images_per_second"])
        ),
        "learning_rate": (
            None if data.get("learning_rate") is None else float(data["learning_rate"])
        ),
        "val_ce_loss": None if data.get("val_ce_loss") is None else float(data["val_ce_loss"]),
    }


def _insert_ignoring_duplicates(session: Session, values: dict[str, Any]) -> None:
    """INSERT the epoch row unless (job_id, epoch) exists: a retried write is a no-op."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        session.execute(
            pg_insert(EpochMetric)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["job_id", "epoch"])
        )
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        session.execute(
            sqlite_insert(EpochMetric)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["job_id", "epoch"])
        )
    else:  # other databases: check first (the unique constraint still guards the race)
        exists = session.scalar(
            select(EpochMetric.id).where(
                EpochMetric.job_id == values["job_id"], EpochMetric.epoch == values["epoch"]
            )
        )
        if exists is None:
            session.add(EpochMetric(**values))


def record_epoch(
    session: Session,
    job_id: uuid.UUID | str,
    record: EpochRecord | Mapping[str, Any],
    *,
    token: int,
) -> bool:
    """Store one finished epoch and move the job's progress and heartbeat, in one transaction.

    `record` is an EpochRecord or a mapping with its fields. Returns False (and writes
    nothing) when the job is no longer running under this claim (`token`).
    """
    job_id = as_uuid(job_id)
    values = _record_values(record)
    limit_stalled_write(session)
    now = db_now(session)
    epoch = values["epoch"]
    moved = session.execute(
        update(Job)
        .where(Job.id == job_id, *owned(token))
        .values(
            current_epoch=case((Job.current_epoch < epoch, epoch), else_=Job.current_epoch),
            heartbeat_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if rowcount(moved) != 1:
        session.rollback()
        return False
    _insert_ignoring_duplicates(session, {"job_id": job_id, "created_at": now, **values})
    session.commit()
    return True


def _owned_update(session: Session, job_id: uuid.UUID | str, token: int, **values: Any) -> bool:
    """UPDATE a job this claim owns (heartbeat_at from the database's clock); commit."""
    limit_stalled_write(session)
    values.setdefault("heartbeat_at", db_now(session))
    result = session.execute(
        update(Job)
        .where(Job.id == as_uuid(job_id), *owned(token))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return rowcount(result) == 1


def heartbeat(session: Session, job_id: uuid.UUID | str, token: int) -> bool:
    """Say "still alive"; False when the job is no longer running under this claim."""
    return _owned_update(session, job_id, token)


def note_problem(session: Session, job_id: uuid.UUID | str, token: int, message: str) -> bool:
    """Show an operator what the worker is retrying (job.error while it still runs)."""
    return _owned_update(session, job_id, token, error=clip(message))


def mark_started(
    session: Session, job_id: uuid.UUID | str, token: int, *, device: str, precision: str
) -> bool:
    """Record where and how the job trains (shown by GET /jobs/{id} while it runs)."""
    return _owned_update(session, job_id, token, device=device, precision=precision)


def control(session: Session, job_id: uuid.UUID | str, token: int) -> StopReason | None:
    """What the training loop should do now: None (go on), CANCEL, or LOST.

    LOST means the job is no longer running under this claim (taken over after a long
    stall, or finished by someone else): stop without touching the job.
    """
    row = session.execute(
        select(Job.status, Job.claims, Job.cancel_requested).where(Job.id == as_uuid(job_id))
    ).one_or_none()
    session.rollback()
    if row is None or row.status != JobStatus.RUNNING or row.claims != token:
        return StopReason.LOST
    return StopReason.CANCEL if row.cancel_requested else None


def last_recorded_epoch(session: Session, job_id: uuid.UUID | str) -> int:
    epochs = session.scalars(
        select(EpochMetric.epoch).where(EpochMetric.job_id == as_uuid(job_id))
    ).all()
    session.rollback()
    return max(epochs, default=0)


def forget_epochs(session: Session, job_id: uuid.UUID | str, token: int) -> bool:
    """Drop a running job's epoch rows (before it restarts from scratch); fenced by the claim."""
    job_id = as_uuid(job_id)
    moved = session.execute(
        update(Job)
        .where(Job.id == job_id, *owned(token))
        .values(current_epoch=0, heartbeat_at=db_now(session))
        .execution_options(synchronize_session=False)
    )
    if rowcount(moved) != 1:
        session.rollback()
        return False
    for row in session.scalars(select(EpochMetric).where(EpochMetric.job_id == job_id)):
        session.delete(row)
    session.commit()
    return True
