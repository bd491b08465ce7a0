"""The job runner in-process: a checkpoint ahead of the stored history is refilled, not retrained."""

from sqlalchemy import select

from app.jobs.runner import Outcome, run_job
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
