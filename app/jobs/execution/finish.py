"""Ending a claim: succeeded (with its registered version), failed, cancelled, or handed back.

Each end is one conditional UPDATE fenced by the claim, so a worker that lost the job
ends nothing; success also requires that no cancel was requested, so an accepted cancel
always wins.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy import case
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.jobs.execution.common import as_uuid, clip, db_now, owned, transition
from app.models import Evaluation, Job, ModelVersion
from app.registry.versions import register_version
from app.states import JobStatus

if TYPE_CHECKING:
    from app.ml.evaluation import EvaluationResult
    from app.registry.store import ArtifactStore, StoredArtifact

REGISTER_RETRIES = 5


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
    job_id = as_uuid(job_id)
    eval_values = evaluation if isinstance(evaluation, Mapping) else evaluation.to_dict()
    for _ in range(REGISTER_RETRIES):
        now = db_now(session)
        changed = transition(
            session,
            job_id,
            JobStatus.SUCCEEDED,
            *owned(token),
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
    changed = transition(
        session,
        as_uuid(job_id),
        JobStatus.FAILED,
        *owned(token),
        finished_at=now,
        heartbeat_at=now,
        error=clip(message),
    )
    session.commit()
    return changed


def finish_cancelled(
    session: Session, job_id: uuid.UUID | str, *, token: int, reason: str | None = None
) -> bool:
    """running -> cancelled, only under this claim; `reason` (a sweep's pruner) goes to
    job.error so the job says why it ended."""
    now = db_now(session)
    extra = {} if reason is None else {"error": clip(reason)}
    changed = transition(
        session, as_uuid(job_id), JobStatus.CANCELLED, *owned(token), finished_at=now, **extra
    )
    session.commit()
    return changed


class HandBack(StrEnum):
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
) -> HandBack:
    """running -> queued without using up an attempt: the worker stops, not the job.

    For a worker shutting down on purpose (SIGTERM from a deploy) and for infrastructure
    faults (`infra_message`), which are counted in infra_failures instead, up to
    MAX_INFRA_FAILURES: then the job fails with the message. enqueued_at is cleared, so
    the next sweep sends the job again; the checkpoint stays for the next claim.
    """
    job_id = as_uuid(job_id)
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.status != JobStatus.RUNNING or job.claims != token:
        session.rollback()
        return HandBack.LOST
    now = db_now(session)
    fence = (*owned(token), Job.infra_failures == job.infra_failures)
    if infra_message is not None and job.infra_failures + 1 >= settings.MAX_INFRA_FAILURES:
        message = (
            f"gave up after {job.infra_failures + 1} infrastructure faults "
            f"(limit {settings.MAX_INFRA_FAILURES}); the last one: {infra_message}"
        )
        changed = transition(
            session, job_id, JobStatus.FAILED, *fence, finished_at=now, error=clip(message)
        )
        session.commit()
        return HandBack.FAILED if changed else HandBack.LOST
    values: dict[str, Any] = {
        "worker": None,
        "enqueued_at": None,
        "attempts": case((Job.attempts > 0, Job.attempts - 1), else_=0),
    }
    if infra_message is not None:
        values.update(infra_failures=Job.infra_failures + 1, error=clip(infra_message))
    changed = transition(session, job_id, JobStatus.QUEUED, *fence, **values)
    session.commit()
    return HandBack.REQUEUED if changed else HandBack.LOST
