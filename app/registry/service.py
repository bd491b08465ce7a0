"""Registered models as the API sees them: look versions up, move aliases.

A route calls one function here, which owns the transaction, its retry and its side
effects, as app/jobs/service.py does for jobs. The one side effect of moving an alias,
telling the processes' caches of resolved names, is a listener the caller passes in: the
registry knows nothing of serving.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import auth
from app.auth import Principal
from app.errors import ModelNotFound
from app.models import ModelAlias, ModelVersion
from app.registry import versions

# Told the model's name once a move of one of its aliases is committed.
AliasListener = Callable[[str], None]


def existing_versions(session: Session, name: str) -> list[ModelVersion]:
    """The versions of `name`, oldest first; ModelNotFound when none is registered."""
    found = versions.list_versions(session, name)
    if not found:
        raise ModelNotFound(f"no registered model named {name!r}")
    return found


def existing_version(session: Session, name: str, version: int) -> ModelVersion:
    """One version of a registered name; ModelNotFound names what is missing."""
    existing_versions(session, name)
    return versions.get_version(session, name, version)


def move_alias(
    session: Session,
    principal: Principal,
    name: str,
    alias: str,
    version: int,
    *,
    on_moved: AliasListener,
) -> ModelAlias:
    """Point `name@alias` at `version`, commit, then call on_moved(name).

    Only the name's owner (the key that first submitted a job under it) or an admin
    (Forbidden otherwise). Moving an alias is one UPDATE, never a gap. Two requests that
    create the same alias at once both try the INSERT: the loser's becomes a plain move.
    """
    auth.check_model_owner(session, principal, name)
    existing_version(session, name, version)
    try:
        row = versions.set_alias(session, name, alias, version)
        session.commit()
    except IntegrityError:
        # Another request created the same alias first; ours becomes a plain move.
        session.rollback()
        row = versions.set_alias(session, name, alias, version)
        session.commit()
    on_moved(name)
    return row
