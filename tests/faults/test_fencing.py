"""The fencing and recovery rules at the database level, on the real PostgreSQL (fast: no TF).

Each test replays one of the holes issue 9 found and checks it is closed.
"""

from __future__ import annotations

import errno
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, OperationalError

from app.files import file_digest
from app.jobs import execution
from app.jobs.execution import StopReason
from app.jobs.execution.common import limit_stalled_write
from app.jobs.runner import infrastructure_message, is_database_fault, is_infrastructure_fault
from app.jobs.service import cancel_job
from app.models import Job, ModelVersion
from app.registry.store import LocalArtifactStore, StoredArtifact

STALE = timedelta(minutes=10)


def _now() -> datetime:
    return datetime.now(UTC)


def _job(session_factory, job_id) -> Job:
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _claim(session_factory, settings, job_id, worker="w1"):
    with session_factory() as session:
        return execution.claim(session, job_id, worker, settings)


def _sweep(session_factory, settings, store=None):
    sent: list[uuid.UUID] = []
    with session_factory() as session:
        report = execution.sweep(session, settings, sent.append, store=store)
    return report, sent


def _age(session_factory, job_id, **delta) -> None:
    """Move the job's heartbeat into the past (as if its worker stopped beating)."""
    with session_factory() as session:
        job = session.get(Job, job_id)
        job.heartbeat_at = _now() - timedelta(**delta)
        session.commit()


def test_a_stalled_worker_cannot_fail_a_job_the_sweep_put_back(
    make_job, session_factory, settings, tmp_path
):
    job = make_job("queued")
    stalled = _claim(session_factory, settings, job.id)
    store = LocalArtifactStore(settings.artifact_dir)
    checkpoint = store.checkpoint_dir(job.id)
    checkpoint.mkdir(parents=True)
    (checkpoint / "marker").write_text("epoch 3")
    _age(session_factory, job.id, minutes=10)
    report, _ = _sweep(session_factory, settings)
    assert report.requeued == [job.id]  # queued again, nobody has claimed it yet

    with session_factory() as session:
        assert not execution.finish_failed(session, job.id, "late failure", token=stalled.token)
        assert not execution.finish_cancelled(session, job.id, token=stalled.token)
        assert not execution.heartbeat(session, job.id, stalled.token)
    row = _job(session_factory, job.id)
    assert (row.status, row.error) == ("queued", None)
    assert (checkpoint / "marker").is_file()


def test_the_claim_counter_never_repeats_after_a_hand_back(make_job, session_factory, settings):
    job = make_job("queued")
    first = _claim(session_factory, settings, job.id, worker="a")
    with session_factory() as session:  # a graceful shutdown gives the attempt back
        assert execution.hand_back(session, job.id, token=first.token, settings=settings) == (
            "requeued"
        )
    second = _claim(session_factory, settings, job.id, worker="b")
    assert second.token != first.token
    row = _job(session_factory, job.id)
    assert (row.attempts, row.claims) == (1, 2)
    with session_factory() as session:  # the first claimant's token is dead for good
        assert not execution.heartbeat(session, job.id, first.token)
        assert execution.control(session, job.id, first.token) is StopReason.LOST
        assert not execution.record_epoch(
            session,
            job.id,
            {"epoch": 1, "loss": 1, "accuracy": 0, "seconds": 1},
            token=first.token,
        )
        assert execution.heartbeat(session, job.id, second.token)


def test_liveness_uses_the_database_clock_not_the_hosts(
    make_job, session_factory, settings, monkeypatch
):
    job = make_job("queued")
    claim = _claim(session_factory, settings, job.id)
    # This process's clock jumps 10 minutes ahead, then 10 minutes behind.
    import app.models

    for skew in (timedelta(minutes=10), -timedelta(minutes=10)):
        monkeypatch.setattr(app.models, "utcnow", lambda s=skew: datetime.now(UTC) + s)
        monkeypatch.setattr(execution, "utcnow", app.models.utcnow, raising=False)
        with session_factory() as session:
            assert execution.heartbeat(session, job.id, claim.token)
        report, sent = _sweep(session_factory, settings)
        assert report.requeued == [] and sent == []
        assert _claim(session_factory, settings, job.id, worker="other").outcome == "busy"
    assert _job(session_factory, job.id).claims == 1


def test_a_cancel_accepted_before_the_success_commit_wins(make_job, session_factory, settings):
    job = make_job("queued")
    claim = _claim(session_factory, settings, job.id)
    with session_factory() as session:
        cancelled = cancel_job(session, job.id)  # the API's 200
        assert cancelled.cancel_requested and cancelled.status == "running"
    staged = settings.artifact_dir / "staged-model.keras"
    staged.parent.mkdir(parents=True, exist_ok=True)
    staged.write_bytes(b"model")
    digest, size = file_digest(staged)
    with session_factory() as session:
        version = execution.finish_succeeded(
            session,
            job.id,
            claim.token,
            evaluation={
                "test_loss": 1.0,
                "test_accuracy": 0.5,
                "first_image": {},
                "per_class_accuracy": [],
                "confusion_matrix": [],
            },
            staged=StoredArtifact(staged, digest, size),
            store=LocalArtifactStore(settings.artifact_dir),
            device="CPU",
            precision="float32",
        )
        assert version is None
        assert execution.control(session, job.id, claim.token) is StopReason.CANCEL
        assert execution.finish_cancelled(session, job.id, token=claim.token)
    row = _job(session_factory, job.id)
    assert (row.status, row.model_version_id) == ("cancelled", None)
    with session_factory() as session:
        assert (
            session.scalars(select(ModelVersion).where(ModelVersion.job_id == job.id)).all() == []
        )


def test_the_sweep_removes_files_of_jobs_terminal_past_the_grace_period(
    make_job, session_factory, settings
):
    store = LocalArtifactStore(settings.artifact_dir)
    old = make_job("failed", finished_at=_now() - timedelta(hours=1))  # failed by a sweep
    recent = make_job("cancelled", finished_at=_now())
    running = make_job("running")
    for job in (old, recent, running):
        store.checkpoint_dir(job.id).mkdir(parents=True)
    store.staging_path(old.id).parent.mkdir(parents=True)
    report, _ = _sweep(session_factory, settings, store=store)
    assert str(old.id) in report.cleaned
    assert str(recent.id) not in report.cleaned and str(running.id) not in report.cleaned
    assert not store.checkpoint_dir(old.id).exists()
    assert not store.staging_path(old.id).parent.exists()
    assert store.checkpoint_dir(recent.id).is_dir()  # within the grace period
    assert store.checkpoint_dir(running.id).is_dir()


def test_a_supervisor_hands_a_dead_workers_job_back_at_once(make_job, session_factory, settings):
    mine = make_job("queued")
    theirs = make_job("queued")
    _claim(session_factory, settings, mine.id, worker="serve-dead@host")
    _claim(session_factory, settings, theirs.id, worker="serve-alive@host")
    sent: list[uuid.UUID] = []
    with session_factory() as session:
        report = execution.release_worker(session, settings, "serve-dead@host", sent.append)
    assert report.requeued == [mine.id] and sent == [mine.id]  # heartbeat still fresh
    row = _job(session_factory, mine.id)
    assert (row.status, row.worker, row.attempts) == ("queued", None, 1)  # a crash counts
    assert _job(session_factory, theirs.id).status == "running"
    again = _claim(session_factory, settings, mine.id, worker="serve-new@host")
    assert again.claimed and again.token == 2


def test_infrastructure_faults_hand_back_without_an_attempt_up_to_their_limit(
    make_job, session_factory, settings
):
    settings = settings.model_copy(update={"MAX_INFRA_FAILURES": 2})
    job = make_job("queued")
    for expected in ("requeued", "failed"):
        claim = _claim(session_factory, settings, job.id)
        with session_factory() as session:
            result = execution.hand_back(
                session, job.id, token=claim.token, settings=settings, infra_message="disk full"
            )
        assert result == expected
    row = _job(session_factory, job.id)
    assert row.status == "failed" and row.attempts == 1  # never counted as the job's crash
    assert row.infra_failures == 1 and "2 infrastructure faults" in row.error


@pytest.mark.parametrize(
    ("exc", "infra", "words"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/store/x"), True, "is full"),
        (PermissionError(errno.EACCES, "Permission denied", "/store/x"), True, "not writable"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/store/x"), True, "not writable"),
        (OperationalError("SELECT 1", {}, Exception("server closed")), True, "database"),
        (ValueError("batch_size must be positive"), False, None),
        (FileNotFoundError(errno.ENOENT, "No such file", "/data/cifar"), False, None),
    ],
)
def test_faults_are_classed_as_infrastructure_or_training(exc, infra, words, settings):
    assert is_infrastructure_fault(exc) is infra
    if infra:
        assert words in infrastructure_message(exc, settings)


def test_a_data_error_is_the_jobs_fault_even_when_caused_by_an_os_error():
    from app.ml.data import DataError

    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "/data")
        except PermissionError as cause:
            raise DataError("cannot read /data") from cause
    except DataError as exc:
        assert not is_infrastructure_fault(exc)


def test_a_worker_frozen_inside_its_write_lets_go_of_the_job_row(make_job, session_factory):
    """A heartbeat transaction that stalls after its UPDATE (the worker SIGSTOPped between the
    UPDATE and the COMMIT) must not hold the job's row lock until the worker thaws: PostgreSQL
    ends that session after STALLED_WRITE_LIMIT_S and the sweep's or the API's write goes on."""
    job = make_job("running", claims=1)
    frozen = session_factory()
    limit_stalled_write(frozen)
    frozen.execute(text("UPDATE jobs SET heartbeat_at = now() WHERE id = :id"), {"id": job.id})
    # `frozen` now holds the row lock and sends nothing more, as a stopped process would.
    with session_factory() as other:
        # Without the limit this waits for the lock until lock_timeout and raises.
        other.execute(text("SET LOCAL lock_timeout = '60s'"))
        other.execute(
            text("UPDATE jobs SET cancel_requested = true WHERE id = :id"), {"id": job.id}
        )
        other.commit()
    with pytest.raises(DBAPIError) as ended:  # the frozen session was ended by the server
        frozen.commit()
    frozen.close()
    # A lost connection, which the runner treats as an infrastructure fault (retry, no attempt).
    assert is_database_fault(ended.value)
    with session_factory() as check:
        assert check.get(Job, job.id).cancel_requested is True
