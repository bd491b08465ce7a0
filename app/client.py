"""A small Python client of the service's HTTP API (httpx), used by the `cnn` remote commands.

    client = ApiClient("http://127.0.0.1:8000", api_key="...")
    job = client.submit_job({"net": "net1", "epochs": 2})
    for event in client.follow(job["id"]):      # server-sent events, resumed on reconnect
        print(event.kind, event.data)

Every error answer of the service (`{"error": {"code", "message"}}`) becomes ApiError with
its status, code and message; a service that cannot be reached becomes ApiUnreachable.
Nothing here imports TensorFlow or the server's modules.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class ApiError(Exception):
    """The service answered with an error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message} (HTTP {status})")
        self.status = status
        self.code = code
        self.message = message


class ApiUnreachable(Exception):
    """No answer at all: wrong URL, service down, network gone."""


@dataclass
class ServerEvent:
    """One server-sent event of `GET /jobs/{id}/events`."""

    id: str | None
    kind: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.kind == "status" and self.data.get("status") in TERMINAL


def parse_sse(lines: Iterator[str]) -> Iterator[ServerEvent]:
    """Events from text/event-stream lines (comments and `retry:` lines are skipped)."""
    event_id: str | None = None
    kind = "message"
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield ServerEvent(event_id, kind, json.loads("\n".join(data)))
            event_id, kind, data = None, "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            event_id = value
        elif name == "event":
            kind = value
        elif name == "data":
            data.append(value)


class ApiClient:
    """The service's endpoints as methods; returns decoded JSON bodies."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing
    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiUnreachable(f"cannot reach {self.url}: {exc}") from exc
        if response.status_code >= 400:
            raise _error(response)
        return response

    def get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=clean).json()

    # ------------------------------------------------------------------ jobs
    def submit_job(self, params: dict[str, Any], idempotency_key: str | None = None) -> Any:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/jobs", json=params, headers=headers).json()

    def list_jobs(self, **filters: Any) -> Any:
        return self.get("/jobs", **filters)

    def job(self, job_id: str) -> Any:
        return self.get(f"/jobs/{job_id}")

    def history(self, job_id: str) -> Any:
        return self.get(f"/jobs/{job_id}/history")

    def evaluation(self, job_id: str) -> Any:
        return self.get(f"/jobs/{job_id}/evaluation")

    def cancel(self, job_id: str) -> Any:
        return self.request("POST", f"/jobs/{job_id}/cancel").json()

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[ServerEvent]:
        """One connection's events; stops when the server closes (or answers 204)."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        try:
            with self.http.stream(
                "GET", f"/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(None)
            ) as response:
                if response.status_code == 204:
                    return
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                yield from parse_sse(response.iter_lines())
        except httpx.TransportError as exc:
            raise ApiUnreachable(f"lost the event stream of {self.url}: {exc}") from exc

    def follow(
        self, job_id: str, last_event_id: str | None = None, retries: int = 30, wait: float = 2.0
    ) -> Iterator[ServerEvent]:
        """Every event until the job is terminal, reconnecting with Last-Event-ID on a drop."""
        failures = 0
        while True:
            try:
                for event in self.events(job_id, last_event_id):
                    failures = 0
                    last_event_id = event.id or last_event_id
                    yield event
                    if event.terminal:
                        return
                return  # 204, or the server ended the stream: nothing more will come
            except ApiUnreachable:
                failures += 1
                if failures > retries:
                    raise
                time.sleep(wait)

    # ------------------------------------------------------------------ sweeps
    def submit_sweep(self, spec: dict[str, Any]) -> Any:
        return self.request("POST", "/sweeps", json=spec).json()

    def list_sweeps(self, **filters: Any) -> Any:
        return self.get("/sweeps", **filters)

    def sweep(self, sweep_id: str) -> Any:
        return self.get(f"/sweeps/{sweep_id}")

    def cancel_sweep(self, sweep_id: str) -> Any:
        return self.request("POST", f"/sweeps/{sweep_id}/cancel").json()

    def sweep_png(self, sweep_id: str) -> bytes:
        return self.request("GET", f"/sweeps/{sweep_id}.png").content

    # ------------------------------------------------------------------ models
    def list_workers(self, include_lost: bool = False, limit: int | None = None) -> Any:
        return self.get("/workers", include_lost=include_lost or None, limit=limit)

    def list_models(self) -> Any:
        return self.get("/models")

    def model(self, name: str) -> Any:
        return self.get(f"/models/{name}")

    def set_alias(self, name: str, alias: str, version: int) -> Any:
        return self.request(
            "PUT", f"/models/{name}/aliases/{alias}", json={"version": version}
        ).json()

    def predict_file(
        self, path: Path, model: str, version: int | None = None, alias: str | None = None
    ) -> Any:
        form: dict[str, str] = {"model": model}
        if version is not None:
            form["version"] = str(version)
        if alias:
            form["alias"] = alias
        with path.open("rb") as handle:
            files = {"file": (path.name, handle, _image_type(path))}
            return self.request("POST", "/predict/image", data=form, files=files).json()


def _image_type(path: Path) -> str:
    return "image/png" if path.suffix.lower() == ".png" else "image/jpeg"


def _error(response: httpx.Response) -> ApiError:
    try:
        error = response.json()["error"]
        return ApiError(response.status_code, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        text = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
        return ApiError(response.status_code, "http_error", text or response.reason_phrase)
