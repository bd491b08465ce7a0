"""The artifact store: trained `.keras` models and per-job training checkpoints.

`ArtifactStore` is the interface the registry and the job runner use; `LocalArtifactStore`
implements it on a local (or shared) folder, settings.artifact_dir. The layout is
object-store friendly, so an S3/GCS store can implement the same few methods later:

    models/<name>/<version>/model.keras    a registered model version (immutable once registered)
    checkpoints/<job_id>/                  the training core's checkpoint of a running job
    staging/<job_id>/model.keras           a finished model waiting to be registered

The registry stores a model's KEY, its path relative to the store's root
("models/net1/3/model.keras"), never an absolute path, so the store can move or be
replaced. Rows written before that hold absolute paths; `local_path` still reads them.

Every file is written to a temporary name in its final folder and moved into place with
os.replace, so a reader (the API, another worker) never sees a half-written model.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol

from app.config import Settings
from app.files import file_digest, resolve_artifact, write_atomically

if TYPE_CHECKING:
    import keras

MODEL_FILE = "model.keras"


@dataclass(frozen=True)
class StoredArtifact:
    """Where a file lies and what it holds. `key` (relative to the store root) is what the
    registry stores; `path` is the local file (for a remote store, a local copy)."""

    path: Path
    sha256: str
    size_bytes: int
    key: str = ""


class ArtifactStore(Protocol):
    """What the registry and the runner need from a store of model files and checkpoints."""

    def model_key(self, name: str, version: int) -> str: ...

    def local_path(self, key: str) -> Path: ...

    def checkpoint_dir(self, job_id: uuid.UUID | str) -> Path: ...

    def stage_model(self, model: keras.Model, job_id: uuid.UUID | str) -> StoredArtifact: ...

    def publish_model(self, staged: Path, name: str, version: int) -> StoredArtifact: ...

    def discard_staging(self, job_id: uuid.UUID | str) -> None: ...

    def discard_checkpoints(self, job_id: uuid.UUID | str) -> None: ...

    def discard_job_files(self, job_id: uuid.UUID | str) -> None: ...

    def job_folders(self) -> set[str]: ...

    def folder_age_s(self, job_id: uuid.UUID | str) -> float: ...


class LocalArtifactStore:
    """The store on a local or shared folder; every worker and the API must see the same one."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalArtifactStore:
        return cls(settings.artifact_dir)

    # ------------------------------------------------------------------ layout
    def model_key(self, name: str, version: int) -> str:
        return str(PurePosixPath("models", name, str(version), MODEL_FILE))

    def local_path(self, key: str) -> Path:
        return resolve_artifact(self.root, key)

    def model_path(self, name: str, version: int) -> Path:
        return self.local_path(self.model_key(name, version))

    def checkpoint_dir(self, job_id: uuid.UUID | str) -> Path:
        return self.root / "checkpoints" / str(job_id)

    def staging_path(self, job_id: uuid.UUID | str) -> Path:
        return self.root / "staging" / str(job_id) / MODEL_FILE

    # ------------------------------------------------------------------ writes
    def stage_model(self, model: keras.Model, job_id: uuid.UUID | str) -> StoredArtifact:
        """Save a trained model in the `.keras` format under staging/, atomically, and hash it."""
        final = self.staging_path(job_id)
        # Keras insists on the .keras suffix, so the temporary name keeps it.
        write_atomically(final, model.save, suffix=".keras")
        sha256, size = file_digest(final)
        return StoredArtifact(final, sha256, size, str(final.relative_to(self.root).as_posix()))

    def publish_model(self, staged: Path, name: str, version: int) -> StoredArtifact:
        """Copy a staged model to its registered place (temp file + os.replace).

        A copy, not a move, so a registration that has to retry with another version
        number still has its staged file.
        """
        key = self.model_key(name, version)
        final = self.local_path(key)
        write_atomically(final, lambda tmp: shutil.copyfile(staged, tmp), suffix=".keras")
        sha256, size = file_digest(final)
        return StoredArtifact(final, sha256, size, key)

    # ------------------------------------------------------------------ clean-up
    def discard_staging(self, job_id: uuid.UUID | str) -> None:
        shutil.rmtree(self.staging_path(job_id).parent, ignore_errors=True)

    def discard_checkpoints(self, job_id: uuid.UUID | str) -> None:
        """A terminal job never resumes, so its checkpoint only takes disk space."""
        shutil.rmtree(self.checkpoint_dir(job_id), ignore_errors=True)

    def discard_job_files(self, job_id: uuid.UUID | str) -> None:
        """Checkpoint and staged model of one job (the sweep's clean-up of terminal jobs)."""
        self.discard_checkpoints(job_id)
        self.discard_staging(job_id)

    def job_folders(self) -> set[str]:
        """Names (job ids) of every checkpoints/<id>/ and staging/<id>/ folder in the store."""
        names: set[str] = set()
        for area in ("checkpoints", "staging"):
            try:
                names.update(p.name for p in (self.root / area).iterdir() if p.is_dir())
            except (FileNotFoundError, NotADirectoryError):
                continue
        return names

    def folder_age_s(self, job_id: uuid.UUID | str) -> float:
        """Seconds since the job's newest checkpoint or staging folder last changed."""
        newest = 0.0
        for folder in (self.checkpoint_dir(job_id), self.staging_path(job_id).parent):
            try:
                newest = max(newest, folder.stat().st_mtime)
            except OSError:
                continue
        return time.time() - newest if newest else float("inf")
