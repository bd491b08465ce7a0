"""Training jobs: submit, list, inspect, follow the curves, read the evaluation, cancel."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from sqlalchemy.orm import Session

from app import auth
from app.api.deps import JobReader, JsonBody, SessionDep, SettingsDep, TrainAccess, TrainPrincipal
from app.auth import Principal
from app.errors import HistoryNotFound
from app.jobs import service as job_service
from app.ml.analysis import analyse
from app.schemas import (
    INT32_MAX,
    AnalysisPublic,
    EpochPublic,
    EvaluationPublic,
    HistoryCurves,
    HistoryPublic,
    JobCreate,
    JobList,
    JobPublic,
)
from app.states import JobStatus, is_terminal

router = APIRouter(prefix="/jobs", tags=["jobs"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    403: {"description": "A `train` key asking for another key's job (`forbidden`)."},
    404: {"description": "No job with this id."},
}

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Retrying a POST with the same key returns the first job, not a new one. "
        "Each API key has its own namespace of idempotency keys.",
    ),
]


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    dependencies=[TrainAccess, JsonBody],
    responses={
        202: {"description": "Accepted; the Location header is the job's URL."},
        403: {"description": "The model name belongs to another key (`forbidden`)."},
        409: {
            "description": "This key used the Idempotency-Key for another job "
            "(`idempotency_key_reused`); keys are scoped to the caller."
        },
        415: {"description": "The body is not JSON."},
        422: {
            "description": "A parameter is out of range or unknown, the job is too large, or "
            "the key owns MAX_MODEL_NAMES_PER_KEY names (`too_many_model_names`)."
        },
        429: {
            "description": "This key has MAX_ACTIVE_JOBS_PER_KEY jobs queued or running "
            "(`quota_exceeded`, with Retry-After)."
        },
    },
)
def submit_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    principal: TrainPrincipal,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    job, created = job_service.submit_job(
        session, body, idempotency_key, principal=principal, settings=settings
    )
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/jobs/{job.id}"
    return JobPublic.model_validate(job)


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    principal: JobReader,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
    net: Annotated[str | None, Query(max_length=64, description="Only jobs of this net.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=INT32_MAX)] = 0,
) -> JobList:
    """Every job for `read` keys; a `train` key without `read` sees its own."""
    owner = None if principal.allows("read") else principal.id
    rows, total = job_service.list_jobs(
        session, status=status, net=net, owner_id=owner, limit=limit, offset=offset
    )
    return JobList(
        jobs=[JobPublic.model_validate(job) for job in rows],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get("/{job_id}", response_model=JobPublic, responses=NOT_FOUND)
def get_job(job_id: uuid.UUID, session: SessionDep, principal: JobReader) -> JobPublic:
    return JobPublic.model_validate(_readable_job(session, principal, job_id))


def _readable_job(session: Session, principal: Principal, job_id: uuid.UUID) -> Any:
    job = job_service.get_job(session, job_id)
    auth.check_job_access(principal, job)
    return job


def _epoch_dicts(session: Session, job_id: uuid.UUID) -> list[dict[str, Any]]:
    return [
        EpochPublic.model_validate(row).model_dump()
        for row in job_service.list_epochs(session, job_id)
    ]


@router.get("/{job_id}/history", response_model=HistoryPublic, responses=NOT_FOUND)
def job_history(job_id: uuid.UUID, session: SessionDep, principal: JobReader) -> HistoryPublic:
    """Per-epoch metrics in both row and column form; includes finished epochs of a running job."""
    job = _readable_job(session, principal, job_id)
    epochs = _epoch_dicts(session, job_id)
    return HistoryPublic(
        job_id=job.id,
        status=JobStatus(job.status),
        epochs=[EpochPublic.model_validate(row) for row in epochs],
        history=HistoryCurves.model_validate(
            {key: [row[key] for row in epochs] for key in HistoryCurves.model_fields}
        ),
        analysis=AnalysisPublic(**analyse(epochs).to_dict(), **_early_stopping(job, epochs)),
    )


def _early_stopping(job: Any, epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """Which epoch an early-stopped run's stored model comes from (the lowest val_loss)."""
    if getattr(job, "early_stopping_patience", None) is None or job.status != "succeeded":
        return {}
    best = analyse(epochs).best_epoch
    return {"restored_epoch": best, "stopped_early": len(epochs) < job.epochs}


@router.get(
    "/{job_id}/history.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "Accuracy and loss curves."},
        403: NOT_FOUND[403],
        404: {"description": "No such job, or no finished epoch yet (`no_history`)."},
    },
)
def job_history_png(job_id: uuid.UUID, session: SessionDep, principal: JobReader) -> Response:
    from app.ml.plots import history_png  # matplotlib is heavy; load it on first use

    job = _readable_job(session, principal, job_id)
    epochs = _epoch_dicts(session, job_id)
    if not epochs:
        raise HistoryNotFound(f"job {job_id} has no finished epoch yet (status {job.status})")
    png = history_png(epochs, title=f"{job.net}: job {job.id} ({job.status})")
    # The curves grow while the job runs; only a finished job's picture is stable.
    cache = "max-age=3600" if is_terminal(job.status) else "no-store"
    return Response(png, media_type="image/png", headers={"Cache-Control": cache})


@router.get(
    "/{job_id}/evaluation",
    response_model=EvaluationPublic,
    responses={
        403: NOT_FOUND[403],
        404: {"description": "No such job, or no evaluation yet (`no_evaluation`)."},
    },
)
def job_evaluation(
    job_id: uuid.UUID, session: SessionDep, principal: JobReader
) -> EvaluationPublic:
    _readable_job(session, principal, job_id)
    return EvaluationPublic.model_validate(job_service.get_evaluation(session, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    responses={
        403: {"description": "Another key's job; only its owner or an admin cancels it."},
        404: NOT_FOUND[404],
        409: {"description": "The job already finished (`job_terminal`)."},
    },
)
def cancel_job(job_id: uuid.UUID, session: SessionDep, principal: TrainPrincipal) -> JobPublic:
    """Queued jobs are cancelled at once; a running job stops at its next batch."""
    auth.check_job_access(principal, job_service.get_job(session, job_id), write=True)
    return JobPublic.model_validate(job_service.cancel_job(session, job_id))
