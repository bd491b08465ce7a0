"""Name, alias or "latest" -> a registered version, from memory: no database on the hot path.

The first request for a name reads that name's versions and aliases (two small queries, off
the event loop); later requests resolve from the copy in memory. The copy goes stale in two
ways, handled as follows:

- in this process (an alias moved through this API), `invalidate(name)` drops it at once,
  so the very next request reads the new target;
- in another process (a worker registered a new version, another API process moved an
  alias), a cheap fingerprint of the registry (the highest version id, the number of
  versions and aliases, the newest alias change) is read at most every `REGISTRY_POLL_S`
  seconds by a background task; when it changes, every cached name is dropped. So another
  process's change is served within that bound (1 s by default).

A name, version or alias that is not in the copy is looked up in the database before the
request is refused, so a version registered a moment ago is never answered 404.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.errors import ModelNotFound
from app.models import ModelAlias, ModelVersion
from app.registry import versions as registry


@dataclass(frozen=True)
class ServedVersion:
    """What serving needs of a registry row (it satisfies app.ml.inference.VersionLike)."""

    name: str
    version: int
    sha256: str
    artifact_path: str


@dataclass
class _Entry:
    versions: dict[int, ServedVersion] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)

    @property
    def latest(self) -> int | None:
        return max(self.versions) if self.versions else None


def fingerprint(session: Session) -> tuple[Any, ...]:
    """Changes whenever a version is added or removed or an alias is added, moved or removed."""
    row = session.execute(
        select(
            select(func.max(ModelVersion.id)).scalar_subquery(),
            select(func.count()).select_from(ModelVersion).scalar_subquery(),
            select(func.count()).select_from(ModelAlias).scalar_subquery(),
            select(func.max(ModelAlias.updated_at)).scalar_subquery(),
        )
    ).one()
    return tuple(row)


class RegistryView:
    """In-memory resolution of (name, version | alias | latest), thread-safe."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._fingerprint: tuple[Any, ...] | None = None
        self.loads = 0  # database reads of a name (tests and the benchmark look at it)

    def lookup(self, name: str, version: int | None, alias: str | None) -> ServedVersion | None:
        """From memory only; None means "not known here", never "does not exist"."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        if version is None:
            version = entry.aliases.get(alias) if alias is not None else entry.latest
            if version is None:
                return None
        return entry.versions.get(version)

    def resolve(self, name: str, version: int | None, alias: str | None) -> ServedVersion:
        """Memory first, else read the name from the database (blocking: call off the loop)."""
        hit = self.lookup(name, version, alias)
        if hit is not None:
            return hit
        self._load(name)
        hit = self.lookup(name, version, alias)
        if hit is not None:
            return hit
        with self._sessions() as session:  # the registry's own words for what is missing
            row = registry.resolve(session, name, version=version, alias=alias)
            return ServedVersion(row.name, row.version, row.sha256, row.artifact_path)

    def _load(self, name: str) -> None:
        with self._sessions() as session:
            if self._fingerprint is None:
                self._fingerprint = fingerprint(session)
            rows = registry.list_versions(session, name)
            aliases = registry.list_aliases(session, name)
        self.loads += 1
        if not rows:
            raise ModelNotFound(f"no registered model named {name!r}")
        entry = _Entry(
            versions={
                r.version: ServedVersion(r.name, r.version, r.sha256, r.artifact_path) for r in rows
            },
            aliases=aliases,
        )
        with self._lock:
            self._entries[name] = entry

    def invalidate(self, name: str | None = None) -> None:
        """Forget one name (or all): its next request reads the database again."""
        with self._lock:
            if name is None:
                self._entries.clear()
            else:
                self._entries.pop(name, None)

    def check(self) -> bool:
        """Read the fingerprint; drop everything if another process changed the registry.
        Blocking (one small query): run it off the event loop. True if something changed."""
        if not self._entries:
            self._fingerprint = None  # nothing cached: nothing to check
            return False
        with self._sessions() as session:
            current = fingerprint(session)
        if current != self._fingerprint:
            self._fingerprint = current
            self.invalidate()
            return True
        return False
