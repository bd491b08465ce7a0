"""What the benchmarks that start the real stack share: where the data and the databases
are, a free port, a polling wait, and the environment a child process of the stack gets.

Imported as a sibling module (`python bench/<bench>.py` puts bench/ on sys.path)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.config import Settings
from app.serve import settings_env

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT / ".." / "shared" / "data" / "cifar10-jpeg.tar.gz"
CACHE = ROOT / "var" / "test-cache"
PG = "postgresql+psycopg://postgres@127.0.0.1:5432"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """`check()`'s first truthy value, polled every `interval` s; TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def env_for(settings: Settings) -> dict[str, str]:
    """This process's environment without any setting, then exactly `settings`' values."""
    fields = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in fields}
    env.update(settings_env(settings))
    env.update(PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    return env
