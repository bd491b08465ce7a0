"""The job state machine: the one place that says which status may follow which.

queued -> running -> succeeded | failed | cancelled; queued -> cancelled.
running -> queued is the internal "requeue" used when a worker died mid-fit
(stale heartbeat or a redelivered message); clients never request it.
Terminal statuses never change.
"""

from __future__ import annotations

from enum import StrEnum

from app.errors import DomainError


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
)

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def is_terminal(status: JobStatus | str) -> bool:
    return JobStatus(status) in TERMINAL


class InvalidTransition(DomainError):
    """A status change the state machine (ALLOWED) does not allow.

    `job_terminal` when the job already finished (nothing can change it any more),
    `invalid_transition` for any other refused change (both in app.errors.STATUS).
    """

    def __init__(self, current: JobStatus, target: JobStatus) -> None:
        self.current = current
        self.target = target
        if is_terminal(current):
            super().__init__(
                f"the job is already {current} and can no longer change", code="job_terminal"
            )
        else:
            super().__init__(
                f"job is '{current}', it cannot become '{target}'", code="invalid_transition"
            )


def check_transition(current: JobStatus | str, target: JobStatus | str) -> None:
    """Raise InvalidTransition unless `current -> target` is allowed."""
    cur, tgt = JobStatus(current), JobStatus(target)
    if tgt not in ALLOWED[cur]:
        raise InvalidTransition(cur, tgt)
