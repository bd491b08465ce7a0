"""GET /workers: the training workers that are up, what they run on and which job they run.

Each worker writes its own row (app/fleet/presence.py); this only reads the table, like
Determined's agent list or Celery's `inspect`, without asking the broker.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import ReadAccess, SessionDep, SettingsDep
from app.fleet.listing import MAX_LIMIT, worker_list
from app.schemas import WorkerList

router = APIRouter(tags=["workers"])


@router.get("/workers", response_model=WorkerList, dependencies=[ReadAccess])
def list_workers(
    session: SessionDep,
    settings: SettingsDep,
    include_lost: Annotated[
        bool,
        Query(description="Also the workers lost or stopped in the last WORKER_FORGET_S."),
    ] = False,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 200,
) -> WorkerList:
    """Live workers by name (a beat within HEARTBEAT_TIMEOUT_S), or every row still kept."""
    return worker_list(session, settings, include_lost=include_lost, limit=limit)
