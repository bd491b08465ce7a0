"""The registry's files over HTTP with the S3 store: downloads and /predict go through this
process's checked copy; a missing or modified object is refused with the stable errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from app.registry import versions
from app.registry.store import open_store


@pytest.fixture
def s3_api(settings, s3_server, tmp_path: Path, client_for, clean_db, session_factory):
    """An API on a new bucket, and `publish(name, content)`: a version's files in the bucket
    and its registry row, as a worker leaves them."""
    bucket = s3_server.bucket()
    variant = settings.model_copy(
        update={
            "ARTIFACT_STORE": f"s3://{bucket}/cnn",
            "S3_ENDPOINT_URL": s3_server.endpoint,
            "STATE_DIR": tmp_path / "api",
        }
    )
    store = open_store(variant)

    def publish(name: str, content: bytes) -> str:
        staged = tmp_path / f"{name}.keras"
        staged.write_bytes(content)
        with session_factory() as session:
            row = versions.register_version(
                session,
                name=name,
                net="net1",
                job_id=None,
                artifact_path="",
                sha256=hashlib.sha256(content).hexdigest(),
                size_bytes=len(content),
                metrics={},
            )
            row.artifact_path = store.publish_model(staged, name, row.version).key
            session.commit()
        return f"cnn/{row.artifact_path}"

    with client_for(variant) as client:
        yield client, publish, bucket, variant


def test_both_download_addresses_serve_the_checked_copy(s3_api, s3_server):
    client, publish, bucket, variant = s3_api
    publish("served", b"the registered bytes")
    for url in ("/models/served/1/download", "/models/served/versions/1/artifact"):
        response = client.get(url)
        assert response.status_code == 200, response.text
        assert response.content == b"the registered bytes"
        assert response.headers["x-checksum-sha256"] == hashlib.sha256(response.content).hexdigest()
    copies = list((variant.scratch_dir / "model-cache").rglob("model.keras"))
    assert [p.read_bytes() for p in copies] == [b"the registered bytes"]


def test_a_missing_object_is_artifact_missing(s3_api, s3_server, expect_error):
    client, publish, bucket, _ = s3_api
    key = publish("gone", b"bytes")
    s3_server.client.delete_object(Bucket=bucket, Key=key)
    expect_error(client.get("/models/gone/1/download"), 404, "artifact_missing")
    expect_error(client.get("/models/gone/2/download"), 404, "model_not_found")
    body = expect_error(
        client.post("/predict", json={"model": "gone", "instances": [[[[0] * 3] * 32] * 32]}),
        503,
        "model_unavailable",
    )
    assert "cnn/" not in body["message"]  # no store internals in the answer


def test_a_modified_object_is_never_served(s3_api, s3_server, expect_error):
    client, publish, bucket, variant = s3_api
    key = publish("tampered", b"the registered bytes")
    s3_server.write(bucket, key, b"something else")
    body = expect_error(client.get("/models/tampered/1/download"), 503, "model_unavailable")
    assert "sha256" in body["message"]
    expect_error(
        client.post("/predict", json={"model": "tampered", "instances": [[[[0] * 3] * 32] * 32]}),
        503,
        "model_unavailable",
    )
    assert not list((variant.scratch_dir / "model-cache").rglob("model.keras"))
