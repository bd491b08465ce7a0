"""Shared fixtures: a throw-away PostgreSQL database, settings pointing at it, the API client.

Fixtures (all lazy: a test that uses none of them never touches PostgreSQL or Redis):

- ``db_url`` (session): URL of a fresh database ``cnn_test_<uuid8>`` on the local
  PostgreSQL, migrated to head with app.migrate.upgrade, dropped at the end.
- ``settings`` (session): app.config.Settings for that database, Redis db 11 as the broker
  with queue names unique to this run (``training-<uuid8>``, ``maintenance-<uuid8>``), so no
  other worker consumes our messages, and STATE_DIR in a temporary folder (artifacts and
  caches go there). Derive variants with ``settings.model_copy(update={...})``.
- ``session_factory`` (session): sessionmaker bound to that database (expire_on_commit=False).
- ``clean_db`` (function): empties every table (TRUNCATE ... RESTART IDENTITY) before the test.
- ``db_session`` (function): an open Session on the emptied database.
- ``client`` (function): fastapi.testclient.TestClient around create_app(settings), lifespan
  running, on the emptied database, sending an admin API key (``client.admin_key``).
- ``api_key`` (function): ``api_key("read,predict") -> str`` creates an API key.
- ``client_for`` (function): ``with client_for(settings.model_copy(...)) as c:`` a client of
  an app built on other settings, sending a new admin key.
- ``make_job`` (function): ``make_job(status="queued", **columns) -> Job`` writes a job row
  straight through the ORM in any state (running/succeeded/... with plausible timestamps).
- ``add_epochs`` (function): ``add_epochs(job_id, n, start=1) -> list[dict]`` writes n epoch
  rows with decreasing loss and returns them as dicts.
- ``register_model`` (function): ``register_model(name="net1", content=b"...", **kw)`` writes a
  file under the artifact folder and registers it with app.registry.versions; returns the
  ModelVersion.
- ``expect_error`` (function): ``expect_error(response, status, code) -> dict`` asserts the
  status and the common error body ``{"error": {"code", "message"}}`` and returns the inner dict.
- ``training_queue`` (function): the run's Redis queue of any-device jobs (gpus 0), emptied
  before the test;
  ``training_queue.messages()`` -> list of (task name, args) waiting there.
- ``cifar10_archive`` (session): the real CIFAR-10 archive, ``../shared/data/cifar10-jpeg.tar.gz``
  relative to the repository (a clean clone has shared/ beside it). Missing, the tests that
  need it skip, or FAIL when CNN_REQUIRE_CIFAR10=1 (scripts/test.sh and .ci/run set it).
- ``cifar10_cache`` (session): where decoded arrays survive between runs (var/test-cache,
  git-ignored), shared by every test that loads the real archive, so a run decodes once.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

# moto's S3 server on loopback, for the artifact store's tests (tests/s3_server.py).
from tests.s3_server import s3_server  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
REDIS_DB = 11
TABLES = (
    "job_events",
    "model_aliases",
    "evaluations",
    "epochs",
    "model_versions",
    "jobs",
    "model_owners",
    "api_keys",
    "rate_buckets",
    "workers",
)


def _admin() -> psycopg.Connection:
    return psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True
    )


def pg_url(database: str) -> str:
    return f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


@pytest.fixture(scope="session")
def run_id() -> str:
    """Eight hex characters naming this test run's database and queues."""
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def fresh_pg_database() -> Iterator[Callable[[], str]]:
    """Factory of empty PostgreSQL databases (URL), all dropped at the end of the run."""
    created: list[str] = []

    def make() -> str:
        name = f"cnn_test_{uuid.uuid4().hex[:8]}"
        with _admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return pg_url(name)

    yield make
    from app.config import Settings
    from app.db import get_engine

    with _admin() as conn:
        for name in created:
            # Close our pooled connections first; FORCE ends any a test left open.
            get_engine(Settings(_env_file=None, DATABASE_URL=pg_url(name))).dispose()
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def db_url(fresh_pg_database: Callable[[], str]) -> str:
    from app.migrate import upgrade

    url = fresh_pg_database()
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def settings(db_url: str, run_id: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from app.config import Settings

    value = Settings(
        _env_file=None,
        DATABASE_URL=db_url,
        CELERY_BROKER_URL=f"redis://127.0.0.1:6379/{REDIS_DB}",
        TRAINING_QUEUE=f"training-{run_id}",
        MAINTENANCE_QUEUE=f"maintenance-{run_id}",
        STATE_DIR=tmp_path_factory.mktemp("state"),
        # TestClient sends Host: testserver.
        ALLOWED_HOSTS="localhost,127.0.0.1,::1,testserver",
        # Quotas and rate limits have their own tests (tests/api/test_security.py,
        # tests/api/test_fair_share.py); the other tests submit and predict as often as
        # they need.
        MAX_ACTIVE_JOBS_PER_KEY=10_000,
        PREDICT_RATE_PER_S=0,
        PREDICT_FAIR_SHARE=False,
    )
    yield value
    import redis

    with redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB) as conn:
        keys = conn.keys(f"*{run_id}*")
        if keys:
            conn.delete(*keys)


@pytest.fixture(scope="session")
def session_factory(settings: Any) -> sessionmaker[Session]:
    from app.db import session_factory as make_factory

    return make_factory(settings)


@pytest.fixture
def clean_db(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session:
        session.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
        session.commit()


@pytest.fixture
def db_session(clean_db: None, session_factory: sessionmaker[Session]) -> Iterator[Session]:
    with session_factory() as session:
        yield session


@pytest.fixture
def api_key(clean_db: None, session_factory: sessionmaker[Session]) -> Callable[..., str]:
    """``api_key("read,predict", name=None) -> str``: a new key with these scopes."""
    from app import auth

    def make(scopes: str | list[str] = "admin", name: str | None = None) -> str:
        with session_factory() as session:
            return auth.create_key(session, name or f"test-{uuid.uuid4().hex[:8]}", scopes).key

    return make


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client(api_key: Callable[..., str], settings: Any) -> Iterator[Any]:
    """TestClient on create_app(settings) that sends an admin key (override per request
    with headers={"Authorization": ...}; ``client.admin_key`` is the key)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    key = api_key("admin", name="test-admin")
    with TestClient(create_app(settings), headers=bearer(key)) as test_client:
        test_client.admin_key = key  # type: ignore[attr-defined]
        yield test_client


@pytest.fixture
def client_for(api_key: Callable[..., str]) -> Callable[..., Any]:
    """``with client_for(settings_variant) as c:`` a TestClient on create_app(variant) that
    sends a new admin key (the variant must use the test database)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    def make(variant: Any, scopes: str = "admin") -> Any:
        return TestClient(create_app(variant), headers=bearer(api_key(scopes)))

    return make


@pytest.fixture
def make_job(clean_db: None, session_factory: sessionmaker[Session]) -> Callable[..., Any]:
    from app.models import Job
    from app.states import TERMINAL, JobStatus

    def make(status: str = "queued", **columns: Any) -> Job:
        status = JobStatus(status)
        now = datetime.now(UTC)
        values: dict[str, Any] = {
            "id": uuid.uuid4(),
            "net": "net1",
            "epochs": 3,
            "batch_size": 32,
            "validation_split": 0.2,
            "optimizer": "adam",
            "learning_rate": 0.001,
            "seed": 0,
            "train_limit": 100,
            "precision": None,
            "status": status.value,
            "current_epoch": 0,
            "attempts": 0,
            "cancel_requested": False,
            "created_at": now - timedelta(minutes=5),
        }
        if status is not JobStatus.QUEUED:
            values.update(
                attempts=1,
                started_at=now - timedelta(minutes=4),
                heartbeat_at=now - timedelta(seconds=5),
                worker="test-worker",
                device="CPU",
            )
        if status in TERMINAL:
            values["finished_at"] = now - timedelta(minutes=1)
        if status is JobStatus.SUCCEEDED:
            values["current_epoch"] = columns.get("epochs", values["epochs"])
        values.update(columns)
        values.setdefault("model_name", values["net"])
        values.setdefault("claims", values["attempts"])  # every attempt was a claim
        job = Job(**values)
        with session_factory() as session:
            session.add(job)
            session.commit()
        return job

    return make


@pytest.fixture
def add_epochs(clean_db: None, session_factory: sessionmaker[Session]) -> Callable[..., Any]:
    from app.models import EpochMetric

    def add(job_id: uuid.UUID, n: int, start: int = 1) -> list[dict[str, Any]]:
        rows = []
        for epoch in range(start, start + n):
            rows.append(
                {
                    "epoch": epoch,
                    "loss": round(2.0 / epoch, 6),
                    "accuracy": round(0.3 + 0.1 * epoch, 6),
                    # Validation loss bottoms out at epoch 2, then climbs: overfitting.
                    "val_loss": round(1.5 + 0.1 * (epoch - 2) ** 2, 6),
                    "val_accuracy": round(0.35 + 0.05 * min(epoch, 2), 6),
                    "seconds": 1.5,
                }
            )
        with session_factory() as session:
            session.add_all(
                EpochMetric(job_id=job_id, images_per_second=100.0, **row) for row in rows
            )
            session.commit()
        return rows

    return add


@pytest.fixture
def register_model(
    clean_db: None, settings: Any, session_factory: sessionmaker[Session]
) -> Callable[..., Any]:
    from app.registry import versions as registry

    def register(
        name: str = "net1",
        content: bytes = b"not really a keras file",
        net: str = "net1",
        job_id: uuid.UUID | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> Any:
        folder = settings.artifact_dir / "test-models" / name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{uuid.uuid4().hex}.keras"
        path.write_bytes(content)
        with session_factory() as session:
            row = registry.register_version(
                session,
                name=name,
                net=net,
                job_id=job_id,
                artifact_path=str(path),
                sha256=hashlib.sha256(content).hexdigest(),
                size_bytes=len(content),
                metrics=metrics if metrics is not None else {"test_accuracy": 0.5},
            )
            session.commit()
            return row

    return register


class TrainingQueue:
    """The Redis list behind the run's training queue (kombu stores one JSON per message)."""

    def __init__(self, name: str) -> None:
        import redis

        self.name = name
        self._redis = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)

    def clear(self) -> None:
        self._redis.delete(self.name)

    def messages(self) -> list[tuple[str, list[Any]]]:
        """(task name, positional args) of every message waiting, oldest first."""
        found = []
        for raw in reversed(self._redis.lrange(self.name, 0, -1)):  # LPUSH: newest first
            envelope = json.loads(raw)
            args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
            found.append((envelope["headers"]["task"], args))
        return found

    def close(self) -> None:
        self._redis.close()


@pytest.fixture
def training_queue(settings: Any) -> Iterator[TrainingQueue]:
    from app.jobs.queue import any_queue

    queue = TrainingQueue(any_queue(settings))
    queue.clear()
    yield queue
    queue.clear()
    queue.close()


def _race_a_held_row(holder: Session, action: Callable[[], Any], what: str) -> Any:
    """Run `action` in a thread while `holder` keeps a flushed row uncommitted; once exactly
    one session waits on that row's lock (it is `action`'s: `what` names it in a failure),
    commit `holder`, and return what `action` returned."""
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(value=action()))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        waiting = 0
        while waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
            # pg_stat_activity is read once per transaction and then cached: drop the cache,
            # or a first look taken before the other session connected is all this loop sees.
            holder.execute(text("SELECT pg_stat_clear_snapshot()"))
            waiting = holder.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            ).scalar_one()
        assert waiting == 1, f"{what} never blocked on the row held open"
        holder.commit()
    finally:
        holder.close()
        thread.join(timeout=10)
    return result["value"]


@pytest.fixture
def race_a_held_row() -> Callable[..., Any]:
    """race_a_held_row(holder, action, "what action does"): see _race_a_held_row."""
    return _race_a_held_row


@pytest.fixture
def artifact_dir(settings: Any) -> Path:
    """The run's artifact folder (settings.artifact_dir), created."""
    settings.artifact_dir.mkdir(parents=True, exist_ok=True)
    return settings.artifact_dir


def _expect_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]


@pytest.fixture
def expect_error() -> Callable[[Any, int, str], dict[str, Any]]:
    return _expect_error


@pytest.fixture(scope="session")
def cifar10_archive() -> Path:
    if not CIFAR10_ARCHIVE.is_file():
        message = f"the CIFAR-10 archive is not at {CIFAR10_ARCHIVE.resolve()}"
        if os.environ.get("CNN_REQUIRE_CIFAR10") == "1":
            pytest.fail(message + " (CNN_REQUIRE_CIFAR10=1: the end-to-end tests must run)")
        pytest.skip(message)
    return CIFAR10_ARCHIVE.resolve()


@pytest.fixture(scope="session")
def cifar10_cache() -> Path:
    return ROOT / "var" / "test-cache"
