"""`cnn worker`: one Celery training worker in this process (one per GPU).

The options are the ones docs/jobs.md argues for: the solo pool (the task runs in this
process, so TensorFlow never sees a fork), concurrency 1 and prefetch 1 (a long fit must
not hold a second job hostage), the training queues its GPUs can serve plus maintenance, and no
gossip/mingle (job state lives in the database, and they only slow the start).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

from app.config import Settings, get_settings
from app.jobs.queue import create_celery, worker_queues


def worker_hostname(settings: Settings) -> str:
    """Celery's node name, stored on each job the worker claims: WORKER_NAME or host + pid."""
    host = socket.gethostname()
    if settings.WORKER_NAME:
        name = settings.WORKER_NAME
        return name if "@" in name else f"{name}@{host}"
    return f"cnn-{os.getpid()}@{host}"


def worker_gpus(settings: Settings) -> int:
    """WORKER_GPUS, or the GPUs this process can see (0 on a CPU host)."""
    if settings.WORKER_GPUS is not None:
        return settings.WORKER_GPUS
    from app.serve import visible_gpus

    return len(visible_gpus())


def worker_options(settings: Settings) -> dict[str, object]:
    return {
        "hostname": worker_hostname(settings),
        "pool_cls": "solo",
        "concurrency": 1,
        "prefetch_multiplier": 1,
        "queues": worker_queues(settings, worker_gpus(settings)),
        "loglevel": "INFO",
        "without_gossip": True,
        "without_mingle": True,
        "optimization": "fair",
    }


def wait_until_released(release: Path) -> None:
    """A standby worker (`cnn serve`): load what a job needs, then wait until `release` exists."""
    import keras  # noqa: F401  (loaded now, not when the job is already waiting)

    import app.jobs.runner  # noqa: F401
    import app.ml.data  # noqa: F401
    import app.ml.evaluation  # noqa: F401
    from app.ml.training import configure_devices

    configure_devices()
    while not release.exists():
        time.sleep(0.1)
    release.unlink(missing_ok=True)


def run_worker(settings: Settings) -> int:
    """Start the worker and block until it shuts down (SIGTERM/SIGINT: warm shutdown)."""
    from app.ml.backend import enable_compilation_cache
    from worker import tasks

    # JAX: compiled training programs persist here, so the next job skips compiling them.
    enable_compilation_cache(settings.STATE_DIR.resolve() / "jax-cache")
    if settings.WORKER_STANDBY_FILE:
        wait_until_released(Path(settings.WORKER_STANDBY_FILE))

    tasks.use_settings(settings)
    app = create_celery(settings)
    worker = app.Worker(**worker_options(settings))
    worker.start()
    return int(worker.exitcode or 0)


if __name__ == "__main__":
    sys.exit(run_worker(get_settings()))
