"""The job runner on the S3 store, in-process: a job resumes on another host from the store's
checkpoint, publishes its model there, and an API with a scratch folder of its own serves it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sqlalchemy import select

from app.jobs.runner import Outcome, run_job
from app.models import EpochMetric, Job, ModelVersion
from app.registry.store import open_store
from tests.faults.conftest import write_tiny_cifar10


def test_a_job_resumes_on_another_host_from_the_stores_checkpoint_then_is_served(
    settings,
    make_job,
    session_factory,
    s3_server,
    tmp_path: Path,
    client_for,
):
    from app.jobs.checkpoints import DurableEpochs
    from app.ml.data import load_cifar10
    from app.ml.training import TrainConfig, checkpoint_records, train

    bucket = s3_server.bucket()
    data_dir = write_tiny_cifar10(tmp_path / "cifar-10-batches-py")

    def host(name: str):
        return settings.model_copy(
            update={
                "ARTIFACT_STORE": f"s3://{bucket}/cnn",
                "S3_ENDPOINT_URL": s3_server.endpoint,
                "STATE_DIR": tmp_path / name,
                "CIFAR10_SOURCE": str(data_dir),
            }
        )

    first, second, api = host("first"), host("second"), host("api")
    job = make_job(
        status="queued", net="net1", epochs=3, batch_size=50, train_limit=300, precision="float32"
    )
    # The first host trained two epochs and made them durable, then died before it could
    # store their rows (the row is always written after the upload).
    sync = open_store(first).checkpoints(job.id)
    config = TrainConfig(net="net1", epochs=2, batch_size=50, train_limit=300, precision="float32")
    durable = DurableEpochs(sync, record=lambda _epoch: None)
    train(
        config,
        load_cifar10(str(data_dir)),
        on_epoch=durable.on_epoch,
        checkpoint_dir=sync.local_dir,
        callbacks=[durable],
    )
    sync.finish()
    sync.close()
    uploaded = checkpoint_records(sync.local_dir)
    assert [key for key in s3_server.keys(bucket) if key.endswith("manifest.json")]

    assert run_job(second, job.id, "second-host") == Outcome.SUCCEEDED

    with session_factory() as session:
        rows = session.scalars(
            select(EpochMetric).where(EpochMetric.job_id == job.id).order_by(EpochMetric.epoch)
        ).all()
        assert [row.epoch for row in rows] == [1, 2, 3]
        # Refilled from the store's checkpoint, not retrained: the same wall-clock seconds.
        assert [row.seconds for row in rows[:2]] == [record.seconds for record in uploaded]
        assert session.get(Job, job.id).status == "succeeded"
        version = session.scalars(select(ModelVersion).where(ModelVersion.job_id == job.id)).one()
    assert version.artifact_path == "models/net1/1/model.keras"
    model = s3_server.read(bucket, "cnn/models/net1/1/model.keras")
    assert hashlib.sha256(model).hexdigest() == version.sha256
    assert s3_server.keys(bucket, "cnn/models/") == [
        "cnn/models/net1/1/manifest.json",
        "cnn/models/net1/1/model.keras",
    ]
    assert s3_server.keys(bucket, "cnn/checkpoints/") == []  # a terminal job's are removed
    assert not (second.scratch_dir / "checkpoints" / str(job.id)).exists()

    with client_for(api) as client:
        response = client.post(
            "/predict", json={"model": "net1", "instances": [[[[0] * 3] * 32] * 32]}
        )
        assert response.status_code == 200, response.text
        download = client.get("/models/net1/1/download")
        assert download.status_code == 200
        assert download.content == model
        assert download.headers["x-checksum-sha256"] == version.sha256
        assert client.get("/models/net1/versions/1/artifact").content == model
    cached = list((api.scratch_dir / "model-cache").rglob("model.keras"))
    assert [path.read_bytes() for path in cached] == [model]
