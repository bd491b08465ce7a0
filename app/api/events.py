"""GET /jobs/{id}/events: a job's status changes and epochs as server-sent events.

The database is the source (app/events.py): each stream polls the job's event log every
EVENTS_POLL_S, so any number of API processes can serve streams of jobs that any worker
runs. The stream ends after the job's terminal status event, and also once the job is
terminal when the client's cursor is past every event (a bogus Last-Event-ID); a reconnect
that already has the terminal event gets 204 No Content, which tells a browser's
EventSource to stop retrying. Last-Event-ID is validated like `?after=` (422), and one key
holds at most EVENT_STREAMS_PER_KEY streams in this process (429 too_many_streams).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from app import auth
from app.api.deps import JobReader, SessionDep, SettingsDep
from app.api.limits import caller_of
from app.errors import TooManyStreams
from app.events import MAX_EVENT_ID, last_event_id, poll
from app.jobs import service as job_service
from app.states import is_terminal

router = APIRouter(prefix="/jobs", tags=["jobs"])

# A comment line this often keeps proxies and load balancers from closing an idle stream.
KEEPALIVE_S = 15.0
# Browsers wait this long (ms) before reconnecting after a dropped connection.
RETRY_MS = 2000


class StreamSlots:
    """Open event streams per caller in this API process, at most `per_key` each."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self.open: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, caller: str) -> Callable[[], None]:
        """A slot for `caller` (TooManyStreams past the bound); returns its release, which
        may be called more than once."""
        with self._lock:
            held = self.open.get(caller, 0)
            if held >= self.per_key:
                raise TooManyStreams(
                    f"this key has {held} event streams open, the most allowed "
                    f"(EVENT_STREAMS_PER_KEY={self.per_key}); close one first"
                )
            self.open[caller] = held + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                left = self.open[caller] - 1
                if left:
                    self.open[caller] = left
                else:
                    del self.open[caller]

        return release


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
        429: {
            "description": "This key holds EVENT_STREAMS_PER_KEY streams in this API process "
            "(`too_many_streams`, with Retry-After)."
        },
    },
)
async def job_events(
    job_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: JobReader,
    last_event_id_header: Annotated[
        int | None,
        Header(
            alias="Last-Event-ID",
            ge=0,
            le=MAX_EVENT_ID,
            description="Continue after this event id (reconnects).",
        ),
    ] = None,
    after: Annotated[
        int | None,
        Query(
            ge=0,
            le=MAX_EVENT_ID,
            description="Same as Last-Event-ID, for clients that cannot set headers.",
        ),
    ] = None,
) -> Response:
    job = await run_in_threadpool(job_service.get_job, session, job_id)  # 404 if unknown
    auth.check_job_access(principal, job)  # a train key streams only its own jobs
    start = (last_event_id_header or 0) if after is None else after
    last = await run_in_threadpool(last_event_id, session, job_id)
    if is_terminal(job.status) and start and start >= last:
        return Response(status_code=204)
    # A cursor past the job's newest event names events that do not exist: continue after
    # the newest one, so that the client still gets what comes next.
    start = min(start, last)
    session.close()  # a long stream must not hold a pooled connection between polls
    release = request.app.state.event_streams.take(caller_of(principal, request.client))
    sessions = request.app.state.sessionmaker
    interval = settings.EVENTS_POLL_S

    async def stream() -> AsyncIterator[bytes]:
        try:
            cursor = start
            yield f"retry: {RETRY_MS}\n\n".encode()
            quiet_since = time.monotonic()
            while True:
                with sessions() as poll_session:
                    events, ended = await run_in_threadpool(poll, poll_session, job_id, cursor)
                for event in events:
                    yield event.encode()
                    cursor = event.id
                    if event.terminal:
                        return
                if ended:
                    return
                if events:
                    quiet_since = time.monotonic()
                    continue  # there may be more than one batch waiting
                if time.monotonic() - quiet_since >= KEEPALIVE_S:
                    yield b": keep-alive\n\n"
                    quiet_since = time.monotonic()
                await asyncio.sleep(interval)
        finally:
            release()

    body = stream()
    # A response cancelled before its first chunk never enters the generator (so never its
    # `finally`): the slot then goes back when the generator is collected.
    weakref.finalize(body, release)
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
