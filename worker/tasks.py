"""Celery tasks: thin wrappers that take a job id and call the app code.

Run a worker with `cnn worker` (worker.run), or with Celery's own command:

    CUDA_VISIBLE_DEVICES=0 celery -A worker.tasks worker --pool solo --concurrency 1 \
        --prefetch-multiplier 1 -Q training,maintenance

`--pool solo` runs each task in the worker's main process: TensorFlow is imported there
(when the worker starts, before it takes a message) and never in a process that forks
afterwards. One worker
process per GPU, pinned with CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, Task, shared_task, signals
from celery.exceptions import Reject

from app.config import Settings, get_settings
from app.jobs.queue import SWEEP_TASK, TRAIN_TASK, create_celery

log = logging.getLogger(__name__)

_settings: Settings | None = None
# Set when the worker begins a warm shutdown (SIGTERM, Ctrl-C): the running fit stops at
# the next batch and its job goes back to the queue instead of holding the shutdown up.
shutdown_requested = threading.Event()
_sweeper: Any = None
# This worker's row in the `workers` table (app/fleet/presence.py), from worker_ready on.
_presence: Any = None


def use_settings(settings: Settings) -> None:
    """Make the tasks of this process use `settings` instead of the environment's."""
    global _settings
    _settings = settings


def current_settings() -> Settings:
    return _settings or get_settings()


_celery_app: Celery | None = None


def __getattr__(name: str) -> Celery:
    """`celery -A worker.tasks` looks up `worker.tasks.app`: build that app on first use, so
    importing this module creates no app and no broker folder (worker.run builds its own
    from explicit settings)."""
    global _celery_app
    if name in ("app", "celery_app"):
        if _celery_app is None:
            _celery_app = create_celery(current_settings())
        return _celery_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@shared_task(name=TRAIN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def train_job(self: Task, job_id: str) -> str:
    """Claim and run one training job; a duplicate delivery returns at once."""
    from app.jobs.runner import run_job

    if shutdown_requested.is_set():
        # Celery's loop takes one more message after a warm shutdown began: hand it back
        # untouched rather than claim a job only to requeue it a moment later.
        raise Reject("the worker is shutting down", requeue=True)

    presence = _presence
    try:
        return run_job(
            current_settings(),
            job_id,
            self.request.hostname or "worker",
            shutdown=shutdown_requested,
            on_claim=presence.running if presence is not None else None,
        )
    finally:
        if presence is not None:
            presence.idle()


@shared_task(name=SWEEP_TASK)
def sweep_jobs() -> dict[str, list[str]]:
    """One sweep (for celery beat or a manual `celery call`); workers also sweep by themselves."""
    from app.jobs.sweeper import sweep_once

    report = sweep_once(current_settings())
    return {key: [str(i) for i in ids] for key, ids in vars(report).items()}


@signals.worker_init.connect
def _load_tensorflow(**_: Any) -> None:
    """Import TensorFlow before taking any message.

    Loading its libraries holds the interpreter for seconds; done after a claim, that would
    stall the job's heartbeat thread, and after a crash it would delay the resumed epoch.
    """
    from app.ml.training import configure_devices

    configure_devices()


@signals.worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    global _sweeper
    from app.jobs.sweeper import Sweeper

    _sweeper = Sweeper(current_settings())
    _sweeper.start()


def _consumed_queues(consumer: Any) -> list[str]:
    """The queues this worker's Celery consumer reads now (its -Q, or add_consumer since)."""
    task_consumer = getattr(consumer, "task_consumer", None)
    if task_consumer is not None:
        return sorted(queue.name for queue in task_consumer.queues)
    return sorted(consumer.app.amqp.queues.consume_from or {})


@signals.worker_ready.connect
def _start_presence(sender: Any = None, **_: Any) -> None:
    """Register in the `workers` table and beat; a failure here must not stop the worker."""
    global _presence
    from app.db import session_factory
    from app.fleet.presence import Presence, describe_this_process

    settings = current_settings()
    try:
        info = describe_this_process(sender.hostname, _consumed_queues(sender))
        _presence = Presence(
            session_factory(settings),
            info,
            settings.HEARTBEAT_INTERVAL_S,
            queues=lambda: _consumed_queues(sender),
        )
        _presence.start()
    except Exception:
        log.exception("this worker could not describe itself; it will not appear in /workers")


@signals.worker_shutting_down.connect
def _stop_training(**_: Any) -> None:
    shutdown_requested.set()


@signals.worker_shutdown.connect
def _stop_sweeper(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()
    if _presence is not None:
        _presence.stop()
