"""Name, alias or "latest" -> a registered version, from memory: no database on the hot path.

The first request for a name reads that name's versions and aliases (two small queries, off
the event loop); later requests resolve from the copy in memory. The copy is brought up to
date by app.serving.service.PredictionService.refresh, which reads the name again (`read`),
stores it (`store`) and, while a label's new target is loaded and warmed, pins the label to
the version it served before (`pin`), so a moved alias never serves a cold model. Refreshes
come from an alias moved through this process, from PostgreSQL's notifications of any
process's change, and from the fingerprint poll (`check`, every REGISTRY_POLL_S), which
catches what a notification may have missed.

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


# The label of "no version, no alias": the latest version.
LATEST: str | None = None


@dataclass
class _Entry:
    versions: dict[int, ServedVersion] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)

    @property
    def latest(self) -> int | None:
        return max(self.versions) if self.versions else None

    def targets(self) -> dict[str | None, int]:
        """Label (an alias, or LATEST) -> the version the registry points it at."""
        found: dict[str | None, int] = {alias: v for alias, v in self.aliases.items()}
        if self.latest is not None:
            found[LATEST] = self.latest
        return found


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
        # (name, label) -> the version served while the label's new target is not warm.
        self._pins: dict[tuple[str, str | None], int] = {}
        self._lock = threading.Lock()
        self._fingerprint: tuple[Any, ...] | None = None
        self.loads = 0  # database reads of a name (tests and the benchmark look at it)

    def lookup(self, name: str, version: int | None, alias: str | None) -> ServedVersion | None:
        """From memory only; None means "not known here", never "does not exist"."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        if version is None:
            version = self._pins.get((name, alias))
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
        entry = self.read(name)
        if entry is None:
            raise ModelNotFound(f"no registered model named {name!r}")
        self.store(name, entry)
        hit = self.lookup(name, version, alias)
        if hit is not None:
            return hit
        with self._sessions() as session:  # the registry's own words for what is missing
            row = registry.resolve(session, name, version=version, alias=alias)
            return ServedVersion(row.name, row.version, row.sha256, row.artifact_path)

    def read(self, name: str) -> _Entry | None:
        """The name as the database has it now (blocking), None when it has no version."""
        with self._sessions() as session:
            if self._fingerprint is None:
                self._fingerprint = fingerprint(session)
            rows = registry.list_versions(session, name)
            aliases = registry.list_aliases(session, name)
        self.loads += 1
        if not rows:
            return None
        return _Entry(
            versions={
                r.version: ServedVersion(r.name, r.version, r.sha256, r.artifact_path) for r in rows
            },
            aliases=aliases,
        )

    def store(self, name: str, entry: _Entry) -> None:
        with self._lock:
            self._entries[name] = entry

    def names(self) -> list[str]:
        """The names resolved here (the ones a refresh concerns)."""
        with self._lock:
            return list(self._entries)

    def served(self, name: str) -> dict[str | None, int] | None:
        """Label -> the version this process serves for it now (pins included); None for a
        name never resolved here."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return None
            targets = entry.targets()
            for (pinned_name, label), version in self._pins.items():
                if pinned_name == name:
                    targets[label] = version
            return targets

    def pin(self, name: str, label: str | None, version: int) -> None:
        """Keep serving `version` for `label` until unpin (its new target is not warm)."""
        with self._lock:
            self._pins[(name, label)] = version

    def unpin(self, name: str, label: str | None) -> None:
        with self._lock:
            self._pins.pop((name, label), None)

    def pins(self, name: str | None = None) -> dict[tuple[str, str | None], int]:
        with self._lock:
            return {k: v for k, v in self._pins.items() if name is None or k[0] == name}

    def forget(self, name: str | None = None) -> None:
        """Forget one name (or all), pins included: its next request reads the database."""
        with self._lock:
            if name is None:
                self._entries.clear()
                self._pins.clear()
            else:
                self._entries.pop(name, None)
                for key in [k for k in self._pins if k[0] == name]:
                    del self._pins[key]

    def check(self) -> bool:
        """Read the fingerprint: True once another process changed the registry since the
        last look (the caller then refreshes every name). Blocking: run it off the loop."""
        if not self._entries:
            self._fingerprint = None  # nothing cached: nothing to check
            return False
        with self._sessions() as session:
            current = fingerprint(session)
        if current != self._fingerprint:
            self._fingerprint = current
            return True
        return False
