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
from kombu import Queue

from app.config import Settings, get_settings

log = logging.getLogger(__name__)

# The task names are the wire protocol between API and workers (queued messages carry
# them), so they keep the names the tasks have always had in worker/tasks.py.
TRAIN_TASK = "worker.tasks.train_job"
SWEEP_TASK = "worker.tasks.sweep_jobs"


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
        # Long fits outlast Redis's default one-hour visibility timeout; the database claim
        # (app.jobs.execution) is the real guard against a second fit, this only makes
        # redelivery rarer.
        transport_options = {"visibility_timeout": 6 * 3600}
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_queues=(Queue(settings.TRAINING_QUEUE), Queue(settings.MAINTENANCE_QUEUE)),
        task_default_queue=settings.MAINTENANCE_QUEUE,
        task_routes={
            TRAIN_TASK: {"queue": settings.TRAINING_QUEUE},
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


def enqueue_training(settings: Settings, job_id: uuid.UUID) -> bool:
    """Send the training task for `job_id`; False (and a warning) when the broker refused."""
    try:
        celery_for(settings).send_task(
            TRAIN_TASK,
            args=[str(job_id)],
            queue=settings.TRAINING_QUEUE,
            retry=True,
            retry_policy=_PUBLISH_RETRY,
        )
    except Exception as exc:  # any broker failure: the job stays queued for the sweep
        log.warning(
            "could not enqueue job %s (%s: %s); it stays queued and the sweep will re-send it",
            job_id,
            type(exc).__name__,
            exc,
        )
        return False
    return True
