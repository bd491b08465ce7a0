"""The artifact store's promises, checked on both implementations (folder and S3 over HTTP)."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from pathlib import Path

import pytest

from app.config import Settings
from app.errors import ArtifactMissing, ModelIntegrityError
from app.ml.training import (
    EpochRecord,
    _write_checkpoint,
    checkpoint_epoch,
    checkpoint_model_path,
    checkpoint_records,
)
from app.registry.disk_cache import DiskCache
from app.registry.store import (
    LocalArtifactStore,
    StoreUnavailable,
    manifest_files,
    open_store,
)

from .conftest import FakeModel, Hosts


def _record(epoch: int) -> EpochRecord:
    return EpochRecord(epoch, 1.0 / epoch, 0.5, 1.0, 0.4, 1.0, 100.0)


def _checkpoint(folder: Path, epoch: int, content: bytes = b"") -> None:
    """What the training core writes after `epoch`: the epoch's unit and the early-stopping
    state beside it."""
    model = FakeModel(content or f"weights after epoch {epoch}".encode())
    _write_checkpoint(model, folder, [_record(e) for e in range(1, epoch + 1)])  # type: ignore[arg-type]
    (folder / "best.json").write_text(f'{{"best_epoch": {epoch}}}')


# ---------------------------------------------------------------------------- models
def test_a_published_model_is_fetched_whole_and_checked(hosts: Hosts):
    worker, api = hosts(), hosts()
    job = uuid.uuid4()
    staged = worker.stage_model(FakeModel(b"the model's bytes"), job)  # type: ignore[arg-type]
    assert staged.sha256 == hashlib.sha256(b"the model's bytes").hexdigest()

    published = worker.publish_model(staged.path, "net1", 3)
    assert published.key == "models/net1/3/model.keras"
    assert (published.sha256, published.size_bytes) == (staged.sha256, staged.size_bytes)
    assert ("net1", 3) in worker.published_versions()

    fetched = api.fetch_model(published.key, published.sha256)
    assert fetched.read_bytes() == b"the model's bytes"
    assert api.fetch_model(published.key, published.sha256) == fetched  # a cached copy
    with pytest.raises(ModelIntegrityError):
        hosts().fetch_model(published.key, hashlib.sha256(b"other bytes").hexdigest())


def test_a_published_model_has_a_manifest_with_its_sha256(hosts: Hosts, tmp_path: Path):
    store = hosts()
    staged = store.stage_model(FakeModel(b"model"), uuid.uuid4())  # type: ignore[arg-type]
    store.publish_model(staged.path, "net2", 1)
    # The manifest is a stored file like the model: fetch it by its key.
    manifest = _stored_bytes(store, "models/net2/1/manifest.json")
    assert manifest_files(manifest) == {"model.keras": (staged.sha256, staged.size_bytes)}


def _stored_bytes(store: object, key: str) -> bytes:
    if isinstance(store, LocalArtifactStore):
        return store.local_path(key).read_bytes()
    return store._read(key)  # type: ignore[attr-defined]


def test_a_missing_model_is_artifact_missing(hosts: Hosts):
    with pytest.raises(ArtifactMissing):
        hosts().fetch_model("models/nobody/1/model.keras", "0" * 64)


def test_a_discarded_version_is_gone_for_every_host(hosts: Hosts):
    worker = hosts()
    staged = worker.stage_model(FakeModel(b"orphan"), uuid.uuid4())  # type: ignore[arg-type]
    kept = worker.publish_model(staged.path, "net1", 1)
    orphan = worker.publish_model(staged.path, "net1", 2)
    assert {("net1", 1), ("net1", 2)} <= set(worker.published_versions())
    assert all(0 <= age < 60 for age in worker.published_versions().values())

    worker.discard_version("net1", 2)
    assert ("net1", 2) not in worker.published_versions()
    with pytest.raises(ArtifactMissing):
        hosts().fetch_model(orphan.key, orphan.sha256)
    assert hosts().fetch_model(kept.key, kept.sha256).read_bytes() == b"orphan"


# ---------------------------------------------------------------------------- checkpoints
def test_a_checkpoint_made_durable_is_resumed_by_another_host(hosts: Hosts):
    job = uuid.uuid4()
    first = hosts().checkpoints(job)
    first.restore()  # nothing stored yet: a fresh start
    assert checkpoint_epoch(first.local_dir) == 0
    recorded: list[int] = []
    for epoch in (1, 2):
        _checkpoint(first.local_dir, epoch)
        first.epoch_done(epoch, lambda e=epoch: recorded.append(e))
    first.finish()
    first.close()
    assert recorded == [1, 2]  # each row once its checkpoint was durable, in order

    second = hosts().checkpoints(job)
    second.restore()
    assert checkpoint_epoch(second.local_dir) == 2
    assert [r.epoch for r in checkpoint_records(second.local_dir)] == [1, 2]
    assert checkpoint_model_path(second.local_dir).read_bytes() == b"weights after epoch 2"
    assert (second.local_dir / "best.json").read_text() == '{"best_epoch": 2}'
    second.close()


def test_discarded_checkpoints_leave_nothing_behind(hosts: Hosts):
    store, job = hosts(), uuid.uuid4()
    sync = store.checkpoints(job)
    sync.restore()
    _checkpoint(sync.local_dir, 1)
    sync.epoch_done(1, lambda: None)
    sync.finish()
    sync.close()
    assert str(job) in store.job_folders()
    assert store.folder_age_s(job) < 60

    store.discard_job_files(job)
    assert str(job) not in store.job_folders()
    assert store.folder_age_s(job) == float("inf")
    again = hosts().checkpoints(job)
    again.restore()
    assert checkpoint_epoch(again.local_dir) == 0


def test_staged_models_count_as_job_files_until_discarded(hosts: Hosts):
    store, job = hosts(), uuid.uuid4()
    store.stage_model(FakeModel(b"staged"), job)  # type: ignore[arg-type]
    assert str(job) in store.job_folders()
    store.discard_staging(job)
    assert str(job) not in store.job_folders()


# ---------------------------------------------------------------------------- S3 only
def test_s3_an_upload_cut_before_its_manifest_is_never_resumed(s3_hosts: Hosts, monkeypatch):
    job = uuid.uuid4()
    store = s3_hosts()
    sync = store.checkpoints(job)
    sync.restore()
    _checkpoint(sync.local_dir, 1)
    sync.epoch_done(1, lambda: None)
    sync.finish()

    # Epoch 2: its files reach the bucket, then the worker dies before the manifest.
    real_put = store._put  # type: ignore[attr-defined]

    def die_at_the_manifest(relative: str, body: bytes) -> None:
        if relative.endswith("manifest.json"):
            raise StoreUnavailable("connection reset", relative, "check the network")
        real_put(relative, body)

    monkeypatch.setattr(store, "_put", die_at_the_manifest)
    rows: list[int] = []
    _checkpoint(sync.local_dir, 2)
    sync.epoch_done(2, lambda: rows.append(2))
    with pytest.raises(StoreUnavailable):
        sync.finish()
    sync.close()
    assert rows == []  # its row is never written: the history stays behind the store
    assert any("epoch-000002-" in key for key in _keys(store))

    other = s3_hosts().checkpoints(job)
    other.restore()
    assert checkpoint_epoch(other.local_dir) == 1


def _keys(store: object) -> list[str]:
    return [item.key for item in store._list("checkpoints/")]  # type: ignore[attr-defined]


def test_s3_uploads_run_beside_the_fit_one_at_a_time(s3_hosts: Hosts, monkeypatch):
    job = uuid.uuid4()
    store = s3_hosts()
    sync = store.checkpoints(job)
    sync.restore()
    release = threading.Event()
    real_upload = store._upload  # type: ignore[attr-defined]

    def slow_upload(path: Path, relative: str) -> None:
        release.wait(10)
        real_upload(path, relative)

    monkeypatch.setattr(store, "_upload", slow_upload)
    rows: list[int] = []
    _checkpoint(sync.local_dir, 1)
    started = time.monotonic()
    sync.epoch_done(1, lambda: rows.append(1))
    assert time.monotonic() - started < 2 and rows == []  # the fit goes on at once

    # The trainer writes epoch 2 meanwhile, which removes epoch 1's folder: the upload
    # reads its own snapshot.
    _checkpoint(sync.local_dir, 2)
    assert not (sync.local_dir / "epoch-000001").exists()
    second = threading.Thread(target=sync.epoch_done, args=(2, lambda: rows.append(2)))
    second.start()
    time.sleep(0.3)
    assert second.is_alive()  # epoch 2's upload waits for epoch 1's
    release.set()
    second.join(10)
    sync.finish()
    sync.close()
    assert rows == [1, 2]

    units = {key.split("/")[2] for key in _keys(store)}
    assert len(units) == 1 and next(iter(units)).startswith("epoch-000002-")  # older pruned
    other = s3_hosts().checkpoints(job)
    other.restore()
    assert checkpoint_model_path(other.local_dir).read_bytes() == b"weights after epoch 2"


def test_s3_a_corrupt_unit_falls_back_to_the_previous_one(s3_hosts: Hosts, s3_server):
    job = uuid.uuid4()
    store = s3_hosts()
    sync = store.checkpoints(job)
    sync.restore()
    for epoch in (1, 2):
        _checkpoint(sync.local_dir, epoch)
        sync.epoch_done(epoch, lambda: None)
        sync.finish()
    # Keep epoch 1 (a stalled upload's leftover) and corrupt epoch 2's model in the bucket.
    assert len({key.split("/")[2] for key in _keys(store)}) == 1
    _checkpoint(sync.local_dir, 1, b"epoch one again")
    sync.epoch_done(1, lambda: None)
    sync.finish()
    sync.close()
    (unit2,) = {k.split("/")[2] for k in _keys(store) if "/epoch-000002-" in k}
    key = f"cnn/checkpoints/{job}/{unit2}/files/epoch-000002/checkpoint.keras"
    s3_server.write(store.bucket, key, b"bit rot")  # type: ignore[attr-defined]

    other = s3_hosts().checkpoints(job)
    other.restore()
    assert checkpoint_model_path(other.local_dir).read_bytes() == b"epoch one again"


def test_s3_an_unreachable_store_is_an_infrastructure_fault(tmp_path: Path):
    from app.jobs.runner import infrastructure_message, is_infrastructure_fault
    from app.registry.s3 import S3ArtifactStore

    store = S3ArtifactStore(
        "bucket",
        "cnn",
        scratch=tmp_path,
        endpoint_url="http://127.0.0.1:9",  # nothing there
    )
    store.client.meta.config.retries = {"max_attempts": 1}
    with pytest.raises(StoreUnavailable) as raised:
        store.job_folders()
    assert is_infrastructure_fault(raised.value)
    message = infrastructure_message(raised.value, Settings(_env_file=None), store.location)
    assert "s3://bucket/cnn" in message and "S3_ENDPOINT_URL" in message


# ---------------------------------------------------------------------------- choosing
def test_the_store_is_chosen_once_from_its_url(tmp_path: Path, s3_server):
    from app.registry.s3 import S3ArtifactStore

    default = Settings(_env_file=None, STATE_DIR=tmp_path)
    store = open_store(default)
    assert isinstance(store, LocalArtifactStore) and store.root == default.artifact_dir
    assert open_store(default) is store

    folder = Settings(_env_file=None, STATE_DIR=tmp_path, ARTIFACT_STORE=f"file://{tmp_path}/x")
    assert open_store(folder).root == tmp_path / "x"  # type: ignore[attr-defined]

    s3 = Settings(
        _env_file=None,
        STATE_DIR=tmp_path,
        ARTIFACT_STORE="s3://models-bucket/team/cnn",
        S3_ENDPOINT_URL=s3_server.endpoint,
    )
    remote = open_store(s3)
    assert isinstance(remote, S3ArtifactStore)
    assert (remote.bucket, remote.prefix, remote.location) == (
        "models-bucket",
        "team/cnn",
        "s3://models-bucket/team/cnn",
    )
    assert remote.scratch == s3.scratch_dir

    for url in ("ftp://host/x", "/just/a/folder", "s3:///no-bucket"):
        with pytest.raises(ValueError, match="ARTIFACT_STORE"):
            open_store(Settings(_env_file=None, STATE_DIR=tmp_path, ARTIFACT_STORE=url))


def test_the_disk_cache_keeps_what_fits_newest_first(tmp_path: Path):
    cache = DiskCache(tmp_path, max_bytes=250)

    def put(content: bytes) -> Path:
        sha = hashlib.sha256(content).hexdigest()
        return cache.fetch(
            f"models/m/{content[:1].decode()}/model.keras", sha, lambda p: p.write_bytes(content)
        )

    first = put(b"a" * 100)
    second = put(b"b" * 100)
    time.sleep(0.01)
    put(b"a" * 100)  # used again: now the most recent
    third = put(b"c" * 100)
    assert first.is_file() and third.is_file() and not second.exists()
    with pytest.raises(ModelIntegrityError):
        cache.fetch("models/m/d/model.keras", "0" * 64, lambda p: p.write_bytes(b"d"))
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.rglob("*"))
