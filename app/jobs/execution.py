"""The database side of running a job (worker side): claim, progress, finish, requeue, sweep.

Each function is one short transaction and every status change is a conditional UPDATE
(`... WHERE status = <expected> AND attempts = <seen>`), so two workers, two deliveries of
the same message or several sweepers running at once can never both win. The attempt
number a claim produced is the claimant's fencing token: progress and finish calls made
with it are ignored once somebody else has taken the job over (docs/jobs.md).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, and_, case, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import rowcount
from app.models import EpochMetric, Evaluation, Job, ModelVersion, as_utc, utcnow
from app.registry.versions import register_version
from app.states import ALLOWED, JobStatus, check_transition, is_terminal

if TYPE_CHECKING:
    from app.ml.evaluation import EvaluationResult
    from app.ml.training import EpochRecord
    from app.registry.store import ArtifactStore, StoredArtifact

log = logging.getLogger(__name__)

ERROR_MAX_CHARS = 2000
REGISTER_RETRIES = 5


class ClaimOutcome(StrEnum):
    """Why a claim did or did not hand the job to the caller."""

    CLAIMED = "claimed"  # queued -> running
    TAKEN_OVER = "taken_over"  # running with a stale heartbeat: the previous claimant died
    BUSY = "busy"  # running with a fresh heartbeat: a duplicate delivery, do nothing
    TERMINAL = "terminal"  # already finished (or cancelled before anyone took it)
    CANCELLED = "cancelled"  # cancel was requested while nobody ran it: now cancelled
    EXHAUSTED = "exhausted"  # the attempt limit is reached: now failed
    MISSING = "missing"  # no such job
    LOST_RACE = "lost_race"  # somebody else changed the row between our read and our UPDATE


@dataclass(frozen=True)
class ClaimResult:
    claimed: bool
    outcome: ClaimOutcome
    attempt: int = 0  # the fencing token for record_epoch/heartbeat/finish_* when claimed
    job: Job | None = None


@dataclass
class SweepReport:
    requeued: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    cancelled: list[uuid.UUID] = field(default_factory=list)
    resent: list[uuid.UUID] = field(default_factory=list)


# ----------------------------------------------------------------------------- helpers
def _as_uuid(job_id: uuid.UUID | str) -> uuid.UUID:
    return job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))


def _sources(target: JobStatus) -> list[str]:
    """Every status that may become `target`, straight from the state machine."""
    return [str(s) for s, allowed in ALLOWED.items() if target in allowed]


def _stale(before: datetime) -> ColumnElement[bool]:
    return or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < before)


def _transition(
    session: Session,
    job_id: uuid.UUID,
    target: JobStatus,
    *conditions: ColumnElement[bool],
    **values: Any,
) -> bool:
    """UPDATE jobs SET status=target ... WHERE status may become target AND conditions.

    Returns whether a row changed; the caller commits or rolls back.
    """
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(_sources(target)), *conditions)
        .values(status=str(target), **values)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1


def _fence(attempt: int | None) -> list[ColumnElement[bool]]:
    return [] if attempt is None else [Job.attempts == attempt]


def _clip(message: str) -> str:
    return message if len(message) <= ERROR_MAX_CHARS else message[: ERROR_MAX_CHARS - 3] + "..."


def attempts_exhausted_message(attempts: int, limit: int) -> str:
    return (
        f"worker died {attempts} times (attempt limit {limit}): the process running this job "
        "stopped without finishing on every attempt (killed, out of memory, machine lost); "
        "try a smaller batch_size or train_limit, or a worker with more memory"
    )


def _stale_before(settings: Settings, now: datetime) -> datetime:
    return now - timedelta(seconds=settings.HEARTBEAT_TIMEOUT_S)


# ----------------------------------------------------------------------------- claim
def claim(
    session: Session, job_id: uuid.UUID | str, worker: str, settings: Settings
) -> ClaimResult:
    """Take the job for `worker`, or say why not. Counts an attempt on every successful claim.

    A job that is running with a fresh heartbeat belongs to its claimant: a second delivery
    of the same message (Redis visibility timeout, a re-sent message) is refused. A running
    job whose heartbeat is stale lost its worker; the claim takes it over, which is a
    requeue and a claim (running -> queued -> running) done in one statement.
    """
    job_id = _as_uuid(job_id)
    now = utcnow()
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        session.rollback()
        return ClaimResult(False, ClaimOutcome.MISSING)
    status = JobStatus(job.status)
    if is_terminal(status):
        session.rollback()
        return ClaimResult(False, ClaimOutcome.TERMINAL, job=job)
    stale_before = _stale_before(settings, now)
    heartbeat = as_utc(job.heartbeat_at)
    if status is JobStatus.RUNNING and heartbeat is not None and heartbeat >= stale_before:
        session.rollback()
        return ClaimResult(False, ClaimOutcome.BUSY, job=job)

    seen = [Job.attempts == job.attempts, Job.status == str(status)]
    if status is JobStatus.RUNNING:
        seen.append(_stale(stale_before))

    if job.cancel_requested:
        # Nobody is running it (queued, or its worker is gone): cancel without starting.
        changed = _transition(session, job_id, JobStatus.CANCELLED, *seen, finished_at=now)
        return _claim_refused(session, job_id, changed, ClaimOutcome.CANCELLED)

    if job.attempts >= settings.MAX_ATTEMPTS:
        message = attempts_exhausted_message(job.attempts, settings.MAX_ATTEMPTS)
        changed = _transition(
            session, job_id, JobStatus.FAILED, *seen, finished_at=now, error=message
        )
        return _claim_refused(session, job_id, changed, ClaimOutcome.EXHAUSTED)

    if status is JobStatus.RUNNING:
        check_transition(JobStatus.RUNNING, JobStatus.QUEUED)
    check_transition(JobStatus.QUEUED, JobStatus.RUNNING)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, *seen)
        .values(
            status=str(JobStatus.RUNNING),
            attempts=job.attempts + 1,
            worker=worker,
            heartbeat_at=now,
            started_at=job.started_at or now,
            error=None,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return ClaimResult(False, ClaimOutcome.LOST_RACE, job=session.get(Job, job_id))
    session.commit()
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    outcome = ClaimOutcome.TAKEN_OVER if status is JobStatus.RUNNING else ClaimOutcome.CLAIMED
    return ClaimResult(True, outcome, attempt=job.attempts, job=job)


def _claim_refused(
    session: Session, job_id: uuid.UUID, changed: bool, outcome: ClaimOutcome
) -> ClaimResult:
    if changed:
        session.commit()
        return ClaimResult(False, outcome, job=session.get(Job, job_id, populate_existing=True))
    session.rollback()
    return ClaimResult(False, ClaimOutcome.LOST_RACE, job=session.get(Job, job_id))


# ----------------------------------------------------------------------------- progress
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
    attempt: int | None = None,
) -> bool:
    """Store one finished epoch and move the job's progress and heartbeat, in one transaction.

    `record` is an EpochRecord or a mapping with its fields. Returns False (and writes
    nothing) when the job is no longer running under this claim (`attempt`).
    """
    job_id = _as_uuid(job_id)
    values = _record_values(record)
    now = utcnow()
    epoch = values["epoch"]
    moved = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == str(JobStatus.RUNNING), *_fence(attempt))
        .values(
            current_epoch=case((Job.current_epoch < epoch, epoch), else_=Job.current_epoch),
            heartbeat_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if moved.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return False
    _insert_ignoring_duplicates(session, {"job_id": job_id, "created_at": now, **values})
    session.commit()
    return True


def heartbeat(session: Session, job_id: uuid.UUID | str, attempt: int | None = None) -> bool:
    """Say "still alive"; False when the job is no longer running under this claim."""
    result = session.execute(
        update(Job)
        .where(Job.id == _as_uuid(job_id), Job.status == str(JobStatus.RUNNING), *_fence(attempt))
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return rowcount(result) == 1


def control(session: Session, job_id: uuid.UUID | str, attempt: int) -> str | None:
    """What the training loop should do now: None (go on), "cancel", or "lost".

    "lost" means the job is no longer running under this claim (taken over after a long
    stall, or finished by someone else): stop without touching the job.
    """
    row = session.execute(
        select(Job.status, Job.attempts, Job.cancel_requested).where(Job.id == _as_uuid(job_id))
    ).one_or_none()
    session.rollback()
    if row is None or row.status != JobStatus.RUNNING or row.attempts != attempt:
        return "lost"
    return "cancel" if row.cancel_requested else None


def last_recorded_epoch(session: Session, job_id: uuid.UUID | str) -> int:
    epochs = session.scalars(
        select(EpochMetric.epoch).where(EpochMetric.job_id == _as_uuid(job_id))
    ).all()
    session.rollback()
    return max(epochs, default=0)


def forget_epochs(session: Session, job_id: uuid.UUID | str, attempt: int) -> bool:
    """Drop a running job's epoch rows (before it restarts from scratch); fenced by attempt."""
    job_id = _as_uuid(job_id)
    owned = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == str(JobStatus.RUNNING), Job.attempts == attempt)
        .values(current_epoch=0, heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if owned.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return False
    for row in session.scalars(select(EpochMetric).where(EpochMetric.job_id == job_id)):
        session.delete(row)
    session.commit()
    return True


def mark_started(
    session: Session, job_id: uuid.UUID | str, attempt: int, *, device: str, precision: str
) -> bool:
    """Record where and how the job trains (shown by GET /jobs/{id} while it runs)."""
    result = session.execute(
        update(Job)
        .where(
            Job.id == _as_uuid(job_id),
            Job.status == str(JobStatus.RUNNING),
            Job.attempts == attempt,
        )
        .values(device=device, precision=precision, heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return rowcount(result) == 1


# ----------------------------------------------------------------------------- finish
def finish_succeeded(
    session: Session,
    job_id: uuid.UUID | str,
    attempt: int,
    *,
    evaluation: EvaluationResult | Mapping[str, Any],
    staged: StoredArtifact,
    store: ArtifactStore,
    device: str,
    precision: str,
    metrics: Mapping[str, Any] | None = None,
) -> ModelVersion | None:
    """succeeded + evaluation row + next registered version + job.model_version_id, atomically.

    The version row is flushed (holding its (name, version) slot) before the model file is
    copied to models/<name>/<version>/, so a concurrent registration can never overwrite a
    file that a committed version points at. Returns None when the claim was lost.
    """
    job_id = _as_uuid(job_id)
    eval_values = evaluation if isinstance(evaluation, Mapping) else evaluation.to_dict()
    for _ in range(REGISTER_RETRIES):
        now = utcnow()
        changed = _transition(
            session,
            job_id,
            JobStatus.SUCCEEDED,
            Job.status == str(JobStatus.RUNNING),
            Job.attempts == attempt,
            finished_at=now,
            heartbeat_at=now,
            device=device,
            precision=precision,
            error=None,
        )
        if not changed:
            session.rollback()
            return None
        job = session.get(Job, job_id, populate_existing=True)
        assert job is not None
        try:
            session.add(Evaluation(job_id=job_id, created_at=now, **eval_values))
            version = register_version(
                session,
                name=job.model_name,
                net=job.net,
                job_id=job_id,
                artifact_path="",  # set below, once the version number holds its slot
                sha256=staged.sha256,
                size_bytes=staged.size_bytes,
                metrics=dict(metrics or {}),
            )
        except IntegrityError:
            # Another job registered the same name and version first: take the next one.
            session.rollback()
            continue
        published = store.publish_model(staged.path, job.model_name, version.version)
        if published.sha256 != staged.sha256:
            session.rollback()
            raise OSError(f"artifact copy of job {job_id} is corrupt (sha256 mismatch)")
        version.artifact_path = published.key  # relative to the store root
        job.model_version_id = version.id
        session.commit()
        return version
    raise RuntimeError(f"could not register a model version for job {job_id}")


def finish_failed(
    session: Session, job_id: uuid.UUID | str, message: str, *, attempt: int | None = None
) -> bool:
    now = utcnow()
    changed = _transition(
        session,
        _as_uuid(job_id),
        JobStatus.FAILED,
        *_fence(attempt),
        finished_at=now,
        heartbeat_at=now,
        error=_clip(message),
    )
    session.commit()
    return changed


def finish_cancelled(
    session: Session, job_id: uuid.UUID | str, *, attempt: int | None = None
) -> bool:
    now = utcnow()
    changed = _transition(
        session, _as_uuid(job_id), JobStatus.CANCELLED, *_fence(attempt), finished_at=now
    )
    session.commit()
    return changed


def requeue(
    session: Session,
    job_id: uuid.UUID | str,
    *,
    attempt: int | None = None,
    refund_attempt: bool = False,
) -> bool:
    """running -> queued with enqueued_at cleared, so the next sweep sends it again.

    `refund_attempt` is for a worker that is being shut down on purpose: stopping for a
    deploy is not a crash and must not count towards MAX_ATTEMPTS.
    """
    values: dict[str, Any] = {"worker": None, "enqueued_at": None}
    if refund_attempt:
        values["attempts"] = case((Job.attempts > 0, Job.attempts - 1), else_=0)
    changed = _transition(session, _as_uuid(job_id), JobStatus.QUEUED, *_fence(attempt), **values)
    session.commit()
    return changed


# ----------------------------------------------------------------------------- sweep
def sweep(
    session: Session, settings: Settings, enqueue: Callable[[uuid.UUID], None]
) -> SweepReport:
    """Repair what dead workers and lost messages left behind; safe to run anywhere, often.

    - running with a stale heartbeat: back to queued and sent again, or failed once the
      attempts are used up, or cancelled if a cancel was requested meanwhile;
    - queued and never sent (enqueued_at null) or sent more than QUEUED_RESEND_S ago and not
      picked up: sent again (the broker may have lost it; a duplicate is refused by claim).
    """
    report = SweepReport()
    now = utcnow()
    stale_before = _stale_before(settings, now)
    stale = session.execute(
        select(Job.id, Job.attempts, Job.cancel_requested).where(
            Job.status == str(JobStatus.RUNNING), _stale(stale_before)
        )
    ).all()
    session.rollback()
    for job_id, attempts, cancel in stale:
        seen = (
            Job.status == str(JobStatus.RUNNING),
            Job.attempts == attempts,
            _stale(stale_before),
        )
        if cancel:
            if _transition(session, job_id, JobStatus.CANCELLED, *seen, finished_at=now):
                report.cancelled.append(job_id)
            session.commit()
        elif attempts >= settings.MAX_ATTEMPTS:
            message = attempts_exhausted_message(attempts, settings.MAX_ATTEMPTS)
            if _transition(
                session, job_id, JobStatus.FAILED, *seen, finished_at=now, error=message
            ):
                report.failed.append(job_id)
            session.commit()
        else:
            requeued = _transition(
                session, job_id, JobStatus.QUEUED, *seen, worker=None, enqueued_at=now
            )
            session.commit()
            if requeued:
                report.requeued.append(job_id)
                _send(session, job_id, enqueue)

    resend_before = now - timedelta(seconds=settings.QUEUED_RESEND_S)
    not_sent = or_(Job.enqueued_at.is_(None), Job.enqueued_at < resend_before)
    lost = session.execute(
        select(Job.id, Job.cancel_requested).where(Job.status == str(JobStatus.QUEUED), not_sent)
    ).all()
    session.rollback()
    for job_id, cancel in lost:
        if cancel:
            changed = _transition(
                session,
                job_id,
                JobStatus.CANCELLED,
                Job.status == str(JobStatus.QUEUED),
                Job.cancel_requested.is_(True),
                finished_at=now,
            )
            session.commit()
            if changed:
                report.cancelled.append(job_id)
            continue
        # Take the right to send: only one of several concurrent sweepers gets rowcount 1.
        taken = session.execute(
            update(Job)
            .where(and_(Job.id == job_id, Job.status == str(JobStatus.QUEUED), not_sent))
            .values(enqueued_at=now)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            report.resent.append(job_id)
            _send(session, job_id, enqueue)
    return report


def _send(session: Session, job_id: uuid.UUID, enqueue: Callable[[uuid.UUID], None]) -> None:
    """Hand a job to the broker; if that fails, clear enqueued_at so the next sweep retries."""
    try:
        enqueue(job_id)
    except Exception:
        log.exception("could not send job %s to the broker; the next sweep retries", job_id)
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == str(JobStatus.QUEUED))
            .values(enqueued_at=None)
            .execution_options(synchronize_session=False)
        )
        session.commit()
