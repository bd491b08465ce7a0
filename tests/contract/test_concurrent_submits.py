"""Issue 18 item 3: the job quota holds under concurrency, across API processes.

A key at 3 of its 4 active jobs sends 12 submits at once, spread over two real API processes
on one database; exactly one is accepted, on the embedded SQLite file and on PostgreSQL.
Before the fix SQLite counted outside any transaction and the key ended with 6 active jobs.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from .live import spawn_api, stop

QUOTA = 4
SUBMITS = 12


def _key_at_three_of_four(settings: Any) -> tuple[str, int]:
    """A train key that owns `net1` and has three queued jobs."""
    from app import auth
    from app.db import session_factory
    from app.migrate import upgrade
    from app.models import Job, ModelOwner

    upgrade(settings.database_url)
    with session_factory(settings)() as session:
        created = auth.create_key(session, "racer", "train")
        owner = created.row.id
        session.add(ModelOwner(name="net1", owner_id=owner, created_at=datetime.now(UTC)))
        for _ in range(QUOTA - 1):
            session.add(
                Job(
                    id=uuid.uuid4(), net="net1", epochs=1, batch_size=32, validation_split=0.2,
                    optimizer="adam", learning_rate=0.001, seed=0, train_limit=10,
                    model_name="net1", status="queued", current_epoch=0, attempts=0,
                    cancel_requested=False, created_at=datetime.now(UTC), owner_id=owner,
                )
            )  # fmt: skip
        session.commit()
    return created.key, owner


def _active_jobs(settings: Any, owner: int) -> int:
    from sqlalchemy import func, select

    from app.db import session_factory
    from app.models import Job

    with session_factory(settings)() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.owner_id == owner, Job.status.in_(("queued", "running")))
            )
            or 0
        )


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_key_at_three_of_four_jobs_gets_exactly_one_of_twelve_concurrent_submits(
    tmp_path: Path, fresh_pg_database: Any, backend: str
) -> None:
    from app.config import Settings

    database = fresh_pg_database() if backend == "postgresql" else ""
    settings = Settings(
        _env_file=None,
        STATE_DIR=tmp_path,
        DATABASE_URL=database,
        MAX_ACTIVE_JOBS_PER_KEY=QUOTA,
        PREDICT_RATE_PER_S=0,
    )
    key, owner = _key_at_three_of_four(settings)
    replicas = [spawn_api(settings) for _ in range(2)]
    try:
        start = threading.Barrier(SUBMITS)
        statuses: list[int] = []
        lock = threading.Lock()

        def submit(i: int) -> None:
            url = replicas[i % 2][0].url
            body = {"net": "net1", "epochs": 1, "train_limit": 10}
            with httpx.Client(base_url=url, timeout=60) as http:
                http.get("/health")  # connected before the start line
                start.wait()
                response = http.post("/jobs", json=body, headers={"Authorization": f"Bearer {key}"})
            with lock:
                statuses.append(response.status_code)

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(SUBMITS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        for _, proc in replicas:
            stop(proc)
    assert sorted(statuses) == [202] + [429] * (SUBMITS - 1), statuses
    assert _active_jobs(settings, owner) == QUOTA
