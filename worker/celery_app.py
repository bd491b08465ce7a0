"""The Celery application: broker from the settings, JSON only, explicit queues.

Job state lives in the SQL database (app.models.Job), never in a result backend,
so no result backend is configured. The API only needs `create_celery(settings)`
and the task names below to enqueue by name (`send_task`); it never imports tasks.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from app.config import Settings, get_settings

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
        # (app.services.execution) is the real guard against a second fit, this only makes
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
