"""The artifact store on S3 or any S3-compatible server (ARTIFACT_STORE=s3://<bucket>/<prefix>).

Same layout and promises as the folder store (app/registry/store.py), built on what S3
guarantees: one object is written whole or not at all, reads and listings are strongly
consistent, and nothing spans two objects. So every unit of several files (a published
model, a checkpoint) is its files first and a manifest with their sha256 last; a reader
trusts only a unit with a manifest (checkpoints) or a registry row (models), and checks the
sha256 of what it downloads. Credentials and region come from the standard AWS variables,
the endpoint from S3_ENDPOINT_URL.

A checkpoint is written by the training core into this worker's scratch folder
(SCRATCH_DIR/checkpoints/<job_id>/), as with the folder store, and uploaded after every
epoch by one thread per job, so the fit never waits for the network:

    checkpoints/<job_id>/epoch-000007-<id>/files/...       the checkpoint folder's files
    checkpoints/<job_id>/epoch-000007-<id>/manifest.json   written last: the unit is complete

The epoch's files are hard-linked into a snapshot first, so the training core may go on
and replace them while they upload. <id> is random, so a stalled worker that wakes up never
overwrites its successor's unit. Once a unit's manifest is written, the epoch's row is
stored, then the older units are deleted (manifests first). A resume reads the newest unit
with a manifest: one without was being uploaded when its worker died and is never read.

Served models are copied into SCRATCH_DIR/model-cache/ (app/registry/disk_cache.py) and
checked against the registered sha256 before anyone loads them.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.config import Settings
from app.errors import ArtifactMissing
from app.files import file_digest
from app.registry.disk_cache import DiskCache
from app.registry.store import (
    MANIFEST_FILE,
    ArtifactStore,
    CheckpointSync,
    StoredArtifact,
    StoreUnavailable,
    folder_age_under,
    job_folders_under,
    manifest_bytes,
    manifest_files,
    store_path,
)

log = logging.getLogger(__name__)

ADVICE = "check S3_ENDPOINT_URL, the bucket, and the AWS credentials of this process"
_UNIT = re.compile(r"^epoch-(\d+)-[0-9a-f]+$")
_MISSING = {"404", "NoSuchKey", "NotFound"}
# delete_objects takes at most this many keys per request.
_DELETE_BATCH = 1000


@dataclass(frozen=True)
class _Object:
    key: str  # relative to the store's root
    size: int
    modified: datetime


class S3ArtifactStore(ArtifactStore):
    """The store in one bucket under one prefix; each process keeps its own scratch folder."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        scratch: Path,
        endpoint_url: str | None = None,
        cache_bytes: int = 4 * 1024**3,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.scratch = Path(scratch).resolve()
        self.location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        # One client per store: boto3 clients are thread-safe, sessions are not.
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url or None,
            config=Config(
                retries={"mode": "standard", "max_attempts": 4},
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=16,
            ),
        )
        self.cache = DiskCache(self.scratch / "model-cache", cache_bytes)

    @classmethod
    def from_settings(cls, settings: Settings) -> S3ArtifactStore:
        bucket, _, prefix = store_path(settings.artifact_store).partition("/")
        if not bucket:
            raise ValueError(
                "ARTIFACT_STORE=s3://<bucket>/<prefix> needs a bucket. "
                f"Received: ARTIFACT_STORE={settings.artifact_store!r}"
            )
        return cls(
            bucket,
            prefix,
            scratch=settings.scratch_dir,
            endpoint_url=settings.S3_ENDPOINT_URL,
            cache_bytes=settings.MODEL_CACHE_DISK_BYTES,
        )

    # ------------------------------------------------------------------ objects
    def _key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def _relative(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    @contextmanager
    def _request(self, what: str, relative: str) -> Iterator[None]:
        """S3's errors as the store's: FileNotFoundError for a missing object,
        StoreUnavailable (an infrastructure fault) for everything else."""
        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                raise FileNotFoundError(f"no object {relative} in {self.location}") from exc
            raise StoreUnavailable(f"{what} was refused ({code})", relative, ADVICE) from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(
                f"{what} failed ({type(exc).__name__})", relative, ADVICE
            ) from exc

    def _upload(self, path: Path, relative: str) -> None:
        with self._request("uploading", relative):
            self.client.upload_file(str(path), self.bucket, self._key(relative))

    def _put(self, relative: str, body: bytes) -> None:
        with self._request("uploading", relative):
            self.client.put_object(Bucket=self.bucket, Key=self._key(relative), Body=body)

    def _read(self, relative: str) -> bytes:
        with self._request("downloading", relative):
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(relative))
            return bytes(response["Body"].read())

    def _download(self, relative: str, path: Path) -> None:
        with self._request("downloading", relative):
            self.client.download_file(self.bucket, self._key(relative), str(path))

    def _list(self, relative_prefix: str) -> list[_Object]:
        found: list[_Object] = []
        with self._request("listing", relative_prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(relative_prefix)
            )
            for page in pages:
                for item in page.get("Contents", []):
                    relative = self._relative(item["Key"])
                    found.append(_Object(relative, int(item["Size"]), item["LastModified"]))
        return found

    def _folders(self, relative_prefix: str) -> set[str]:
        """The names one level below a prefix ("checkpoints/" -> job ids)."""
        names: set[str] = set()
        with self._request("listing", relative_prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(relative_prefix), Delimiter="/"
            )
            for page in pages:
                for item in page.get("CommonPrefixes", []):
                    names.add(self._relative(item["Prefix"])[len(relative_prefix) :].strip("/"))
        return names

    def _delete(self, relatives: list[str]) -> None:
        """Delete objects, manifests first, so a unit being removed never looks complete."""
        manifests = [r for r in relatives if r.endswith("/" + MANIFEST_FILE)]
        rest = [r for r in relatives if not r.endswith("/" + MANIFEST_FILE)]
        for group in (manifests, rest):
            for start in range(0, len(group), _DELETE_BATCH):
                batch = group[start : start + _DELETE_BATCH]
                with self._request("deleting", batch[0]):
                    response = self.client.delete_objects(
                        Bucket=self.bucket,
                        Delete={"Objects": [{"Key": self._key(r)} for r in batch], "Quiet": True},
                    )
                errors = response.get("Errors", [])
                if errors:
                    first = errors[0]
                    raise StoreUnavailable(
                        f"deleting was refused ({first.get('Code')})",
                        self._relative(str(first.get("Key", ""))),
                        ADVICE,
                    )

    # ------------------------------------------------------------------ models
    def staging_path(self, job_id: uuid.UUID | str) -> Path:
        return self.scratch / "staging" / str(job_id) / "model.keras"

    def publish_model(self, staged: Path, name: str, version: int) -> StoredArtifact:
        key = self.model_key(name, version)
        sha256, size = file_digest(staged)
        self._upload(staged, key)
        manifest = manifest_bytes({Path(key).name: (sha256, size)}, name=name, version=version)
        self._put(str(Path(key).with_name(MANIFEST_FILE)), manifest)
        return StoredArtifact(staged, sha256, size, key)

    def fetch_model(self, key: str, sha256: str) -> Path:
        """The model's copy in this process's cache, downloaded and checked on first use."""
        if Path(key).is_absolute():  # a folder store's legacy row: never in a bucket
            raise ArtifactMissing(f"the store has no file for {key}")
        try:
            return self.cache.fetch(key, sha256, lambda path: self._download(key, path))
        except FileNotFoundError:
            raise ArtifactMissing(f"the store has no file for {key}") from None

    def published_versions(self) -> dict[tuple[str, int], float]:
        newest: dict[tuple[str, int], datetime] = {}
        for item in self._list("models/"):
            parts = item.key.split("/")
            if len(parts) != 4 or not parts[2].isdigit():
                continue
            slot = (parts[1], int(parts[2]))
            if slot not in newest or item.modified > newest[slot]:
                newest[slot] = item.modified
        now = datetime.now(UTC)
        return {slot: (now - when).total_seconds() for slot, when in newest.items()}

    def discard_version(self, name: str, version: int) -> None:
        folder = str(Path(self.model_key(name, version)).parent) + "/"
        self._delete([item.key for item in self._list(folder)])

    def discard_staging(self, job_id: uuid.UUID | str) -> None:
        shutil.rmtree(self.staging_path(job_id).parent, ignore_errors=True)

    # ------------------------------------------------------------------ checkpoints
    def checkpoints(self, job_id: uuid.UUID | str) -> CheckpointSync:
        return _S3Checkpoints(self, str(job_id))

    def discard_checkpoints(self, job_id: uuid.UUID | str) -> None:
        self._delete([item.key for item in self._list(f"checkpoints/{job_id}/")])
        for area in ("checkpoints", "uploads"):
            shutil.rmtree(self.scratch / area / str(job_id), ignore_errors=True)

    # ------------------------------------------------------------------ the sweep
    def job_folders(self) -> set[str]:
        """Jobs with checkpoints in the bucket, or files in this process's scratch folder."""
        return self._folders("checkpoints/") | job_folders_under(self.scratch)

    def folder_age_s(self, job_id: uuid.UUID | str) -> float:
        objects = self._list(f"checkpoints/{job_id}/")
        local = folder_age_under(self.scratch, job_id)
        if not objects:
            return local
        newest = max(item.modified for item in objects)
        return min(local, (datetime.now(UTC) - newest).total_seconds())


# ---------------------------------------------------------------------- checkpoints
class _Uploader:
    """One background thread per job running one upload at a time, in order.

    `submit` first waits for the previous upload, and raises its failure: an epoch's upload
    starts only after the previous one has finished, and a failed one stops the job at its
    next epoch (an infrastructure fault: it is handed back and resumes from the last
    complete unit).
    """

    def __init__(self, name: str) -> None:
        self._tasks: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=1)
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            try:
                task()
            except BaseException as exc:  # handed to the training thread at the next wait
                self._error = exc
            finally:
                self._idle.set()

    def wait(self) -> None:
        """Until the upload in flight is done; raise its failure (once)."""
        self._idle.wait()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def submit(self, task: Callable[[], None]) -> None:
        self.wait()
        self._idle.clear()
        self._tasks.put(task)

    def close(self) -> None:
        self._idle.wait()
        self._tasks.put(None)
        self._thread.join(timeout=30)


class _S3Checkpoints(CheckpointSync):
    def __init__(self, store: S3ArtifactStore, job_id: str) -> None:
        self.store = store
        self.job_id = job_id
        self.local_dir = store.scratch / "checkpoints" / job_id
        self._snapshots = store.scratch / "uploads" / job_id
        self._prefix = f"checkpoints/{job_id}/"
        self._uploader: _Uploader | None = None

    # ------------------------------------------------------------------ units
    def _units(self) -> tuple[list[tuple[int, datetime, str]], dict[str, list[str]]]:
        """(epoch, when, unit) of every complete unit, newest first; and every unit's keys."""
        keys: dict[str, list[str]] = {}
        complete: list[tuple[int, datetime, str]] = []
        for item in self.store._list(self._prefix):
            unit = item.key[len(self._prefix) :].split("/", 1)[0]
            match = _UNIT.match(unit)
            if match is None:
                continue
            keys.setdefault(unit, []).append(item.key)
            if item.key == f"{self._prefix}{unit}/{MANIFEST_FILE}":
                complete.append((int(match.group(1)), item.modified, unit))
        return sorted(complete, reverse=True), keys

    def restore(self) -> None:
        """The newest complete unit into local_dir (emptied first); nothing if there is none.

        A unit deleted meanwhile, or one whose files do not match its manifest, is skipped
        for the next older one.
        """
        shutil.rmtree(self.local_dir, ignore_errors=True)
        complete, _ = self._units()
        for epoch, _when, unit in complete:
            try:
                self._download(unit)
            except (FileNotFoundError, ValueError) as exc:
                log.warning("checkpoint %s of job %s unusable: %s", unit, self.job_id, exc)
                continue
            log.info(
                "job %s: restored the checkpoint of epoch %d from the store", self.job_id, epoch
            )
            return

    def _download(self, unit: str) -> None:
        files = manifest_files(self.store._read(f"{self._prefix}{unit}/{MANIFEST_FILE}"))
        target = self._snapshots / f"restore-{uuid.uuid4().hex}"
        try:
            for relative, (sha256, _size) in files.items():
                path = target / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                self.store._download(f"{self._prefix}{unit}/files/{relative}", path)
                if file_digest(path)[0] != sha256:
                    raise ValueError(f"{relative} does not match its manifest")
            target.mkdir(parents=True, exist_ok=True)
            self.local_dir.parent.mkdir(parents=True, exist_ok=True)
            os.rename(target, self.local_dir)
        finally:
            shutil.rmtree(target, ignore_errors=True)

    # ------------------------------------------------------------------ uploads
    def epoch_done(self, epoch: int, then: Callable[[], None]) -> None:
        if self._uploader is None:
            self._uploader = _Uploader(f"upload-{self.job_id}")
        self._uploader.wait()  # the previous epoch's upload first
        snapshot = self._snapshot(epoch)
        unit = f"epoch-{epoch:06d}-{uuid.uuid4().hex[:12]}"
        self._uploader.submit(lambda: self._upload(unit, epoch, snapshot, then))

    def _snapshot(self, epoch: int) -> Path:
        """Hard links to the epoch's checkpoint folder and the state files beside it (early
        stopping), so the training core can replace them while they are uploaded."""
        snapshot = self._snapshots / f"epoch-{epoch:06d}-{uuid.uuid4().hex[:8]}"
        sources = [p for p in self.local_dir.iterdir() if p.is_file() and _kept(p.name)]
        folder = self.local_dir / f"epoch-{epoch:06d}"
        sources += [p for p in folder.rglob("*") if p.is_file()]
        for source in sources:
            target = snapshot / source.relative_to(self.local_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:  # another file system, or links not allowed: a copy will do
                shutil.copy2(source, target)
        return snapshot

    def _upload(self, unit: str, epoch: int, snapshot: Path, then: Callable[[], None]) -> None:
        """The files, then the manifest; then the epoch's row; then the older units."""
        try:
            files: dict[str, tuple[str, int]] = {}
            for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
                relative = path.relative_to(snapshot).as_posix()
                files[relative] = file_digest(path)
                self.store._upload(path, f"{self._prefix}{unit}/files/{relative}")
            manifest = manifest_bytes(files, job_id=self.job_id, epoch=epoch)
            self.store._put(f"{self._prefix}{unit}/{MANIFEST_FILE}", manifest)
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)
        then()
        try:
            self._prune(unit, epoch)
        except StoreUnavailable as exc:  # only space: the sweep removes them with the job
            log.warning("job %s: could not remove older checkpoints: %s", self.job_id, exc)

    def _prune(self, kept: str, epoch: int) -> None:
        _, keys = self._units()
        doomed: list[str] = []
        for unit, unit_keys in keys.items():
            match = _UNIT.match(unit)
            if unit != kept and match is not None and int(match.group(1)) <= epoch:
                doomed += unit_keys
        if doomed:
            self.store._delete(doomed)

    def finish(self) -> None:
        if self._uploader is not None:
            self._uploader.wait()

    def close(self) -> None:
        if self._uploader is not None:
            try:
                self._uploader.wait()
            except Exception as exc:  # the caller is already leaving on another path
                log.warning("job %s: the last checkpoint upload failed: %s", self.job_id, exc)
            self._uploader.close()
            self._uploader = None
        shutil.rmtree(self._snapshots, ignore_errors=True)


def _kept(name: str) -> bool:
    """A state file beside the epoch folders (not a temporary one being written)."""
    return not name.startswith((".", "tmp-"))
