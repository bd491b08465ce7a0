"""A job's event log, read from the database: what `GET /jobs/{id}/events` streams.

The `job_events` table is written by triggers (migration 0002_job_events), so the log holds
every status change and every stored epoch whichever process made it. Any API process can
therefore serve any client: the stream polls the table, remembers the last id it sent, and a
client that reconnects with `Last-Event-ID` continues after exactly that event.

An `epoch` event carries the stored row as `GET /jobs/{id}/history` shows it. When a job
restarts from scratch (its checkpoint was lost) its rows are dropped: the events of those
rows are skipped from then on, and the new run's epochs arrive as new events, starting at
epoch 1 again. A client that already holds epoch N and receives epoch N again drops N and
everything after it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import EpochMetric, Job, JobEvent
from app.schemas import EpochPublic, JobPublic
from app.states import is_terminal

# One poll returns at most this many events; the next poll continues.
BATCH = 500
# The largest event id a client may send (`?after=` or Last-Event-ID): ids are BIGINT.
MAX_EVENT_ID = 2**62


@dataclass(frozen=True)
class Event:
    """One server-sent event: `id`, `event` (status|epoch) and its JSON `data`."""

    id: int
    kind: str
    data: dict[str, Any]
    terminal: bool = False

    def encode(self) -> bytes:
        """The event in the text/event-stream format (one `data:` line of JSON)."""
        payload = json.dumps(self.data, separators=(",", ":"), default=str)
        return f"id: {self.id}\nevent: {self.kind}\ndata: {payload}\n\n".encode()


def read_events(session: Session, job_id: uuid.UUID, after: int, limit: int = BATCH) -> list[Event]:
    """The job's events with id > `after`, oldest first (at most `limit`)."""
    rows = session.execute(
        select(JobEvent, EpochMetric)
        .outerjoin(EpochMetric, EpochMetric.id == JobEvent.epoch_id)
        .where(JobEvent.job_id == job_id, JobEvent.id > after)
        .order_by(JobEvent.id)
        .limit(limit)
    ).all()
    events: list[Event] = []
    job_public: dict[str, Any] | None = None
    for event, epoch_row in rows:
        at = event.created_at.isoformat() if event.created_at else None
        if event.kind == "epoch":
            if epoch_row is None:
                continue  # the run it belonged to was dropped (restart from scratch)
            data = {
                "job_id": str(job_id),
                "at": at,
                **EpochPublic.model_validate(epoch_row).model_dump(),
            }
            events.append(Event(event.id, "epoch", data))
            continue
        status = event.status or ""
        data = {
            "job_id": str(job_id),
            "at": at,
            "status": status,
            "previous": event.previous_status,
            "epoch": event.epoch,
            "error": event.error,
        }
        terminal = is_terminal(status)
        if terminal:
            # Terminal rows never change again, so today's job is the job as it ended.
            if job_public is None:
                job = session.get(Job, job_id)
                job_public = JobPublic.model_validate(job).model_dump(mode="json") if job else {}
            data["job"] = job_public
        events.append(Event(event.id, "status", data, terminal=terminal))
    session.rollback()  # end the read transaction; the next poll must see new commits
    return events


def poll(session: Session, job_id: uuid.UUID, after: int) -> tuple[list[Event], bool]:
    """The job's events after `after` (see read_events), and whether the stream is over: no
    new event and the job is terminal. A cursor past the terminal event (a client that
    claims ids that do not exist) still ends the stream, which would otherwise poll for ever."""
    events = read_events(session, job_id, after)
    if events:
        return events, False
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    session.rollback()
    return events, status is None or is_terminal(status)


def last_event_id(session: Session, job_id: uuid.UUID) -> int:
    """The id of the job's newest event (0 when it has none)."""
    value = session.scalar(
        select(JobEvent.id).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc()).limit(1)
    )
    session.rollback()
    return int(value or 0)
