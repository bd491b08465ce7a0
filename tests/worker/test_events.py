"""GET /jobs/{id}/events against two real API processes on one PostgreSQL database.

The job's life is written straight through the worker-side database functions (claim,
record_epoch, finish), as a worker would, so no training is needed: the stream must show
each change in order, end at the terminal status, and resume on the *other* process with
Last-Event-ID without a gap or a repeat.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.client import ApiClient, ServerEvent
from app.jobs import execution

from .conftest import Processes, free_port


def epoch(n: int) -> dict[str, Any]:
    return {
        "epoch": n,
        "loss": 2.0 / n,
        "accuracy": 0.3 + 0.1 * n,
        "val_loss": 1.9 / n,
        "val_accuracy": 0.3 + 0.05 * n,
        "seconds": 1.0,
        "images_per_second": 100.0,
    }


class Collector:
    """Follows a job's events in a thread; `events` fills as they arrive."""

    def __init__(self, client: ApiClient, job_id: str, last_event_id: str | None = None) -> None:
        self.events: queue.Queue[ServerEvent] = queue.Queue()
        self.seen: list[ServerEvent] = []
        self.thread = threading.Thread(
            target=self._run, args=(client, job_id, last_event_id), daemon=True
        )
        self.thread.start()

    def _run(self, client: ApiClient, job_id: str, last_event_id: str | None) -> None:
        for event in client.events(job_id, last_event_id):
            self.events.put(event)

    def next(self, timeout: float = 20) -> ServerEvent:
        event = self.events.get(timeout=timeout)
        self.seen.append(event)
        return event


def summary(events: list[ServerEvent]) -> list[tuple[str, Any]]:
    return [(e.kind, e.data["status"] if e.kind == "status" else e.data["epoch"]) for e in events]


@pytest.fixture(scope="module")
def two_apis(settings, tmp_path_factory) -> Iterator[tuple[ApiClient, ApiClient]]:
    """Two uvicorn processes on the run's database (jobs here are new rows; no cleaning)."""
    fast = settings.model_copy(update={"EVENTS_POLL_S": 0.1})
    procs = Processes(tmp_path_factory.mktemp("events-api-logs"))
    clients = []
    try:
        for _ in range(2):
            port = free_port()
            procs.api(fast, port)
            clients.append(ApiClient(f"http://127.0.0.1:{port}", timeout=10))
        yield clients[0], clients[1]
    finally:
        for client in clients:
            client.close()
        procs.cleanup()


def test_events_arrive_in_order_live_and_end_at_the_terminal_status(
    two_apis, session_factory, settings
):
    a, b = two_apis
    job = a.submit_job({"net": "net1", "epochs": 3, "train_limit": 100})
    job_id = uuid.UUID(job["id"])
    live = Collector(a, job["id"])
    assert summary([live.next()]) == [("status", "queued")]

    with session_factory() as session:
        claim = execution.claim(session, job_id, "test-worker", settings)
    assert claim.claimed
    assert summary([live.next()]) == [("status", "running")]
    for n in (1, 2, 3):
        with session_factory() as session:
            assert execution.record_epoch(session, job_id, epoch(n), token=claim.token)
        # Each epoch is on the stream before the next one is written: live, not at the end.
        event = live.next()
        assert (event.kind, event.data["epoch"]) == ("epoch", n)
        assert event.data["loss"] == pytest.approx(2.0 / n)
    with session_factory() as session:
        assert execution.finish_failed(session, job_id, "out of memory", token=claim.token)
    final = live.next()
    assert final.terminal and final.data["status"] == "failed"
    assert final.data["error"] == "out of memory"
    assert final.data["job"]["status"] == "failed"  # the job as it ended
    live.thread.join(timeout=10)
    assert not live.thread.is_alive(), "the stream did not end after the terminal status"
    assert live.events.empty()

    ids = [int(e.id or 0) for e in live.seen]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    # The other process replays the same log, and resumes after any id without repeats.
    assert [(e.id, e.kind) for e in b.events(job["id"])] == [(e.id, e.kind) for e in live.seen]
    for cut in range(len(live.seen)):
        resumed = list(b.events(job["id"], last_event_id=live.seen[cut].id))
        assert [e.id for e in resumed] == [e.id for e in live.seen[cut + 1 :]]

    # A client that already has the terminal event is told to stop reconnecting: 204.
    response = httpx.get(
        f"{b.url}/jobs/{job['id']}/events", headers={"Last-Event-ID": live.seen[-1].id or ""}
    )
    assert response.status_code == 204


def test_a_dropped_stream_resumes_on_another_process_without_gaps_or_repeats(
    two_apis, session_factory, settings
):
    a, b = two_apis
    job = a.submit_job({"net": "net1", "epochs": 4, "train_limit": 100})
    job_id = uuid.UUID(job["id"])
    with session_factory() as session:
        claim = execution.claim(session, job_id, "test-worker", settings)
        assert execution.record_epoch(session, job_id, epoch(1), token=claim.token)

    # First connection (process A): read up to epoch 1, then drop the connection.
    received: list[ServerEvent] = []
    for event in a.events(job["id"]):
        received.append(event)
        if event.kind == "epoch":
            break
    assert summary(received) == [("status", "queued"), ("status", "running"), ("epoch", 1)]

    # While nobody listens, epochs 2 and 3 are stored.
    with session_factory() as session:
        for n in (2, 3):
            assert execution.record_epoch(session, job_id, epoch(n), token=claim.token)

    # Reconnect to process B with Last-Event-ID: the missed epochs first, then live ones.
    live = Collector(b, job["id"], last_event_id=received[-1].id)
    assert summary([live.next(), live.next()]) == [("epoch", 2), ("epoch", 3)]
    with session_factory() as session:
        assert execution.record_epoch(session, job_id, epoch(4), token=claim.token)
    assert summary([live.next()]) == [("epoch", 4)]
    a.cancel(job["id"])  # cancel_requested; the "worker" stops and reports it
    with session_factory() as session:
        assert execution.finish_cancelled(session, job_id, token=claim.token)
    assert summary([live.next()]) == [("status", "cancelled")]
    live.thread.join(timeout=10)

    whole = [e.id for e in a.events(job["id"])]
    assert [e.id for e in received + live.seen] == whole


def test_follow_reconnects_by_itself_and_unknown_jobs_are_404(two_apis, session_factory, settings):
    a, _ = two_apis
    job = a.submit_job({"net": "net1", "epochs": 1, "train_limit": 100})
    job_id = uuid.UUID(job["id"])
    with session_factory() as session:
        claim = execution.claim(session, job_id, "test-worker", settings)
        assert execution.record_epoch(session, job_id, epoch(1), token=claim.token)
        assert execution.finish_failed(session, job_id, "stop here", token=claim.token)
    events = list(a.follow(job["id"]))
    assert summary(events) == [
        ("status", "queued"),
        ("status", "running"),
        ("epoch", 1),
        ("status", "failed"),
    ]
    response = httpx.get(f"{a.url}/jobs/{uuid.uuid4()}/events")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"
    raw = httpx.get(f"{a.url}/jobs/{job['id']}/events")
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.startswith("retry: ")
