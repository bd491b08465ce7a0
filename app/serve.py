"""`cnn serve`: migrate, then run the API and one supervised worker process, and stop both.

With no DATABASE_URL and no CELERY_BROKER_URL this is the embedded default: a SQLite file
and kombu's filesystem broker under STATE_DIR, so nothing needs to be installed. With them
set it runs the same pieces against PostgreSQL and Redis.

The API runs here (uvicorn, main thread). The worker is a separate process (`cnn worker`)
because TensorFlow must own its process, and so that a worker that dies (killed, out of
memory) is simply started again: its job resumes from the last checkpoint once the
worker's sweep sees the stale heartbeat. Ctrl-C or SIGTERM stop the API, then ask the
worker for a warm shutdown: a running fit stops at the next batch and its job goes back to
the queue, to resume from its checkpoint on the next start.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.config import Settings

log = logging.getLogger("cnn.serve")

# A worker that lived shorter than this is crash-looping: wait longer before the next start.
STABLE_AFTER_S = 30.0
MAX_BACKOFF_S = 30.0
WORKER_STOP_TIMEOUT_S = 60.0
PR_SET_PDEATHSIG = 1


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as environment variables, so a child process sees exactly these."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        env[name] = str(value.resolve()) if isinstance(value, Path) else str(value)
    return env


def _parent_death_signal() -> Callable[[], None] | None:
    """Linux: make the worker get SIGTERM if `cnn serve` itself is killed (no orphan worker).

    prctl is looked up here, in the parent, so that the function run between fork and exec
    is a single C call (preexec_fn must not import or allocate much: other threads exist).
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sigterm = int(signal.SIGTERM)

    def set_signal() -> None:
        prctl(PR_SET_PDEATHSIG, sigterm)

    return set_signal


class WorkerSupervisor(threading.Thread):
    """Keeps one worker process alive until stop() is called."""

    def __init__(self, settings: Settings, command: list[str] | None = None) -> None:
        super().__init__(name="worker-supervisor", daemon=True)
        self.command = command or [sys.executable, "-m", "app.cli", "worker"]
        # The child inherits this process's environment (PATH, CUDA_VISIBLE_DEVICES, ...)
        # with the settings laid over it.
        self.env = {**os.environ, **settings_env(settings)}
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            # Spawned from this thread, which lives as long as the supervision does:
            # PDEATHSIG follows the creating thread.
            self.process = subprocess.Popen(
                self.command, env=self.env, preexec_fn=_parent_death_signal()
            )
            self.starts += 1
        log.info("worker process %d started", self.process.pid)

    def run(self) -> None:
        backoff = 1.0
        self._spawn()
        started = time.monotonic()
        while not self._stopping.wait(0.5):
            process = self.process
            if process is None or process.poll() is None:
                continue
            lived = time.monotonic() - started
            backoff = 1.0 if lived >= STABLE_AFTER_S else min(backoff * 2, MAX_BACKOFF_S)
            log.warning(
                "worker process %d exited with code %s; starting a new one in %.0f s",
                process.pid,
                process.returncode,
                backoff,
            )
            if self._stopping.wait(backoff):
                break
            self._spawn()
            started = time.monotonic()
        self._terminate()

    def _terminate(self) -> None:
        with self._lock:
            process = self.process
        if process is None or process.poll() is not None:
            return
        log.info("stopping worker process %d (warm shutdown)", process.pid)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("worker process %d did not stop in time; killing it", process.pid)
            process.kill()
            process.wait()

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join()
        else:
            self._terminate()


def serve(settings: Settings, host: str, port: int) -> int:
    """Run until SIGINT/SIGTERM; returns the exit code for `cnn serve`."""
    import uvicorn

    from app.main import create_app
    from app.migrate import upgrade

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings.STATE_DIR.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    log.info(
        "database %s, broker %s",
        "embedded SQLite" if not settings.DATABASE_URL else "configured",
        f"filesystem at {settings.broker_dir}" if settings.embedded_broker else "configured",
    )

    # uvicorn re-raises the signal that stopped it once it is down; these handlers take it
    # so that the worker is stopped next instead of the process dying on the spot.
    received: list[int] = []

    def _remember(sig: int, _frame: Any) -> None:
        received.append(sig)

    previous = {sig: signal.signal(sig, _remember) for sig in (signal.SIGINT, signal.SIGTERM)}
    supervisor = WorkerSupervisor(settings)
    supervisor.start()
    try:
        if settings.API_WORKERS > 1:
            # Each API process has its own model cache and batchers; they see each other's
            # registry changes within REGISTRY_POLL_S. uvicorn spawns them (no fork after
            # TensorFlow) and builds each app from the environment, so hand the settings down.
            os.environ.update(settings_env(settings))
            uvicorn.run(
                "app.main:create_app",
                factory=True,
                host=host,
                port=port,
                workers=settings.API_WORKERS,
                log_level="info",
            )
        else:
            server = uvicorn.Server(
                uvicorn.Config(create_app(settings), host=host, port=port, log_level="info")
            )
            server.run()
    finally:
        supervisor.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped (%s)", ", ".join(signal.Signals(s).name for s in received) or "API exited")
    return 0
