"""Typed FastAPI dependencies: the settings and a database session of this app instance.

Both come from app.state (set by create_app), so a test can build an app on its own
database without touching the process-wide settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.api.transport import is_json, media_type, unsupported
from app.auth import AUTH_OFF, Principal, PrincipalCache, anonymous, authenticate
from app.config import Settings
from app.errors import Forbidden, Unauthorized
from app.quotas import PredictLimiter


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, closed (and rolled back if uncommitted) afterwards."""
    with request.app.state.sessionmaker() as session:
        yield session


def require_json(request: Request) -> None:
    """Answer 415 for a body that is not declared as JSON, instead of a confusing 422."""
    media = media_type(request.headers)
    has_body = request.headers.get("content-length", "0") != "0" or bool(
        request.headers.get("transfer-encoding")
    )
    if not media and not has_body:
        return  # no body at all: validation reports the missing fields
    if not is_json(media):
        raise unsupported(
            "the request body must be JSON sent with Content-Type: application/json", media
        )


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
JsonBody = Depends(require_json)


# ----------------------------------------------------------------------------- access
# Declares the scheme in the OpenAPI document (so /docs can authorise) and reads the
# header; auto_error=False so a missing key is our own 401 with the common error body.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key: `Authorization: Bearer cnn_...` (see docs/security.md).",
)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ANONYMOUS_SCOPES = {"read": "ANONYMOUS_READ", "predict": "ANONYMOUS_PREDICT"}


def _has_bearer_header(request: Request) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(token.strip())


def get_principal(
    request: Request, session: SessionDep, settings: SettingsDep, credentials: BearerDep
) -> Principal:
    """Who is calling: the key's principal, AUTH_OFF, or the anonymous caller (no scopes
    unless ANONYMOUS_READ / ANONYMOUS_PREDICT open them). A bad key is 401 even where
    anonymous callers are allowed, so a typo in a key never passes silently."""
    if settings.AUTH != "off" and credentials is not None:
        return authenticate(session, credentials.credentials)
    return _keyless_principal(request, settings)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_scope(*scopes: str) -> Callable[..., Principal]:
    """Dependency: the caller's Principal if it holds one of `scopes` (admin holds all).

    401 without a (valid) key, 403 with a key that lacks the scope. A state-changing
    request (not GET/HEAD/OPTIONS) also needs the bearer header even with AUTH=off or
    anonymous access: a browser cannot add it to a cross-site request. (/predict, which
    changes nothing, has its own check: authorise_predict.)
    """

    def dependency(request: Request, principal: PrincipalDep) -> Principal:
        if request.method not in SAFE_METHODS and not _has_bearer_header(request):
            raise Unauthorized(
                "this request changes state and needs the header 'Authorization: Bearer <API key>'"
            )
        return _holding(principal, scopes)

    dependency.__name__ = f"require_scope_{'_'.join(scopes)}"
    return dependency


def _holding(principal: Principal, scopes: tuple[str, ...]) -> Principal:
    """The principal if it holds one of `scopes`: else 401 (no key) or 403 (a key without)."""
    if any(principal.allows(scope) for scope in scopes):
        return principal
    wanted = " or ".join(scopes)
    if principal.id is None and principal.name == "anonymous":
        raise Unauthorized(f"this request needs an API key with the {wanted} scope")
    raise Forbidden(f"this API key lacks the {wanted} scope")


# One dependency object per scope, so that listing it in a route's `dependencies=[...]`
# (to check the key before the body's content type) and taking the Principal as a
# parameter run it once (FastAPI caches a dependency per request).
require_read = require_scope("read")
require_train = require_scope("train")
require_admin = require_scope("admin")
# Jobs: `read` sees every job, a `train` key its own.
require_job_reader = require_scope("read", "train")
ReadPrincipal = Annotated[Principal, Depends(require_read)]
TrainPrincipal = Annotated[Principal, Depends(require_train)]
AdminPrincipal = Annotated[Principal, Depends(require_admin)]
JobReader = Annotated[Principal, Depends(require_job_reader)]
ReadAccess = Depends(require_read)
TrainAccess = Depends(require_train)
AdminAccess = Depends(require_admin)


def principal_cache(request: Request) -> PrincipalCache:
    """This app's cache of key principals (created with the app; cleared on revocation)."""
    cache: PrincipalCache = request.app.state.principal_cache
    return cache


async def authorise_predict(request: Request, credentials: BearerDep) -> Principal:
    """The one check of a /predict caller: its key, the predict scope, then admission by the
    shared /predict limits (app/quotas.py: 429 + Retry-After). The routes declare it, and
    PredictFastPath runs the route's dependencies, so both entries call this function.

    Async, with the key's principal from PrincipalCache: the sync dependency chain cost four
    thread hand-offs and a database query per request, a quarter of the API's time at 32
    clients.
    """
    settings: Settings = request.app.state.settings
    if settings.AUTH == "off" or credentials is None:
        principal = _keyless_principal(request, settings)
    else:
        principal = await _cached_principal(request, credentials.credentials)
    _holding(principal, ("predict",))
    limiter: PredictLimiter = request.app.state.predict_limiter
    client = request.client.host if request.client else "unknown"
    await limiter.admit(f"key:{principal.id}" if principal.id is not None else f"anon:{client}")
    return principal


async def _cached_principal(request: Request, key: str) -> Principal:
    """get_principal without a query (or a thread hop) for a key seen in the last AUTH_CACHE_S."""
    cache = principal_cache(request)
    principal = cache.get(key)
    if principal is None:
        principal = await run_in_threadpool(_authenticate_fresh, request, key)
        cache.put(key, principal)
    return principal


def _keyless_principal(request: Request, settings: Settings) -> Principal:
    """AUTH_OFF, or the anonymous caller (no scopes unless ANONYMOUS_* open them)."""
    if settings.AUTH == "off":
        return AUTH_OFF
    if request.headers.get("authorization"):
        raise Unauthorized("the Authorization header must be 'Bearer <API key>'")
    return anonymous(scope for scope, flag in ANONYMOUS_SCOPES.items() if getattr(settings, flag))


def _authenticate_fresh(request: Request, key: str) -> Principal:
    with request.app.state.sessionmaker() as session:
        return authenticate(session, key)


PredictAccess = Depends(authorise_predict)
