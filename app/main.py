"""The FastAPI application: routers, one error body everywhere, settings on app.state.

Run with `uvicorn app.main:create_app --factory` (or `cnn serve`, which also migrates).
Nothing here imports TensorFlow; /summary and /predict load it on first use.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api import (
    compare,
    dashboard,
    events,
    health,
    jobs,
    metrics,
    models,
    nets,
    predict,
    summary,
)
from app.config import Settings, get_settings
from app.db import session_factory
from app.errors import install_error_handlers
from app.metrics import predict_middleware
from app.serving.service import PredictionService

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: the process settings).

    Every request gets its session from app.state.sessionmaker, so two apps built with
    different settings (tests, tools) never share a database by accident.
    """
    settings = settings or get_settings()
    sessions = session_factory(settings)
    prediction = PredictionService(settings, sessions)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("API up, database backend %s", sessions.kw["bind"].dialect.name)
        await prediction.start()
        yield
        await prediction.stop()
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
    app.state.prediction = prediction
    install_error_handlers(app)
    app.middleware("http")(predict_middleware)
    for router in (
        health.router,
        nets.router,
        summary.router,
        jobs.router,
        events.router,
        models.router,
        predict.router,
        metrics.router,
        compare.router,
    ):
        app.include_router(router)
    dashboard.install(app)
    return app
