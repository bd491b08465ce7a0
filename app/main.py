"""The FastAPI application: routers, one error body everywhere, settings on app.state.

Run with `uvicorn app.main:create_app --factory` (or `cnn serve`, which also migrates).
Nothing here imports TensorFlow; /summary and /predict load it on first use.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

from app.api import (
    compare,
    dashboard,
    events,
    health,
    jobs,
    keys,
    metrics,
    models,
    nets,
    predict,
    summary,
    sweeps,
    workers,
)
from app.api.deps import ReadAccess
from app.api.limits import install_limits
from app.api.transport import PREDICT_PATH
from app.auth import PrincipalCache
from app.config import Settings, get_settings
from app.db import session_factory
from app.errors import install_error_handlers
from app.metrics import PredictMetrics
from app.notices import Notices
from app.quotas import PredictLimiter
from app.serving.service import PredictionService

log = logging.getLogger(__name__)


def warn_open_access(settings: Settings) -> None:
    """Say at every start when the service is open to callers without a key."""
    if settings.AUTH == "off":
        log.warning(
            "AUTH=off: every request acts as an administrator; use this only on a machine "
            "nobody else can reach"
        )
        return
    opened = [name for name in ("ANONYMOUS_READ", "ANONYMOUS_PREDICT") if getattr(settings, name)]
    if opened:
        log.warning("%s: callers without an API key are served", " and ".join(opened))
    if "*" in settings.allowed_hosts:
        log.warning("ALLOWED_HOSTS=*: any Host header is served; check it in the proxy in front")


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "Stable symbolic code."},
                "message": {"type": "string"},
                "details": {"type": "object"},
            },
        }
    },
}
_GUARD_RESPONSES = {
    "401": "No API key, an unknown or revoked one (`unauthorized`).",
    "403": "The key lacks the scope, or the job or model name is another key's (`forbidden`).",
}


def _no_null_form_fields(schema: dict[str, Any]) -> None:
    """A multipart form field is text or absent, never JSON null: drop the `null` branch
    FastAPI documents for optional form fields (a fuzzer would send the string "null")."""
    components = schema.get("components", {}).get("schemas", {})
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            content = operation.get("requestBody", {}).get("content", {})
            ref = content.get("multipart/form-data", {}).get("schema", {}).get("$ref", "")
            form = components.get(ref.rsplit("/", 1)[-1], {}) if ref else {}
            if {"version", "alias"} <= set(form.get("properties", {})):
                form["not"] = {"required": ["version", "alias"]}  # either, never both
            for field in form.get("properties", {}).values():
                options = field.get("anyOf")
                if options and {"type": "null"} in options:
                    kept = [o for o in options if o != {"type": "null"}]
                    field.pop("anyOf")
                    field.update(kept[0] if len(kept) == 1 else {"anyOf": kept})


def _document_security(app: FastAPI, settings: Settings) -> None:
    """Complete the OpenAPI document with what the guards answer, so that every status the
    service sends is documented: 401/403 on every secured operation, 408 and 413 where a body
    is read, 429 on /predict, the common error body, and the job size bounds of `settings`
    (a request the schema allows is one the service accepts)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["Error"] = ERROR_SCHEMA
        error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                extra = dict(_GUARD_RESPONSES) if operation.get("security") else {}
                if "requestBody" in operation:
                    extra["408"] = "The body did not arrive in BODY_TIMEOUT_S (`request_timeout`)."
                    extra["413"] = "The body is over its limit (`too_large`)."
                if path.startswith(PREDICT_PATH):
                    extra["429"] = "Too many requests for this key (`rate_limited`, Retry-After)."
                for status, text in extra.items():
                    responses.setdefault(status, {"description": text})
                for status, response in responses.items():
                    # Every error answers the common body (FastAPI documents its own
                    # {"detail": [...]} for 422, which this service never sends).
                    if status.isdigit() and int(status) >= 400:
                        response["content"] = error_content
        _no_null_form_fields(schema)
        fields = components.get("JobCreate", {}).get("properties", {})
        for name, bound in (
            ("epochs", settings.JOB_MAX_EPOCHS),
            ("batch_size", settings.JOB_MAX_BATCH_SIZE),
        ):
            field = fields.get(name)
            if field is not None and "maximum" in field:
                field["maximum"] = min(field["maximum"], bound)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# Swagger UI's files, vendored (app/static/swagger/VERSION) and served by the dashboard's
# /static mount: the page where keys are pasted loads nothing from another host.
SWAGGER_ASSETS = "/static/swagger"


def _install_docs(app: FastAPI) -> None:
    """GET /docs: Swagger UI from this service's own files, offline, with the validator
    badge off (it would send the schema's URL to validator.swagger.io)."""

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{SWAGGER_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER_ASSETS}/favicon-32x32.png",
            oauth2_redirect_url=None,
            swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": False},
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: the process settings).

    Every request gets its session from app.state.sessionmaker, so two apps built with
    different settings (tests, tools) never share a database by accident.
    """
    settings = settings or get_settings()
    sessions = session_factory(settings)
    prediction = PredictionService(settings, sessions)
    limiter = PredictLimiter.from_settings(settings)
    principals = PrincipalCache(settings.AUTH_CACHE_S)
    # Other processes' registry changes and key revocations, at once (PostgreSQL only).
    notices = Notices(settings.database_url)
    notices.on_registry(prediction.changed)
    notices.on_key_revoked(principals.revoked)
    notices.on_gap(prediction.changed)
    notices.on_gap(principals.clear)
    prediction.pushed = notices.listening.is_set

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("API up, database backend %s", sessions.kw["bind"].dialect.name)
        warn_open_access(settings)
        await prediction.start()
        await limiter.start()
        notices.start()
        yield
        notices.stop()
        await limiter.stop()
        await prediction.stop()
        # Return pooled connections now rather than at interpreter exit.
        sessions.kw["bind"].dispose()

    app = FastAPI(
        title="CNN training and inference service",
        version="0.1.0",
        summary="Train CIFAR-10 classifiers as jobs, track their curves, register and serve them.",
        lifespan=lifespan,
        # /docs is ours (_install_docs); ReDoc is not offered: it loads from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.sessionmaker = sessions
    app.state.predict_limiter = limiter
    app.state.principal_cache = principals
    app.state.prediction = prediction
    app.state.event_streams = events.StreamSlots(settings.EVENT_STREAMS_PER_KEY)
    install_error_handlers(app)
    app.add_middleware(predict.PredictFastPath)  # innermost: inside the host and body-size guards
    install_limits(app, settings)
    _document_security(app, settings)
    app.add_middleware(PredictMetrics)
    for router in (
        health.router,
        nets.router,
        summary.router,
        jobs.router,
        events.router,
        models.router,
        predict.router,
        keys.router,
        compare.router,
        sweeps.router,
        workers.router,
    ):
        app.include_router(router)
    # /metrics takes the read scope unless the operator opened it to a private Prometheus.
    app.include_router(metrics.router, dependencies=[] if settings.METRICS_PUBLIC else [ReadAccess])
    dashboard.install(app)
    _install_docs(app)
    return app
