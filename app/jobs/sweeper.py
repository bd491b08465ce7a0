"""The periodic sweep, as a thread inside every worker process; it also advances sweeps.

Every round repairs jobs (`sweep_once`) and then advances every hyperparameter sweep with
work left (`advance_sweeps_once`: tell the trials whose jobs ended, ask new ones; see
app/sweeps/service.py). Every worker sweeps (no separate beat service to deploy or to forget): a deployment that
can run jobs has at least one worker, and the sweep's conditional UPDATEs make any number
of concurrent sweepers safe. The sweep is also a task (`SWEEP_TASK` in app.jobs.queue) for
anyone who prefers celery beat.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from app.config import Settings
from app.db import session_factory
from app.jobs import execution
from app.jobs.queue import enqueue_training
from app.registry.store import open_store

log = logging.getLogger(__name__)


def send_training(settings: Settings, job_id: uuid.UUID) -> None:
    """Enqueue as the API does (app.jobs.queue); raise so the sweep can retry a failed send."""
    if not enqueue_training(settings, job_id):
        raise ConnectionError(f"the broker did not accept job {job_id}")


def advance_sweeps_once(settings: Settings) -> None:
    """Advance every hyperparameter sweep with work left (safe with concurrent advancers)."""
    from app.sweeps.service import advance_all

    for sweep_id, report in advance_all(session_factory(settings), settings).items():
        if report.told or report.asked or report.finished:
            log.info(
                "sweep %s: told trials %s, asked trials %s%s",
                sweep_id,
                report.told,
                report.asked,
                ", finished" if report.finished else "",
            )


# When this process last looked for orphaned model files (a listing of every model's files,
# so at most every ORPHAN_SCAN_S, not every sweep).
_orphan_scan = {"next": 0.0}
_orphan_lock = threading.Lock()


def _orphan_scan_due(settings: Settings) -> bool:
    with _orphan_lock:
        now = time.monotonic()
        if now < _orphan_scan["next"]:
            return False
        _orphan_scan["next"] = now + settings.ORPHAN_SCAN_S
        return True


def sweep_once(settings: Settings) -> execution.SweepReport:
    with session_factory(settings)() as session:
        report = execution.sweep(
            session,
            settings,
            lambda job_id: send_training(settings, job_id),
            store=open_store(settings),
            orphans=_orphan_scan_due(settings),
        )
    for what in ("requeued", "failed", "cancelled", "resent", "cleaned", "orphans"):
        ids = getattr(report, what)
        if ids:
            log.info("sweep %s %d job(s): %s", what, len(ids), ", ".join(map(str, ids)))
    return report


class Sweeper(threading.Thread):
    """Runs sweep_once and advance_sweeps_once at start and then every SWEEP_INTERVAL_S."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="sweeper", daemon=True)
        self.settings = settings
        self._halt = threading.Event()

    def run(self) -> None:
        while True:
            try:
                sweep_once(self.settings)
            except Exception:  # the database may be briefly away; try again next round
                log.exception("sweep failed")
            try:
                advance_sweeps_once(self.settings)
            except Exception:
                log.exception("advancing the sweeps failed")
            if self._halt.wait(self.settings.SWEEP_INTERVAL_S):
                return

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
