"""The model registry: versions 1, 2, 3... per name, and movable aliases.

A version row is written only once its artifact is complete and hashed, so every
version (and every alias, which can only point at a version) is ready to serve.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import ModelNotFound as ModelNotFound
from app.models import ModelAlias, ModelVersion


def register_version(
    session: Session,
    *,
    name: str,
    net: str,
    job_id: uuid.UUID | None,
    artifact_path: str,
    sha256: str,
    size_bytes: int,
    metrics: dict[str, Any],
) -> ModelVersion:
    """Add the next version of `name` (flushes, the caller commits)."""
    latest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == name))
    row = ModelVersion(
        name=name,
        version=(latest or 0) + 1,
        net=net,
        job_id=job_id,
        artifact_path=artifact_path,
        sha256=sha256,
        size_bytes=size_bytes,
        metrics=metrics,
    )
    session.add(row)
    session.flush()
    return row


def list_names(session: Session) -> list[str]:
    return list(session.scalars(select(ModelVersion.name).distinct().order_by(ModelVersion.name)))


def list_versions(session: Session, name: str) -> list[ModelVersion]:
    return list(
        session.scalars(
            select(ModelVersion).where(ModelVersion.name == name).order_by(ModelVersion.version)
        )
    )


def list_aliases(session: Session, name: str) -> dict[str, int]:
    rows = session.scalars(select(ModelAlias).where(ModelAlias.name == name))
    return {row.alias: row.version for row in rows}


def get_version(session: Session, name: str, version: int) -> ModelVersion:
    row = session.scalar(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    )
    if row is None:
        raise ModelNotFound(f"model {name!r} has no version {version}")
    return row


def resolve(
    session: Session, name: str, *, version: int | None = None, alias: str | None = None
) -> ModelVersion:
    """The version to serve: an explicit version, else an alias, else the latest."""
    if version is not None:
        return get_version(session, name, version)
    if alias is not None:
        target = session.get(ModelAlias, (name, alias))
        if target is None:
            raise ModelNotFound(f"model {name!r} has no alias {alias!r}")
        return get_version(session, name, target.version)
    row = session.scalar(
        select(ModelVersion)
        .where(ModelVersion.name == name)
        .order_by(ModelVersion.version.desc())
        .limit(1)
    )
    if row is None:
        raise ModelNotFound(f"no registered model named {name!r}")
    return row


def set_alias(session: Session, name: str, alias: str, version: int) -> ModelAlias:
    """Point `name@alias` at an existing version in one statement (flushes, caller commits)."""
    get_version(session, name, version)
    row = session.get(ModelAlias, (name, alias))
    if row is None:
        row = ModelAlias(name=name, alias=alias, version=version)
        session.add(row)
    else:
        row.version = version
    session.flush()
    return row


@contextmanager
def version_slot(session: Session, name: str, version: int) -> Iterator[bool]:
    """Hold (name, version) without registering it, for as long as the block runs.

    An uncommitted row in the slot, rolled back at the end, so no reader ever sees it. The
    unique index makes a registration of the same version wait until the block ends (and a
    block wait for a registration in progress). Yields False when the version is registered
    (committed, or committed meanwhile): then the slot is not ours.
    """
    placeholder = ModelVersion(
        name=name,
        version=version,
        net="",
        job_id=None,
        artifact_path="",
        sha256="",
        size_bytes=0,
        metrics={},
    )
    session.add(placeholder)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        yield False
        return
    try:
        yield True
    finally:
        session.rollback()
