"""The FastAPI application: routers, one error body everywhere, settings on app.state.

Run with `uvicorn app.main:create_app --factory` (or `cnn serve`, which also migrates).
Nothing here imports TensorFlow; /summary and /predict load it on first use.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from app.api import dashboard, events, health, jobs, metrics, models, nets, predict, summary
from app.config import Settings, get_settings
from app.db import session_factory
from app.errors import error_body, install_error_handlers
from app.metrics import predict_middleware
from app.services.registry import ModelNotFound
from app.states import InvalidTransition, is_terminal

log = logging.getLogger(__name__)


def _install_domain_handlers(app: FastAPI) -> None:
    """Map the service layer's own exceptions onto the common error body."""

    @app.exception_handler(InvalidTransition)
    async def _invalid_transition(_: Request, exc: InvalidTransition) -> JSONResponse:
        code = "job_terminal" if is_terminal(exc.current) else "invalid_transition"
        message = (
            f"the job is already {exc.current} and can no longer change"
            if is_terminal(exc.current)
            else str(exc)
        )
        return JSONResponse(error_body(code, message), status_code=409)

    @app.exception_handler(OperationalError)
    async def _database_down(_: Request, exc: OperationalError) -> JSONResponse:
        # Connection refused, server gone, SQLite locked: worth a retry, not a 500.
        log.warning("database error: %s", exc.orig)
        return JSONResponse(
            error_body(
                "database_unavailable", f"the database does not answer ({type(exc.orig).__name__})"
            ),
            status_code=503,
        )

    @app.exception_handler(ModelNotFound)
    async def _model_not_found(_: Request, exc: ModelNotFound) -> JSONResponse:
        return JSONResponse(error_body("model_not_found", str(exc)), status_code=404)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: the process settings).

    Every request gets its session from app.state.sessionmaker, so two apps built with
    different settings (tests, tools) never share a database by accident.
    """
    settings = settings or get_settings()
    sessions = session_factory(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("API up, database backend %s", sessions.kw["bind"].dialect.name)
        yield
        # Return pooled connections now rather than at interpreter exit.
        sessions.kw["bind"].dispose()

    app = FastAPI(
        title="CNN training and inference service",
        version="0.1.0",
        summary="Train CIFAR-10 classifiers as jobs, track their curves, register and serve them.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.sessionmaker = sessions
    install_error_handlers(app)
    app.middleware("http")(predict_middleware)
    _install_domain_handlers(app)
    for router in (
        health.router,
        nets.router,
        summary.router,
        jobs.router,
        events.router,
        models.router,
        predict.router,
        metrics.router,
    ):
        app.include_router(router)
    dashboard.install(app)
    return app
