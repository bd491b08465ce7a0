"""The worker's database side on the real PostgreSQL: claim, fencing, epochs, finish, sweep.

Fast (no TensorFlow): every test writes job rows in a given state and calls
app.jobs.execution directly, the way the worker does.
"""

from __future__ import annotations

import functools
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from app.files import file_digest
from app.jobs import execution
from app.jobs.execution import ClaimOutcome, StopReason
from app.jobs.service import cancel_job
from app.jobs.sweeper import send_training
from app.models import EpochMetric, Evaluation, Job, ModelVersion
from app.registry.store import LocalArtifactStore, StoredArtifact


def _now() -> datetime:
    return datetime.now(UTC)


def _job(session_factory, job_id) -> Job:
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _epochs(session_factory, job_id) -> list[int]:
    with session_factory() as session:
        return list(
            session.scalars(
                select(EpochMetric.epoch)
                .where(EpochMetric.job_id == job_id)
                .order_by(EpochMetric.epoch)
            )
        )


def _record(epoch: int, loss: float = 1.0) -> dict:
    return {
        "epoch": epoch,
        "loss": loss,
        "accuracy": 0.5,
        "val_loss": 1.2,
        "val_accuracy": 0.4,
        "seconds": 2.0,
        "images_per_second": 500.0,
    }


def _claim(session_factory, settings, job_id, worker="w1"):
    with session_factory() as session:
        return execution.claim(session, job_id, worker, settings)


STALE = timedelta(minutes=10)


# ------------------------------------------------------------------------------------ claim
def test_claim_takes_a_queued_job_and_counts_the_attempt(make_job, session_factory, settings):
    job = make_job("queued")
    result = _claim(session_factory, settings, job.id, worker="worker-a@host")
    assert result.claimed and result.outcome == ClaimOutcome.CLAIMED
    assert result.token == 1
    row = _job(session_factory, job.id)
    assert (row.status, row.attempts, row.worker) == ("running", 1, "worker-a@host")
    assert row.started_at is not None and row.heartbeat_at is not None


def test_second_delivery_while_the_claimant_beats_is_refused(make_job, session_factory, settings):
    job = make_job("queued")
    first = _claim(session_factory, settings, job.id, worker="a")
    second = _claim(session_factory, settings, job.id, worker="b")
    assert first.claimed
    assert not second.claimed and second.outcome == ClaimOutcome.BUSY
    row = _job(session_factory, job.id)
    assert (row.attempts, row.worker) == (1, "a")


def test_stale_running_job_is_taken_over_and_keeps_its_start(make_job, session_factory, settings):
    started = _now() - timedelta(hours=1)
    job = make_job("running", heartbeat_at=_now() - STALE, started_at=started, attempts=1)
    result = _claim(session_factory, settings, job.id, worker="b")
    assert result.claimed and result.outcome == ClaimOutcome.TAKEN_OVER
    assert result.token == 2
    row = _job(session_factory, job.id)
    assert (row.status, row.worker, row.attempts) == ("running", "b", 2)
    assert abs((row.started_at - started).total_seconds()) < 1


def test_terminal_job_is_never_claimed(make_job, session_factory, settings):
    job = make_job("succeeded")
    result = _claim(session_factory, settings, job.id)
    assert not result.claimed and result.outcome == ClaimOutcome.TERMINAL
    assert _job(session_factory, job.id).attempts == 1


def test_queued_job_cancelled_through_the_api_never_starts(make_job, session_factory, settings):
    job = make_job("queued")
    with session_factory() as session:
        cancel_job(session, job.id)
    result = _claim(session_factory, settings, job.id)
    assert not result.claimed and result.outcome == ClaimOutcome.TERMINAL
    row = _job(session_factory, job.id)
    assert (row.status, row.attempts, row.started_at) == ("cancelled", 0, None)


def test_cancel_requested_on_a_dead_workers_job_cancels_it_on_redelivery(
    make_job, session_factory, settings
):
    job = make_job("running", heartbeat_at=_now() - STALE, cancel_requested=True)
    result = _claim(session_factory, settings, job.id)
    assert not result.claimed and result.outcome == ClaimOutcome.CANCELLED
    row = _job(session_factory, job.id)
    assert (row.status, row.attempts) == ("cancelled", 1)


def test_claim_beyond_the_attempt_limit_fails_the_job(make_job, session_factory, settings):
    job = make_job("running", heartbeat_at=_now() - STALE, attempts=settings.MAX_ATTEMPTS)
    result = _claim(session_factory, settings, job.id)
    assert not result.claimed and result.outcome == ClaimOutcome.EXHAUSTED
    row = _job(session_factory, job.id)
    assert row.status == "failed"
    limit = settings.MAX_ATTEMPTS
    assert f"worker died {limit} times (attempt limit {limit})" in row.error
    assert row.finished_at is not None


def test_missing_job_is_reported(session_factory, settings, clean_db):
    result = _claim(session_factory, settings, uuid.uuid4())
    assert not result.claimed and result.outcome == ClaimOutcome.MISSING


def test_concurrent_claims_have_exactly_one_winner(make_job, session_factory, settings):
    def contend(job_id, name, barrier, results) -> None:
        barrier.wait()
        results.append(_claim(session_factory, settings, job_id, worker=name))

    for _ in range(5):
        job = make_job("queued")
        barrier = threading.Barrier(4)
        results: list = []
        threads = [
            threading.Thread(target=contend, args=(job.id, f"w{i}", barrier, results))
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [r for r in results if r.claimed]
        assert len(winners) == 1, [r.outcome for r in results]
        assert {r.outcome for r in results if not r.claimed} <= {
            ClaimOutcome.BUSY,
            ClaimOutcome.LOST_RACE,
        }
        assert _job(session_factory, job.id).attempts == 1


# ----------------------------------------------------------------------------- progress
def test_record_epoch_is_idempotent_and_moves_progress(make_job, session_factory, settings):
    job = make_job("queued")
    claim = _claim(session_factory, settings, job.id)
    before = _job(session_factory, job.id).heartbeat_at
    with session_factory() as session:
        assert execution.record_epoch(session, job.id, _record(1, loss=1.5), token=claim.token)
        # The same epoch again (a retried write, or a resumed run reporting it twice).
        assert execution.record_epoch(session, job.id, _record(1, loss=9.9), token=claim.token)
        assert execution.record_epoch(session, job.id, _record(2), token=claim.token)
    assert _epochs(session_factory, job.id) == [1, 2]
    row = _job(session_factory, job.id)
    assert row.current_epoch == 2
    assert row.heartbeat_at > before
    with session_factory() as session:
        first = session.scalar(
            select(EpochMetric).where(EpochMetric.job_id == job.id, EpochMetric.epoch == 1)
        )
        assert first.loss == pytest.approx(1.5)  # the first write stays


def test_a_superseded_claimant_writes_nothing(make_job, session_factory, settings):
    job = make_job("running", heartbeat_at=_now() - STALE, attempts=1)
    old_attempt = 1
    takeover = _claim(session_factory, settings, job.id, worker="new")
    assert takeover.claimed
    with session_factory() as session:
        assert not execution.record_epoch(session, job.id, _record(1), token=old_attempt)
        assert not execution.heartbeat(session, job.id, old_attempt)
        assert execution.control(session, job.id, old_attempt) is StopReason.LOST
        assert not execution.finish_failed(session, job.id, "zombie", token=old_attempt)
        assert execution.control(session, job.id, takeover.token) is None
    assert _epochs(session_factory, job.id) == []
    assert _job(session_factory, job.id).status == "running"


def test_control_reports_a_cancel_request(make_job, session_factory, settings):
    job = make_job("queued")
    claim = _claim(session_factory, settings, job.id)
    with session_factory() as session:
        assert execution.control(session, job.id, claim.token) is None
        cancel_job(session, job.id)
        assert _job(session_factory, job.id).cancel_requested
        assert execution.control(session, job.id, claim.token) is StopReason.CANCEL
        assert execution.finish_cancelled(session, job.id, token=claim.token)
    assert _job(session_factory, job.id).status == "cancelled"


def test_finish_on_a_terminal_job_changes_nothing(make_job, session_factory, settings):
    job = make_job("succeeded")
    with session_factory() as session:
        assert not execution.finish_failed(session, job.id, "late", token=1)
        assert not execution.finish_cancelled(session, job.id, token=1)
        assert execution.hand_back(session, job.id, token=1, settings=settings) == "lost"
    row = _job(session_factory, job.id)
    assert (row.status, row.error) == ("succeeded", None)


def test_hand_back_on_shutdown_gives_the_attempt_back_but_not_the_claim(
    make_job, session_factory, settings
):
    job = make_job("queued")
    claim = _claim(session_factory, settings, job.id)
    with session_factory() as session:
        assert execution.hand_back(session, job.id, token=claim.token, settings=settings) == (
            "requeued"
        )
    row = _job(session_factory, job.id)
    assert (row.status, row.attempts, row.worker, row.enqueued_at) == ("queued", 0, None, None)
    assert row.claims == 1  # the token is never handed out again


def test_finish_succeeded_registers_the_next_version(make_job, session_factory, settings):
    store = LocalArtifactStore(settings.artifact_dir)
    jobs = [make_job("queued", model_name="reg-test") for _ in range(2)]
    versions = []
    for i, job in enumerate(jobs):
        claim = _claim(session_factory, settings, job.id)
        staged_path = store.staging_path(job.id)
        staged_path.parent.mkdir(parents=True, exist_ok=True)
        staged_path.write_bytes(f"model bytes {i}".encode())
        sha256, size = file_digest(staged_path)
        staged = StoredArtifact(staged_path, sha256, size)
        evaluation = {
            "test_loss": 1.0,
            "test_accuracy": 0.6,
            "first_image": {
                "probabilities": [0.1] * 10,
                "predicted_class": 3,
                "true_class": 3,
                "match": True,
            },
            "per_class_accuracy": [0.6] * 10,
            "confusion_matrix": [[0] * 10 for _ in range(10)],
        }
        finish = functools.partial(
            execution.finish_succeeded,
            evaluation=evaluation,
            staged=staged,
            store=store,
            device="CPU",
            precision="float32",
        )
        with session_factory() as session:
            version = finish(session, job.id, claim.token, metrics={"test_accuracy": 0.6})
        assert version is not None
        versions.append(version)
        # A second finish of the same claim is refused: the job is terminal now.
        with session_factory() as session:
            assert finish(session, job.id, claim.token) is None
    assert [v.version for v in versions] == [1, 2]
    for i, (job, version) in enumerate(zip(jobs, versions, strict=True)):
        row = _job(session_factory, job.id)
        assert (row.status, row.model_version_id, row.device) == ("succeeded", version.id, "CPU")
        path = store.model_path("reg-test", version.version)
        # Stored relative to the store's root (issue 7), so the store can move.
        assert version.artifact_path == f"models/reg-test/{version.version}/model.keras"
        assert store.local_path(version.artifact_path) == path
        assert path.read_bytes() == f"model bytes {i}".encode()
        assert file_digest(path) == (version.sha256, version.size_bytes)
        with session_factory() as session:
            assert session.get(Evaluation, job.id).test_accuracy == pytest.approx(0.6)
    with session_factory() as session:
        count = session.scalar(select(func.count()).select_from(ModelVersion))
    assert count == 2


# -------------------------------------------------------------------------------- sweep
def test_sweep_repairs_what_dead_workers_and_lost_messages_left(
    make_job, session_factory, settings, training_queue
):
    limit = settings.MAX_ATTEMPTS
    stale = make_job("running", heartbeat_at=_now() - STALE, attempts=1)
    exhausted = make_job("running", heartbeat_at=_now() - STALE, attempts=limit)
    cancelling = make_job("running", heartbeat_at=_now() - STALE, cancel_requested=True)
    alive = make_job("running", heartbeat_at=_now())
    never_sent = make_job("queued", enqueued_at=None)
    just_sent = make_job("queued", enqueued_at=_now())
    long_lost = make_job(
        "queued", enqueued_at=_now() - timedelta(seconds=settings.QUEUED_RESEND_S + 60)
    )
    finished = make_job("succeeded", heartbeat_at=_now() - STALE)

    with session_factory() as session:
        report = execution.sweep(session, settings, lambda i: send_training(settings, i))

    assert report.requeued == [stale.id]
    assert report.failed == [exhausted.id]
    assert report.cancelled == [cancelling.id]
    assert set(report.resent) == {never_sent.id, long_lost.id}
    statuses = {j.id: _job(session_factory, j.id) for j in (stale, exhausted, cancelling, alive)}
    assert statuses[stale.id].status == "queued" and statuses[stale.id].worker is None
    assert statuses[exhausted.id].status == "failed"
    assert f"worker died {limit} times (attempt limit {limit})" in statuses[exhausted.id].error
    assert statuses[cancelling.id].status == "cancelled"
    assert statuses[alive.id].status == "running"
    assert _job(session_factory, just_sent.id).status == "queued"
    assert _job(session_factory, finished.id).status == "succeeded"
    # The real Redis queue now holds exactly one message per job that needed one.
    sent = sorted(args[0] for _task, args in training_queue.messages())
    assert sent == sorted(str(i) for i in (stale.id, never_sent.id, long_lost.id))
    assert {task for task, _args in training_queue.messages()} == {"worker.tasks.train_job"}
    # Sent again just now: a second sweep leaves them alone.
    with session_factory() as session:
        again = execution.sweep(session, settings, lambda i: send_training(settings, i))
    assert again.requeued == again.resent == again.failed == []


def test_concurrent_sweepers_send_each_job_once(
    make_job, session_factory, settings, training_queue
):
    jobs = [make_job("running", heartbeat_at=_now() - STALE) for _ in range(4)]
    jobs += [make_job("queued", enqueued_at=None) for _ in range(4)]
    barrier = threading.Barrier(3)

    def run() -> None:
        barrier.wait()
        with session_factory() as session:
            execution.sweep(session, settings, lambda i: send_training(settings, i))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = sorted(args[0] for _task, args in training_queue.messages())
    assert sent == sorted(str(j.id) for j in jobs)
    for job in jobs:
        assert _job(session_factory, job.id).status == "queued"


def test_failed_send_is_retried_by_the_next_sweep(make_job, session_factory, settings):
    job = make_job("queued", enqueued_at=None)

    def broker_down(_job_id) -> None:
        raise ConnectionError("broker unreachable")

    with session_factory() as session:
        execution.sweep(session, settings, broker_down)
    assert _job(session_factory, job.id).enqueued_at is None  # still due
    sent: list[uuid.UUID] = []
    with session_factory() as session:
        execution.sweep(session, settings, sent.append)
    assert sent == [job.id]
    assert _job(session_factory, job.id).enqueued_at is not None
