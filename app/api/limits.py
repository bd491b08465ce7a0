"""ASGI middleware that guards every request before a route sees it.

- HostAllowList: the Host header must name this service (ALLOWED_HOSTS), otherwise 400
  `host_not_allowed`. A page on attacker.example whose DNS name was rebound to 127.0.0.1
  sends `Host: attacker.example` and is refused.
- BodyLimit: the body is counted while it is read, before anything parses it. A declared
  Content-Length over the route's limit is refused without reading a byte; a chunked or
  lying body is cut off at the limit (413 `too_large`). Limits: PREDICT_MAX_BODY_BYTES for
  POST /predict, UPLOAD_MAX_FILE_BYTES (+ room for the form fields) for the multipart
  upload, MAX_JSON_BODY_BYTES for everything else. The whole body must arrive within
  BODY_TIMEOUT_S of the request (408 `request_timeout`), and an answer sent before a
  large body was read to its end closes the connection, so that the server never goes on
  reading (and discarding) the rest of a body nobody wants.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.transport import PREDICT_IMAGE_PATH, PREDICT_PATH
from app.auth import Principal
from app.config import Settings
from app.errors import error_body, status_of

log = logging.getLogger(__name__)

# Room for the multipart boundaries and the small form fields next to the file.
MULTIPART_OVERHEAD = 64 * 1024
CONNECTION_CLOSE = (b"connection", b"close")
# An answer sent before the body was read closes the connection when the body is larger
# than this (or chunked); a smaller one is already in the server's buffer (uvicorn reads
# 64 KiB ahead), so the connection can be kept.
CLOSE_UNREAD_OVER = 64 * 1024


def caller_of(principal: Principal | None, client: Any) -> str:
    """Whom a per-caller limit counts: the key, or the client's address for a keyless
    caller (the address uvicorn reports, which believes X-Forwarded-For only from
    TRUSTED_PROXIES). None: a test's override of the access check."""
    if principal is not None and principal.id is not None:
        return f"key:{principal.id}"
    return f"anon:{client.host if client else 'unknown'}"


async def _send_error(send: Send, code: str, message: str) -> None:
    body = orjson.dumps(error_body(code, message))
    status = status_of(code)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _host(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"host":
            host = value.decode("latin-1").strip().lower()
            if host.startswith("["):  # [::1]:8000
                return host[1 : host.find("]")] if "]" in host else host
            return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return ""


class HostAllowList:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.allowed = settings.allowed_hosts
        self.any = "*" in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.any:
            await self.app(scope, receive, send)
            return
        host = _host(scope)
        if host not in self.allowed:
            log.warning("refused a request for host %r (not in ALLOWED_HOSTS)", host[:100])
            await _send_error(
                send,
                "host_not_allowed",
                "this service does not answer for the Host header sent; "
                "the operator can add the name to ALLOWED_HOSTS",
            )
            return
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.predict = settings.PREDICT_MAX_BODY_BYTES
        self.upload = settings.UPLOAD_MAX_FILE_BYTES + MULTIPART_OVERHEAD
        self.json = settings.MAX_JSON_BODY_BYTES
        self.timeout = settings.BODY_TIMEOUT_S

    def limit_for(self, path: str) -> tuple[int, str]:
        path = path.rstrip("/")
        if path == PREDICT_PATH:
            return self.predict, "PREDICT_MAX_BODY_BYTES"
        if path == PREDICT_IMAGE_PATH:
            return self.upload, "UPLOAD_MAX_FILE_BYTES"
        return self.json, "MAX_JSON_BODY_BYTES"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.limit_for(scope.get("path", ""))
        message = f"the request body is larger than this route accepts ({limit:,} bytes, {setting})"
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _send_error(send, "too_large", message)
            return
        if declared == 0 or (declared is None and not _chunked(scope)):
            await self.app(scope, receive, send)  # no body to wait for
            return
        deadline = asyncio.get_running_loop().time() + self.timeout
        received = 0
        complete = False
        small = declared is not None and declared <= CLOSE_UNREAD_OVER

        async def counted() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()  # e.g. a streaming answer waiting for the disconnect
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await receive()
            except TimeoutError:
                # Raised inside the route's body reading, like the 413 below.
                raise HTTPException(
                    status_of("request_timeout"),
                    f"the request body did not arrive within {self.timeout:g} s "
                    "(BODY_TIMEOUT_S); send it at once, or in smaller requests",
                    headers={"Connection": "close"},
                ) from None
            if msg["type"] != "http.request":
                complete = True  # the client is gone
                return msg
            received += len(msg.get("body", b""))
            if received > limit:
                # Raised inside the route's body parsing; FastAPI lets HTTPException
                # through and the app's handler renders the error body.
                raise HTTPException(status_of("too_large"), message)
            complete = not msg.get("more_body", False)
            return msg

        async def closing(msg: Message) -> None:
            if msg["type"] == "http.response.start" and not (complete or small):
                headers = list(msg.get("headers", ()))
                if CONNECTION_CLOSE not in headers:
                    msg = {**msg, "headers": [*headers, CONNECTION_CLOSE]}
            await send(msg)

        await self.app(scope, counted, closing)


def _chunked(scope: Scope) -> bool:
    return any(name == b"transfer-encoding" for name, _ in scope.get("headers", ()))


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def install_limits(app: Any, settings: Settings) -> None:
    """Add the guards; the host check runs first (outermost)."""
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(HostAllowList, settings=settings)
