"""Run one training job end to end: claim it, train with durable progress, finish it.

The glue between the database (app.jobs.execution), the artifact store and the
training core (app.ml). No Celery and no HTTP here, so the same runner works under any
task queue; the worker's task only hands it a job id. The worker loads TensorFlow when it
starts (worker/tasks.py), so loading it never stalls a claimed job's heartbeat.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import session_factory
from app.errors import public_message
from app.jobs import execution
from app.jobs.execution import StopReason
from app.models import Job
from app.registry.store import CheckpointSync, open_store

if TYPE_CHECKING:
    from app.ml.data import Cifar10
    from app.ml.training import EpochRecord, TrainConfig, TrainResult

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
    REQUEUED = "requeued"  # handed back (shutdown, infrastructure fault): queued again
    LOST = "lost"  # someone else owns the job now; nothing was written


class _Interrupted(Exception):
    """Leave the current phase: cancel requested, claim lost, or the worker shuts down."""


class _Heartbeat(threading.Thread):
    """Writes heartbeat_at every interval so the sweep knows this claim is alive."""

    def __init__(
        self, sessions: sessionmaker[Session], job_id: uuid.UUID, token: int, interval: float
    ) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self._sessions, self._job_id, self._token = sessions, job_id, token
        self._interval = interval
        self._halt = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self._interval):
            try:
                with self._sessions() as session:
                    if not execution.heartbeat(session, self._job_id, self._token):
                        log.warning("job %s: heartbeat refused, the claim is lost", self._job_id)
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
        token: int,
        shutdown: threading.Event | None,
        heartbeat: _Heartbeat,
    ) -> None:
        self._sessions, self._job_id, self._token = sessions, job_id, token
        self._shutdown = shutdown
        self._heartbeat = heartbeat
        self._next_poll = 0.0
        self.reason: StopReason | None = None
        # Why a trial hook ended the job early (a sweep's pruner): it ends cancelled with this.
        self.ended_early: str | None = None

    def lose(self) -> None:
        self.reason = self.reason or StopReason.LOST

    def end_early(self, why: str) -> None:
        self.ended_early = self.ended_early or why

    def should_stop(self, force: bool = False) -> bool:
        if self.reason is not None or self.ended_early is not None:
            return True
        if self._heartbeat.lost.is_set():
            self.reason = StopReason.LOST
        elif self._shutdown is not None and self._shutdown.is_set():
            self.reason = StopReason.SHUTDOWN
        elif force or time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + CONTROL_POLL_S
            try:
                with self._sessions() as session:
                    self.reason = execution.control(session, self._job_id, self._token)
            except DB_ERRORS:  # the database is briefly away: ask again at the next poll
                log.warning("job %s: could not read its control flags", self._job_id)
        return self.reason is not None

    def checkpoint(self) -> None:
        """Between phases: leave now if a cancel, a shutdown or a lost claim is pending."""
        if self.should_stop(force=True):
            raise _Interrupted(self.reason)

    def sleep(self, seconds: float) -> None:
        """Wait (a back-off) while still answering cancel, shutdown and a lost claim."""
        deadline = time.monotonic() + seconds
        while True:
            self.checkpoint()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, CONTROL_POLL_S))


def run_job(
    settings: Settings,
    job_id: uuid.UUID | str,
    worker: str,
    *,
    shutdown: threading.Event | None = None,
    on_claim: Callable[[uuid.UUID], None] | None = None,
) -> Outcome | execution.ClaimOutcome:
    """Claim and run one job; returns an Outcome or a ClaimOutcome when it was not claimed.

    Training faults end the job `failed` with a message the user can act on, and the worker
    goes on to its next job. Infrastructure faults (store, database) are retried with
    back-off and then handed back without using an attempt (docs/reliability.md). Only a
    database that stays unreachable propagates: nothing can be recorded, and the sweep puts
    the job back once its heartbeat is stale.
    """
    job_id = uuid.UUID(str(job_id))
    sessions = session_factory(settings)
    with sessions() as session:
        claim = execution.claim(session, job_id, worker, settings)
    if not claim.claimed:
        log.info("job %s not run by %s: %s", job_id, worker, claim.outcome)
        return claim.outcome
    assert claim.job is not None
    if on_claim is not None:
        on_claim(job_id)  # the worker's presence (GET /workers) shows the job from now on
    log.info(
        "job %s claimed by %s (claim %d, attempt %d, %s)",
        job_id,
        worker,
        claim.token,
        claim.job.attempts,
        claim.outcome,
    )
    beat = _Heartbeat(sessions, job_id, claim.token, settings.HEARTBEAT_INTERVAL_S)
    beat.start()
    try:
        runner = _Runner(settings, sessions, claim.job, claim.token, shutdown, beat)
        outcome = runner.run()
    finally:
        beat.stop()
    if outcome == Outcome.LOST:
        log.warning("job %s lost by %s: another claim owns it; nothing written", job_id, worker)
    return outcome


class _Runner:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        job: Job,
        token: int,
        shutdown: threading.Event | None,
        beat: _Heartbeat,
    ) -> None:
        self.settings, self.sessions, self.job, self.token = settings, sessions, job, token
        self.store = open_store(settings)
        self.control = _Control(sessions, job.id, token, shutdown, beat)
        self.device = "unknown"

    def _db(
        self,
        fn: Callable[Concatenate[Session, uuid.UUID, P], R],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        """One app.jobs.execution step for this job in a session of its own, retried with
        back-off while the database is unreachable."""

        def step() -> R:
            with self.sessions() as session:
                return fn(session, self.job.id, *args, **kwargs)

        def before_retry(exc: Exception, delay: float) -> None:
            log.warning("job %s: database error, retrying in %.1f s: %s", self.job.id, delay, exc)

        return retry_with_backoff(
            step,
            retryable=is_database_fault,
            first_delay_s=0.5,
            settings=self.settings,
            before_retry=before_retry,
        )

    def run(self) -> Outcome:
        try:
            return self._train_and_finish()
        except _Interrupted:
            return self._stopped()
        except Exception as exc:
            if is_infrastructure_fault(exc):
                return self._infrastructure_fault(exc)
            message = failure_message(exc, self.job, self.settings, self.device)
            log.warning("job %s failed: %s", self.job.id, message, exc_info=True)
            if self._db(execution.finish_failed, message, token=self.token):
                self._clean_up()
                return Outcome.FAILED
            return Outcome.LOST

    def _infrastructure_fault(self, exc: BaseException) -> Outcome:
        """Hand the job back after a back-off, keeping its checkpoint and its attempts."""
        message = infrastructure_message(exc, self.settings, self.store.location)
        log.warning("job %s: infrastructure fault: %s", self.job.id, message, exc_info=True)
        try:
            backoff = min(2.0**self.job.infra_failures, self.settings.INFRA_BACKOFF_MAX_S)
            self._db(execution.note_problem, self.token, message)
            self.control.sleep(backoff)
        except _Interrupted:
            return self._stopped()
        result = self._db(
            execution.hand_back, token=self.token, settings=self.settings, infra_message=message
        )
        if result == execution.HandBack.REQUEUED:
            return Outcome.REQUEUED
        if result == execution.HandBack.FAILED:
            self._clean_up()
            return Outcome.FAILED
        return Outcome.LOST

    def _retry_infrastructure(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run `fn`, retrying infrastructure faults in place with back-off for INFRA_RETRY_S.

        The job stays this worker's (heartbeat on); job.error tells the operator what is
        wrong meanwhile. Past the deadline the fault propagates and the job is handed back.
        """

        def before_retry(exc: Exception, delay: float) -> None:
            message = infrastructure_message(exc, self.settings, self.store.location)
            log.warning(
                "job %s: %s failed, retrying in %.0f s: %s", self.job.id, what, delay, message
            )
            if not self._db(execution.note_problem, self.token, f"retrying {what}: {message}"):
                raise _Interrupted(StopReason.LOST) from exc

        return retry_with_backoff(
            fn,
            retryable=is_infrastructure_fault,
            first_delay_s=1.0,
            settings=self.settings,
            before_retry=before_retry,
            sleep=self.control.sleep,
        )

    def _train_and_finish(self) -> Outcome:
        from app.ml.data import load_cifar10, provenance
        from app.ml.distribute import describe_devices
        from app.ml.evaluation import evaluate
        from app.ml.training import TrainConfig, configure_devices, resolve_precision

        job, settings = self.job, self.settings
        configure_devices()
        self.device = describe_devices(job.gpus)
        requested = job.precision or settings.PRECISION
        config = TrainConfig.from_attributes(job, precision=requested)
        # Resolve `auto` once and store it, so a resumed attempt uses the same policy.
        config = dataclasses.replace(config, precision=resolve_precision(requested))
        if not self._db(
            execution.mark_started, self.token, device=self.device, precision=config.precision
        ):
            return Outcome.LOST
        self.control.checkpoint()

        data = load_cifar10(settings.CIFAR10_SOURCE, cache_dir=settings.cache_dir)
        self.control.checkpoint()
        checkpoints = self.store.checkpoints(job.id)
        try:
            result = self._fit(config, data, checkpoints)
        finally:
            checkpoints.close()
        if result is None:
            return Outcome.LOST
        if result.cancelled or self.control.reason is not None:
            return self._stopped()
        self.control.checkpoint()

        evaluation = dataclasses.replace(
            evaluate(result.model, data.x_test, data.y_test, tta=config.tta),
            data=provenance(data).to_dict(),
        )
        self.control.checkpoint()
        metrics = {
            "test_loss": evaluation.test_loss,
            "test_accuracy": evaluation.test_accuracy,
            "epochs": config.epochs,
            "device": result.device,
            "precision": result.precision,
            **({"restored_epoch": result.best_epoch} if result.best_epoch else {}),
            **({"tta_accuracy": evaluation.tta_accuracy} if evaluation.tta_views else {}),
        }

        def stage_and_register() -> Any:
            staged = self.store.stage_model(result.model, job.id)
            self.control.checkpoint()
            return self._db(
                execution.finish_succeeded,
                self.token,
                evaluation=evaluation,
                staged=staged,
                store=self.store,
                device=result.device,
                precision=result.precision,
                metrics=metrics,
            )

        version = self._retry_infrastructure("saving and registering the model", stage_and_register)
        if version is None:
            # Not recorded: a cancel was accepted meanwhile (it wins), or the claim is lost.
            self.store.discard_staging(job.id)
            self.control.should_stop(force=True)
            return self._stopped()
        log.info("job %s succeeded: %s version %d", job.id, version.name, version.version)
        self._clean_up()
        return Outcome.SUCCEEDED

    def _fit(
        self, config: TrainConfig, data: Cifar10, checkpoints: CheckpointSync
    ) -> TrainResult | None:
        """Resume from the store's checkpoint and train; None when the claim was lost.

        Every epoch's row is stored once its checkpoint is durable in the store
        (app/jobs/checkpoints.py); a fit that ends normally waits for the last one.
        """
        from app.jobs.checkpoints import DurableEpochs
        from app.ml.training import train
        from app.sweeps.trials import TrialHook

        self._retry_infrastructure("restoring the checkpoint", checkpoints.restore)
        if not self._align_checkpoint(checkpoints.local_dir):
            return None
        # A sweep's trial gets each stored epoch's verdict from the sweep's pruner.
        trial = self._db(TrialHook.for_job, self.sessions)
        if trial is not None and trial.stop_reason is not None:
            self.control.end_early(trial.stop_reason)  # decided before this worker took over
        self.control.checkpoint()

        def record(epoch: EpochRecord) -> None:
            if not self._db(execution.record_epoch, epoch, token=self.token):
                self.control.lose()  # should_stop() ends the fit at the next batch
                return
            why = trial(epoch) if trial is not None else None
            if why is not None:
                self.control.end_early(why)

        durable = DurableEpochs(checkpoints, record)
        result = train(
            config,
            data,
            on_epoch=durable.on_epoch,
            should_stop=self.control.should_stop,
            checkpoint_dir=checkpoints.local_dir,
            callbacks=[durable],
        )
        if not result.cancelled and self.control.reason is None:
            checkpoints.finish()
        return result

    def _align_checkpoint(self, checkpoint_dir: Path) -> bool:
        """Make the checkpoint and the stored history agree before resuming.

        An epoch's row is stored only once its checkpoint (with every epoch record so far)
        is durable in the store, so a worker killed between the two leaves the checkpoint
        ahead of the history: the missing rows are refilled from the checkpoint's records.
        A checkpoint behind the history (a store that lost it) cannot be resumed without a
        gap, so such a job restarts from 1.
        """
        from app.ml.training import checkpoint_epoch, checkpoint_records

        done = checkpoint_epoch(checkpoint_dir)
        recorded = self._db(execution.last_recorded_epoch)
        if done > recorded:
            missing = [r for r in checkpoint_records(checkpoint_dir) if r.epoch > recorded]
            if [r.epoch for r in missing] == list(range(recorded + 1, done + 1)):
                for record in missing:
                    if not self._db(execution.record_epoch, record, token=self.token):
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
        return bool(self._db(execution.forget_epochs, self.token))

    def _stopped(self) -> Outcome:
        reason = self.control.reason
        if reason is not StopReason.LOST and self.control.ended_early is not None:
            ended = self.control.ended_early
            if self._db(execution.finish_cancelled, token=self.token, reason=ended):
                self._clean_up()
                return Outcome.CANCELLED
            return Outcome.LOST
        if reason is StopReason.CANCEL:
            if self._db(execution.finish_cancelled, token=self.token):
                self._clean_up()
                return Outcome.CANCELLED
            return Outcome.LOST
        if reason is StopReason.SHUTDOWN:
            # Not a crash: the attempt is given back; the checkpoint lets the next claim resume.
            result = self._db(execution.hand_back, token=self.token, settings=self.settings)
            if result == execution.HandBack.REQUEUED:
                log.info("job %s handed back because the worker is shutting down", self.job.id)
                return Outcome.REQUEUED
        return Outcome.LOST

    def _clean_up(self) -> None:
        """A terminal job never resumes: its checkpoint and staged file are dead weight.

        The job has ended already, so a store that fails now changes nothing: the sweep
        removes the files once it answers again."""
        try:
            self.store.discard_job_files(self.job.id)
        except OSError as exc:
            log.warning("job %s: its files stay for the sweep: %s", self.job.id, exc)


# ----------------------------------------------------------------------------- retries
def retry_with_backoff(
    fn: Callable[[], R],
    *,
    retryable: Callable[[Exception], bool],
    first_delay_s: float,
    settings: Settings,
    before_retry: Callable[[Exception, float], None],
    sleep: Callable[[float], None] = time.sleep,
) -> R:
    """fn(), retried while it raises what `retryable` accepts, for up to INFRA_RETRY_S.

    The delay doubles from `first_delay_s` up to INFRA_BACKOFF_MAX_S; no retry starts past
    the deadline, and any other exception, or the last fault, propagates. `before_retry`
    (exception, delay) logs, and may raise to give up; `sleep` waits out the delay.
    """
    deadline = time.monotonic() + settings.INFRA_RETRY_S
    delay = first_delay_s
    while True:
        try:
            return fn()
        except Exception as exc:
            if not retryable(exc) or time.monotonic() + delay > deadline:
                raise
            before_retry(exc, delay)
            sleep(delay)
            delay = min(delay * 2, settings.INFRA_BACKOFF_MAX_S)


# ----------------------------------------------------------------------------- fault classes
DB_ERRORS = (OperationalError, InterfaceError, DBAPIError)
# errno values that say the storage is at fault, not the job: full, read-only, forbidden,
# broken mount, a path component that is not a folder.
STORAGE_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EFBIG,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.EIO,
        errno.ENOTDIR,
        errno.EEXIST,
        errno.ESTALE,
    }
)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def is_database_fault(exc: BaseException) -> bool:
    """Connection-level database errors (server gone, connection killed, locked SQLite file)."""
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def _storage_error(exc: BaseException) -> OSError | None:
    from app.ml.data import DataError

    for item in _chain(exc):
        if isinstance(item, DataError):
            return None  # the training data is the job's problem, not the store's
        if isinstance(item, OSError) and item.errno in STORAGE_ERRNOS:
            return item
    return None


def is_infrastructure_fault(exc: BaseException) -> bool:
    """The store or the database failed, not the job: retry, keep the checkpoint and attempts."""
    return any(is_database_fault(item) for item in _chain(exc)) or _storage_error(exc) is not None


def infrastructure_message(
    exc: BaseException, settings: Settings, location: str | None = None
) -> str:
    """What is wrong, in words an operator can act on. `location` names the artifact store
    (a folder or a bucket); the configured one by default."""
    storage = _storage_error(exc)
    if storage is not None:
        store = location or open_store(settings).location
        where = storage.filename or store
        keeps = "The job keeps its checkpoint and history and resumes when the store is writable"
        advice = getattr(storage, "advice", None)
        if advice is not None:  # the store's own words (an object store that is unreachable)
            return (
                f"the artifact store ({store}) failed: {where}: {storage.strerror}; "
                f"{advice}. {keeps}"
            )
        if storage.errno in {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}:
            return (
                f"the artifact store ({store}) is full: writing {where} failed "
                f"({storage.strerror}); free space or enlarge its volume. {keeps}"
            )
        return (
            f"the artifact store ({store}) is not writable: {where}: "
            f"{storage.strerror}; check the volume is mounted read-write and owned by the "
            f"worker's user. {keeps}"
        )
    return (
        f"the database is unreachable ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
        "check DATABASE_URL and that PostgreSQL is up. The job keeps its checkpoint"
    )


def _out_of_memory_types() -> tuple[type[BaseException], ...]:
    """MemoryError, and TensorFlow's ResourceExhaustedError when TensorFlow is loaded (a job
    that failed before it was imported cannot have run out of GPU memory)."""
    tf = sys.modules.get("tensorflow")
    errors = getattr(tf, "errors", None)
    exhausted = getattr(errors, "ResourceExhaustedError", None)
    return (MemoryError,) if exhausted is None else (MemoryError, exhausted)


def failure_message(exc: BaseException, job: Job, settings: Settings, device: str) -> str:
    """A sentence the user can act on, naming what to change, fit for any API caller
    (no absolute paths, no raw text of unexpected exceptions: those go to the log)."""
    return public_message(_failure_text(exc, job, settings, device))


def _failure_text(exc: BaseException, job: Job, settings: Settings, device: str) -> str:
    from app.ml.data import DataError
    from app.ml.distribute import DistributionError
    from app.ml.nets import UnknownNetError
    from app.ml.training import TrainingError

    kind = type(exc).__name__
    if isinstance(exc, DataError):
        return f"could not load the CIFAR-10 data: {exc}. Check the workers' CIFAR10_SOURCE setting"
    out_of_memory = "out of memory" in str(exc).lower() or "OOM when allocating" in str(exc)
    if isinstance(exc, _out_of_memory_types()) or out_of_memory:
        return (
            f"out of memory on {device} with batch_size {job.batch_size}: use a smaller "
            "batch_size, a mixed precision (mixed_bfloat16 or mixed_float16) or a smaller net"
        )
    if isinstance(exc, UnknownNetError):
        return f"{exc}; create a new job with one of them"
    if isinstance(exc, (TrainingError, DistributionError)):
        return f"training stopped: {exc}"
    if isinstance(exc, ValueError):
        return f"invalid training parameters: {exc}"
    # Anything else may carry paths, tensors or library internals: the worker's log has it.
    return f"training failed with {kind}; the worker's log has the details"
