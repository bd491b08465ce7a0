"""Per-key limits: queued-or-running jobs (in the database) and /predict requests per second.

The request rate is a token bucket per principal, kept in this API process: with several
API replicas each enforces its own share (document the per-replica rate). No HTTP here.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth import Principal
from app.errors import QuotaExceeded, RateLimited
from app.models import Job
from app.states import JobStatus

ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


def check_job_quota(session: Session, principal: Principal, limit: int) -> None:
    """QuotaExceeded (429, Retry-After) when the key already has `limit` queued-or-running jobs.

    A count, then the caller's INSERT: atomic only inside the submission's serialisation
    (app.db.serialize, taken by app.jobs.service.create_job before it calls this), so that
    concurrent submissions of one key, through any API process, are counted one by one.
    """
    if principal.id is None:
        return  # AUTH=off: there is no key to count for
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.owner_id == principal.id, Job.status.in_(ACTIVE))
    )
    if (active or 0) >= limit:
        raise QuotaExceeded(
            f"this key has {active} queued or running jobs, the most allowed "
            f"(MAX_ACTIVE_JOBS_PER_KEY={limit}); wait for one to finish or cancel one"
        )


class TokenBucket:
    """`rate` tokens per second up to `burst`; take() answers the wait when empty."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimiter:
    """One TokenBucket per caller, at most `max_callers` remembered (least recent dropped)."""

    def __init__(self, rate: float, burst: int, max_callers: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_callers = max_callers
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, caller: str) -> None:
        """RateLimited (with Retry-After seconds) when `caller` has no token left."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.get(caller)
            if bucket is None:
                bucket = self._buckets[caller] = TokenBucket(self.rate, self.burst, now)
                if len(self._buckets) > self.max_callers:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(caller)
            wait = bucket.take(now)
        if wait > 0:
            raise RateLimited(
                f"too many /predict requests for this key (PREDICT_RATE_PER_S={self.rate:g}, "
                f"burst {self.burst}); retry after {wait:.2f} s",
                retry_after=max(1, math.ceil(wait)),
            )
