"""What every phase shares: the database's clock, the conditional transition, the fence.

A status change is `_transition`: one UPDATE whose WHERE names every status that may
become the target (from app.states.ALLOWED) plus the caller's own conditions, so a row
somebody else changed meanwhile is simply not matched. A worker's write adds `owned(token)`:
the job must still be running under the claim that produced the token.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select, text, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import rowcount
from app.models import Job, as_utc
from app.states import ALLOWED, JobStatus

ERROR_MAX_CHARS = 2000
# A worker frozen inside one of its write transactions (SIGSTOP, a paused VM, a long GC pause)
# would hold the job's row lock, and the sweep and the API's cancel would wait on it until it
# thawed. PostgreSQL ends such a session after this long (SET LOCAL: this transaction only).
STALLED_WRITE_LIMIT_S = 10


def as_uuid(job_id: uuid.UUID | str) -> uuid.UUID:
    return job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))


def _sources(target: JobStatus) -> list[str]:
    """Every status that may become `target`, straight from the state machine."""
    return [str(s) for s, allowed in ALLOWED.items() if target in allowed]


def db_now(session: Session) -> datetime:
    """The database's clock (UTC): the one clock every worker, sweeper and API agrees on.

    PostgreSQL's now() is the start of the current transaction, which this call begins
    (or joins), so the value is current for the statements that follow it. SQLite is a
    file on the one host that uses it, so its clock is that host's.
    """
    dialect = session.get_bind().dialect.name
    value: datetime | None
    if dialect == "sqlite":
        stamp = session.scalar(select(func.strftime("%Y-%m-%d %H:%M:%f", "now")))
        value = datetime.fromisoformat(str(stamp))
    else:
        value = session.scalar(select(func.now()))
    result = as_utc(value)
    assert result is not None
    return result


def stale(before: datetime) -> ColumnElement[bool]:
    return or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < before)


def stale_before(settings: Settings, now: datetime) -> datetime:
    return now - timedelta(seconds=settings.HEARTBEAT_TIMEOUT_S)


def transition(
    session: Session,
    job_id: uuid.UUID,
    target: JobStatus,
    *conditions: ColumnElement[bool],
    **values: Any,
) -> bool:
    """UPDATE jobs SET status=target ... WHERE status may become target AND conditions.

    Returns whether a row changed; the caller commits or rolls back.
    """
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(_sources(target)), *conditions)
        .values(status=str(target), **values)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1


def owned(token: int) -> list[ColumnElement[bool]]:
    """The fence of every worker write: the job is running and still under this claim."""
    return [Job.status == str(JobStatus.RUNNING), Job.claims == token]


def limit_stalled_write(session: Session) -> None:
    """Let PostgreSQL end this transaction if it idles past STALLED_WRITE_LIMIT_S."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text(f"SET LOCAL idle_in_transaction_session_timeout = '{STALLED_WRITE_LIMIT_S}s'")
        )


def clip(message: str) -> str:
    return message if len(message) <= ERROR_MAX_CHARS else message[: ERROR_MAX_CHARS - 3] + "..."


def attempts_exhausted_message(attempts: int, limit: int) -> str:
    return (
        f"worker died {attempts} times (attempt limit {limit}): the process running this job "
        "stopped without finishing on every attempt (killed, out of memory, machine lost); "
        "try a smaller batch_size or train_limit, or a worker with more memory"
    )
