"""The database side of running a job (worker side): claim, progress, finish, requeue, sweep.

Each function is one short transaction and every status change is a conditional UPDATE
(`... WHERE status = <expected> AND claims = <seen>`), so two workers, two deliveries of
the same message or several sweepers running at once can never both win. The claim
counter a claim produced is the claimant's fencing token: it only grows, so progress and
finish calls made with an old token are refused once somebody else has taken the job over.
Times that decide liveness (heartbeat_at, staleness) come from the database's clock, never
from the host's (docs/reliability.md).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import rowcount
from app.models import EpochMetric, Evaluation, Job, ModelVersion, as_utc
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
    token: int = 0  # the fencing token (jobs.claims) for record_epoch/heartbeat/finish_*
    job: Job | None = None


@dataclass
class SweepReport:
    requeued: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    cancelled: list[uuid.UUID] = field(default_factory=list)
    resent: list[uuid.UUID] = field(default_factory=list)
    cleaned: list[str] = field(default_factory=list)  # jobs whose leftover files were removed


# ----------------------------------------------------------------------------- helpers
def _as_uuid(job_id: uuid.UUID | str) -> uuid.UUID:
    return job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))


def _sources(target: JobStatus) -> list[str]:
    """Every status that may become `target`, straight from the state machine."""
    return [str(s) for s, allowed in ALLOWED.items() if target in allowed]


def db_now(session: Session) -> datetime:
    """The database's clock (UTC): the one clock every worker, sweeper and API agrees on.

    PostgreSQL's now() is the start of the current transaction, which this call begins
    (or joins), so the value is current for the statements that follow it. SQLite is a
    file on the one host that uses it, so its clock is that host's.
    """
    dialect = session.get_bind().dialect.name
    value: datetime | None
    if dialect == "sqlite":
        text = session.scalar(select(func.strftime("%Y-%m-%d %H:%M:%f", "now")))
        value = datetime.fromisoformat(str(text))
    else:
        value = session.scalar(select(func.now()))
    result = as_utc(value)
    assert result is not None
    return result


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


def _owned(token: int) -> list[ColumnElement[bool]]:
    """The fence of every worker write: the job is running and still under this claim."""
    return [Job.status == str(JobStatus.RUNNING), Job.claims == token]


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
    """Take the job for `worker`, or say why not. Counts an attempt and a claim when taken.

    A job that is running with a fresh heartbeat belongs to its claimant: a second delivery
    of the same message (Redis visibility timeout, a re-sent message) is refused. A running
    job whose heartbeat is stale lost its worker; the claim takes it over, which is a
    requeue and a claim (running -> queued -> running) done in one statement.
    """
    job_id = _as_uuid(job_id)
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        session.rollback()
        return ClaimResult(False, ClaimOutcome.MISSING)
    now = db_now(session)
    status = JobStatus(job.status)
    if is_terminal(status):
        session.rollback()
        return ClaimResult(False, ClaimOutcome.TERMINAL, job=job)
    stale_before = _stale_before(settings, now)
    heartbeat = as_utc(job.heartbeat_at)
    if status is JobStatus.RUNNING and heartbeat is not None and heartbeat >= stale_before:
        session.rollback()
        return ClaimResult(False, ClaimOutcome.BUSY, job=job)

    seen = [Job.claims == job.claims, Job.status == str(status)]
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
            claims=job.claims + 1,
            worker=worker,
            heartbeat_at=now,
            started_at=job.started_at or now,
            error=None,
        )
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) != 1:
        session.rollback()
        return ClaimResult(False, ClaimOutcome.LOST_RACE, job=session.get(Job, job_id))
    session.commit()
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    outcome = ClaimOutcome.TAKEN_OVER if status is JobStatus.RUNNING else ClaimOutcome.CLAIMED
    return ClaimResult(True, outcome, token=job.claims, job=job)


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
        "learning_rate": (
            None if data.get("learning_rate") is None else float(data["learning_rate"])
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
    token: int,
) -> bool:
    """Store one finished epoch and move the job's progress and heartbeat, in one transaction.

    `record` is an EpochRecord or a mapping with its fields. Returns False (and writes
    nothing) when the job is no longer running under this claim (`token`).
    """
    job_id = _as_uuid(job_id)
    values = _record_values(record)
    _limit_stalled_write(session)
    now = db_now(session)
    epoch = values["epoch"]
    moved = session.execute(
        update(Job)
        .where(Job.id == job_id, *_owned(token))
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


# A worker frozen inside one of its write transactions (SIGSTOP, a paused VM, a long GC pause)
# would hold the job's row lock, and the sweep and the API's cancel would wait on it until it
# thawed. PostgreSQL ends such a session after this long (SET LOCAL: this transaction only).
STALLED_WRITE_LIMIT_S = 10


def _limit_stalled_write(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text(f"SET LOCAL idle_in_transaction_session_timeout = '{STALLED_WRITE_LIMIT_S}s'")
        )


def _owned_update(session: Session, job_id: uuid.UUID | str, token: int, **values: Any) -> bool:
    """UPDATE a job this claim owns (heartbeat_at from the database's clock); commit."""
    _limit_stalled_write(session)
    values.setdefault("heartbeat_at", db_now(session))
    result = session.execute(
        update(Job)
        .where(Job.id == _as_uuid(job_id), *_owned(token))
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
    return _owned_update(session, job_id, token, error=_clip(message))


def control(session: Session, job_id: uuid.UUID | str, token: int) -> str | None:
    """What the training loop should do now: None (go on), "cancel", or "lost".

    "lost" means the job is no longer running under this claim (taken over after a long
    stall, or finished by someone else): stop without touching the job.
    """
    row = session.execute(
        select(Job.status, Job.claims, Job.cancel_requested).where(Job.id == _as_uuid(job_id))
    ).one_or_none()
    session.rollback()
    if row is None or row.status != JobStatus.RUNNING or row.claims != token:
        return "lost"
    return "cancel" if row.cancel_requested else None


def last_recorded_epoch(session: Session, job_id: uuid.UUID | str) -> int:
    epochs = session.scalars(
        select(EpochMetric.epoch).where(EpochMetric.job_id == _as_uuid(job_id))
    ).all()
    session.rollback()
    return max(epochs, default=0)


def forget_epochs(session: Session, job_id: uuid.UUID | str, token: int) -> bool:
    """Drop a running job's epoch rows (before it restarts from scratch); fenced by the claim."""
    job_id = _as_uuid(job_id)
    owned = session.execute(
        update(Job)
        .where(Job.id == job_id, *_owned(token))
        .values(current_epoch=0, heartbeat_at=db_now(session))
        .execution_options(synchronize_session=False)
    )
    if rowcount(owned) != 1:
        session.rollback()
        return False
    for row in session.scalars(select(EpochMetric).where(EpochMetric.job_id == job_id)):
        session.delete(row)
    session.commit()
    return True


def mark_started(
    session: Session, job_id: uuid.UUID | str, token: int, *, device: str, precision: str
) -> bool:
    """Record where and how the job trains (shown by GET /jobs/{id} while it runs)."""
    return _owned_update(session, job_id, token, device=device, precision=precision)


# ----------------------------------------------------------------------------- finish
def finish_succeeded(
    session: Session,
    job_id: uuid.UUID | str,
    token: int,
    *,
    evaluation: EvaluationResult | Mapping[str, Any],
    staged: StoredArtifact,
    store: ArtifactStore,
    device: str,
    precision: str,
    metrics: Mapping[str, Any] | None = None,
) -> ModelVersion | None:
    """succeeded + evaluation row + next registered version + job.model_version_id, atomically.

    The statement that records success also checks that no cancel was requested, so a
    cancel the API accepted (200) always wins; the caller then finishes the job cancelled.
    The version row is flushed (holding its (name, version) slot) before the model file is
    copied to models/<name>/<version>/, so a concurrent registration can never overwrite a
    file that a committed version points at. Returns None when the claim was lost or a
    cancel was requested (`control` says which).
    """
    job_id = _as_uuid(job_id)
    eval_values = evaluation if isinstance(evaluation, Mapping) else evaluation.to_dict()
    for _ in range(REGISTER_RETRIES):
        now = db_now(session)
        changed = _transition(
            session,
            job_id,
            JobStatus.SUCCEEDED,
            *_owned(token),
            Job.cancel_requested.is_(False),
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
        try:
            published = store.publish_model(staged.path, job.model_name, version.version)
        except BaseException:
            session.rollback()  # nothing is committed: the job is still running, ours
            raise
        if published.sha256 != staged.sha256:
            session.rollback()
            raise OSError(f"artifact copy of job {job_id} is corrupt (sha256 mismatch)")
        version.artifact_path = published.key  # relative to the store root
        job.model_version_id = version.id
        session.commit()
        return version
    raise RuntimeError(f"could not register a model version for job {job_id}")


def finish_failed(session: Session, job_id: uuid.UUID | str, message: str, *, token: int) -> bool:
    """running -> failed, only under this claim (a superseded worker fails nothing)."""
    now = db_now(session)
    changed = _transition(
        session,
        _as_uuid(job_id),
        JobStatus.FAILED,
        *_owned(token),
        finished_at=now,
        heartbeat_at=now,
        error=_clip(message),
    )
    session.commit()
    return changed


def finish_cancelled(session: Session, job_id: uuid.UUID | str, *, token: int) -> bool:
    """running -> cancelled, only under this claim."""
    now = db_now(session)
    changed = _transition(
        session, _as_uuid(job_id), JobStatus.CANCELLED, *_owned(token), finished_at=now
    )
    session.commit()
    return changed


class HandBack:
    """What hand_back did."""

    REQUEUED = "requeued"
    FAILED = "failed"  # an infrastructure fault hit its limit
    LOST = "lost"  # not ours any more


def hand_back(
    session: Session,
    job_id: uuid.UUID | str,
    *,
    token: int,
    settings: Settings,
    infra_message: str | None = None,
) -> str:
    """running -> queued without using up an attempt: the worker stops, not the job.

    For a worker shutting down on purpose (SIGTERM from a deploy) and for infrastructure
    faults (`infra_message`), which are counted in infra_failures instead, up to
    MAX_INFRA_FAILURES: then the job fails with the message. enqueued_at is cleared, so
    the next sweep sends the job again; the checkpoint stays for the next claim.
    """
    job_id = _as_uuid(job_id)
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.status != JobStatus.RUNNING or job.claims != token:
        session.rollback()
        return HandBack.LOST
    now = db_now(session)
    fence = (*_owned(token), Job.infra_failures == job.infra_failures)
    if infra_message is not None and job.infra_failures + 1 >= settings.MAX_INFRA_FAILURES:
        message = (
            f"gave up after {job.infra_failures + 1} infrastructure faults "
            f"(limit {settings.MAX_INFRA_FAILURES}); the last one: {infra_message}"
        )
        changed = _transition(
            session, job_id, JobStatus.FAILED, *fence, finished_at=now, error=_clip(message)
        )
        session.commit()
        return HandBack.FAILED if changed else HandBack.LOST
    values: dict[str, Any] = {
        "worker": None,
        "enqueued_at": None,
        "attempts": case((Job.attempts > 0, Job.attempts - 1), else_=0),
    }
    if infra_message is not None:
        values.update(infra_failures=Job.infra_failures + 1, error=_clip(infra_message))
    changed = _transition(session, job_id, JobStatus.QUEUED, *fence, **values)
    session.commit()
    return HandBack.REQUEUED if changed else HandBack.LOST


# ----------------------------------------------------------------------------- recovery
def _recover(
    session: Session,
    settings: Settings,
    job_id: uuid.UUID,
    attempts: int,
    cancel: bool,
    seen: tuple[ColumnElement[bool], ...],
    now: datetime,
    enqueue: Callable[[uuid.UUID], None],
    report: SweepReport,
) -> None:
    """A running job whose worker is gone: cancelled, failed at the limit, or queued and sent."""
    if cancel:
        if _transition(session, job_id, JobStatus.CANCELLED, *seen, finished_at=now):
            report.cancelled.append(job_id)
        session.commit()
    elif attempts >= settings.MAX_ATTEMPTS:
        message = attempts_exhausted_message(attempts, settings.MAX_ATTEMPTS)
        if _transition(session, job_id, JobStatus.FAILED, *seen, finished_at=now, error=message):
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


def release_worker(
    session: Session, settings: Settings, worker: str, enqueue: Callable[[uuid.UUID], None]
) -> SweepReport:
    """Hand back at once the running jobs of a worker process known to be dead.

    For a supervisor that saw its child exit (`cnn serve`): no need to wait for the
    heartbeat to go stale. Fenced by worker name and claim; the dead worker's claim counts
    as a used attempt, as any crash does.
    """
    report = SweepReport()
    rows = session.execute(
        select(Job.id, Job.claims, Job.attempts, Job.cancel_requested).where(
            Job.status == str(JobStatus.RUNNING), Job.worker == worker
        )
    ).all()
    now = db_now(session)
    session.rollback()
    for job_id, claims, attempts, cancel in rows:
        seen = (Job.status == str(JobStatus.RUNNING), Job.claims == claims, Job.worker == worker)
        _recover(session, settings, job_id, attempts, cancel, seen, now, enqueue, report)
    return report


# ----------------------------------------------------------------------------- sweep
def sweep(
    session: Session,
    settings: Settings,
    enqueue: Callable[[uuid.UUID], None],
    store: ArtifactStore | None = None,
) -> SweepReport:
    """Repair what dead workers and lost messages left behind; safe to run anywhere, often.

    - running with a stale heartbeat (by the database's clock): back to queued and sent
      again, or failed once the attempts are used up, or cancelled if a cancel was
      requested meanwhile;
    - queued and never sent (enqueued_at null) or sent more than QUEUED_RESEND_S ago and not
      picked up: sent again (the broker may have lost it; a duplicate is refused by claim);
    - with `store`: checkpoints and staged files of jobs that ended more than
      CLEANUP_GRACE_S ago are removed, whoever ended them.
    """
    report = SweepReport()
    now = db_now(session)
    stale_before = _stale_before(settings, now)
    stale = session.execute(
        select(Job.id, Job.claims, Job.attempts, Job.cancel_requested).where(
            Job.status == str(JobStatus.RUNNING), _stale(stale_before)
        )
    ).all()
    session.rollback()
    for job_id, claims, attempts, cancel in stale:
        seen = (
            Job.status == str(JobStatus.RUNNING),
            Job.claims == claims,
            _stale(stale_before),
        )
        _recover(session, settings, job_id, attempts, cancel, seen, now, enqueue, report)

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
        if rowcount(taken) == 1:
            report.resent.append(job_id)
            _send(session, job_id, enqueue)

    if store is not None:
        clean_up_files(session, settings, store, now, report)
    return report


def clean_up_files(
    session: Session, settings: Settings, store: ArtifactStore, now: datetime, report: SweepReport
) -> None:
    """Remove checkpoints/staged files of jobs terminal for CLEANUP_GRACE_S (or deleted)."""
    folders = store.job_folders()
    if not folders:
        return
    ids: dict[uuid.UUID, str] = {}
    for name in folders:
        try:
            ids[uuid.UUID(name)] = name
        except ValueError:
            continue
    rows = session.execute(
        select(Job.id, Job.status, Job.finished_at).where(Job.id.in_(list(ids)))
    ).all()
    session.rollback()
    known = {row.id: row for row in rows}
    ended_before = now - timedelta(seconds=settings.CLEANUP_GRACE_S)
    for job_id, name in ids.items():
        row = known.get(job_id)
        if row is None:
            gone = store.folder_age_s(name) > settings.CLEANUP_GRACE_S  # its job was deleted
        else:
            finished = as_utc(row.finished_at)
            gone = is_terminal(row.status) and (finished is None or finished <= ended_before)
        if gone:
            store.discard_job_files(name)
            report.cleaned.append(name)


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
