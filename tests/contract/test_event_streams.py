"""Issue 18 item 4: GET /jobs/{id}/events against a real API process.

Last-Event-ID is validated like `?after=` (a huge value raised OverflowError inside the
stream), a stream whose cursor is past every event still ends when its job does (300 such
streams cost 40% of a core, for ever), and one key holds a bounded number of streams.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from .live import LiveApi, spawn_api, stop

STREAMS_PER_KEY = 2


@pytest.fixture(scope="module")
def events_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    from app import auth
    from app.config import Settings
    from app.db import session_factory
    from app.migrate import upgrade

    settings = Settings(
        _env_file=None,
        STATE_DIR=tmp_path_factory.mktemp("events"),
        EVENTS_POLL_S=0.1,
        EVENT_STREAMS_PER_KEY=STREAMS_PER_KEY,
        MAX_ACTIVE_JOBS_PER_KEY=1000,
    )
    upgrade(settings.database_url)
    with session_factory(settings)() as session:
        key = auth.create_key(session, "events-admin", "admin").key
    live, proc = spawn_api(settings, key)
    try:
        yield live
    finally:
        stop(proc)


@pytest.fixture
def http(events_api: LiveApi) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=events_api.url, headers=events_api.headers(), timeout=10) as c:
        yield c


def _queued_job(http: httpx.Client) -> str:
    body = {"net": "net1", "epochs": 1, "train_limit": 10, "model_name": "events"}
    response = http.post("/jobs", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


@pytest.mark.parametrize("value", ["abc", "9" * 5000, "-1", str(2**62 + 1), "1e3", "12 13"])
def test_a_malformed_or_huge_last_event_id_is_422_like_after(
    http: httpx.Client, value: str
) -> None:
    job = _queued_job(http)
    response = http.get(f"/jobs/{job}/events", headers={"Last-Event-ID": value})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"
    if value.lstrip("-").isdigit():
        assert http.get(f"/jobs/{job}/events", params={"after": value}).status_code == 422


def _read_events(response: httpx.Response, into: list[str]) -> None:
    for line in response.iter_lines():
        if line.startswith("event:") or line.startswith("data:"):
            into.append(line)


def test_a_cursor_past_every_event_still_ends_with_the_job(http: httpx.Client) -> None:
    job = _queued_job(http)
    lines: list[str] = []
    with http.stream(
        "GET", f"/jobs/{job}/events", headers={"Last-Event-ID": str(10**15)}
    ) as response:
        assert response.status_code == 200
        reader = threading.Thread(target=_read_events, args=(response, lines), daemon=True)
        reader.start()
        time.sleep(0.5)  # the stream is polling
        assert http.post(f"/jobs/{job}/cancel").status_code == 200
        reader.join(timeout=10)
        ended = not reader.is_alive()
    assert ended, "the stream did not end after its job was cancelled"
    # The client is told what happened after its (bogus) cursor: the terminal status.
    assert any('"status":"cancelled"' in line for line in lines), lines
    # And a reconnect past the end of a terminal job is 204: nothing more will come.
    again = http.get(f"/jobs/{job}/events", headers={"Last-Event-ID": str(10**15)})
    assert again.status_code == 204


class OpenStream:
    """A stream held open: its first line read, its client, response and line iterator kept
    (dropping the iterator would close the connection)."""

    def __init__(self, events_api: LiveApi, job: str) -> None:
        self.client = httpx.Client(
            base_url=events_api.url, headers=events_api.headers(), timeout=10
        )
        self.context = self.client.stream("GET", f"/jobs/{job}/events")
        self.response = self.context.__enter__()
        self.lines = self.response.iter_lines()
        self.first = next(self.lines) if self.response.status_code == 200 else ""

    def close(self) -> None:
        self.context.__exit__(None, None, None)
        self.client.close()


def test_a_key_holds_a_bounded_number_of_streams(events_api: LiveApi, http: httpx.Client) -> None:
    job = _queued_job(http)
    held = [OpenStream(events_api, job) for _ in range(STREAMS_PER_KEY)]
    try:
        for stream in held:
            assert stream.response.status_code == 200
            assert stream.first.startswith("retry:")
        refused = http.get(f"/jobs/{job}/events")
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "too_many_streams"
        assert int(refused.headers["retry-after"]) >= 1
        # Other keys have their own streams.
        other = _other_key(events_api)
        with http.stream(
            "GET", f"/jobs/{job}/events", headers={"Authorization": f"Bearer {other}"}
        ) as response:
            assert response.status_code == 200
        # A closed stream gives its slot back.
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:
            with http.stream("GET", f"/jobs/{job}/events") as response:
                if response.status_code == 200:
                    break
            assert time.monotonic() < deadline, "the closed stream's slot never came back"
            time.sleep(0.2)
    finally:
        for stream in held:
            stream.close()


def _other_key(events_api: LiveApi) -> str:
    from app import auth
    from app.db import session_factory

    with session_factory(events_api.settings)() as session:
        return auth.create_key(session, f"reader-{time.monotonic_ns()}", "read").key


def test_streams_state_their_limit_in_the_schema(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    operation = spec["paths"]["/jobs/{job_id}/events"]["get"]
    header = next(p for p in operation["parameters"] if p["name"] == "Last-Event-ID")
    assert header["schema"]["anyOf"][0]["maximum"] == 2**62
    assert "429" in operation["responses"]
