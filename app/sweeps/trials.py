"""The worker's side of a trial: after each stored epoch, ask the sweep's pruner.

The runner (app/jobs/runner.py) calls a TrialHook with every EpochRecord it has stored;
the hook answers None (go on) or the sentence that ends the job early. The epoch's value
is already in the epochs table, which is where the study reads intermediate values from,
so reporting is storing. The pruner's verdict is recorded on the trial
(`pruned_epoch`) before the fit stops, so a worker that dies between the two still ends the
job pruned when it resumes.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import rowcount
from app.models import Job, Sweep, SweepTrial
from app.sweeps import service
from app.sweeps.schemas import SearchCreate

if TYPE_CHECKING:
    from app.ml.training import EpochRecord

log = logging.getLogger(__name__)


def pruned_message(pruner: str, epoch: int, metric: str, value: float | None) -> str:
    shown = "no value" if value is None else f"{value:.4f}"
    return (
        f"pruned by the sweep's {pruner} pruner after epoch {epoch}: its {metric} ({shown}) "
        "was not among the best of the trials that reached that epoch"
    )


class TrialHook:
    """Called with each stored epoch of one trial's job; returns why to stop, or None."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        sweep_id: uuid.UUID,
        trial_id: int,
        number: int,
        epochs: int,
        spec: SearchCreate,
        stop_reason: str | None = None,
    ) -> None:
        self.sessions = sessions
        self.sweep_id, self.trial_id, self.number = sweep_id, trial_id, number
        self.epochs = epochs
        self.spec = spec
        # Already decided by an earlier attempt of this job (it died before it stopped).
        self.stop_reason = stop_reason

    @classmethod
    def for_job(
        cls, session: Session, job_id: uuid.UUID, sessions: sessionmaker[Session]
    ) -> TrialHook | None:
        """The hook of job `job_id` when it is a trial of a search with a pruner, else None."""
        row = session.execute(
            select(SweepTrial, Sweep, Job.epochs)
            .join(Sweep, Sweep.id == SweepTrial.sweep_id)
            .join(Job, Job.id == SweepTrial.job_id)
            .where(SweepTrial.job_id == job_id)
        ).one_or_none()
        session.rollback()
        if row is None:
            return None
        trial, sweep, epochs = row
        spec = service.load_spec(sweep)
        if not isinstance(spec, SearchCreate) or spec.pruner.type == "none":
            return None
        reason = None
        if trial.pruned_epoch is not None:
            reason = pruned_message(
                spec.pruner.type, trial.pruned_epoch, spec.objective.metric, None
            )
        return cls(sessions, sweep.id, trial.id, trial.number, epochs, spec, stop_reason=reason)

    def __call__(self, record: EpochRecord) -> str | None:
        if self.stop_reason is not None:
            return self.stop_reason
        if record.epoch >= self.epochs:
            return None  # the last epoch is done: the trial completes
        try:
            return self._check(record)
        except Exception:  # pruning is advice: a failure to ask never fails the job
            log.exception(
                "trial %d of sweep %s: the pruner could not be asked", self.number, self.sweep_id
            )
            return None

    def _check(self, record: EpochRecord) -> str | None:
        from app.sweeps import study

        with self.sessions() as session:
            sweep = service.get_sweep(session, self.sweep_id)
            records = service.records(session, sweep, self.spec)
            session.rollback()
            prune, attrs = study.should_prune(self.spec, records, self.number)
            values: dict[str, object] = {"system_attrs": attrs}
            if prune:
                values["pruned_epoch"] = record.epoch
            changed = session.execute(
                update(SweepTrial)
                .where(
                    SweepTrial.id == self.trial_id,
                    SweepTrial.state == "running",
                    SweepTrial.pruned_epoch.is_(None),
                )
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            session.commit()
        if not prune or not rowcount(changed):
            return None
        value = getattr(record, self.spec.objective.metric)
        self.stop_reason = pruned_message(
            self.spec.pruner.type, record.epoch, self.spec.objective.metric, value
        )
        log.info("trial %d of sweep %s: %s", self.number, self.sweep_id, self.stop_reason)
        return self.stop_reason
