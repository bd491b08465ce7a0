"""`cnn serve`: migrate, then run the API and one supervised worker process, and stop both.

With no DATABASE_URL and no CELERY_BROKER_URL this is the embedded default: a SQLite file
and kombu's filesystem broker under STATE_DIR, so nothing needs to be installed. With them
set it runs the same pieces against PostgreSQL and Redis.

The API runs here (uvicorn, main thread). The worker is a separate process (`cnn worker`)
because TensorFlow must own its process, and so that a worker that dies (killed, out of
memory) is simply started again. The supervisor knows the moment its worker dies, so it
hands that worker's running job back at once (fenced by the worker's unique name and the
job's claim) and sends it again: the new worker resumes it from the last checkpoint without
waiting for the heartbeat timeout. Ctrl-C or SIGTERM stop the API, then ask the
worker for a warm shutdown: a running fit stops at the next batch and its job goes back to
the queue, to resume from its checkpoint on the next start.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
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


def visible_gpus(selection: str = "all") -> list[str]:
    """The GPU ids to start one worker each for, without importing TensorFlow or JAX.

    `all`: CUDA_VISIBLE_DEVICES when set (empty or -1 means none), else what `nvidia-smi -L`
    lists; `none`: no GPU; else a comma-separated list of ids. An empty list means one
    worker on the CPU (or on whatever the framework finds).
    """
    selection = selection.strip()
    if selection == "none":
        return []
    if selection != "all":
        return [part.strip() for part in selection.split(",") if part.strip()]
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [part.strip() for part in env.split(",") if part.strip()]
        return [] if not ids or ids[0] == "-1" else ids
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def worker_command(gpu: str | None) -> list[str]:
    command = [sys.executable, "-m", "app.cli", "worker"]
    return command if gpu is None else [*command, "--gpu", gpu]


def hand_back_dead_worker(settings: Settings, worker: str) -> list[str]:
    """The running jobs of a worker that is known to be dead: back to the queue and sent now."""
    from app.db import session_factory
    from app.jobs import execution
    from app.jobs.queue import enqueue_training

    def send(job_id: uuid.UUID) -> None:
        if not enqueue_training(settings, job_id):
            raise ConnectionError(f"the broker did not accept job {job_id}")

    with session_factory(settings)() as session:
        report = execution.release_worker(session, settings, worker, send)
    return [str(i) for i in (*report.requeued, *report.failed, *report.cancelled)]


class WorkerSupervisor(threading.Thread):
    """Keeps one worker process alive until stop() is called, with a loaded one in reserve.

    Every worker it starts gets a unique name (WORKER_NAME), which the worker stores on
    the jobs it claims; when the process exits, `on_death(name)` hands those jobs back.
    With `standby` (SERVE_STANDBY_WORKER) a second worker is started that loads
    TensorFlow and then waits for a release file (WORKER_STANDBY_FILE) before it takes any
    message: when the active worker dies, the standby is released and a new standby
    started, so a crash does not wait for TensorFlow to load.
    """

    def __init__(
        self,
        settings: Settings,
        command: list[str] | None = None,
        on_death: Callable[[str], object] | None = None,
        standby: bool | None = None,
    ) -> None:
        super().__init__(name="worker-supervisor", daemon=True)
        self.command = command or worker_command(None)
        # The child inherits this process's environment (PATH, CUDA_VISIBLE_DEVICES, ...)
        # with the settings laid over it.
        self.env = {**os.environ, **settings_env(settings)}
        self.on_death = on_death
        self.standby = settings.SERVE_STANDBY_WORKER if standby is None else standby
        self.standby_dir = (settings.STATE_DIR / "standby").resolve()
        self.process: subprocess.Popen[bytes] | None = None
        self.worker_name = ""
        self.spare: subprocess.Popen[bytes] | None = None
        self.spare_name = ""
        self.spare_release: Path | None = None
        self._spare_due = 0.0  # when to start a standby if there is none
        self.starts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def _start(self, name: str, release: Path | None) -> subprocess.Popen[bytes]:
        # Spawned from this thread, which lives as long as the supervision does:
        # PDEATHSIG follows the creating thread.
        env = {**self.env, "WORKER_NAME": name, "WORKER_STANDBY_FILE": str(release or "")}
        process = subprocess.Popen(self.command, env=env, preexec_fn=_parent_death_signal())
        self.starts += 1
        return process

    @staticmethod
    def _new_name() -> str:
        return f"serve-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"

    def _spawn(self) -> None:
        """Start a new active worker (no standby to promote)."""
        with self._lock:
            if self._stopping.is_set():
                return
            self.worker_name = self._new_name()
            self.process = self._start(self.worker_name, None)
        log.info("worker process %d (%s) started", self.process.pid, self.worker_name)

    def _spawn_spare(self) -> None:
        if not self.standby:
            return
        with self._lock:
            if self._stopping.is_set() or (self.spare is not None and self.spare.poll() is None):
                return
            self.standby_dir.mkdir(parents=True, exist_ok=True)
            self.spare_name = self._new_name()
            self.spare_release = self.standby_dir / f"{uuid.uuid4().hex}.go"
            self.spare = self._start(self.spare_name, self.spare_release)
        log.info("standby worker process %d (%s) started", self.spare.pid, self.spare_name)

    def _promote(self) -> bool:
        """Release the standby to become the active worker; False when there is none."""
        with self._lock:
            spare, release = self.spare, self.spare_release
            if spare is None or release is None or spare.poll() is not None:
                return False
            release.touch()
            self.process, self.worker_name = spare, self.spare_name
            self.spare, self.spare_release = None, None
        log.info("standby worker process %d (%s) is now active", spare.pid, self.worker_name)
        return True

    def _hand_back(self, name: str) -> None:
        if self.on_death is None:
            return
        try:
            jobs = self.on_death(name)
            if jobs:
                log.info("handed back the job(s) of dead worker %s: %s", name, jobs)
        except Exception:  # the sweep still requeues it once its heartbeat is stale
            log.exception("could not hand back the jobs of dead worker %s", name)

    def run(self) -> None:
        quick_deaths = 0
        self._spawn()
        # The standby loads once the first worker is up, not competing with its start.
        self._spare_due = time.monotonic() + STABLE_AFTER_S
        started = time.monotonic()
        while not self._stopping.wait(0.5):
            spare = self.spare
            if spare is not None and spare.poll() is not None:
                log.warning(
                    "standby worker process %d exited with code %s", spare.pid, spare.returncode
                )
                self.spare = None
                self._spare_due = time.monotonic() + STABLE_AFTER_S  # not in a tight loop
            if self.spare is None and time.monotonic() >= self._spare_due:
                self._spawn_spare()
            process = self.process
            if process is None or process.poll() is None:
                continue
            lived = time.monotonic() - started
            self._hand_back(self.worker_name)
            # The first death restarts at once (a killed worker's job is waiting); only a
            # worker that keeps dying young waits 1, 2, 4... s (a crash loop, not a job).
            quick_deaths = 0 if lived >= STABLE_AFTER_S else quick_deaths + 1
            backoff = 0.0 if quick_deaths <= 1 else min(2.0 ** (quick_deaths - 2), MAX_BACKOFF_S)
            log.warning(
                "worker process %d exited with code %s; a new one takes over in %.0f s",
                process.pid,
                process.returncode,
                backoff,
            )
            if self._stopping.wait(backoff):
                break
            if not self._promote():
                self._spawn()
            # A new standby would compete for the CPU with the job resuming right now: it is
            # started once the new active worker has run for a while.
            self._spare_due = time.monotonic() + STABLE_AFTER_S
            started = time.monotonic()
        self._terminate()

    def _terminate(self) -> None:
        with self._lock:
            process, spare = self.process, self.spare
        if spare is not None and spare.poll() is None:
            spare.kill()  # holds no job: nothing to hand back
            spare.wait()
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
            self._hand_back(self.worker_name)

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join()
        else:
            self._terminate()


def _bootstrap_admin_key(settings: Settings) -> None:
    """First start: an admin key in ADMIN_KEY_FILE (0600), so the README's curl lines work."""
    from app.auth import ensure_admin_key
    from app.db import session_factory

    if settings.AUTH == "off":
        return
    with session_factory(settings)() as session:
        written = ensure_admin_key(session, settings.admin_key_file)
    if written:
        log.info(
            "created an admin API key in %s (mode 0600); send it as 'Authorization: Bearer <key>'",
            written,
        )
    elif settings.admin_key_file.exists():
        log.info("admin API key: %s", settings.admin_key_file)


def secure_state(settings: Settings) -> None:
    """The state folders (STATE_DIR, artifacts, the data cache, the embedded broker) owner-only
    (0700) and the embedded database 0600 with its -wal and -shm files, whether they are
    created now or were left wider: the database holds the key hashes, the folders the
    models and the queued messages."""
    from app.db import owner_only_sqlite

    folders = [settings.STATE_DIR, settings.artifact_dir, settings.cache_dir]
    if settings.embedded_broker:
        folders.append(settings.broker_dir)
    for folder in folders:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.stat().st_mode & 0o077:
            folder.chmod(0o700)
    if not settings.DATABASE_URL:
        owner_only_sqlite(settings.database_url)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's settings besides the app: X-Forwarded-For/-Proto believed from
    TRUSTED_PROXIES only. uvicorn's own default believes any loopback peer, so a local
    caller could name any address and rotate it past the per-address limits."""
    proxies = settings.trusted_proxies
    if not proxies:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": proxies}


def run_api(settings: Settings, host: str, port: int, log_level: str = "info") -> None:
    """The API in this process until SIGINT/SIGTERM (API_WORKERS > 1: that many processes,
    which uvicorn spawns and which build their app from the environment)."""
    import uvicorn

    from app.main import create_app

    options = uvicorn_options(settings)
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
            log_level=log_level,
            **options,
        )
        return
    config = uvicorn.Config(
        create_app(settings), host=host, port=port, log_level=log_level, **options
    )
    uvicorn.Server(config).run()


def serve(settings: Settings, host: str, port: int, gpus: str = "all") -> int:
    """Run until SIGINT/SIGTERM; returns the exit code for `cnn serve`."""
    from app.migrate import upgrade

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Everything the service and its workers create from here on is owner-only (the
    # database, models, checkpoints, messages); what exists already is narrowed.
    os.umask(0o077)
    secure_state(settings)
    upgrade(settings.database_url)
    _bootstrap_admin_key(settings)
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
    devices = visible_gpus(gpus)
    if gpus == "none":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    choices: list[str | None] = list(devices) or [None]
    supervisors = [
        WorkerSupervisor(
            settings,
            worker_command(gpu),
            on_death=lambda name: hand_back_dead_worker(settings, name),
        )
        for gpu in choices
    ]
    log.info(
        "starting %d worker(s) on %s",
        len(supervisors),
        ", ".join(f"GPU {gpu}" for gpu in devices) or "the default device",
    )
    # After the workers' environment is taken: on JAX the API allocates GPU memory on demand
    # instead of preallocating, so it shares a card with the worker that owns it.
    from app.ml.backend import configure_memory

    if os.environ.get("KERAS_BACKEND") == "jax":
        configure_memory("api")
    for supervisor in supervisors:
        supervisor.start()
    try:
        run_api(settings, host, port)
    finally:
        for supervisor in supervisors:
            supervisor.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped (%s)", ", ".join(signal.Signals(s).name for s in received) or "API exited")
    return 0
