"""Issue 18 item 1 (and the disconnect of item 6) against a real API process, over raw
sockets: a /predict body is admitted before a byte of it is read, per key and per process;
a body that does not arrive in time is 408 and its connection closed; the budget comes
back; a client that leaves mid-body is neither an ERROR nor a 500.

The flood itself (150 connections of almost 8 MiB, RSS and latencies) is
bench/bench_predict_flood.py.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from .live import LiveApi, start_live_api, stop

KIB = 1024
BODY_LIMIT = 256 * KIB
PER_KEY = 2 * BODY_LIMIT
TOTAL = 4 * BODY_LIMIT
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    live, proc = start_live_api(
        tmp_path_factory.mktemp("admission"),
        PREDICT_RATE_PER_S=0,
        PREDICT_MAX_BODY_BYTES=BODY_LIMIT,
        PREDICT_INFLIGHT_BYTES_PER_KEY=PER_KEY,
        PREDICT_INFLIGHT_BYTES=TOTAL,
        BODY_TIMEOUT_S=TIMEOUT_S,
    )
    try:
        yield live
    finally:
        stop(proc)


def _key(api: LiveApi, scopes: str = "predict") -> str:
    from app import auth
    from app.db import session_factory

    with session_factory(api.settings)() as session:
        return auth.create_key(session, f"k{time.monotonic_ns()}", scopes).key


class Held:
    """A /predict request whose headers (and `first` bytes of body) are sent, the rest not."""

    def __init__(
        self,
        api: LiveApi,
        key: str,
        declared: int | None,
        first: bytes = b"{",
        path: str = "",
        expect: bool = False,
    ) -> None:
        parts = urlsplit(api.url)
        length = (
            f"Content-Length: {declared}\r\n"
            if declared is not None
            else "Transfer-Encoding: chunked\r\n"
        )
        continue_first = "Expect: 100-continue\r\n" if expect else ""
        head = (
            f"POST {path or '/predict'} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n{length}"
            f"{continue_first}\r\n"
        ).encode()
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=15)
        self.sock.sendall(head)
        if first:
            body = first if declared is not None else b"%x\r\n%s\r\n" % (len(first), first)
            try:
                self.sock.sendall(body)
            except OSError:
                pass  # answered and closed before reading it

    def answer(self) -> tuple[int, dict[str, str], bytes, bool]:
        """Status, headers, body of the answer, and whether the server then closed."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            assert chunk, f"closed without an answer: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            body += self.sock.recv(65536)
        try:
            closed = self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            closed = True
        self.sock.close()
        return int(lines[0].split()[1]), headers, body, closed


def _small_predict(api: LiveApi, key: str) -> int:
    pixels = [[[0, 0, 0]] * 32] * 32
    response = httpx.post(
        f"{api.url}/predict",
        json={"model": "tiny", "instances": [pixels]},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    return response.status_code


def test_bodies_are_admitted_before_they_are_read(api: LiveApi) -> None:
    flooder, other, third = _key(api), _key(api), _key(api)
    held = [Held(api, flooder, BODY_LIMIT) for _ in range(PER_KEY // BODY_LIMIT)]
    time.sleep(0.3)  # admitted and waiting for the rest of their bodies
    # The key's budget is full: refused at once, without sending a byte of the body, and
    # the connection is closed (the server does not go on reading a body nobody wants).
    started = time.monotonic()
    refused = Held(api, flooder, BODY_LIMIT, first=b"", expect=True)
    status, headers, body, closed = refused.answer()
    assert (status, closed) == (429, True), body  # not "100 Continue": send no body
    assert b'"rate_limited"' in body and b"PREDICT_INFLIGHT_BYTES_PER_KEY" in body
    assert int(headers["retry-after"]) >= 1
    assert time.monotonic() - started < TIMEOUT_S / 2  # not the deadline: the admission
    # Another key is served meanwhile, and may hold its own share...
    assert _small_predict(api, other) == 200
    held += [Held(api, other, BODY_LIMIT) for _ in range(PER_KEY // BODY_LIMIT)]
    time.sleep(0.3)
    # ...until the process's budget is full: then everyone waits (503, not a 500).
    status, headers, body, closed = Held(api, third, BODY_LIMIT, first=b"").answer()
    assert (status, closed) == (503, True), body
    assert b'"overloaded"' in body and b"PREDICT_INFLIGHT_BYTES" in body
    # The held bodies never arrive: 408 at the deadline, and the connection is closed.
    for request in held:
        status, _, body, closed = request.answer()
        assert (status, closed) == (408, True), body
        assert b'"request_timeout"' in body and b"BODY_TIMEOUT_S" in body
    waited = time.monotonic() - started
    assert TIMEOUT_S * 0.8 < waited < TIMEOUT_S + 10
    # The budget came back with them.
    assert _small_predict(api, flooder) == 200
    assert _small_predict(api, third) == 200


def test_a_chunked_body_is_counted_as_it_arrives(api: LiveApi) -> None:
    key = _key(api)
    held = Held(api, key, BODY_LIMIT)  # half the key's budget, admitted
    time.sleep(0.2)
    chunked = Held(api, key, None, first=b"[" * (BODY_LIMIT // 2))
    second = Held(api, key, None, first=b"[" * (BODY_LIMIT // 2 + KIB))  # past the budget
    status, _, body, closed = second.answer()
    assert (status, closed) == (429, True), body
    assert b'"rate_limited"' in body
    for request in (held, chunked):
        assert request.answer()[0] == 408


def test_a_client_that_leaves_mid_body_is_no_error_and_no_500(api: LiveApi) -> None:
    key = _key(api)
    for _ in range(3):
        gone = Held(api, key, BODY_LIMIT, first=b'{"model": "tiny", "instances": [' + b"0," * 5000)
        time.sleep(0.2)
        gone.sock.close()
    time.sleep(0.5)
    assert _small_predict(api, key) == 200  # still serving, the key's budget back
    log = api.log.read_text(errors="replace")
    for sign in ("Traceback", "Exception in ASGI application", "unexpected error"):
        assert sign not in log, api.tail()
    metrics = httpx.get(f"{api.url}/metrics", headers=api.headers(), timeout=10).text
    predict_500 = [
        line
        for line in metrics.splitlines()
        if line.startswith("cnn_predict_requests_total") and 'status="500"' in line
    ]
    assert predict_500 == [], predict_500
    assert any('status="499"' in line for line in metrics.splitlines()), "not counted as 499"
