"""Run one training job end to end: claim it, train with durable progress, finish it.

The glue between the database (app.jobs.execution), the artifact store and the
training core (app.ml). No Celery and no HTTP here, so the same runner works under any
task queue; the worker's task only hands it a job id. TensorFlow is imported lazily, after
the claim, so a duplicate delivery is refused without loading it.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import session_factory
from app.jobs import execution
from app.models import Job
from app.registry.store import LocalArtifactStore

if TYPE_CHECKING:
    from app.ml.training import EpochRecord

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger(__name__)

# should_stop() runs after every batch; the database is asked at most this often.
CONTROL_POLL_S = 0.5


class Outcome(StrEnum):
    """What run_job did, for logs and tests (the job row is the real record)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REQUEUED = "requeued"  # the worker is shutting down: the job goes back to the queue
    LOST = "lost"  # someone else owns the job now; nothing was written


class _Heartbeat(threading.Thread):
    """Writes heartbeat_at every interval so the sweep knows this claim is alive."""

    def __init__(
        self, sessions: sessionmaker[Session], job_id: uuid.UUID, attempt: int, interval: float
    ) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self._sessions, self._job_id, self._attempt = sessions, job_id, attempt
        self._interval = interval
        self._halt = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self._interval):
            try:
                with self._sessions() as session:
                    if not execution.heartbeat(session, self._job_id, self._attempt):
                        self.lost.set()
                        return
            except Exception:  # a database blip must not kill the thread; the next beat retries
                log.exception("heartbeat of job %s failed", self._job_id)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


class _Control:
    """The training loop's should_stop(): cancel requested, claim lost, or worker shutdown."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        job_id: uuid.UUID,
        attempt: int,
        shutdown: threading.Event | None,
        heartbeat: _Heartbeat,
    ) -> None:
        self._sessions, self._job_id, self._attempt = sessions, job_id, attempt
        self._shutdown = shutdown
        self._heartbeat = heartbeat
        self._next_poll = 0.0
        self.reason: str | None = None  # "cancel" | "lost" | "shutdown"

    def lose(self) -> None:
        self.reason = self.reason or "lost"

    def should_stop(self) -> bool:
        if self.reason is not None:
            return True
        if self._heartbeat.lost.is_set():
            self.reason = "lost"
        elif self._shutdown is not None and self._shutdown.is_set():
            self.reason = "shutdown"
        elif time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + CONTROL_POLL_S
            with self._sessions() as session:
                self.reason = execution.control(session, self._job_id, self._attempt)
        return self.reason is not None


def run_job(
    settings: Settings,
    job_id: uuid.UUID | str,
    worker: str,
    *,
    shutdown: threading.Event | None = None,
) -> Outcome | execution.ClaimOutcome:
    """Claim and run one job; returns an Outcome or a ClaimOutcome when it was not claimed.

    Errors in training end the job `failed` with a message the user can act on and do not
    propagate, so the worker goes on to its next job. Only database errors propagate: then
    nothing can be recorded, and the sweep puts the job back once its heartbeat is stale.
    """
    job_id = uuid.UUID(str(job_id))
    sessions = session_factory(settings)
    with sessions() as session:
        claim = execution.claim(session, job_id, worker, settings)
    if not claim.claimed:
        log.info("job %s not run by %s: %s", job_id, worker, claim.outcome)
        return claim.outcome
    assert claim.job is not None
    log.info("job %s claimed by %s (attempt %d, %s)", job_id, worker, claim.attempt, claim.outcome)
    beat = _Heartbeat(sessions, job_id, claim.attempt, settings.HEARTBEAT_INTERVAL_S)
    beat.start()
    try:
        runner = _Runner(settings, sessions, claim.job, claim.attempt, shutdown, beat)
        return runner.run()
    finally:
        beat.stop()


class _Runner:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        job: Job,
        attempt: int,
        shutdown: threading.Event | None,
        beat: _Heartbeat,
    ) -> None:
        self.settings, self.sessions, self.job, self.attempt = settings, sessions, job, attempt
        self.store = LocalArtifactStore.from_settings(settings)
        self.control = _Control(sessions, job.id, attempt, shutdown, beat)
        self.device = "unknown"

    def _db(
        self,
        fn: Callable[Concatenate[Session, uuid.UUID, P], R],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        """Call an app.jobs.execution step for this job in a session of its own."""
        with self.sessions() as session:
            return fn(session, self.job.id, *args, **kwargs)

    def run(self) -> Outcome:
        try:
            return self._train_and_finish()
        except (OperationalError, DBAPIError):
            raise  # the database is unreachable: leave the job to the sweep
        except Exception as exc:
            message = failure_message(exc, self.job, self.settings, self.device)
            log.warning("job %s failed: %s", self.job.id, message, exc_info=True)
            if self._db(execution.finish_failed, message, attempt=self.attempt):
                self._clean_up()
                return Outcome.FAILED
            return Outcome.LOST

    def _train_and_finish(self) -> Outcome:
        from app.ml.data import load_cifar10
        from app.ml.evaluation import evaluate
        from app.ml.training import (
            TrainConfig,
            configure_devices,
            describe_device,
            resolve_precision,
            train,
        )

        job, settings = self.job, self.settings
        configure_devices()
        self.device = describe_device()
        requested = job.precision or settings.PRECISION
        config = TrainConfig.from_attributes(job, precision=requested)
        # Resolve `auto` once and store it, so a resumed attempt uses the same policy.
        config = dataclasses.replace(config, precision=resolve_precision(requested))
        if not self._db(
            execution.mark_started, self.attempt, device=self.device, precision=config.precision
        ):
            return Outcome.LOST

        data = load_cifar10(settings.CIFAR10_SOURCE, cache_dir=settings.cache_dir)
        checkpoint_dir = self.store.checkpoint_dir(job.id)
        if not self._align_checkpoint(checkpoint_dir):
            return Outcome.LOST

        def on_epoch(record: EpochRecord) -> None:
            if not self._db(execution.record_epoch, record, attempt=self.attempt):
                self.control.lose()  # should_stop() ends the fit at the next batch

        result = train(
            config,
            data,
            on_epoch=on_epoch,
            should_stop=self.control.should_stop,
            checkpoint_dir=checkpoint_dir,
        )
        if result.cancelled or self.control.reason is not None:
            return self._stopped()

        evaluation = evaluate(result.model, data.x_test, data.y_test)
        staged = self.store.stage_model(result.model, job.id)
        metrics = {
            "test_loss": evaluation.test_loss,
            "test_accuracy": evaluation.test_accuracy,
            "epochs": config.epochs,
            "device": result.device,
            "precision": result.precision,
        }
        version = self._db(
            execution.finish_succeeded,
            self.attempt,
            evaluation=evaluation,
            staged=staged,
            store=self.store,
            device=result.device,
            precision=result.precision,
            metrics=metrics,
        )
        if version is None:
            self.store.discard_staging(job.id)
            return Outcome.LOST
        log.info("job %s succeeded: %s version %d", job.id, version.name, version.version)
        self._clean_up()
        return Outcome.SUCCEEDED

    def _align_checkpoint(self, checkpoint_dir: Path) -> bool:
        """Make the checkpoint and the stored history agree before resuming.

        The training core writes the checkpoint (with every epoch record so far) just
        before it reports the epoch, so a worker killed between the two leaves the
        checkpoint ahead of the history: the missing rows are refilled from the
        checkpoint's records. A checkpoint behind the history (a host without the shared
        artifact volume) cannot be resumed without a gap, so such a job restarts from 1.
        """
        from app.ml.training import checkpoint_epoch, checkpoint_records

        done = checkpoint_epoch(checkpoint_dir)
        recorded = self._db(execution.last_recorded_epoch)
        if done > recorded:
            missing = [r for r in checkpoint_records(checkpoint_dir) if r.epoch > recorded]
            if [r.epoch for r in missing] == list(range(recorded + 1, done + 1)):
                for record in missing:
                    if not self._db(execution.record_epoch, record, attempt=self.attempt):
                        return False
                log.info(
                    "job %s: refilled epochs %d-%d from its checkpoint",
                    self.job.id,
                    recorded + 1,
                    done,
                )
                recorded = done
        if done == recorded:
            if done:
                log.info("job %s resumes after epoch %d", self.job.id, done)
            return True
        log.warning(
            "job %s: checkpoint at epoch %d but history at epoch %d; restarting from epoch 1",
            self.job.id,
            done,
            recorded,
        )
        self.store.discard_checkpoints(self.job.id)
        return bool(self._db(execution.forget_epochs, self.attempt))

    def _stopped(self) -> Outcome:
        reason = self.control.reason
        if reason == "cancel":
            if self._db(execution.finish_cancelled, attempt=self.attempt):
                self._clean_up()
                return Outcome.CANCELLED
            return Outcome.LOST
        if reason == "shutdown":
            # Not a crash: give the attempt back; the checkpoint lets the next worker resume.
            if self._db(execution.requeue, attempt=self.attempt, refund_attempt=True):
                log.info("job %s requeued because the worker is shutting down", self.job.id)
                return Outcome.REQUEUED
        return Outcome.LOST

    def _clean_up(self) -> None:
        """A terminal job never resumes: its checkpoint and staged file are dead weight."""
        self.store.discard_checkpoints(self.job.id)
        self.store.discard_staging(self.job.id)


def _out_of_memory_types() -> tuple[type[BaseException], ...]:
    """MemoryError, and TensorFlow's ResourceExhaustedError when TensorFlow is loaded (a job
    that failed before it was imported cannot have run out of GPU memory)."""
    tf = sys.modules.get("tensorflow")
    errors = getattr(tf, "errors", None)
    exhausted = getattr(errors, "ResourceExhaustedError", None)
    return (MemoryError,) if exhausted is None else (MemoryError, exhausted)


def failure_message(exc: BaseException, job: Job, settings: Settings, device: str) -> str:
    """A sentence the user can act on, naming what to change."""
    from app.ml.data import DataError
    from app.ml.nets import UnknownNetError
    from app.ml.training import TrainingError

    kind = type(exc).__name__
    if isinstance(exc, DataError):
        return (
            f"could not load the CIFAR-10 data: {exc}. Check the workers' CIFAR10_SOURCE "
            f"setting (now {settings.CIFAR10_SOURCE!r})"
        )
    out_of_memory = "out of memory" in str(exc).lower() or "OOM when allocating" in str(exc)
    if isinstance(exc, _out_of_memory_types()) or out_of_memory:
        return (
            f"out of memory on {device} with batch_size {job.batch_size}: use a smaller "
            "batch_size, a mixed precision (mixed_bfloat16 or mixed_float16) or a smaller net"
        )
    if isinstance(exc, UnknownNetError):
        return f"{exc}; create a new job with one of them"
    if isinstance(exc, TrainingError):
        return f"training stopped: {exc}"
    if isinstance(exc, ValueError):
        return f"invalid training parameters: {exc}"
    return f"training failed with {kind}: {exc}"
