"""Writing the same (job, epoch) twice leaves one row (a retried write is not a new epoch)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from app.models import EpochMetric


def epoch_rows(session_factory, job_id) -> list[tuple[int, float]]:
    with session_factory() as session:
        return [
            (row.epoch, row.loss)
            for row in session.scalars(
                select(EpochMetric).where(EpochMetric.job_id == job_id).order_by(EpochMetric.epoch)
            )
        ]


def test_the_unique_constraint_refuses_a_second_row(client, make_job, session_factory):
    job = make_job("running", epochs=3)
    row = {"epoch": 1, "loss": 1.0, "accuracy": 0.5, "val_loss": 1.1, "val_accuracy": 0.4}
    with session_factory() as session:
        session.add(EpochMetric(job_id=job.id, seconds=1.0, **row))
        session.commit()
        session.add(EpochMetric(job_id=job.id, seconds=2.0, **{**row, "loss": 0.9}))
        with pytest.raises(IntegrityError) as raised:
            session.commit()
        assert "uq_epochs_job_id_epoch" in str(raised.value)
        session.rollback()
        count = session.scalar(
            select(func.count()).select_from(EpochMetric).where(EpochMetric.job_id == job.id)
        )
    assert count == 1
    assert epoch_rows(session_factory, job.id) == [(1, 1.0)]
    history = client.get(f"/jobs/{job.id}/history").json()
    assert [e["epoch"] for e in history["epochs"]] == [1]


def test_the_same_epoch_of_another_job_is_its_own_row(make_job, session_factory):
    first, second = make_job("running"), make_job("running")
    row = {"epoch": 1, "loss": 1.0, "accuracy": 0.5, "seconds": 1.0}
    with session_factory() as session:
        session.add_all([EpochMetric(job_id=first.id, **row), EpochMetric(job_id=second.id, **row)])
        session.commit()
    assert epoch_rows(session_factory, first.id) == [(1, 1.0)]
    assert epoch_rows(session_factory, second.id) == [(1, 1.0)]


def test_record_epoch_twice_keeps_one_row_and_the_first_values(client, make_job, session_factory):
    from app.jobs.execution import record_epoch

    job = make_job("running", epochs=3)
    record = {
        "epoch": 1,
        "loss": 1.0,
        "accuracy": 0.5,
        "val_loss": 1.1,
        "val_accuracy": 0.4,
        "seconds": 2.0,
        "images_per_second": 50.0,
    }
    with session_factory() as session:
        assert record_epoch(session, job.id, record, token=job.claims) is True
        # A redelivered or retried write of the same epoch (its numbers may differ slightly).
        assert record_epoch(session, job.id, {**record, "loss": 0.99}, token=job.claims) is True
    assert epoch_rows(session_factory, job.id) == [(1, 1.0)]
    body = client.get(f"/jobs/{job.id}").json()
    assert body["progress"] == {"epoch": 1, "epochs": 3}
    history = client.get(f"/jobs/{job.id}/history").json()
    assert [(e["epoch"], e["loss"]) for e in history["epochs"]] == [(1, 1.0)]
