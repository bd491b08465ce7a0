"""Issue 18 item 6, what `cnn serve` sets up: X-Forwarded-For believed only from
TRUSTED_PROXIES (a real uvicorn started as `cnn serve` starts it), and owner-only state."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from app.config import Settings
from app.db import make_engine
from app.serve import secure_state, uvicorn_options

from .contract.live import spawn_api, stop

# `cnn serve`'s API part (app.serve.run_api) on the port spawn_api appends.
RUN_API = [
    sys.executable,
    "-c",
    "import sys; from app.config import get_settings; from app.serve import run_api; "
    "run_api(get_settings(), '127.0.0.1', int(sys.argv[-1]))",
]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("trusted", "believed"), [("", False), ("127.0.0.1", True), ("10.0.0.1,10.0.0.2", False)]
)
def test_forwarded_for_is_believed_only_from_trusted_proxies(
    tmp_path: Path, trusted: str, believed: bool
) -> None:
    settings = Settings(_env_file=None, STATE_DIR=tmp_path, TRUSTED_PROXIES=trusted)
    live, proc = spawn_api(settings, command=RUN_API)
    try:
        forwarded = {"X-Forwarded-For": "203.0.113.9"}
        answer = httpx.get(f"{live.url}/health?from=test", headers=forwarded, timeout=10)
        assert answer.status_code == 200
    finally:
        stop(proc)
    access = [line for line in live.log.read_text().splitlines() if "/health?from=test" in line]
    assert access, live.tail()
    # uvicorn's access log names the client address it believed.
    assert all(("203.0.113.9" in line) is believed for line in access), access


def test_uvicorn_believes_no_proxy_by_default() -> None:
    assert uvicorn_options(Settings(_env_file=None)) == {"proxy_headers": False}
    options = uvicorn_options(Settings(_env_file=None, TRUSTED_PROXIES="10.0.0.1, 10.0.0.0/8"))
    assert options == {"proxy_headers": True, "forwarded_allow_ips": ["10.0.0.1", "10.0.0.0/8"]}


def test_state_is_owner_only_when_created(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, STATE_DIR=tmp_path / "var")
    secure_state(settings)
    for folder in (settings.STATE_DIR, settings.artifact_dir, settings.cache_dir):
        assert mode(folder) == 0o700, folder
    assert mode(settings.broker_dir) == 0o700
    assert mode(settings.STATE_DIR / "cnn.db") == 0o600


def test_state_left_wider_is_narrowed(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, STATE_DIR=tmp_path / "var")
    for folder in (settings.STATE_DIR, settings.artifact_dir, settings.cache_dir):
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o755)
    database = settings.STATE_DIR / "cnn.db"
    files = [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
    for file in files:
        file.write_bytes(b"")
        file.chmod(0o644)
    secure_state(settings)
    for folder in (settings.STATE_DIR, settings.artifact_dir, settings.cache_dir):
        assert mode(folder) == 0o700, folder
    for file in files:
        assert mode(file) == 0o600, file


def test_an_embedded_database_and_its_wal_are_created_owner_only(tmp_path: Path) -> None:
    """Whoever opens it first (the API, a worker, `cnn migrate`), not only `cnn serve`."""
    database = tmp_path / "cnn.db"
    engine = make_engine(f"sqlite:///{database}")
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
            conn.execute(text("INSERT INTO t VALUES (1)"))
        assert mode(database) == 0o600
        assert mode(Path(f"{database}-wal")) == 0o600
    finally:
        engine.dispose()
