"""Small file helpers shared by the artifact store and the serving code (stdlib only, so
app/ml can use them without depending on the registry)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def file_digest(path: Path) -> tuple[str, int]:
    """sha256 hex digest and size of a file, read in chunks (models can be large)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def resolve_artifact(root: Path, stored: str) -> Path:
    """The local file of a registry's artifact_path: a key relative to `root`, or a legacy
    absolute path (kept as it is)."""
    path = Path(stored)
    return path if path.is_absolute() else root / path


def write_atomically(final: Path, write: Callable[[Path], object], suffix: str = "") -> None:
    """Write `final` through `write(tmp)` on a temporary name in the same folder, then
    os.replace it into place: readers see the old file or the whole new one, never a part."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
