"""A worker process's presence in the `workers` table: a thread like the job heartbeat.

It registers at start, beats every HEARTBEAT_INTERVAL_S with the job being run (and the
queues the Celery consumer reads right now), writes at once when the job changes, and marks
the row stopped on a clean shutdown. The training path only sets a field and wakes the
thread: it never waits on the database, and a database error is logged and retried at the
next beat, never raised into the worker.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from app.fleet import records
from app.fleet.records import WorkerInfo

log = logging.getLogger(__name__)


def describe_this_process(name: str, queues: list[str]) -> WorkerInfo:
    """Host, pid, the device training uses, how many GPUs are visible, the Keras backend."""
    from app.ml import backend

    device = backend.device()
    return WorkerInfo(
        name=name,
        host=socket.gethostname(),
        pid=os.getpid(),
        device_kind=device.kind.lower(),
        device=device.label(),
        gpu_count=len(backend.gpus()),
        keras_backend=backend.name(),
        queues=list(queues),
    )


class Presence(threading.Thread):
    """Keeps this worker's row fresh until stop(); `running`/`idle` record the current job."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        info: WorkerInfo,
        interval: float,
        queues: Callable[[], list[str]] | None = None,
    ) -> None:
        super().__init__(name=f"presence-{info.name}", daemon=True)
        self._sessions, self.info, self._interval = sessions, info, interval
        self._queues = queues
        self._job: uuid.UUID | None = None
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._registered = False

    def running(self, job_id: uuid.UUID) -> None:
        self._job = job_id
        self._wake.set()

    def idle(self) -> None:
        self._job = None
        self._wake.set()

    def run(self) -> None:
        while not self._halt.is_set():
            self._write()
            self._wake.wait(self._interval)
            self._wake.clear()

    def _current_queues(self) -> list[str] | None:
        if self._queues is None:
            return None
        try:
            return self._queues()
        except Exception:  # the consumer is restarting its connection: keep the last list
            return None

    def _write(self) -> None:
        try:
            with self._sessions() as session:
                if self._registered and records.beat(
                    session, self.info.name, self._job, self._current_queues()
                ):
                    return
                # First beat, or the row was forgotten (a long partition): register again.
                records.register(session, self.info)
                self._registered = True
                if self._job is not None:
                    records.beat(session, self.info.name, self._job)
        except Exception:
            log.exception("worker %s: heartbeat not written; retrying", self.info.name)

    def stop(self) -> None:
        """End the beats and mark the row stopped (a failure leaves it to go lost)."""
        self._halt.set()
        self._wake.set()
        self.join(timeout=10)
        try:
            with self._sessions() as session:
                records.mark_stopped(session, self.info.name)
        except Exception:
            log.exception("worker %s: could not mark itself stopped", self.info.name)
