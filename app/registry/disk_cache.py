"""Local copies of models from a remote store, checked before use, bounded in bytes.

A copy is named by its sha256 (`<root>/<sha256>/<file name>`), so a file in the cache is
immutable and can only ever be the content that was registered: it is downloaded to a
temporary name, hashed, and moved into place only when the hash matches. Files used least
recently (their mtime is touched on every use) are removed once the cache holds more than
`max_bytes`; the file just fetched always stays.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from app.errors import ModelIntegrityError
from app.files import file_digest

_SHA256 = re.compile(r"[0-9a-f]{64}")


class DiskCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def path(self, key: str, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256.lower()):
            raise ModelIntegrityError(f"{key} is registered with an invalid sha256")
        return self.root / sha256.lower() / PurePosixPath(key).name

    def fetch(self, key: str, sha256: str, download: Callable[[Path], None]) -> Path:
        """The cached copy of `key`, downloaded with download(path) on a miss.

        ModelIntegrityError when the download does not match `sha256` (nothing is kept);
        whatever `download` raises propagates.
        """
        final = self.path(key, sha256)
        if final.is_file():
            _touch(final)
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=final.suffix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            download(tmp)
            digest = file_digest(tmp)[0]
            if digest != sha256.lower():
                raise ModelIntegrityError(
                    f"the stored artifact {key} has sha256 {digest}, but {sha256} was "
                    "registered; refusing to use a modified file"
                )
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        self._evict(keep=final)
        return final

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used copies until the cache fits in max_bytes."""
        with self._lock:
            files = []
            for path in self.root.glob("*/*"):
                if path.name.startswith(".tmp-") or not path.is_file():
                    continue
                try:
                    stat = path.stat()
                except OSError:
                    continue
                files.append((stat.st_mtime, stat.st_size, path))
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files):
                if total <= self.max_bytes:
                    return
                if path == keep:
                    continue
                shutil.rmtree(path.parent, ignore_errors=True)
                total -= size


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # evicted by another thread a moment ago: the caller's open will say so
        pass
