"""Prometheus metrics (official prometheus_client): what `GET /metrics` exposes.

Two kinds, documented name by name in docs/metrics.md:

- **Read from the database at scrape time** (DatabaseCollector): jobs by state, queue depth,
  epochs stored, epoch duration and images/s by net and device, worker heartbeat ages. The
  database is shared, so every API process answers the same figures whichever process or
  worker changed them, and a restart loses nothing.
- **Counted in this process** (module-level objects): predict requests by model, status and
  input form, predict latency, forward-pass batch sizes, model cache hits and loads. Each API
  process counts its own requests; Prometheus scrapes every process (one target each) and
  `sum()` adds them up, as usual for per-process counters.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.transport import OCTET_STREAM, PREDICT_IMAGE_PATH, PREDICT_PATH, media_type
from app.models import EpochMetric, Job
from app.states import JobStatus

# Process-wide objects live in their own registry, so building several apps in one process
# (tests, tools) never registers a metric twice.
PROCESS_REGISTRY = CollectorRegistry(auto_describe=True)

PREDICT_REQUESTS = Counter(
    "cnn_predict_requests",
    "Prediction requests answered, by resolved model, HTTP status and input form.",
    ["model", "status", "input"],
    registry=PROCESS_REGISTRY,
)
PREDICT_LATENCY = Histogram(
    "cnn_predict_latency_seconds",
    "Time from request to answer of /predict and /predict/image, by input form.",
    ["input"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=PROCESS_REGISTRY,
)
PREDICT_BATCH = Histogram(
    "cnn_predict_batch_size",
    "Images per forward pass (a micro-batch where requests are batched together).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=PROCESS_REGISTRY,
)
CACHE_HITS = Counter(
    "cnn_model_cache_hits",
    "Predictions served by a model already in the cache.",
    ["model"],
    registry=PROCESS_REGISTRY,
)
CACHE_LOADS = Counter(
    "cnn_model_cache_loads",
    "Models loaded (sha256 check, safe-mode load, warm-up) into the cache.",
    ["model"],
    registry=PROCESS_REGISTRY,
)

EPOCH_SECONDS_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
IMAGES_PER_SECOND_BUCKETS = (100, 300, 1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000)


# ---------------------------------------------------------------- prediction requests
@dataclass
class _PredictNote:
    model: str = "unknown"
    input: str = "unknown"


_note: contextvars.ContextVar[_PredictNote | None] = contextvars.ContextVar(
    "cnn_predict_note", default=None
)


def note_predict(model: str | None = None, input_form: str | None = None) -> None:
    """Label the current prediction request (called by the predict routes, any thread)."""
    note = _note.get()
    if note is None:
        return
    if model is not None:
        note.model = model
    if input_form is not None:
        note.input = input_form


class PredictMetrics:
    """Count and time /predict requests; the routes fill in the model and the input form.

    Plain ASGI, not BaseHTTPMiddleware: that one runs each request in an extra task with
    memory streams, which cost a sixth of the API's time at 32 concurrent clients.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path") if scope["type"] == "http" else None
        if path not in (PREDICT_PATH, PREDICT_IMAGE_PATH):
            await self.app(scope, receive, send)
            return
        form = "raw" if media_type(Headers(scope=scope)) == OCTET_STREAM else "instances"
        note = _PredictNote(input="multipart" if path == PREDICT_IMAGE_PATH else form)
        token = _note.set(note)  # the routes' threads see the same object through the context
        start = time.perf_counter()
        status = 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            _note.reset(token)
            PREDICT_LATENCY.labels(note.input).observe(time.perf_counter() - start)
            PREDICT_REQUESTS.labels(note.model, str(status), note.input).inc()


# ---------------------------------------------------------------- serving hooks
def cache_hit(model: str) -> None:
    CACHE_HITS.labels(model).inc()


def cache_load(model: str) -> None:
    CACHE_LOADS.labels(model).inc()


def counting_batches(forward: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap a model's forward pass so each call's batch size is observed (micro-batches
    included: the batcher calls the pass once per merged batch)."""

    def counted(batch: Any) -> Any:
        PREDICT_BATCH.observe(len(batch))
        return forward(batch)

    return counted


# ---------------------------------------------------------------- the database figures
def _histogram(
    name: str, documentation: str, rows: list[Any], buckets: tuple[float, ...]
) -> HistogramMetricFamily:
    """rows: (net, device, count, sum, count<=b for each bucket)."""
    family = HistogramMetricFamily(name, documentation, labels=["net", "device"])
    for net, device, count, total, *below in rows:
        cumulative = [(str(float(b)), float(n or 0)) for b, n in zip(buckets, below, strict=True)]
        cumulative.append(("+Inf", float(count)))
        family.add_metric([net, device or "unknown"], cumulative, float(total or 0))
    return family


class DatabaseCollector(Collector):
    """Figures computed from the database at each scrape (right with any number of processes)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        with self.sessions() as session:
            yield from self._jobs(session)
            yield from self._epochs(session)
            yield from self._heartbeats(session)
            session.rollback()

    def _jobs(self, session: Session) -> Iterator[Metric]:
        counts: dict[str, int] = {
            status: count
            for status, count in session.execute(
                select(Job.status, func.count()).group_by(Job.status)
            )
        }
        jobs = GaugeMetricFamily("cnn_jobs", "Jobs in each state.", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], float(counts.get(status.value, 0)))
        yield jobs
        yield GaugeMetricFamily(
            "cnn_queue_depth",
            "Jobs queued and waiting for a training worker.",
            value=float(counts.get(JobStatus.QUEUED.value, 0)),
        )

    def _epochs(self, session: Session) -> Iterator[Metric]:
        stored = GaugeMetricFamily(
            "cnn_epochs_stored", "Epoch records stored, by net.", labels=["net"]
        )
        for net, count in session.execute(
            select(Job.net, func.count(EpochMetric.id))
            .join(EpochMetric, EpochMetric.job_id == Job.id)
            .group_by(Job.net)
        ):
            stored.add_metric([net], float(count))
        yield stored

        def bucketed(column: Any, buckets: tuple[float, ...]) -> list[Any]:
            query = (
                select(
                    Job.net,
                    Job.device,
                    func.count(column),
                    func.sum(column),
                    *(func.sum(case((column <= b, 1), else_=0)) for b in buckets),
                )
                .join(EpochMetric, EpochMetric.job_id == Job.id)
                .where(column.is_not(None))
                .group_by(Job.net, Job.device)
            )
            return list(session.execute(query).all())

        yield _histogram(
            "cnn_epoch_duration_seconds",
            "Wall time of stored epochs, by net and device.",
            bucketed(EpochMetric.seconds, EPOCH_SECONDS_BUCKETS),
            EPOCH_SECONDS_BUCKETS,
        )
        yield _histogram(
            "cnn_epoch_images_per_second",
            "Training throughput of stored epochs, by net and device.",
            bucketed(EpochMetric.images_per_second, IMAGES_PER_SECOND_BUCKETS),
            IMAGES_PER_SECOND_BUCKETS,
        )

    def _heartbeats(self, session: Session) -> Iterator[Metric]:
        age = GaugeMetricFamily(
            "cnn_worker_heartbeat_age_seconds",
            "Seconds since each worker running a job last beat (stale after HEARTBEAT_TIMEOUT_S).",
            labels=["worker"],
        )
        now = datetime.now(UTC)
        latest: dict[str, float] = {}
        for worker, beat in session.execute(
            select(Job.worker, Job.heartbeat_at).where(
                Job.status == JobStatus.RUNNING.value, Job.heartbeat_at.is_not(None)
            )
        ):
            beat = beat if beat.tzinfo else beat.replace(tzinfo=UTC)
            seconds = max((now - beat).total_seconds(), 0.0)
            key = worker or "unknown"
            latest[key] = min(seconds, latest.get(key, seconds))
        for worker, seconds in sorted(latest.items()):
            age.add_metric([worker], seconds)
        yield age


def render(sessions: sessionmaker[Session]) -> bytes:
    """The text exposition: this process's counters, then the database figures."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(sessions))
    return generate_latest(PROCESS_REGISTRY) + generate_latest(registry)
