"""The queue client: the Celery app factory, and sending a job to the workers by task name.

Broker from the settings, JSON only, explicit queues. Job state lives in the SQL database
(app.models.Job), never in a result backend, so no result backend is configured. The API
enqueues by task name (`send_task`) and never imports the tasks or training code; the
message carries only the job id. A failed send leaves the job queued with no enqueued_at,
and the workers' periodic sweep re-sends it.

Nothing here runs at import time: an app (and, for the embedded broker, its folder) is
made by `create_celery`, called by the worker entry point and by `celery_for` on first send.
"""

from __future__ import annotations

import logging
import threading
import uuid

from celery import Celery
from kombu import Exchange, Queue
from sqlalchemy import select

from app.config import Settings, get_settings

log = logging.getLogger(__name__)

# The task names are the wire protocol between API and workers (queued messages carry
# them), so they keep the names the tasks have always had in worker/tasks.py.
TRAIN_TASK = "worker.tasks.train_job"
SWEEP_TASK = "worker.tasks.sweep_jobs"


def any_queue(settings: Settings) -> str:
    """The queue of jobs that run on any device (gpus 0): every worker serves it."""
    return f"{settings.TRAINING_QUEUE}.any"


def gpu_queue(settings: Settings, gpus: int) -> str:
    """The queue of jobs that ask for exactly `gpus` GPUs."""
    return f"{settings.TRAINING_QUEUE}.gpu{gpus}"


def training_queue(settings: Settings, gpus: int) -> str:
    """Where a job asking for `gpus` devices is sent (0: any device)."""
    return any_queue(settings) if gpus == 0 else gpu_queue(settings, gpus)


def worker_queues(settings: Settings, gpus: int) -> list[str]:
    """The queues a worker owning `gpus` GPUs serves: every job it can run, and the sweeps.

    A 4-GPU worker takes jobs asking for 1 to 4 GPUs and any-device jobs, so a job never
    lands on a worker with fewer GPUs than it asked for.
    """
    return [
        *(gpu_queue(settings, n) for n in range(1, gpus + 1)),
        any_queue(settings),
        settings.MAINTENANCE_QUEUE,
    ]


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def create_celery(settings: Settings | None = None) -> Celery:
    """A Celery app bound to the configured broker (filesystem transport when embedded)."""
    settings = settings or get_settings()
    app = Celery("cnn", broker=settings.broker_url, include=["worker.tasks"])
    transport_options: dict[str, object] = {}
    if settings.embedded_broker:
        folder = settings.broker_dir
        for sub in ("out", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder / "out"),
            "data_folder_out": str(folder / "out"),
            "processed_folder": str(folder / "processed"),
            # Without this kombu writes its exchange tables to ./control in the cwd.
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    else:
        # Long fits outlast Redis's default one-hour visibility timeout (the message is
        # acknowledged after the fit); the database claim (app.jobs.execution) is the real
        # guard against a second fit, this only makes redelivery rarer (docs/jobs.md).
        transport_options = {"visibility_timeout": settings.CELERY_VISIBILITY_TIMEOUT_S}
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        # Each queue on its own direct exchange, as Celery declares the GPU queues when they
        # are first used (task_create_missing_queues); a bare Queue(name) would be bound to
        # the default (maintenance) exchange and routing key.
        task_queues=(_queue(any_queue(settings)), _queue(settings.MAINTENANCE_QUEUE)),
        task_default_queue=settings.MAINTENANCE_QUEUE,
        task_routes={
            TRAIN_TASK: {"queue": any_queue(settings)},
            SWEEP_TASK: {"queue": settings.MAINTENANCE_QUEUE},
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_hijack_root_logger=False,
    )
    return app


# Keep a failed send short: the request is waiting, and the sweep retries later anyway.
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}

_apps: dict[str, Celery] = {}
_apps_lock = threading.Lock()


def celery_for(settings: Settings) -> Celery:
    """One Celery app (and its connection pool) per distinct settings."""
    key = settings.model_dump_json()
    with _apps_lock:
        app = _apps.get(key)
        if app is None:
            app = _apps[key] = create_celery(settings)
        return app


def job_gpus(settings: Settings, job_id: uuid.UUID) -> int:
    """The GPUs a stored job asked for (0 for a job that is gone: it will not be claimed)."""
    from app.db import session_factory
    from app.models import Job

    with session_factory(settings)() as session:
        return session.scalar(select(Job.gpus).where(Job.id == job_id)) or 0


def enqueue_training(settings: Settings, job_id: uuid.UUID, gpus: int | None = None) -> bool:
    """Send the training task for `job_id` to the queue of its `gpus` (read from the job when
    not given, as the sweep's re-sends do); False (and a warning) when the broker refused."""
    try:
        if gpus is None:
            gpus = job_gpus(settings, job_id)
        celery_for(settings).send_task(
            TRAIN_TASK,
            args=[str(job_id)],
            queue=training_queue(settings, gpus),
            retry=True,
            retry_policy=_PUBLISH_RETRY,
        )
    except Exception as exc:  # any broker (or database) failure: the sweep sends it later
        log.warning(
            "could not enqueue job %s (%s: %s); it stays queued and the sweep will re-send it",
            job_id,
            type(exc).__name__,
            exc,
        )
        return False
    return True
