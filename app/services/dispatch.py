"""Hand a queued job to the workers by task name, so the API never imports training code.

The message carries only the job id; everything else is in the database. A failed send
leaves the job queued with no enqueued_at, and the worker's periodic sweep re-sends it.
"""

from __future__ import annotations

import logging
import threading
import uuid

from celery import Celery

from app.config import Settings
from worker.celery_app import TRAIN_TASK, create_celery

log = logging.getLogger(__name__)

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
