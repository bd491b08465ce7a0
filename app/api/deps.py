"""Typed FastAPI dependencies: the settings and a database session of this app instance.

Both come from app.state (set by create_app), so a test can build an app on its own
database without touching the process-wide settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import UnsupportedMediaType


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, closed (and rolled back if uncommitted) afterwards."""
    with request.app.state.sessionmaker() as session:
        yield session


def require_json(request: Request) -> None:
    """Answer 415 for a body that is not declared as JSON, instead of a confusing 422."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    has_body = request.headers.get("content-length", "0") != "0" or bool(
        request.headers.get("transfer-encoding")
    )
    if not media and not has_body:
        return  # no body at all: validation reports the missing fields
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        raise UnsupportedMediaType(
            f"the request body must be JSON sent with Content-Type: application/json "
            f"(got {media[:100] or 'no content type'})"
        )


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
JsonBody = Depends(require_json)
