"""GET /health: the API is up and its database answers."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app.api.deps import SessionDep
from app.errors import DatabaseUnavailable
from app.schemas import HealthPublic

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


def _version() -> str:
    try:
        return version("cnn-service")
    except PackageNotFoundError:  # running from a checkout that was not pip-installed
        return "unknown"


@router.get(
    "/health",
    response_model=HealthPublic,
    responses={503: {"description": "The database does not answer."}},
)
def health(session: SessionDep) -> HealthPublic:
    try:
        session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        log.warning("health check: database unavailable: %s", exc)
        raise DatabaseUnavailable(f"the database does not answer ({type(exc).__name__})") from exc
    return HealthPublic(
        status="ok",
        database="ok",
        database_backend=session.get_bind().dialect.name,
        version=_version(),
    )
