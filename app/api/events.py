"""GET /jobs/{id}/events: a job's status changes and epochs as server-sent events.

The database is the source (app/events.py): each stream polls the job's event log every
EVENTS_POLL_S, so any number of API processes can serve streams of jobs that any worker
runs. The stream ends after the job's terminal status event; a reconnect that already has
that event gets 204 No Content, which tells a browser's EventSource to stop retrying.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from app import auth
from app.api.deps import JobReader, SessionDep, SettingsDep
from app.events import last_event_id, parse_last_event_id, read_events
from app.jobs import service as job_service
from app.states import is_terminal

router = APIRouter(prefix="/jobs", tags=["jobs"])

# A comment line this often keeps proxies and load balancers from closing an idle stream.
KEEPALIVE_S = 15.0
# Browsers wait this long (ms) before reconnecting after a dropped connection.
RETRY_MS = 2000


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "`status` and `epoch` events, each with an `id`; ends after the "
            "terminal status.",
        },
        204: {"description": "The job is terminal and the client already has every event."},
        404: {"description": "No job with this id."},
    },
)
async def job_events(
    job_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: JobReader,
    last_event_id_header: Annotated[
        str | None,
        Header(alias="Last-Event-ID", description="Continue after this event id (reconnects)."),
    ] = None,
    after: Annotated[
        int | None,
        Query(
            ge=0,
            le=2**62,
            description="Same as Last-Event-ID, for clients that cannot set headers.",
        ),
    ] = None,
) -> Response:
    job = await run_in_threadpool(job_service.get_job, session, job_id)  # 404 if unknown
    auth.check_job_access(principal, job)  # a train key streams only its own jobs
    start = parse_last_event_id(last_event_id_header) if after is None else after
    if (
        is_terminal(job.status)
        and start
        and start >= await run_in_threadpool(last_event_id, session, job_id)
    ):
        return Response(status_code=204)
    session.close()  # a long stream must not hold a pooled connection between polls
    sessions = request.app.state.sessionmaker
    poll = settings.EVENTS_POLL_S

    async def stream() -> AsyncIterator[bytes]:
        cursor = start
        yield f"retry: {RETRY_MS}\n\n".encode()
        quiet_since = time.monotonic()
        while True:
            with sessions() as poll_session:
                events = await run_in_threadpool(read_events, poll_session, job_id, cursor)
            for event in events:
                yield event.encode()
                cursor = event.id
                if event.terminal:
                    return
            if events:
                quiet_since = time.monotonic()
                continue  # there may be more than one batch waiting
            if time.monotonic() - quiet_since >= KEEPALIVE_S:
                yield b": keep-alive\n\n"
                quiet_since = time.monotonic()
            await asyncio.sleep(poll)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
