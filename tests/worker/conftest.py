"""Real processes for the worker tests: API servers, Celery workers, `cnn serve`.

Every process is a subprocess started with the environment built from a Settings object
(the way `cnn serve` hands settings to its worker), in its own session so the test can
SIGKILL it, with its output in a log file that a failing test prints.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.serve import settings_env

ROOT = Path(__file__).resolve().parents[2]

# Short enough that a dead worker is noticed in seconds, long enough that a busy 2-core
# machine does not miss a beat: the worker beats every 0.5 s.
FAST_ROBUSTNESS = {
    "HEARTBEAT_INTERVAL_S": 0.5,
    "HEARTBEAT_TIMEOUT_S": 5.0,
    "SWEEP_INTERVAL_S": 1.0,
}


def stack_settings(
    url: str, redis_url: str, name: str, state_dir: Path, cache: Path, archive: Path, **extra: Any
) -> Settings:
    """Settings of a real stack on a fresh database: its own queues (named after `name` and a
    random tag), the real CIFAR-10 archive and its decoded cache, fast robustness timings."""
    tag = uuid.uuid4().hex[:8]
    return Settings(
        _env_file=None,
        DATABASE_URL=url,
        CELERY_BROKER_URL=redis_url,
        TRAINING_QUEUE=f"training-{name}-{tag}",
        MAINTENANCE_QUEUE=f"maintenance-{name}-{tag}",
        STATE_DIR=state_dir,
        CACHE_DIR=cache,
        CIFAR10_SOURCE=str(archive),
        **{**FAST_ROBUSTNESS, **extra},
    )


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(settings: Settings) -> dict[str, str]:
    """This environment minus any setting, plus exactly `settings`."""
    fields = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in fields}
    env.update(settings_env(settings))
    env.update(PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    return env


class Proc:
    """A subprocess with a log file; stop() is graceful, kill() is SIGKILL."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            args,
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a lost machine would."""
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait()
        self._log.close()
        return self.popen.returncode

    def cleanup(self) -> None:
        """Leave nothing behind: the process and anything it started (same session)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()
        self._log.close()

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return f"--- last lines of {self.name} ({self.log_path}) ---\n" + "\n".join(text[-lines:])


class Processes:
    """Starts processes and cleans all of them up at the end of the test."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Proc] = []

    def start(self, name: str, args: list[str], settings: Settings) -> Proc:
        proc = Proc(name, args, process_env(settings), self.log_dir)
        self.started.append(proc)
        return proc

    def worker(self, settings: Settings) -> Proc:
        return self.start("worker", [sys.executable, "-m", "app.cli", "worker"], settings)

    def api(self, settings: Settings, port: int) -> Proc:
        args = [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        proc = self.start("api", args, settings)
        wait_api(proc, port)
        return proc

    def tails(self) -> str:
        return "\n".join(p.tail() for p in self.started)

    def cleanup(self) -> None:
        for proc in self.started:
            proc.cleanup()


def wait_api(proc: Proc, port: int, timeout: float = 60) -> None:
    def up() -> bool:
        assert proc.alive(), proc.tail()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout, "the API to answer /health", interval=0.2)


@pytest.fixture(scope="session")
def cifar10(cifar10_archive: Path, cifar10_cache: Path) -> Any:
    """Decode the archive once for the whole run (about 40 s cold); workers reuse the cache."""
    from app.ml.data import load_cifar10

    return load_cifar10(str(cifar10_archive), cache_dir=cifar10_cache)


@pytest.fixture
def processes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(procs.tails())
    procs.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    # Let the `processes` fixture know whether the test failed, to print the logs.
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def admin_key(settings: Settings) -> str:
    """A new admin API key in the database of `settings` (migrated already)."""
    from app import auth
    from app.db import session_factory

    with session_factory(settings)() as session:
        return auth.create_key(session, f"e2e-{uuid.uuid4().hex[:8]}", "admin").key


class Api:
    """A small HTTP client for the job endpoints, with the assertions every test repeats."""

    def __init__(self, port: int, key: str) -> None:
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            timeout=30,
            headers={"Authorization": f"Bearer {key}"},
        )

    def submit(self, **params: Any) -> dict[str, Any]:
        response = self.http.post("/jobs", json=params)
        assert response.status_code == 202, response.text
        return response.json()

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def epochs(self, job_id: str) -> list[int]:
        response = self.http.get(f"/jobs/{job_id}/history")
        assert response.status_code == 200, response.text
        return [row["epoch"] for row in response.json()["epochs"]]

    def wait_status(self, job_id: str, status: str, timeout: float) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            job = self.job(job_id)
            if job["status"] == status:
                return job
            terminal = {"succeeded", "failed", "cancelled"}
            assert job["status"] not in terminal, f"job ended {job['status']}: {job['error']}"
            return None

        return wait_for(reached, timeout, f"job {job_id} to be {status}", interval=0.2)

    def check_finished_job(self, job: dict[str, Any], epochs: int, cifar10: Any) -> None:
        """History, evaluation, curves and /predict of a succeeded job (the issue's flow)."""
        job_id = job["id"]
        history = self.http.get(f"/jobs/{job_id}/history").json()
        assert [row["epoch"] for row in history["epochs"]] == list(range(1, epochs + 1))
        assert len(history["history"]["val_accuracy"]) == epochs
        assert all(0 <= acc <= 1 for acc in history["history"]["accuracy"])
        # The plain cross-entropy of every epoch, and the verdict on the curves (issue 20).
        assert all(v is not None and v > 0 for v in history["history"]["val_ce_loss"])
        assert history["analysis"]["verdict"]["epochs"] == epochs
        evaluation = self.http.get(f"/jobs/{job_id}/evaluation").json()
        assert 0.1 < evaluation["test_accuracy"] <= 1, evaluation  # better than chance
        assert len(evaluation["per_class_accuracy"]) == 10
        assert evaluation["test_ce_loss"] > 0
        # Which data the worker loaded: the archive, its sha256, which test image is first.
        assert evaluation["data"] == {
            "archive": cifar10.archive,
            "sha256": cifar10.sha256,
            "first_test_image": cifar10.test_order,
            "train_images": len(cifar10.y_train),
            "test_images": len(cifar10.y_test),
        }
        png = self.http.get(f"/jobs/{job_id}/history.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG\r\n\x1a\n")

        version = job["model_version"]
        assert version is not None and version["name"] == job["parameters"]["model_name"]
        response = self.http.post(
            "/predict",
            json={"model": version["name"], "instances": [cifar10.x_test[0].tolist()]},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == {"name": version["name"], "version": version["version"]}
        (prediction,) = body["predictions"]
        assert len(prediction["probabilities"]) == 10
        assert abs(sum(prediction["probabilities"]) - 1) < 1e-3
        # The first test image is also the evaluation's first image: same model, same answer.
        first = evaluation["first_image"]
        assert prediction["class_id"] == first["predicted_class"]
        for served, evaluated in zip(
            prediction["probabilities"], first["probabilities"], strict=True
        ):
            assert abs(served - evaluated) < 0.02

    def close(self) -> None:
        self.http.close()


@contextlib.contextmanager
def api_stack(
    database_url: str,
    redis_url: str,
    name: str,
    tmp_path_factory: pytest.TempPathFactory,
    cifar10_cache: Path,
    cifar10_archive: Path,
) -> Iterator[tuple[Settings, Api]]:
    """A migrated PostgreSQL database, settings for `name` and one API process on a free
    port with an admin client; the process and the database's pool go at the end."""
    from app.db import session_factory
    from app.migrate import upgrade

    upgrade(database_url)
    settings = stack_settings(
        database_url,
        redis_url,
        name,
        tmp_path_factory.mktemp(f"{name}-state"),
        cifar10_cache,
        cifar10_archive,
    )
    procs = Processes(tmp_path_factory.mktemp(f"{name}-api-logs"))
    port = free_port()
    try:
        procs.api(settings, port)
        api = Api(port, admin_key(settings))
        yield settings, api
        api.close()
    finally:
        procs.cleanup()
        session_factory(settings).kw["bind"].dispose()
