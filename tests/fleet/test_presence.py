"""The Presence thread on PostgreSQL: registers, shows the job at once, registers again after
its row was forgotten, marks itself stopped; and a database that is away never kills it."""

from __future__ import annotations

import time
import uuid

from sqlalchemy import create_engine, delete
from sqlalchemy.orm import sessionmaker

from app.fleet.presence import Presence, describe_this_process
from app.models import Worker

from .test_api_workers import info


def row(session_factory, name: str) -> Worker | None:
    with session_factory() as session:
        found = session.get(Worker, name)
        if found is not None:
            session.expunge(found)
        return found


def wait_until(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return value


def test_registers_shows_the_job_at_once_and_stops(clean_db, session_factory):
    # A long interval: only the wake-ups of running()/idle() can write within the test.
    presence = Presence(session_factory, info("p@box"), interval=60, queues=lambda: ["q1", "q2"])
    presence.start()
    try:
        first = wait_until(lambda: row(session_factory, "p@box"))
        assert first.current_job_id is None and first.stopped_at is None
        job = uuid.uuid4()
        presence.running(job)
        seen = wait_until(lambda: (r := row(session_factory, "p@box")).current_job_id and r)
        assert seen.current_job_id == job and seen.queues == ["q1", "q2"]
        presence.idle()
        wait_until(lambda: row(session_factory, "p@box").current_job_id is None)
        # The sweep forgot the row (a long partition): the next beat registers it again.
        with session_factory() as session:
            session.execute(delete(Worker))
            session.commit()
        presence.running(job)
        back = wait_until(lambda: row(session_factory, "p@box"))
        assert wait_until(lambda: row(session_factory, "p@box").current_job_id) == job
        assert back.pid == 4242
    finally:
        presence.stop()
    stopped = row(session_factory, "p@box")
    assert stopped.stopped_at is not None and stopped.current_job_id is None
    assert not presence.is_alive()


def test_a_database_that_is_away_never_kills_the_thread(caplog):
    engine = create_engine(
        "postgresql+psycopg://postgres@127.0.0.1:1/nowhere", connect_args={"connect_timeout": 1}
    )
    presence = Presence(sessionmaker(engine), info("away@box"), interval=0.05)
    presence.start()
    try:
        wait_until(lambda: "heartbeat not written" in caplog.text)
        presence.running(uuid.uuid4())
        time.sleep(0.2)
        assert presence.is_alive()
    finally:
        presence.stop()  # logs, does not raise
    assert "could not mark itself stopped" in caplog.text
    engine.dispose()


def test_describes_this_process():
    import os

    me = describe_this_process("me@here", ["training"])
    assert me.pid == os.getpid() and me.queues == ["training"]
    assert me.device_kind in {"cpu", "gpu"} and me.keras_backend in {"tensorflow", "jax"}
    assert (me.gpu_count == 0) == (me.device_kind == "cpu")
