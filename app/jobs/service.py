"""Jobs as the API sees them: submit (idempotently), read, list, cancel, and their epochs.

A route calls one function here, which owns the transaction and its side effects: submit_job
commits the job, then hands it to the broker and records that it did. Status changes go
through app.states.check_transition, and every change that races a worker is one
conditional UPDATE, so a job the worker just claimed or finished is never overwritten with
a stale status.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import Select, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from app import auth
from app.auth import Principal
from app.config import Settings
from app.db import rowcount, serialize
from app.errors import EvaluationNotFound, IdempotencyConflict, JobNotFound, JobTooLarge
from app.jobs import queue
from app.ml.options import Option
from app.ml.params import OPTIONS
from app.models import EpochMetric, Evaluation, Job
from app.quotas import check_job_quota
from app.schemas import JobCreate
from app.states import InvalidTransition, JobStatus, check_transition


def job_identity(options: Sequence[Option]) -> tuple[str, ...]:
    """The fields a reused Idempotency-Key must repeat: the net, every option declared with
    identity=True (app/ml/params.py) and the registry name, which is a job field."""
    return ("net", *(o.name for o in options if o.identity), "model_name")


PARAMETER_FIELDS = job_identity(OPTIONS)
# A job row is re-read at most this often when a worker keeps changing it under a cancel.
_CANCEL_ATTEMPTS = 5
# A submission is tried again once when another caller took its new model name meanwhile.
_CREATE_ATTEMPTS = 2
# app.db.serialize's lock kind for job submissions (one lock per caller).
SUBMIT_LOCK = 18
# CIFAR-10's training images: a job without train_limit trains on all of them.
CIFAR10_TRAIN_IMAGES = 50_000


def _now() -> datetime:
    return datetime.now(UTC)


def _job_query() -> Select[tuple[Job]]:
    # JobPublic reads the evaluation and the produced version; load them with the job.
    return select(Job).options(selectinload(Job.evaluation), selectinload(Job.model_version))


def _by_key(session: Session, owner_id: int | None, key: str) -> Job | None:
    """The owner's job with this Idempotency-Key: keys are scoped to their caller, so another
    key's use of the same string is invisible."""
    return session.scalar(_job_query().where(Job.owner_id == owner_id, Job.idempotency_key == key))


def check_job_size(data: JobCreate, settings: Settings) -> None:
    """JobTooLarge past the settings' bounds (JOB_MAX_EPOCHS, JOB_MAX_BATCH_SIZE, and
    JOB_MAX_IMAGE_EPOCHS for epochs x training images), so one job cannot hold a worker
    for days or exhaust its memory."""
    images = min(data.train_limit or CIFAR10_TRAIN_IMAGES, CIFAR10_TRAIN_IMAGES)
    problems = []
    if data.epochs > settings.JOB_MAX_EPOCHS:
        problems.append(f"epochs must be at most {settings.JOB_MAX_EPOCHS} (JOB_MAX_EPOCHS)")
    if data.batch_size > settings.JOB_MAX_BATCH_SIZE:
        problems.append(
            f"batch_size must be at most {settings.JOB_MAX_BATCH_SIZE} (JOB_MAX_BATCH_SIZE)"
        )
    if data.epochs * images > settings.JOB_MAX_IMAGE_EPOCHS:
        problems.append(
            f"epochs x training images ({data.epochs} x {images:,}) must be at most "
            f"{settings.JOB_MAX_IMAGE_EPOCHS:,} (JOB_MAX_IMAGE_EPOCHS); lower epochs or set "
            "train_limit"
        )
    if problems:
        raise JobTooLarge("; ".join(problems))


def _check_same_request(job: Job, data: JobCreate) -> None:
    """A reused Idempotency-Key must carry the same request, else it is a client bug."""
    wanted = data.parameters()
    differing = [name for name in PARAMETER_FIELDS if getattr(job, name) != wanted[name]]
    if differing:
        raise IdempotencyConflict(
            "this Idempotency-Key was already used for a job with different parameters "
            f"({', '.join(differing)}); send a new key for a new job"
        )


def submit_job(
    session: Session,
    data: JobCreate,
    idempotency_key: str | None,
    *,
    principal: Principal,
    settings: Settings,
) -> tuple[Job, bool]:
    """Accept a job (POST /jobs): create it, send it to the broker, record the send.

    Returns the job as it now stands and whether this call created it. The job is a
    committed row before it is a message, so a broker that is down loses nothing: the job
    stays queued with enqueued_at null and the sweep sends it. A replayed Idempotency-Key
    (created=False) sends nothing again.
    """
    job, created = create_job(
        session, data, idempotency_key, principal=principal, settings=settings
    )
    if created and queue.enqueue_training(settings, job.id, job.gpus):
        mark_enqueued(session, job.id)
    return get_job(session, job.id), created


def create_job(
    session: Session,
    data: JobCreate,
    idempotency_key: str | None,
    *,
    principal: Principal,
    settings: Settings,
) -> tuple[Job, bool]:
    """Insert a queued job owned by `principal` and commit; returns (job, created).

    One transaction, serialised per caller across API processes (app.db.serialize): the
    caller's stored job for this idempotency key comes back as it is (created=False);
    otherwise the job must fit the size bounds (JobTooLarge) and the key's job quota
    (QuotaExceeded), and its model name must be free or the principal's (Forbidden) and
    within the key's names (TooManyModelNames). The name is claimed in the transaction that
    inserts the job, so a refused job claims nothing. With AUTH=off the principal is
    app.auth.AUTH_OFF: an admin without a key, which owns every name and has no quota.
    """
    attempt = 1
    while True:
        try:
            return _create_serialised(session, data, idempotency_key, principal, settings)
        except IntegrityError:
            # Another transaction committed first what this one inserts: the same new model
            # name (another caller's submission), or a job with this idempotency key written
            # outside a submission. Look again: the name is taken, or the job replays.
            session.rollback()
            if attempt >= _CREATE_ATTEMPTS:
                raise
            attempt += 1
        except BaseException:
            session.rollback()  # a refused job leaves nothing behind, its name claim included
            raise


def _create_serialised(
    session: Session,
    data: JobCreate,
    idempotency_key: str | None,
    principal: Principal,
    settings: Settings,
) -> tuple[Job, bool]:
    serialize(session, SUBMIT_LOCK, principal.id or 0)
    if idempotency_key is not None:
        existing = _by_key(session, principal.id, idempotency_key)
        if existing is not None:
            _check_same_request(existing, data)
            session.commit()  # ends the serialised transaction
            return existing, False
    check_job_size(data, settings)
    check_job_quota(session, principal, settings.MAX_ACTIVE_JOBS_PER_KEY)
    auth.claim_model_name(
        session, principal, data.model_name or data.net, settings.MAX_MODEL_NAMES_PER_KEY
    )
    job = Job(
        id=uuid.uuid4(),
        status=JobStatus.QUEUED,
        current_epoch=0,
        attempts=0,
        cancel_requested=False,
        created_at=_now(),
        idempotency_key=idempotency_key,
        owner_id=principal.id,
        **data.parameters(),
    )
    session.add(job)
    session.commit()
    return job, True


def mark_enqueued(session: Session, job_id: uuid.UUID) -> None:
    """Record that the broker accepted the job (the sweep re-sends jobs without this)."""
    session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=_now()))
    session.commit()


def get_job(session: Session, job_id: uuid.UUID) -> Job:
    """The job, or JobNotFound."""
    job = session.scalar(_job_query().where(Job.id == job_id))
    if job is None:
        raise JobNotFound(f"no job with id {job_id}")
    return job


def list_jobs(
    session: Session,
    *,
    status: JobStatus | None = None,
    net: str | None = None,
    owner_id: int | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Job], int]:
    """One page of jobs, newest first, and how many match the filters in all."""
    filters = []
    if owner_id is not None:
        filters.append(Job.owner_id == owner_id)
    if status is not None:
        filters.append(Job.status == status.value)
    if net is not None:
        filters.append(Job.net == net)
    total = session.scalar(select(func.count()).select_from(Job).where(*filters)) or 0
    rows = session.scalars(
        _job_query()
        .where(*filters)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(rows), total


def cancel_job(session: Session, job_id: uuid.UUID) -> Job:
    """Cancel a job and return it as it now stands.

    queued -> cancelled at once; running -> cancel_requested, and the worker stops the fit
    at the next batch and marks it cancelled; terminal -> InvalidTransition (job_terminal).
    """
    for _ in range(_CANCEL_ATTEMPTS):
        job = get_job(session, job_id)
        status = JobStatus(job.status)
        check_transition(status, JobStatus.CANCELLED)
        if status is JobStatus.QUEUED:
            statement = (
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
                .values(status=JobStatus.CANCELLED.value, cancel_requested=True, finished_at=_now())
            )
        else:
            statement = (
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
                .values(cancel_requested=True)
            )
        changed = rowcount(session.execute(statement))
        session.commit()
        if changed:
            session.expire_all()
            return get_job(session, job_id)
        # A worker changed the status between our read and our UPDATE: look again.
        session.expire_all()
    job = get_job(session, job_id)
    raise InvalidTransition(JobStatus(job.status), JobStatus.CANCELLED)


def list_epochs(session: Session, job_id: uuid.UUID) -> Sequence[EpochMetric]:
    """The finished epochs of a job, in order (they appear while the job still runs)."""
    return list(
        session.scalars(
            select(EpochMetric).where(EpochMetric.job_id == job_id).order_by(EpochMetric.epoch)
        )
    )


def get_evaluation(session: Session, job_id: uuid.UUID) -> Evaluation:
    """The job's test-set evaluation, or EvaluationNotFound until there is one."""
    evaluation = session.get(Evaluation, job_id)
    if evaluation is None:
        raise EvaluationNotFound(
            f"job {job_id} has no evaluation yet; it is written when training succeeds"
        )
    return evaluation
