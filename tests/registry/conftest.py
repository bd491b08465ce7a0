"""Both artifact stores behind one fixture: the folder and S3 (moto's server over HTTP)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from app.registry.store import ArtifactStore, LocalArtifactStore
from tests.s3_server import S3Server

# A host's view of the store: each call is another process with its own scratch folder.
Hosts = Callable[[], ArtifactStore]


class FakeModel:
    """What the store needs of a keras.Model: save(path) writes the file."""

    def __init__(self, content: bytes) -> None:
        self.content = content

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.content)


def s3_hosts_on(server: S3Server, scratch_root: Path) -> Hosts:
    """Stores on one new bucket, each with a scratch folder of its own."""
    from app.registry.s3 import S3ArtifactStore

    bucket = server.bucket()
    count = itertools.count()
    return lambda: S3ArtifactStore(
        bucket, "cnn", scratch=scratch_root / f"host-{next(count)}", endpoint_url=server.endpoint
    )


@pytest.fixture(params=["file", "s3"])
def hosts(request: pytest.FixtureRequest, tmp_path: Path) -> Hosts:
    """A factory of stores on one shared location: the folder store's folder, or one bucket."""
    if request.param == "file":
        root = tmp_path / "artifacts"
        return lambda: LocalArtifactStore(root)
    return s3_hosts_on(request.getfixturevalue("s3_server"), tmp_path)


@pytest.fixture
def s3_hosts(s3_server: S3Server, tmp_path: Path) -> Hosts:
    """The same for the S3 store alone (what only an object store does: uploads)."""
    return s3_hosts_on(s3_server, tmp_path)
