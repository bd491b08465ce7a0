"""One error model: domain exceptions, the one code -> HTTP status table, the handlers.

Services, the job runner and `app.ml` raise subclasses of `DomainError`. They know nothing
of HTTP: each carries a stable symbolic `code` (what clients switch on) and a message that
says what was wrong and what was expected, never echoing the request payload back.
`STATUS` is the only place that turns a code into an HTTP status, and
`install_error_handlers` renders every failure as {"error": {"code", "message"}}.

FastAPI is imported only inside `install_error_handlers`, so `app.ml` and the worker can
import the exceptions without pulling in the web stack, and nothing of the app is imported
at all, so any module can import this one (app.states defines InvalidTransition on top of
DomainError). docs/architecture.md lists every code with its status and when it is sent.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)

# The one table from error code to HTTP status. A code missing here answers 500.
STATUS: dict[str, int] = {
    # the request itself
    "bad_json": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "too_large": 413,
    "too_many_instances": 413,
    "unsupported_media_type": 415,
    "validation_error": 422,
    "host_not_allowed": 400,
    # prediction input (InputError)
    "empty_batch": 422,
    "bad_shape": 422,
    "bad_value": 422,
    "bad_range": 422,
    "not_finite": 422,
    "bad_image": 422,
    "image_size": 422,
    "bad_base64": 422,
    # jobs
    "job_not_found": 404,
    "no_evaluation": 404,
    "no_history": 404,
    "idempotency_key_reused": 409,
    "job_too_large": 422,
    "quota_exceeded": 429,
    "too_many_model_names": 422,
    "too_many_streams": 429,
    # app.states.InvalidTransition (beside the state machine it enforces)
    "job_terminal": 409,
    "invalid_transition": 409,
    # compare and report (issue 11)
    "invalid_job_ids": 422,
    "job_not_finished": 409,
    # sweeps (issue 20)
    "sweep_not_found": 404,
    "no_finished_trials": 409,
    "sweep_too_large": 422,
    "sweep_terminal": 409,
    "ablation_not_found": 404,
    # nets, models and artifacts
    "unknown_net": 404,
    "model_not_found": 404,
    "artifact_missing": 404,
    "model_unavailable": 503,
    # the service
    "database_unavailable": 503,
    "not_ready": 503,
    # API keys and limits
    "key_not_found": 404,
    "key_name_taken": 409,
    "key_in_use": 409,
    "rate_limited": 429,
    "overloaded": 503,
    "internal_error": 500,
    # never sent: the client closed the connection first (nginx's 499); the metrics count it
    "client_closed_request": 499,
}


class DomainError(Exception):
    """An error a client can act on. `code` is a key of STATUS; the class sets its default."""

    code: str = "internal_error"
    # Extra response headers (e.g. Retry-After); None for most errors.
    headers: dict[str, str] | None = None

    def __init_subclass__(cls, code: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code

    def __init__(
        self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details

    @property
    def status(self) -> int:
        return status_of(self.code)


def status_of(code: str) -> int:
    return STATUS.get(code, 500)


# An absolute path, not part of a URL ("redis://host/0") or of a relative path.
_ABSOLUTE_PATH = re.compile(
    r"(?<![\w.:/~-])/(?:[^\s'\"`,;:()\[\]{}<>/]+/)*([^\s'\"`,;:()\[\]{}<>/]*)"
)
PUBLIC_MESSAGE_MAX_CHARS = 500


def public_message(text: str) -> str:
    """`text` fit for any API caller: absolute paths cut to their last part (".../x.tar.gz"),
    one line, at most PUBLIC_MESSAGE_MAX_CHARS. The raw text belongs in the log."""
    text = _ABSOLUTE_PATH.sub(lambda m: f".../{m.group(1)}" if m.group(1) else "...", text)
    text = " ".join(text.split())
    if len(text) > PUBLIC_MESSAGE_MAX_CHARS:
        text = text[: PUBLIC_MESSAGE_MAX_CHARS - 3] + "..."
    return text


# ----------------------------------------------------------------------------- requests
class RequestInvalid(DomainError, code="validation_error"):
    """The request is malformed in a way the schema cannot express."""


class UnsupportedMediaType(DomainError, code="unsupported_media_type"):
    """The body is not in a media type the endpoint takes."""


class PayloadTooLarge(DomainError, code="too_large"):
    """An upload over the endpoint's size limit."""


class InputError(DomainError, ValueError):
    """Prediction input the client can fix; `code` says which rule it broke (bad_shape, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


# ----------------------------------------------------------------------------- jobs
class JobNotFound(DomainError, code="job_not_found"):
    """No job has this id."""


class InvalidJobIds(DomainError, code="invalid_job_ids"):
    """GET /compare or /report got an empty, too long or malformed list of job ids."""


class JobNotFinished(DomainError, code="job_not_finished"):
    """A report is written from succeeded jobs only."""


class AblationNotFound(DomainError, code="ablation_not_found"):
    """A report asked for an ablation that the sweeps service does not have."""


class EvaluationNotFound(DomainError, code="no_evaluation"):
    """The job exists but has no test-set evaluation yet."""


class HistoryNotFound(DomainError, code="no_history"):
    """The job exists but has not finished an epoch yet."""


class IdempotencyConflict(DomainError, code="idempotency_key_reused"):
    """An Idempotency-Key was reused with different parameters."""


class JobTooLarge(DomainError, code="job_too_large"):
    """Past JOB_MAX_EPOCHS, JOB_MAX_BATCH_SIZE or JOB_MAX_IMAGE_EPOCHS."""


class QuotaExceeded(DomainError, code="quota_exceeded"):
    """The key has MAX_ACTIVE_JOBS_PER_KEY queued-or-running jobs. A slot frees when one of
    them ends, which takes minutes: Retry-After says when asking again is worth it."""

    headers = {"Retry-After": "30"}


class TooManyModelNames(DomainError, code="too_many_model_names"):
    """The key owns MAX_MODEL_NAMES_PER_KEY model names; a job must reuse one of them."""


class TooManyStreams(DomainError, code="too_many_streams"):
    """The key holds EVENT_STREAMS_PER_KEY event streams in this API process already."""

    headers = {"Retry-After": "5"}


# ----------------------------------------------------------------------------- sweeps
class SweepNotFound(DomainError, code="sweep_not_found"):
    """No sweep has this id."""


class NoFinishedTrials(DomainError, code="no_finished_trials"):
    """GET /sweeps/{id}.png before any trial has a value to plot."""


class SweepTooLarge(DomainError, code="sweep_too_large"):
    """Past SWEEP_MAX_TRIALS or SWEEP_MAX_PARALLEL."""


class SweepTerminal(DomainError, code="sweep_terminal"):
    """Cancelling a sweep that already finished or was cancelled."""


# ----------------------------------------------------------------------------- models
class UnknownNet(DomainError, code="unknown_net"):
    """No net of this name (details.known lists the nets)."""


class ModelNotFound(DomainError, LookupError, code="model_not_found"):
    """No registered name, version or alias matches the request."""


class ArtifactMissing(DomainError, code="artifact_missing"):
    """A registered version whose artifact file is gone from the store."""


class ModelArtifactError(DomainError, RuntimeError, code="model_unavailable"):
    """The registered artifact cannot be served (missing, unreadable, or not a CIFAR-10 model)."""


class ModelIntegrityError(ModelArtifactError):
    """The artifact's sha256 differs from the registered one: the file is never loaded."""


class ModelUnavailable(DomainError, code="model_unavailable"):
    """A model version is registered but cannot be served now (see ModelArtifactError)."""


# ----------------------------------------------------------------------------- service
class DatabaseUnavailable(DomainError, code="database_unavailable"):
    """The database does not answer; worth a retry."""


# ----------------------------------------------------------------------------- access
class NotReady(DomainError, code="not_ready"):
    """GET /ready: this API process cannot serve yet (details: what it holds and why)."""


class HostNotAllowed(DomainError, code="host_not_allowed"):
    """The Host header names no host of ALLOWED_HOSTS (DNS rebinding)."""


class Unauthorized(DomainError, code="unauthorized"):
    """No API key, an unknown or revoked one, or no bearer header on a state change."""

    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(DomainError, code="forbidden"):
    """A valid key without the scope, or another key's job or model name."""


class KeyNotFound(DomainError, code="key_not_found"):
    """No API key with this id or name."""


class KeyNameTaken(DomainError, code="key_name_taken"):
    """Key names are unique."""


class KeyInUse(DomainError, code="key_in_use"):
    """An admin key asked to revoke itself over the API."""


class RateLimited(DomainError, code="rate_limited"):
    """The key is over its fair share of /predict or its hard cap; Retry-After says when."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after)}


class Overloaded(DomainError, code="overloaded"):
    """More /predict requests in flight than PREDICT_MAX_PENDING (503 with Retry-After)."""

    headers = {"Retry-After": "1"}


# ----------------------------------------------------------------------------- rendering
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
# Starlette's own HTTP errors (unknown route, wrong method, ...) by status.
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "too_large",
    415: "unsupported_media_type",
}
# Starlette's multipart errors (a 400 whose detail is the parser's message): those about a
# size or a count are `too_large`, the rest a malformed body (`validation_error`).
_MULTIPART_TOO_LARGE = ("Too many ", "Part exceeded ", "Field exceeded ")


def allowed_methods(request: Any) -> list[str]:
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


def error_response(request: Any, exc: Exception) -> JSONResponse:
    """Any exception as the common error body: the app's handlers and /predict's fast path
    (app.api.predict.PredictFastPath) both answer through this one function."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from sqlalchemy.exc import OperationalError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    def render(
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> JSONResponse:
        return JSONResponse(
            error_body(code, message, details), status_code=status_of(code), headers=headers
        )

    if isinstance(exc, DomainError):
        return render(exc.code, exc.message, exc.details, exc.headers)
    if isinstance(exc, ClientDisconnect):
        # Not a server error: nobody is left to answer (the server drops what is sent).
        log.info("client closed the connection during %s %s", request.method, request.url.path)
        return render("client_closed_request", "the client closed the connection")
    if isinstance(exc, RequestValidationError):
        message, fields = _describe_validation(exc)
        return render("validation_error", message, {"fields": fields})
    if isinstance(exc, OperationalError):
        # Connection refused, server gone, SQLite locked: worth a retry, not a 500.
        log.warning("database error: %s", exc.orig)
        return render(
            "database_unavailable", f"the database does not answer ({type(exc.orig).__name__})"
        )
    if isinstance(exc, StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 400 and exc.detail == FASTAPI_BODY_ERROR:
            # Bytes that are not UTF-8 JSON: the same 422 as any other malformed JSON.
            return render("validation_error", "body: the body is not valid UTF-8 JSON")
        if exc.status_code == 400:
            # The framework's own 400s come from the multipart parser: a documented code,
            # never the catch-all http_error.
            detail = str(exc.detail)
            too_large = detail.startswith(_MULTIPART_TOO_LARGE)
            return render(
                "too_large" if too_large else "validation_error",
                f"body: the multipart form cannot be read ({detail[:200]})",
            )
        if exc.status_code == 405:
            headers = {"Allow": ", ".join(allowed_methods(request))}
        return JSONResponse(
            error_body(code, str(exc.detail)), status_code=exc.status_code, headers=headers
        )
    # The detail goes to the log only; the client learns the exception's type.
    log.error("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
    return render("internal_error", f"unexpected server error ({type(exc).__name__})")


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through error_response so clients see one shape."""
    from fastapi.exceptions import RequestValidationError
    from sqlalchemy.exc import OperationalError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def handle(request: Any, exc: Exception) -> JSONResponse:
        return error_response(request, exc)

    for kind in (
        DomainError,
        RequestValidationError,
        OperationalError,
        StarletteHTTPException,
        Exception,
    ):
        app.add_exception_handler(kind, handle)
