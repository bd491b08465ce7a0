"""The artifact store: trained `.keras` models and per-job training checkpoints.

A local folder (settings.artifact_dir) with an object-store-friendly layout, so an S3/GCS
backend can replace it later by implementing the same few methods:

    models/<name>/<version>/model.keras    a registered model version (immutable once registered)
    checkpoints/<job_id>/                  the training core's checkpoint of a running job
    staging/<job_id>/model.keras           a finished model waiting to be registered

Every file is written to a temporary name in its final folder and moved into place with
os.replace, so a reader (the API, another worker) never sees a half-written model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.config import Settings

if TYPE_CHECKING:
    import keras

MODEL_FILE = "model.keras"


@dataclass(frozen=True)
class StoredArtifact:
    """Where a file lies and what it holds: the registry stores all three."""

    path: Path
    sha256: str
    size_bytes: int


def file_digest(path: Path) -> tuple[str, int]:
    """sha256 hex digest and size of a file, read in chunks (models can be large)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class ArtifactStore:
    """Local-folder implementation; paths it returns are absolute so every process agrees."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    @classmethod
    def from_settings(cls, settings: Settings) -> ArtifactStore:
        return cls(settings.artifact_dir)

    # ------------------------------------------------------------------ layout
    def model_path(self, name: str, version: int) -> Path:
        return self.root / "models" / name / str(version) / MODEL_FILE

    def checkpoint_dir(self, job_id: uuid.UUID | str) -> Path:
        return self.root / "checkpoints" / str(job_id)

    def staging_path(self, job_id: uuid.UUID | str) -> Path:
        return self.root / "staging" / str(job_id) / MODEL_FILE

    # ------------------------------------------------------------------ writes
    def stage_model(self, model: keras.Model, job_id: uuid.UUID | str) -> StoredArtifact:
        """Save a trained model in the `.keras` format under staging/, atomically, and hash it."""
        final = self.staging_path(job_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        # Keras insists on the .keras suffix, so the temporary name keeps it.
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".keras", dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            model.save(tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        sha256, size = file_digest(final)
        return StoredArtifact(final, sha256, size)

    def publish_model(self, staged: Path, name: str, version: int) -> StoredArtifact:
        """Copy a staged model to its registered place (temp file + os.replace).

        A copy, not a move, so a registration that has to retry with another version
        number still has its staged file.
        """
        final = self.model_path(name, version)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".keras", dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            shutil.copyfile(staged, tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        sha256, size = file_digest(final)
        return StoredArtifact(final, sha256, size)

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
