"""The job runner in-process: a checkpoint ahead of the stored history is refilled, not
retrained; and its one back-off loop."""

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from app.config import Settings
from app.jobs.runner import Outcome, is_database_fault, retry_with_backoff, run_job
from app.ml.training import TrainConfig, checkpoint_records, train
from app.models import EpochMetric, Job
from app.registry.store import LocalArtifactStore


def test_epochs_checkpointed_but_never_stored_are_refilled_then_training_resumes(
    settings, make_job, session_factory, cifar10, cifar10_archive, cifar10_cache
):
    settings = settings.model_copy(
        update={"CIFAR10_SOURCE": str(cifar10_archive), "CACHE_DIR": cifar10_cache}
    )
    job = make_job(
        status="queued", net="net1", epochs=3, batch_size=64, train_limit=400, precision="float32"
    )
    # A worker that died right after writing epoch 2's checkpoint, before storing any row.
    store = LocalArtifactStore.from_settings(settings)
    config = TrainConfig(net="net1", epochs=2, batch_size=64, train_limit=400, precision="float32")
    train(config, cifar10, checkpoint_dir=store.checkpoint_dir(job.id))
    checkpointed = checkpoint_records(store.checkpoint_dir(job.id))

    assert run_job(settings, job.id, "test-runner") == Outcome.SUCCEEDED

    with session_factory() as session:
        rows = session.scalars(
            select(EpochMetric).where(EpochMetric.job_id == job.id).order_by(EpochMetric.epoch)
        ).all()
        assert [row.epoch for row in rows] == [1, 2, 3]
        # Wall-clock seconds never repeat between two fits: equal means refilled, not retrained.
        assert [row.seconds for row in rows[:2]] == [record.seconds for record in checkpointed]
        assert session.get(Job, job.id).status == "succeeded"


def _flaky(failures: list[BaseException]):
    """A call that raises each of `failures` in turn, then answers "done"."""
    calls = []

    def call() -> str:
        calls.append(len(calls))
        if failures:
            raise failures.pop(0)
        return "done"

    return call, calls


def _database_down() -> OperationalError:
    return OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


def _retry(call, *, within_s=3600.0, before_retry=lambda exc, delay: None, sleep=None):
    """retry_with_backoff on database faults, from 1 s up to 3 s, without sleeping."""
    settings = Settings(_env_file=None, INFRA_RETRY_S=within_s, INFRA_BACKOFF_MAX_S=3)
    return retry_with_backoff(
        call,
        retryable=is_database_fault,
        first_delay_s=1.0,
        settings=settings,
        before_retry=before_retry,
        sleep=sleep or (lambda delay: None),
    )


def test_retry_with_backoff_doubles_the_delay_up_to_its_cap():
    call, calls = _flaky([_database_down() for _ in range(4)])
    slept, told = [], []

    def before_retry(exc: Exception, delay: float) -> None:
        told.append((type(exc).__name__, delay))

    assert _retry(call, before_retry=before_retry, sleep=slept.append) == "done"
    assert len(calls) == 5
    assert slept == [1.0, 2.0, 3.0, 3.0]
    assert told == [("OperationalError", delay) for delay in slept]


def test_retry_with_backoff_lets_other_faults_and_a_spent_deadline_through():
    call, calls = _flaky([ValueError("the job's own fault")])
    with pytest.raises(ValueError):
        _retry(call)
    assert len(calls) == 1
    # No retry would start before the deadline: the fault itself propagates.
    call, calls = _flaky([_database_down()])
    with pytest.raises(OperationalError):
        _retry(call, within_s=0.5)
    assert len(calls) == 1


def test_retry_with_backoff_gives_up_when_before_retry_raises():
    class Lost(Exception):
        pass

    def give_up(exc: Exception, delay: float) -> None:
        raise Lost from exc

    call, calls = _flaky([_database_down(), _database_down()])
    with pytest.raises(Lost) as raised:
        _retry(call, before_retry=give_up)
    assert isinstance(raised.value.__cause__, OperationalError)
    assert len(calls) == 1
