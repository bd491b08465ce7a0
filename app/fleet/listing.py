"""The worker list as GET /workers answers it, also read straight from the database by
`cnn workers --local`: one function, so both show the same thing."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.config import Settings
from app.fleet import records
from app.schemas import WorkerList, WorkerPublic

# One page of GET /workers at most (a fleet larger than this pages by name).
MAX_LIMIT = 1000


def worker_list(
    session: Session, settings: Settings, *, include_lost: bool, limit: int
) -> WorkerList:
    rows, total, now = records.list_workers(
        session, settings, include_lost=include_lost, limit=limit
    )
    fields = [name for name in WorkerPublic.model_fields if name != "state"]
    return WorkerList(
        workers=[
            WorkerPublic.model_validate(
                {
                    **{name: getattr(row, name) for name in fields},
                    "state": records.state(row, settings, now),
                }
            )
            for row in rows
        ],
        total=total,
        limit=limit,
    )
