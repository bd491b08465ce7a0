"""The worker's trial hook (app/sweeps/trials.py): the pruner's verdict after each stored epoch."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import select

from app.ml.training import EpochRecord
from app.models import EpochMetric, SweepTrial
from app.sweeps.trials import TrialHook

from .test_api_sweeps import search_body


def store(session_factory, job_id: str, epoch: int, val: float) -> EpochRecord:
    """Store an epoch as record_epoch does, and return its record (what the runner passes)."""
    record = EpochRecord(epoch, 1.0, 0.5, 2.0 - val, val, 1.0, 100.0)
    with session_factory() as session:
        session.add(
            EpochMetric(job_id=uuid.UUID(job_id), created_at=datetime.now(UTC), **record.to_dict())
        )
        session.commit()
    return record


def hook(session_factory, job_id: str) -> TrialHook | None:
    with session_factory() as session:
        return TrialHook.for_job(session, uuid.UUID(job_id), session_factory)


def test_the_hook_stops_a_trial_the_pruner_prunes_and_records_the_epoch(
    client, session_factory, make_job
):
    sweep = client.post(
        "/sweeps", json=search_body(pruner={"type": "asha", "reduction_factor": 2})
    ).json()
    first, second = (t["job_id"] for t in sweep["trials"])
    one, two = hook(session_factory, first), hook(session_factory, second)
    assert one is not None and two is not None and one.stop_reason is None
    assert one(store(session_factory, first, 1, 0.50)) is None
    why = two(store(session_factory, second, 1, 0.30))
    assert why is not None and "pruned by the sweep's asha pruner after epoch 1" in why
    assert "val_accuracy (0.3000)" in why
    with session_factory() as session:
        rows = {str(t.job_id): t for t in session.scalars(select(SweepTrial))}
    assert rows[second].pruned_epoch == 1 and rows[first].pruned_epoch is None
    assert rows[first].system_attrs == {"completed_rung_0": 0.5}
    # A worker that takes the job over after a crash stops it at once.
    again = hook(session_factory, second)
    assert again is not None and again.stop_reason is not None
    # The last epoch always completes.
    assert one(store(session_factory, first, 3, 0.01)) is None


def test_no_hook_for_plain_jobs_searches_without_pruner_and_ablations(
    client, session_factory, make_job
):
    assert hook(session_factory, str(make_job().id)) is None
    sweep = client.post("/sweeps", json=search_body()).json()
    assert hook(session_factory, sweep["trials"][0]["job_id"]) is None
    ablation = client.post(
        "/sweeps", json={"kind": "ablation", "epochs": 2, "train_limit": 100}
    ).json()
    assert hook(session_factory, ablation["trials"][0]["job_id"]) is None
