"""`cnn worker`: one Celery training worker in this process (one per GPU).

The options are the ones docs/jobs.md argues for: the solo pool (the task runs in this
process, so TensorFlow never sees a fork), concurrency 1 and prefetch 1 (a long fit must
not hold a second job hostage), both queues (training fits, maintenance sweeps), and no
gossip/mingle (job state lives in the database, and they only slow the start).
"""

from __future__ import annotations

import os
import socket
import sys

from app.config import Settings, get_settings
from app.jobs.queue import create_celery


def worker_hostname(settings: Settings) -> str:
    """Celery's node name, stored on each job the worker claims: WORKER_NAME or host + pid."""
    host = socket.gethostname()
    if settings.WORKER_NAME:
        name = settings.WORKER_NAME
        return name if "@" in name else f"{name}@{host}"
    return f"cnn-{os.getpid()}@{host}"


def worker_options(settings: Settings) -> dict[str, object]:
    return {
        "hostname": worker_hostname(settings),
        "pool_cls": "solo",
        "concurrency": 1,
        "prefetch_multiplier": 1,
        "queues": [settings.TRAINING_QUEUE, settings.MAINTENANCE_QUEUE],
        "loglevel": "INFO",
        "without_gossip": True,
        "without_mingle": True,
        "optimization": "fair",
    }


def run_worker(settings: Settings) -> int:
    """Start the worker and block until it shuts down (SIGTERM/SIGINT: warm shutdown)."""
    from worker import tasks

    tasks.use_settings(settings)
    app = create_celery(settings)
    worker = app.Worker(**worker_options(settings))
    worker.start()
    return int(worker.exitcode or 0)


if __name__ == "__main__":
    sys.exit(run_worker(get_settings()))
