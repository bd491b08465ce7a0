"""GET /metrics: Prometheus text format (see app/metrics.py and docs/metrics.md)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from app.metrics import render

# The read scope is added where the router is included, unless METRICS_PUBLIC (app/main.py).
router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition."}},
)
async def metrics(request: Request) -> Response:
    body = await run_in_threadpool(render, request.app.state.sessionmaker)
    return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})
