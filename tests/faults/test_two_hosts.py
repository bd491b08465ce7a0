"""Two hosts and no shared folder: a job resumes on the other host from the S3 store's
checkpoint, an API in a third folder serves the model from the store, and a crash between a
model's upload and its registry commit leaves nothing visible and an orphan the sweep removes.

Every process has a folder of its own (state, scratch, decoded data); they share only
PostgreSQL, one Redis and one S3 server (moto's, over HTTP on loopback).
"""

from __future__ import annotations

import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psycopg
import pytest
from sqlalchemy import select

from app.config import Settings
from app.db import session_factory
from app.jobs.sweeper import sweep_once
from app.migrate import upgrade
from app.models import EpochMetric, Job, ModelVersion
from tests.s3_server import S3Server

from .conftest import (
    FAULT_SETTINGS,
    Api,
    Processes,
    RedisServer,
    admin_key,
    free_port,
    wait_for,
    write_tiny_cifar10,
)

pytestmark = pytest.mark.slow

# 1,600 training images in batches of 32: an epoch lasts long enough to be hit mid-way.
JOB = {"net": "net1", "epochs": 3, "batch_size": 32, "train_limit": 2000, "model_name": "two-hosts"}
# Holds the registry commit of one model name for a while (a BEFORE UPDATE trigger: the
# runner inserts the version row, uploads the files, then sets the key and commits).
STALL_COMMIT = """
CREATE FUNCTION stall_half_published() RETURNS trigger AS $$
BEGIN
    IF NEW.name = 'half-published' THEN PERFORM pg_sleep(60); END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER stall_half_published BEFORE UPDATE ON model_versions
    FOR EACH ROW EXECUTE FUNCTION stall_half_published();
"""


def _admin(database: str) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", user="postgres", dbname=database, autocommit=True)


def test_two_hosts_share_only_the_database_the_broker_and_the_store(
    fresh_pg_database,
    s3_server: S3Server,
    processes: Processes,
    tmp_path: Path,
):
    url = fresh_pg_database()
    upgrade(url)
    database = url.rsplit("/", 1)[1]
    bucket = s3_server.bucket()
    redis_server = RedisServer(tmp_path)
    data = write_tiny_cifar10(tmp_path / "data" / "cifar-10-batches-py", train_per_batch=400)

    def host(name: str) -> Settings:
        folder = tmp_path / name
        shutil.copytree(data, folder / "cifar-10-batches-py")  # each host its own copy
        return Settings(
            _env_file=None,
            DATABASE_URL=url,
            CELERY_BROKER_URL=redis_server.url,
            STATE_DIR=folder / "state",
            CIFAR10_SOURCE=str(folder / "cifar-10-batches-py"),
            PRECISION="float32",
            ARTIFACT_STORE=f"s3://{bucket}/cnn",
            S3_ENDPOINT_URL=s3_server.endpoint,
            CLEANUP_GRACE_S=2.0,
            ORPHAN_SCAN_S=0.5,
            **FAULT_SETTINGS,
        )

    first, second, api_host = host("first"), host("second"), host("api")
    sessions = session_factory(first)
    port = free_port()
    processes.api(api_host, port)
    api = Api(port, admin_key(api_host))
    try:
        # ---------------------------------------------------------------- kill and resume
        worker_a = processes.worker(first)
        job_id = api.submit(**JOB)["id"]
        wait_for(lambda: api.job(job_id)["status"] == "running", 180, "the first host to claim")
        worker_b = processes.worker(second)  # idle meanwhile: the job is the first host's

        def rows() -> list[EpochMetric]:
            with sessions() as session:
                return list(
                    session.scalars(
                        select(EpochMetric)
                        .where(EpochMetric.job_id == uuid.UUID(job_id))
                        .order_by(EpochMetric.epoch)
                    )
                )

        wait_for(rows, 240, "epoch 1 to be stored", interval=0.02)
        worker_a.kill()  # mid-epoch 2
        killed_at = datetime.now(UTC)
        assert [row.epoch for row in rows()] == [1]
        manifests = [k for k in s3_server.keys(bucket, "cnn/checkpoints/") if "manifest" in k]
        assert len(manifests) == 1 and "/epoch-000001-" in manifests[0]

        done = api.wait_status(job_id, "succeeded", timeout=300)
        stored = rows()
        assert [row.epoch for row in stored] == [1, 2, 3]  # each once: no gap, no duplicate
        # Epoch 1 is the first host's row (resumed, not retrained); 2 and 3 the second's.
        assert stored[0].created_at.astimezone(UTC) < killed_at < stored[1].created_at
        assert done["attempts"] == 2 and done["worker"].startswith(f"cnn-{worker_b.pid}@")
        assert "restored the checkpoint of epoch 1 from the store" in worker_b.log_path.read_text()
        assert s3_server.keys(bucket, "cnn/models/") == [
            "cnn/models/two-hosts/1/manifest.json",
            "cnn/models/two-hosts/1/model.keras",
        ]
        # No host wrote a folder store: the bucket is the only place the model lives.
        assert not any(
            (tmp_path / name / "state" / "artifacts").exists()
            for name in ("first", "second", "api")
        )

        # ---------------------------------------------------------------- served by a third folder
        image = np.zeros((32, 32, 3), dtype=np.uint8).tolist()
        answer = api.http.post("/predict", json={"model": "two-hosts", "instances": [image]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == {"name": "two-hosts", "version": 1}
        cached = list((api_host.scratch_dir / "model-cache").rglob("model.keras"))
        assert [p.read_bytes() for p in cached] == [
            s3_server.read(bucket, "cnn/models/two-hosts/1/model.keras")
        ]

        # ---------------------------------------------------------------- crash before the commit
        with _admin(database) as conn:
            conn.execute(STALL_COMMIT)
        half = api.submit(
            net="net1", epochs=1, batch_size=50, train_limit=200, model_name="half-published"
        )["id"]
        manifest = "cnn/models/half-published/1/manifest.json"
        wait_for(lambda: manifest in s3_server.keys(bucket, "cnn/models/"), 240, "the upload")
        stalled = wait_for(lambda: _stalled_backends(database), 30, "the commit to stall")
        # Uploaded, not committed: no reader sees the version.
        assert api.http.get("/models/half-published").status_code == 404
        missing = api.http.post("/predict", json={"model": "half-published", "instances": [image]})
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"

        worker_b.kill()  # the crash: its transaction never commits
        with _admin(database) as conn:
            for pid in stalled:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            conn.execute("DROP TRIGGER stall_half_published ON model_versions")
        assert api.http.post(f"/jobs/{half}/cancel").status_code == 200  # no rerun

        def swept() -> bool:
            # The sweep every worker runs (in this process: no worker is left alive).
            sweep_once(first)
            return (
                s3_server.keys(bucket, "cnn/models/half-published/") == []
                and s3_server.keys(bucket, f"cnn/checkpoints/{half}/") == []
                and api.job(half)["status"] == "cancelled"
            )

        wait_for(swept, 60, "the sweep to remove the orphan", interval=0.5)
        with sessions() as session:
            assert session.scalars(select(ModelVersion.name)).all() == ["two-hosts"]
            assert session.get(Job, uuid.UUID(half)).model_version_id is None
        assert api.http.get("/models/half-published").status_code == 404
        assert api.http.get("/models/two-hosts/1/download").status_code == 200  # untouched
    finally:
        api.close()
        redis_server.kill()
        sessions.kw["bind"].dispose()


def _stalled_backends(database: str) -> list[int]:
    with _admin("postgres") as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND wait_event = 'PgSleep'",
            (database,),
        ).fetchall()
    return [int(pid) for (pid,) in rows]
