"""The database side of running a job (worker side): claim, progress, finish, requeue, sweep.

Each function is one short transaction and every status change is a conditional UPDATE
(`... WHERE status = <expected> AND claims = <seen>`), so two workers, two deliveries of
the same message or several sweepers running at once can never both win. The claim
counter a claim produced is the claimant's fencing token: it only grows, so progress and
finish calls made with an old token are refused once somebody else has taken the job over.
Times that decide liveness (heartbeat_at, staleness) come from the database's clock, never
from the host's (docs/reliability.md).

One module per phase of a job's life, all re-exported here (`execution.claim(...)`):

common.py    the database clock, the conditional transition, the claim's fence
claiming.py  claim -> ClaimResult(ClaimOutcome)
progress.py  record_epoch, heartbeat, note_problem, control -> StopReason, mark_started, ...
finish.py    finish_succeeded (with registration), finish_failed, finish_cancelled, hand_back
recovery.py  sweep and release_worker: repair what dead workers and lost messages left, and
             remove the files of terminal jobs and of models never registered
"""

from app.jobs.execution.claiming import ClaimOutcome, ClaimResult, claim
from app.jobs.execution.common import (
    ERROR_MAX_CHARS,
    STALLED_WRITE_LIMIT_S,
    attempts_exhausted_message,
    db_now,
)
from app.jobs.execution.finish import (
    REGISTER_RETRIES,
    HandBack,
    finish_cancelled,
    finish_failed,
    finish_succeeded,
    hand_back,
)
from app.jobs.execution.progress import (
    StopReason,
    control,
    forget_epochs,
    heartbeat,
    last_recorded_epoch,
    mark_started,
    note_problem,
    record_epoch,
)
from app.jobs.execution.recovery import (
    SweepReport,
    clean_up_files,
    release_worker,
    remove_orphans,
    sweep,
)

__all__ = [
    "ERROR_MAX_CHARS",
    "REGISTER_RETRIES",
    "STALLED_WRITE_LIMIT_S",
    "ClaimOutcome",
    "ClaimResult",
    "HandBack",
    "StopReason",
    "SweepReport",
    "attempts_exhausted_message",
    "claim",
    "clean_up_files",
    "control",
    "db_now",
    "finish_cancelled",
    "finish_failed",
    "finish_succeeded",
    "forget_epochs",
    "hand_back",
    "heartbeat",
    "last_recorded_epoch",
    "mark_started",
    "note_problem",
    "record_epoch",
    "release_worker",
    "remove_orphans",
    "sweep",
]
