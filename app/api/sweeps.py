"""Sweeps: a hyperparameter search or an ablation whose trials are ordinary jobs."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, Response

from app.api.deps import JobReader, JsonBody, SessionDep, SettingsDep, TrainAccess, TrainPrincipal
from app.errors import NoFinishedTrials
from app.schemas import INT32_MAX
from app.sweeps import service
from app.sweeps.schemas import SweepCreate, SweepList, SweepPublic, SweepStatus
from app.sweeps.views import sweep_public, sweep_summaries

router = APIRouter(prefix="/sweeps", tags=["sweeps"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    403: {"description": "A `train` key asking for another key's sweep (`forbidden`)."},
    404: {"description": "No sweep with this id (`sweep_not_found`)."},
}


@router.post(
    "",
    status_code=201,
    response_model=SweepPublic,
    dependencies=[TrainAccess, JsonBody],
    responses={
        201: {"description": "Created; its first trials are queued. Location: its URL."},
        403: {"description": "A model name belongs to another key (`forbidden`)."},
        415: {"description": "The body is not JSON."},
        422: {
            "description": "A field is out of range, a parameter is not a training option or "
            "leaves its bounds, a trial would be refused (`validation_error`, "
            "`job_too_large`), or past SWEEP_MAX_TRIALS / SWEEP_MAX_PARALLEL "
            "(`sweep_too_large`)."
        },
        429: {
            "description": "This key has MAX_ACTIVE_SWEEPS_PER_KEY running sweeps (`quota_exceeded`)."
        },
    },
)
def create_sweep(
    body: Annotated[SweepCreate, Body()],
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    principal: TrainPrincipal,
) -> SweepPublic:
    """A search (`kind: search`, the default) or an ablation (`kind: ablation`); see
    docs/sweeps.md. Each trial is a job of this key."""
    sweep = service.create_sweep(session, body, principal=principal, settings=settings)
    response.headers["Location"] = f"/sweeps/{sweep.id}"
    return sweep_public(session, sweep)


@router.get("", response_model=SweepList)
def list_sweeps(
    session: SessionDep,
    principal: JobReader,
    status: Annotated[SweepStatus | None, Query(description="Only sweeps in this status.")] = None,
    kind: Annotated[Literal["search", "ablation"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=INT32_MAX)] = 0,
) -> SweepList:
    """Every sweep for `read` keys; a `train` key without `read` sees its own."""
    owner = None if principal.allows("read") else principal.id
    rows, total = service.list_sweeps(
        session, owner_id=owner, status=status, kind=kind, limit=limit, offset=offset
    )
    return SweepList(sweeps=sweep_summaries(session, rows), total=total, limit=limit, offset=offset)


@router.get(
    "/{sweep_id}.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "History and parameter plots."},
        403: NOT_FOUND[403],
        404: {"description": "No such sweep (`sweep_not_found`)."},
        # The sweep exists; its picture does not yet (as /compare's job_not_finished).
        409: {"description": "No trial with a value yet (`no_finished_trials`)."},
    },
)
def sweep_png(sweep_id: uuid.UUID, session: SessionDep, principal: JobReader) -> Response:
    from app.sweeps.plots import sweep_png as render  # matplotlib is heavy: load it on first use

    sweep = service.get_sweep(session, sweep_id)
    service.check_access(principal, sweep)
    shown = sweep_public(session, sweep)
    if not any(t.value is not None for t in shown.trials):
        raise NoFinishedTrials(f"sweep {sweep_id} has no trial with a value yet")
    cache = "no-store" if shown.status == "running" else "max-age=3600"
    return Response(render(shown), media_type="image/png", headers={"Cache-Control": cache})


@router.get("/{sweep_id}", response_model=SweepPublic, responses=NOT_FOUND)
def get_sweep(sweep_id: uuid.UUID, session: SessionDep, principal: JobReader) -> SweepPublic:
    """Trials (parameters, state, validation curve, pruned epoch), the best trial by the
    objective, parameter importances."""
    sweep = service.get_sweep(session, sweep_id)
    service.check_access(principal, sweep)
    return sweep_public(session, sweep)


@router.post(
    "/{sweep_id}/cancel",
    response_model=SweepPublic,
    responses={
        403: {"description": "Another key's sweep; only its owner or an admin cancels it."},
        404: NOT_FOUND[404],
        409: {"description": "The sweep already ended (`sweep_terminal`)."},
    },
)
def cancel_sweep(
    sweep_id: uuid.UUID, session: SessionDep, settings: SettingsDep, principal: TrainPrincipal
) -> SweepPublic:
    """No new trials; queued trials are cancelled at once, running ones at their next batch."""
    service.check_access(principal, service.get_sweep(session, sweep_id), write=True)
    return sweep_public(session, service.cancel_sweep(session, sweep_id, settings))
