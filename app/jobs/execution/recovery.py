"""Recovery: what dead workers and lost messages leave behind, repaired by anyone, often.

Nothing here holds a claim. Each repair is a conditional UPDATE on what the sweep saw
(status, claim counter, a stale heartbeat by the database's clock), so any number of
sweepers running at once, and a worker that wakes up meanwhile, can never both win.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import rowcount
from app.jobs.execution.common import (
    attempts_exhausted_message,
    db_now,
    stale,
    stale_before,
    transition,
)
from app.models import Job, ModelVersion, as_utc
from app.registry.versions import version_slot
from app.states import JobStatus, is_terminal

if TYPE_CHECKING:
    from app.registry.store import ArtifactStore

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    requeued: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    cancelled: list[uuid.UUID] = field(default_factory=list)
    resent: list[uuid.UUID] = field(default_factory=list)
    cleaned: list[str] = field(default_factory=list)  # jobs whose leftover files were removed
    orphans: list[str] = field(default_factory=list)  # "<name>/<version>" of unregistered models


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
        if transition(session, job_id, JobStatus.CANCELLED, *seen, finished_at=now):
            report.cancelled.append(job_id)
        session.commit()
    elif attempts >= settings.MAX_ATTEMPTS:
        message = attempts_exhausted_message(attempts, settings.MAX_ATTEMPTS)
        if transition(session, job_id, JobStatus.FAILED, *seen, finished_at=now, error=message):
            report.failed.append(job_id)
        session.commit()
    else:
        requeued = transition(
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


def sweep(
    session: Session,
    settings: Settings,
    enqueue: Callable[[uuid.UUID], None],
    store: ArtifactStore | None = None,
    *,
    orphans: bool = False,
) -> SweepReport:
    """Repair what dead workers and lost messages left behind; safe to run anywhere, often.

    - running with a stale heartbeat (by the database's clock): back to queued and sent
      again, or failed once the attempts are used up, or cancelled if a cancel was
      requested meanwhile;
    - queued and never sent (enqueued_at null) or sent more than QUEUED_RESEND_S ago and not
      picked up: sent again (the broker may have lost it; a duplicate is refused by claim);
    - with `store`: checkpoints and staged files of jobs that ended more than
      CLEANUP_GRACE_S ago are removed, whoever ended them; and with `orphans` too, the model
      files that no registry row names, published more than CLEANUP_GRACE_S ago.
    """
    report = SweepReport()
    now = db_now(session)
    before = stale_before(settings, now)
    stale_jobs = session.execute(
        select(Job.id, Job.claims, Job.attempts, Job.cancel_requested).where(
            Job.status == str(JobStatus.RUNNING), stale(before)
        )
    ).all()
    session.rollback()
    for job_id, claims, attempts, cancel in stale_jobs:
        seen = (
            Job.status == str(JobStatus.RUNNING),
            Job.claims == claims,
            stale(before),
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
            changed = transition(
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
        if orphans:
            remove_orphans(session, settings, store, report)
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


def remove_orphans(
    session: Session, settings: Settings, store: ArtifactStore, report: SweepReport
) -> None:
    """Remove the files of model versions no registry row names, older than CLEANUP_GRACE_S.

    They are what a crash between uploading a model and committing its registry row leaves
    (the row is the commit point, so no reader ever saw them). Each is removed while this
    sweep holds its (name, version) slot in the registry: a worker registering that version
    right now either commits first (then the files are its own and stay) or waits for the
    removal and then writes its files afresh.
    """
    found = store.published_versions()
    old = {slot for slot, age in found.items() if age > settings.CLEANUP_GRACE_S}
    if not old:
        return
    registered = set(
        session.execute(
            select(ModelVersion.name, ModelVersion.version).where(
                ModelVersion.name.in_({name for name, _ in old})
            )
        ).tuples()
    )
    session.rollback()
    for name, version in sorted(old - registered):
        with version_slot(session, name, version) as ours:
            if ours:
                store.discard_version(name, version)
                report.orphans.append(f"{name}/{version}")


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
