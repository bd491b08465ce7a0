"""Admission of /predict bodies before they are read: bytes in flight, per caller and in all.

One flooding key sent 150 bodies of almost 8 MiB each and paused: the API read them all
and held gigabytes. Now a body is admitted before its first byte is read, from its
Content-Length; a chunked body (no length) is counted as it arrives, against the same
budgets. A caller past its own budget gets 429 `rate_limited` (the key above its share);
past the process's budget every caller gets 503 `overloaded`, both with Retry-After, and the
connection is closed without reading the body; bodies of at most 64 KiB are never refused
for the process's budget (see ALWAYS_ADMITTED). The bytes are given back when the answer is
ready. No HTTP here: the route (app/api/predict.py) reads the body and charges it.
"""

from __future__ import annotations

import threading
from types import TracebackType

from app.errors import Overloaded, RateLimited

MIB = 1024 * 1024
# A declared body this small is in the server's read buffer already (uvicorn reads 64 KiB
# ahead): refusing it saves no memory, so the process's budget never refuses it (it still
# counts, and the caller's budget still applies). Bodies from many keys that fill the
# process's budget then cannot shut out everyone's one-image requests.
ALWAYS_ADMITTED = 64 * 1024


def _mib(n: int) -> str:
    return f"{n / MIB:g} MiB"


class BodyBudget:
    """Bytes of bodies admitted and not yet answered: at most `per_caller` for one caller and
    `total` for the whole process."""

    def __init__(self, per_caller: int, total: int) -> None:
        self.per_caller = per_caller
        self.total = total
        self.held = 0
        self.by_caller: dict[str, int] = {}
        self._lock = threading.Lock()

    def admit(self, caller: str, declared: int | None) -> Admission:
        """An admission for one request; its declared length is reserved now."""
        admission = Admission(self, caller)
        if declared:
            admission.take(declared, small=declared <= ALWAYS_ADMITTED)
        return admission

    def _reserve(self, caller: str, n: int, small: bool) -> None:
        with self._lock:
            mine = self.by_caller.get(caller, 0)
            if mine + n > self.per_caller:
                raise RateLimited(
                    f"this key already sends {_mib(mine)} of /predict bodies at once, and this "
                    f"body would take it past {_mib(self.per_caller)} "
                    "(PREDICT_INFLIGHT_BYTES_PER_KEY); wait for an answer first",
                    retry_after=1,
                )
            if self.held + n > self.total and not small:
                raise Overloaded(
                    f"the service is receiving {_mib(self.held)} of /predict bodies, its most "
                    f"(PREDICT_INFLIGHT_BYTES={_mib(self.total)}); retry in a moment"
                )
            self.by_caller[caller] = mine + n
            self.held += n

    def _release(self, caller: str, n: int) -> None:
        with self._lock:
            left = self.by_caller.get(caller, 0) - n
            if left > 0:
                self.by_caller[caller] = left
            else:
                self.by_caller.pop(caller, None)
            self.held -= n


class Admission:
    """The bytes one request holds; a context manager that gives them back at its end."""

    def __init__(self, budget: BodyBudget, caller: str) -> None:
        self.budget = budget
        self.caller = caller
        self.held = 0

    def take(self, n: int, small: bool = False) -> None:
        """Hold `n` more bytes (RateLimited or Overloaded when they do not fit; `small`: a
        whole body of at most ALWAYS_ADMITTED bytes, which the process's budget admits)."""
        self.budget._reserve(self.caller, n, small)
        self.held += n

    def close(self) -> None:
        if self.held:
            self.budget._release(self.caller, self.held)
            self.held = 0

    def __enter__(self) -> Admission:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
