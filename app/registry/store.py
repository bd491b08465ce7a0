"""The artifact store: registered models and per-job training checkpoints, on a folder or S3.

`ArtifactStore` is the one interface the registry, the job runner, the sweep and serving
use. `open_store(settings)` picks the implementation once, from ARTIFACT_STORE's scheme
(`STORES`), and nothing outside this package knows which one is in use:

    file://<folder>          LocalArtifactStore (here): a folder every process sees (default)
    s3://<bucket>/<prefix>   S3ArtifactStore (app/registry/s3.py): any S3-compatible server

Both keep the same layout under their root:

    models/<name>/<version>/model.keras      a published model (immutable once registered)
    models/<name>/<version>/manifest.json    its files with their sha256, written after them
    checkpoints/<job_id>/...                 the running job's latest complete checkpoint
    staging/<job_id>/model.keras             a finished model waiting to be published (the
                                             file store; an object store stages in scratch)

Publishing a model is the files first, then the manifest, and only then the registry row,
which is the commit point: a version that no row names is invisible to every reader, and
the sweep removes its files once they are older than CLEANUP_GRACE_S (the orphans of a crash
between upload and commit). The registry stores a model's KEY, relative to the store's root
("models/net1/3/model.keras"), never an absolute path, so the store can move or be replaced;
rows written before that hold absolute paths, which the file store still reads.

A job's checkpoint is written by the training core into a local folder
(`CheckpointSync.local_dir`) and made durable in the store after every epoch
(`epoch_done`): the folder store's local folder IS the store, so there is nothing to do; an
object store uploads in the background, and a resume never reads a half-uploaded checkpoint.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from app.config import Settings
from app.errors import ArtifactMissing, ModelIntegrityError
from app.files import file_digest, resolve_artifact, write_atomically

if TYPE_CHECKING:
    import keras

MODEL_FILE = "model.keras"
MANIFEST_FILE = "manifest.json"

# Scheme of ARTIFACT_STORE -> "module:class" of its implementation, imported when chosen (so
# the folder store never loads boto3).
STORES: dict[str, str] = {
    "file": "app.registry.store:LocalArtifactStore",
    "s3": "app.registry.s3:S3ArtifactStore",
}


class StoreUnavailable(OSError):
    """The store cannot be reached or refused a request (errno EIO: an infrastructure fault,
    retried and handed back like a full disk, never the job's failure). `advice` tells the
    operator what to check."""

    def __init__(self, message: str, key: str, advice: str) -> None:
        super().__init__(errno.EIO, message, key)
        self.advice = advice


@dataclass(frozen=True)
class StoredArtifact:
    """Where a file lies and what it holds. `key` (relative to the store root) is what the
    registry stores; `path` is the local file (for a remote store, a local copy)."""

    path: Path
    sha256: str
    size_bytes: int
    key: str = ""


def manifest_bytes(files: dict[str, tuple[str, int]], **about: Any) -> bytes:
    """A manifest: what a unit holds ({relative path: (sha256, size)}) and what it is."""
    listed = {path: {"sha256": sha, "size_bytes": size} for path, (sha, size) in files.items()}
    return json.dumps({"format": 1, **about, "files": listed}, sort_keys=True).encode()


def manifest_files(data: bytes) -> dict[str, tuple[str, int]]:
    """The files a manifest lists; ValueError for anything that is not one of ours, including
    a path that would leave the unit's folder."""
    try:
        listed = json.loads(data)["files"]
        files = {str(p): (str(e["sha256"]), int(e["size_bytes"])) for p, e in listed.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a manifest: {type(exc).__name__}") from exc
    for path in files:
        parts = PurePosixPath(path).parts
        if not parts or PurePosixPath(path).is_absolute() or ".." in parts:
            raise ValueError(f"a manifest path leaves its unit: {path!r}")
    return files


class CheckpointSync(ABC):
    """One job's checkpoint between the training core's local folder and the store.

    The runner restores the newest complete checkpoint into `local_dir` before training,
    lets the training core write there, and calls `epoch_done` once an epoch's checkpoint
    (and the early-stopping state beside it) is on disk. `then` (the epoch's row) is called
    only once that checkpoint is durable in the store, so the stored history is never ahead
    of the store's checkpoint. `finish` waits for the last epoch and raises its failure;
    `close` waits without raising.
    """

    local_dir: Path

    @abstractmethod
    def restore(self) -> None: ...

    @abstractmethod
    def epoch_done(self, epoch: int, then: Callable[[], None]) -> None: ...

    def finish(self) -> None:
        return None

    def close(self) -> None:
        return None


class ArtifactStore(ABC):
    """What the registry, the runner, the sweep and serving need from a store."""

    # Where the store is, for messages: a folder, or s3://bucket/prefix.
    location: str

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Settings) -> ArtifactStore: ...

    # ------------------------------------------------------------------ models
    def model_key(self, name: str, version: int) -> str:
        return str(PurePosixPath("models", name, str(version), MODEL_FILE))

    @abstractmethod
    def staging_path(self, job_id: uuid.UUID | str) -> Path:
        """The local file a finished model is saved to before it is published."""

    def stage_model(self, model: keras.Model, job_id: uuid.UUID | str) -> StoredArtifact:
        """Save a trained model in the `.keras` format, atomically, and hash it."""
        final = self.staging_path(job_id)
        # Keras insists on the .keras suffix, so the temporary name keeps it.
        write_atomically(final, model.save, suffix=".keras")
        sha256, size = file_digest(final)
        return StoredArtifact(final, sha256, size)

    @abstractmethod
    def publish_model(self, staged: Path, name: str, version: int) -> StoredArtifact:
        """Put a staged model under models/<name>/<version>/: the file, then its manifest.
        Not yet visible: the caller's registry row, committed afterwards, makes it so."""

    @abstractmethod
    def fetch_model(self, key: str, sha256: str) -> Path:
        """A local file holding the registered model `key`, checked against `sha256`
        (ArtifactMissing if the store has none, ModelIntegrityError if it does not match)."""

    @abstractmethod
    def published_versions(self) -> dict[tuple[str, int], float]:
        """Every (name, version) with files under models/, and the age in seconds of its
        newest file: what the sweep compares with the registry to find orphans."""

    @abstractmethod
    def discard_version(self, name: str, version: int) -> None:
        """Remove models/<name>/<version>/ (an orphan: the caller checked no row names it)."""

    @abstractmethod
    def discard_staging(self, job_id: uuid.UUID | str) -> None: ...

    # ------------------------------------------------------------------ checkpoints
    @abstractmethod
    def checkpoints(self, job_id: uuid.UUID | str) -> CheckpointSync: ...

    @abstractmethod
    def discard_checkpoints(self, job_id: uuid.UUID | str) -> None:
        """A terminal job never resumes, so its checkpoint only takes space."""

    # ------------------------------------------------------------------ the sweep
    def discard_job_files(self, job_id: uuid.UUID | str) -> None:
        """Checkpoint and staged model of one job (the sweep's clean-up of terminal jobs)."""
        self.discard_checkpoints(job_id)
        self.discard_staging(job_id)

    @abstractmethod
    def job_folders(self) -> set[str]:
        """Names (job ids) of every job with checkpoint or staged files here."""

    @abstractmethod
    def folder_age_s(self, job_id: uuid.UUID | str) -> float:
        """Seconds since the job's files last changed (infinity when there are none)."""


_opened: dict[tuple[Any, ...], ArtifactStore] = {}
_opened_lock = threading.Lock()


def open_store(settings: Settings) -> ArtifactStore:
    """The store ARTIFACT_STORE names, opened once per process and configuration.

    ValueError for a scheme that is not in STORES.
    """
    url = settings.artifact_store
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in STORES:
        raise ValueError(
            "ARTIFACT_STORE must be file://<folder> or s3://<bucket>/<prefix>. "
            f"Received: ARTIFACT_STORE={url!r}"
        )
    # Per process too: a client's connections must not cross a fork.
    key = (
        os.getpid(),
        url,
        settings.S3_ENDPOINT_URL,
        settings.scratch_dir,
        settings.MODEL_CACHE_DISK_BYTES,
    )
    with _opened_lock:
        store = _opened.get(key)
        if store is None:
            module, name = STORES[scheme].split(":")
            implementation: type[ArtifactStore] = getattr(importlib.import_module(module), name)
            store = _opened[key] = implementation.from_settings(settings)
        return store


def store_path(url: str) -> str:
    """What follows the scheme: the folder of file://, the bucket and prefix of s3://."""
    return url.split("://", 1)[1]


# ---------------------------------------------------------------------- the folder store
class _FolderCheckpoints(CheckpointSync):
    """The folder store's checkpoints: the training core writes straight into the store
    (atomically, one folder per epoch), so every epoch is durable as soon as it is written."""

    def __init__(self, local_dir: Path) -> None:
        self.local_dir = local_dir

    def restore(self) -> None:
        return None

    def epoch_done(self, epoch: int, then: Callable[[], None]) -> None:
        then()


class LocalArtifactStore(ArtifactStore):
    """The store on a local or shared folder; every worker and the API must see the same one.

    Every file is written to a temporary name in its final folder and moved into place with
    os.replace, so a reader (the API, another worker) never sees a half-written file.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.location = str(self.root)

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalArtifactStore:
        return cls(Path(store_path(settings.artifact_store)))

    # ------------------------------------------------------------------ layout
    def local_path(self, key: str) -> Path:
        return resolve_artifact(self.root, key)

    def model_path(self, name: str, version: int) -> Path:
        return self.local_path(self.model_key(name, version))

    def checkpoint_dir(self, job_id: uuid.UUID | str) -> Path:
        return self.root / "checkpoints" / str(job_id)

    def staging_path(self, job_id: uuid.UUID | str) -> Path:
        return self.root / "staging" / str(job_id) / MODEL_FILE

    # ------------------------------------------------------------------ models
    def publish_model(self, staged: Path, name: str, version: int) -> StoredArtifact:
        """Copy a staged model to its registered place (temp file + os.replace), then write
        its manifest.

        A copy, not a move, so a registration that has to retry with another version
        number still has its staged file.
        """
        key = self.model_key(name, version)
        final = self.local_path(key)
        write_atomically(final, lambda tmp: shutil.copyfile(staged, tmp), suffix=".keras")
        sha256, size = file_digest(final)
        manifest = manifest_bytes({MODEL_FILE: (sha256, size)}, name=name, version=version)
        write_atomically(final.with_name(MANIFEST_FILE), lambda tmp: tmp.write_bytes(manifest))
        return StoredArtifact(final, sha256, size, key)

    def fetch_model(self, key: str, sha256: str) -> Path:
        """The store's own file, once its sha256 is checked: the folder is local, so there
        is nothing to copy."""
        path = self.local_path(key)
        if not path.is_file():
            raise ArtifactMissing(f"the store has no file for {key}")
        digest = file_digest(path)[0]
        if digest != sha256.lower():
            raise ModelIntegrityError(
                f"the stored artifact {key} has sha256 {digest}, but {sha256} was registered; "
                "refusing to use a modified file"
            )
        return path

    def published_versions(self) -> dict[tuple[str, int], float]:
        found: dict[tuple[str, int], float] = {}
        now = time.time()
        for folder in _subfolders(self.root / "models", depth=2):
            name, version = folder.parent.name, folder.name
            if version.isdigit():
                found[(name, int(version))] = now - _newest_mtime(folder)
        return found

    def discard_version(self, name: str, version: int) -> None:
        folder = self.model_path(name, version).parent
        # The manifest first: a half-removed version never looks complete.
        (folder / MANIFEST_FILE).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)

    def discard_staging(self, job_id: uuid.UUID | str) -> None:
        shutil.rmtree(self.staging_path(job_id).parent, ignore_errors=True)

    # ------------------------------------------------------------------ checkpoints
    def checkpoints(self, job_id: uuid.UUID | str) -> CheckpointSync:
        return _FolderCheckpoints(self.checkpoint_dir(job_id))

    def discard_checkpoints(self, job_id: uuid.UUID | str) -> None:
        shutil.rmtree(self.checkpoint_dir(job_id), ignore_errors=True)

    # ------------------------------------------------------------------ the sweep
    def job_folders(self) -> set[str]:
        """Names (job ids) of every checkpoints/<id>/ and staging/<id>/ folder in the store."""
        return job_folders_under(self.root)

    def folder_age_s(self, job_id: uuid.UUID | str) -> float:
        """Seconds since the job's newest checkpoint or staging folder last changed."""
        return folder_age_under(self.root, job_id)


# ---------------------------------------------------------------------- folder helpers
def _subfolders(root: Path, depth: int) -> Iterator[Path]:
    """The folders exactly `depth` levels below root (none if root is missing)."""
    try:
        children = [p for p in root.iterdir() if p.is_dir()]
    except OSError:
        return
    for child in children:
        if depth == 1:
            yield child
        else:
            yield from _subfolders(child, depth - 1)


def _newest_mtime(folder: Path) -> float:
    newest = folder.stat().st_mtime
    for path in folder.rglob("*"):
        try:
            newest = max(newest, path.stat().st_mtime)
        except OSError:
            continue
    return newest


def job_folders_under(root: Path) -> set[str]:
    """The names of the folders in root/checkpoints/ and root/staging/."""
    names: set[str] = set()
    for area in ("checkpoints", "staging"):
        names.update(p.name for p in _subfolders(root / area, depth=1))
    return names


def folder_age_under(root: Path, job_id: uuid.UUID | str) -> float:
    """Seconds since root/checkpoints/<id>/ or root/staging/<id>/ last changed."""
    newest = 0.0
    for folder in (root / "checkpoints" / str(job_id), root / "staging" / str(job_id)):
        try:
            newest = max(newest, folder.stat().st_mtime)
        except OSError:
            continue
    return time.time() - newest if newest else float("inf")
