"""One error type and one JSON body for every failure: {"error": {"code", "message"}}.

Codes are stable symbolic strings that clients can switch on; messages say what was
wrong and what was expected, and never echo the request payload back.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


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


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through error_body so clients see one shape."""

    @app.exception_handler(AppError)
    async def _app_error(_: Request, exc: AppError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, fields = _describe_validation(exc)
        return JSONResponse(
            error_body("validation_error", message, {"fields": fields}), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 415: "unsupported_media_type"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(
            error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            error_body("internal_error", f"unexpected server error ({type(exc).__name__})"),
            status_code=500,
        )
