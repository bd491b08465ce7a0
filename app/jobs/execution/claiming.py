"""Claiming a job: the one conditional UPDATE that makes a worker its only runner."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import rowcount
from app.jobs.execution.common import (
    as_uuid,
    attempts_exhausted_message,
    db_now,
    stale,
    stale_before,
    transition,
)
from app.models import Job, as_utc
from app.states import JobStatus, check_transition, is_terminal


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


def claim(
    session: Session, job_id: uuid.UUID | str, worker: str, settings: Settings
) -> ClaimResult:
    """Take the job for `worker`, or say why not. Counts an attempt and a claim when taken.

    A job that is running with a fresh heartbeat belongs to its claimant: a second delivery
    of the same message (Redis visibility timeout, a re-sent message) is refused. A running
    job whose heartbeat is stale lost its worker; the claim takes it over, which is a
    requeue and a claim (running -> queued -> running) done in one statement.
    """
    job_id = as_uuid(job_id)
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        session.rollback()
        return ClaimResult(False, ClaimOutcome.MISSING)
    now = db_now(session)
    status = JobStatus(job.status)
    if is_terminal(status):
        session.rollback()
        return ClaimResult(False, ClaimOutcome.TERMINAL, job=job)
    before = stale_before(settings, now)
    heartbeat = as_utc(job.heartbeat_at)
    if status is JobStatus.RUNNING and heartbeat is not None and heartbeat >= before:
        session.rollback()
        return ClaimResult(False, ClaimOutcome.BUSY, job=job)

    seen = [Job.claims == job.claims, Job.status == str(status)]
    if status is JobStatus.RUNNING:
        seen.append(stale(before))

    if job.cancel_requested:
        # Nobody is running it (queued, or its worker is gone): cancel without starting.
        changed = transition(session, job_id, JobStatus.CANCELLED, *seen, finished_at=now)
        return _claim_refused(session, job_id, changed, ClaimOutcome.CANCELLED)

    if job.attempts >= settings.MAX_ATTEMPTS:
        message = attempts_exhausted_message(job.attempts, settings.MAX_ATTEMPTS)
        changed = transition(
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
