"""A real API process for the contract tests: uvicorn on a free loopback port, its own
SQLite state, an admin key and one tiny registered model (`tiny`, version 1)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LiveApi:
    url: str
    key: str
    pid: int
    settings: Any
    log: Path

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", **extra}

    def rss_bytes(self) -> int:
        """The API process's resident memory (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tiny_model(path: Path) -> bytes:
    import keras
    from keras import layers

    model = keras.Sequential(
        [keras.Input((32, 32, 3)), layers.GlobalAveragePooling2D(), layers.Dense(10)]
    )
    model.save(path)
    return path.read_bytes()


def _seed(settings: Any) -> str:
    """Migrate, create the admin key, register `tiny` v1 (owned by the admins)."""
    from app import auth
    from app.db import session_factory
    from app.migrate import upgrade
    from app.models import ModelOwner, ModelVersion

    upgrade(settings.database_url)
    relative = Path("models") / "tiny" / "1" / "model.keras"
    target = settings.artifact_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    content = _tiny_model(target)
    with session_factory(settings)() as session:
        key = auth.create_key(session, "contract-admin", "admin").key
        session.add(ModelOwner(name="tiny", owner_id=None, created_at=datetime.now(UTC)))
        session.add(
            ModelVersion(
                name="tiny",
                version=1,
                net="net1",
                artifact_path=str(relative),
                sha256=hashlib.sha256(content).hexdigest(),
                size_bytes=len(content),
                metrics={},
                created_at=datetime.now(UTC),
            )
        )
        session.commit()
    return key


def start_live_api(state: Path, **overrides: Any) -> tuple[LiveApi, subprocess.Popen[bytes]]:
    from app.config import Settings

    settings = Settings(_env_file=None, STATE_DIR=state, **overrides)
    key = _seed(settings)
    live, proc = spawn_api(settings, key)
    warm_up(live)
    return live, proc


def spawn_api(
    settings: Any, key: str = "", command: list[str] | None = None
) -> tuple[LiveApi, subprocess.Popen[bytes]]:
    """One more API process on `settings` (migrated already), on a free port, once its
    /health answers. `command` replaces `uvicorn app.main:create_app` (it gets --port)."""
    from app.config import Settings
    from app.serve import settings_env

    fields = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in fields}
    env.update(settings_env(settings), PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    port = _free_port()
    log = settings.STATE_DIR / f"api-{uuid.uuid4().hex[:6]}.log"
    if command is None:
        command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory"]
        command += ["--host", "127.0.0.1", "--log-level", "warning"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "--port", str(port)], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    live = LiveApi(f"http://127.0.0.1:{port}", key, proc.pid, settings, log)
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, live.tail()
        try:
            if httpx.get(f"{live.url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop(proc)
            raise AssertionError("the API did not start:\n" + live.tail())
        time.sleep(0.2)
    return live, proc


def warm_up(live: LiveApi) -> None:
    """Pay the first-call costs (TensorFlow import, summaries, loading `tiny`) before
    anything is timed or measured, as a deployment's warm-up requests would."""
    with httpx.Client(base_url=live.url, headers=live.headers(), timeout=120) as http:
        assert http.get("/summary/net1").status_code == 200  # imports TensorFlow
        pixels = [[[0, 0, 0]] * 32] * 32
        answer = http.post("/predict", json={"model": "tiny", "instances": [pixels]})
        assert answer.status_code == 200, answer.text


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
