"""A crash between uploading a model and committing its registry row leaves files that no
reader can see; the sweep removes them after the grace period, never a version being
registered at that moment. On both stores."""

from __future__ import annotations

import hashlib
import uuid

from app.jobs import execution
from app.registry import versions
from app.registry.store import ArtifactStore

from .conftest import FakeModel, Hosts


def _publish(store: ArtifactStore, name: str, version: int, content: bytes) -> str:
    staged = store.stage_model(FakeModel(content), uuid.uuid4())  # type: ignore[arg-type]
    return store.publish_model(staged.path, name, version).key


def _register(session_factory, name: str, version: int, key: str, content: bytes) -> None:
    with session_factory() as session:
        row = versions.register_version(
            session,
            name=name,
            net="net1",
            job_id=None,
            artifact_path=key,
            sha256=hashlib.sha256(content).hexdigest(),
            size_bytes=len(content),
            metrics={},
        )
        assert row.version == version
        session.commit()


def _sweep_orphans(session_factory, settings, store: ArtifactStore) -> list[str]:
    report = execution.SweepReport()
    with session_factory() as session:
        execution.remove_orphans(session, settings, store, report)
    return report.orphans


def test_unregistered_files_are_removed_after_the_grace_period_only(
    hosts: Hosts, clean_db, session_factory, settings
):
    store = hosts()
    key = _publish(store, "kept", 1, b"registered")
    _register(session_factory, "kept", 1, key, b"registered")
    orphan_key = _publish(store, "crashed", 1, b"uploaded, never committed")

    within_grace = settings.model_copy(update={"CLEANUP_GRACE_S": 3600})
    assert _sweep_orphans(session_factory, within_grace, store) == []
    assert ("crashed", 1) in store.published_versions()

    past_grace = settings.model_copy(update={"CLEANUP_GRACE_S": 0})
    assert _sweep_orphans(session_factory, past_grace, store) == ["crashed/1"]
    assert set(store.published_versions()) == {("kept", 1)}
    assert hosts().fetch_model(key, hashlib.sha256(b"registered").hexdigest())
    assert orphan_key == "models/crashed/1/model.keras"


def test_a_version_being_registered_is_not_an_orphan(
    hosts: Hosts, clean_db, session_factory, settings, race_a_held_row
):
    """The worker holds (name, version) in an uncommitted row while it uploads: the sweep
    waits for that row, and once it is committed the files are the version's."""
    store = hosts()
    past_grace = settings.model_copy(update={"CLEANUP_GRACE_S": 0})
    content = b"being registered"
    worker = session_factory()
    row = versions.register_version(
        worker,
        name="racing",
        net="net1",
        job_id=None,
        artifact_path="",
        sha256=hashlib.sha256(content).hexdigest(),
        size_bytes=len(content),
        metrics={},
    )
    row.artifact_path = _publish(store, "racing", row.version, content)
    worker.flush()

    removed = race_a_held_row(
        worker,
        lambda: _sweep_orphans(session_factory, past_grace, store),
        "the sweep's hold on the version being registered",
    )
    assert removed == []
    assert ("racing", 1) in store.published_versions()
    with session_factory() as session:
        assert versions.get_version(session, "racing", 1).artifact_path == row.artifact_path


class _HeldSlot:
    """A session holding a version's slot, as race_a_held_row wants its holder: `commit`
    leaves the slot (a rollback: the placeholder row never existed for anyone)."""

    def __init__(self, session, name: str, version: int) -> None:
        self.session = session
        self._slot = versions.version_slot(session, name, version)
        assert self._slot.__enter__() is True

    def execute(self, *args):
        return self.session.execute(*args)

    def commit(self) -> None:
        self._slot.__exit__(None, None, None)

    def close(self) -> None:
        self.session.close()


def test_a_registration_waits_for_the_sweep_that_holds_its_slot(
    hosts: Hosts, clean_db, session_factory, race_a_held_row
):
    """The other order: the sweep holds the slot while it removes an orphan; a worker
    registering the same version (as finish_succeeded does: the row, then the files, then
    the commit) waits for it, then writes its own files."""
    store = hosts()
    _publish(store, "reused", 1, b"the orphan")
    sweep = _HeldSlot(session_factory(), "reused", 1)
    store.discard_version("reused", 1)
    content = b"the real version 1"

    def register() -> int:
        with session_factory() as session:
            row = versions.register_version(
                session,
                name="reused",
                net="net1",
                job_id=None,
                artifact_path="",
                sha256=hashlib.sha256(content).hexdigest(),
                size_bytes=len(content),
                metrics={},
            )
            row.artifact_path = _publish(store, "reused", row.version, content)
            session.commit()
            return row.version

    assert race_a_held_row(sweep, register, "the registration of the held version") == 1
    fetched = hosts().fetch_model(
        "models/reused/1/model.keras", hashlib.sha256(content).hexdigest()
    )
    assert fetched.read_bytes() == content
