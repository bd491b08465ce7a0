"""Several real API processes (uvicorn) on one database, for the tests of issue 18: each on a
free loopback port, started from one Settings, as a deployment's replicas behind a load
balancer would be."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
PIXEL = [[0, 0, 0]] * 32


@dataclass
class Replica:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Fleet:
    settings: Any
    replicas: list[Replica] = field(default_factory=list)

    def key(self, scopes: str, name: str | None = None) -> str:
        from app import auth
        from app.db import session_factory

        with session_factory(self.settings)() as session:
            return auth.create_key(session, name or f"k-{uuid.uuid4().hex[:8]}", scopes).key

    def stop(self) -> None:
        for replica in self.replicas:
            replica.proc.terminate()
        for replica in self.replicas:
            try:
                replica.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                replica.proc.kill()
                replica.proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_fleet(settings: Any, replicas: int = 2) -> Fleet:
    """Migrate `settings`' database, then start `replicas` API processes on it."""
    from app.config import Settings
    from app.migrate import upgrade
    from app.serve import settings_env

    settings.STATE_DIR.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    names = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in names}
    env.update(settings_env(settings), PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    fleet = Fleet(settings)
    for _ in range(replicas):
        port = free_port()
        log = settings.STATE_DIR / f"api-{port}.log"
        command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
        fleet.replicas.append(Replica(f"http://127.0.0.1:{port}", proc, log))
    deadline = time.monotonic() + 90
    for replica in fleet.replicas:
        while True:
            if replica.proc.poll() is not None:
                fleet.stop()
                raise AssertionError("an API process exited:\n" + replica.tail())
            try:
                if httpx.get(f"{replica.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                fleet.stop()
                raise AssertionError("an API process did not start:\n" + replica.tail())
            time.sleep(0.2)
    return fleet


def tiny_model(path: Path, seed: int) -> bytes:
    """A small CIFAR-shaped model; different seeds answer differently."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((32, 32, 3)), layers.GlobalAveragePooling2D(), layers.Dense(10)]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path.read_bytes()


def register(settings: Any, name: str, content: bytes, *, corrupt: bool = False) -> int:
    """Register `content` as the next version of `name` (owned by the admins); `corrupt`
    registers it under a wrong sha256, so that it never loads. Returns the version."""
    from app.db import session_factory
    from app.registry import versions

    relative = Path("models") / name / f"{uuid.uuid4().hex}.keras"
    target = settings.artifact_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)
    digest = hashlib.sha256(content + (b"x" if corrupt else b"")).hexdigest()
    with session_factory(settings)() as session:
        row = versions.register_version(
            session,
            name=name,
            net="net1",
            job_id=None,
            artifact_path=str(relative),
            sha256=digest,
            size_bytes=len(content),
            metrics={},
        )
        session.commit()
        return row.version
