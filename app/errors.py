"""One error type and one JSON body for every failure: {"error": {"code", "message"}}.

Codes are stable symbolic strings that clients can switch on; messages say what was
wrong and what was expected, and never echo the request payload back.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class AppError(Exception):
    """An error the client can act on; `status` is the HTTP status to answer with."""

    def __init__(
        self, code: str, message: str, status: int = 400, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.details = details


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return {"error": error}


def _describe_validation(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    """Turn pydantic's errors into one readable sentence plus per-field entries (no input echo)."""
    fields = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        if err.get("type") == "json_invalid":
            # pydantic puts the character offset in `loc`; the field is the whole body.
            loc = []
        fields.append({"field": ".".join(loc) or "body", "problem": err.get("msg", "invalid")})
    message = "; ".join(f"{f['field']}: {f['problem']}" for f in fields) or "invalid request"
    return message, fields


# FastAPI's detail when the body cannot even be decoded (e.g. not UTF-8).
FASTAPI_BODY_ERROR = "There was an error parsing the body"
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first
    route that matched the path, e.g. `Allow: POST` for /jobs although GET exists too)."""
    from starlette.routing import Match

    scope = {**request.scope, "method": "GET"}
    methods: set[str] = set()

    def walk(routes: Any) -> None:
        for route in routes:
            nested = getattr(route, "effective_candidates", None)  # FastAPI's included routers
            if nested is not None:
                walk(nested())
                continue
            route_methods = getattr(route, "methods", None)
            if route_methods and route.matches(scope)[0] is not Match.NONE:
                methods.update(route_methods)

    walk(request.app.router.routes)
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through error_body so clients see one shape."""

    @app.exception_handler(AppError)
    async def _app_error(_: Request, exc: AppError) -> JSONResponse:
        headers = None
        if isinstance(exc, Unauthorized):
            headers = {"WWW-Authenticate": "Bearer"}
        elif isinstance(exc, RateLimited):
            headers = {"Retry-After": str(exc.retry_after)}
        return JSONResponse(
            error_body(exc.code, exc.message, exc.details), status_code=exc.status, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, fields = _describe_validation(exc)
        return JSONResponse(
            error_body("validation_error", message, {"fields": fields}), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 400 and exc.detail == FASTAPI_BODY_ERROR:
            # Bytes that are not UTF-8 JSON: the same 422 as any other malformed JSON.
            return JSONResponse(
                error_body("validation_error", "body: the body is not valid UTF-8 JSON"),
                status_code=422,
            )
        if exc.status_code == 405:
            headers = {"Allow": ", ".join(allowed_methods(request))}
        return JSONResponse(
            error_body(code, str(exc.detail)), status_code=exc.status_code, headers=headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The detail goes to the log only; the client learns the exception's type.
        log.error("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            error_body("internal_error", f"unexpected server error ({type(exc).__name__})"),
            status_code=500,
        )


# Access control and quotas (app.auth, app.api.deps). Converted to DomainError subclasses
# once the one-table error model lands.
class Unauthorized(AppError):
    def __init__(self, message: str) -> None:
        super().__init__("unauthorized", message, 401)


class Forbidden(AppError):
    def __init__(self, message: str) -> None:
        super().__init__("forbidden", message, 403)


class KeyNotFound(AppError):
    def __init__(self, message: str) -> None:
        super().__init__("key_not_found", message, 404)


class KeyNameTaken(AppError):
    def __init__(self, message: str) -> None:
        super().__init__("key_name_taken", message, 409)


class JobTooLarge(AppError):
    def __init__(self, message: str) -> None:
        super().__init__("job_too_large", message, 422)


class KeyInUse(AppError):
    def __init__(self, message: str) -> None:
        super().__init__("key_in_use", message, 409)


class QuotaExceeded(AppError):
    def __init__(self, message: str) -> None:
        super().__init__("quota_exceeded", message, 429)


class RateLimited(AppError):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__("rate_limited", message, 429)
        self.retry_after = retry_after
