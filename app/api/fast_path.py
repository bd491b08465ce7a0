"""A route's requests from the ASGI scope straight to its endpoint, past the router and
FastAPI's per-request dependency solving (docs/performance.md: for one-image /predict
requests those were a third of the event loop's time).

The fast path runs what the route declares, not a copy of it: at start-up it reads the
route's dependant, which holds the dependencies of the app, of every router the route was
included through and of the route itself, and plans the calls once, in FastAPI's order and
with FastAPI's one-call-per-request cache. A request then only makes those calls. A
dependency it cannot make that way (a sync one, which FastAPI would run on a thread, a
generator, one that reads a query parameter, a header or the body) stops the app at
start-up with `FastPathMismatch`, so a dependency added to the route, its router or the app
is never skipped.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import fastapi.routing
from fastapi.dependencies.models import Dependant
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import error_response

# Special parameters FastAPI fills from the request; the fast path fills only the Request.
_UNSUPPORTED_SPECIAL = {
    "websocket_param_name": "a WebSocket",
    "response_param_name": "the Response",
    "background_tasks_param_name": "BackgroundTasks",
    "security_scopes_param_name": "SecurityScopes",
}


class FastPathMismatch(RuntimeError):
    """The route declares something the fast path cannot run as FastAPI would."""


@dataclass(frozen=True, slots=True)
class Step:
    """One call of a request: a dependency, or (the last step) the endpoint."""

    call: Callable[..., Awaitable[Any]]
    request_params: tuple[str, ...]  # parameters that take the Request
    results: tuple[tuple[str, int], ...]  # parameter -> index of the step that computes it


def plan(app: Any, method: str, path: str) -> tuple[Step, ...]:
    """The calls FastAPI would make for `method path` of `app`, in its order; the endpoint
    last. Raises FastPathMismatch for a route the fast path cannot serve exactly."""
    root = _dependant(app, method, path)
    steps: list[Step] = []
    cached: dict[Any, int] = {}

    def visit(node: Dependant) -> int:
        call = node.call
        assert call is not None  # FastAPI gives every dependant its callable
        if node.use_cache and call in cached:
            return cached[call]
        problem = _cannot_run(node)
        if problem:
            raise FastPathMismatch(
                f"{method} {path}: {_name(call)} {problem}; the fast path "
                "(app/api/fast_path.py) runs async dependencies that take only the Request "
                "and other dependencies"
            )
        results = []
        for sub in node.dependencies:
            index = visit(sub)
            if sub.name is not None:  # `dependencies=[...]` run for their effect only
                results.append((sub.name, index))
        special = (node.request_param_name, node.http_connection_param_name)
        steps.append(Step(call, tuple(p for p in special if p), tuple(results)))
        if node.use_cache:
            cached[call] = len(steps) - 1
        return len(steps) - 1

    visit(root)
    endpoint = steps[-1].call
    returns = inspect.signature(endpoint, eval_str=True).return_annotation
    if not (inspect.isclass(returns) and issubclass(returns, Response)):
        raise FastPathMismatch(
            f"{method} {path}: {_name(endpoint)} must be annotated to return a Response "
            "(the fast path sends what the endpoint returns, FastAPI would serialise it)"
        )
    return tuple(steps)


async def run(steps: tuple[Step, ...], request: Request) -> Any:
    """Make the planned calls; the endpoint's answer."""
    results: list[Any] = []
    for step in steps:
        kwargs = {name: results[index] for name, index in step.results}
        for name in step.request_params:
            kwargs[name] = request
        results.append(await step.call(**kwargs))
    return results[-1]


class RouteFastPath:
    """ASGI middleware serving `method path` (set by a subclass) through the planned calls;
    everything else, and every request while `app.dependency_overrides` is set, goes on to
    the router. Errors get the app's error body (app.errors.error_response). The route stays
    registered for the OpenAPI document, other methods (405) and a service mounted under a
    root path (the fast path matches the path itself only)."""

    method: str
    path: str

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.steps: tuple[Step, ...] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._start(scope, receive, send)
            return
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != self.method:
            await self.app(scope, receive, send)
            return
        app = scope["app"]
        if getattr(app, "dependency_overrides", None):  # the router applies them
            await self.app(scope, receive, send)
            return
        if self.steps is None:  # served without a lifespan (a TestClient outside `with`)
            self.steps = plan(app, self.method, self.path)
        request = Request(scope, receive)
        response: Response
        try:
            response = await run(self.steps, request)
        except Exception as exc:
            response = error_response(request, exc)
        await response(scope, receive, send)

    async def _start(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Plan at start-up; a route the fast path cannot serve stops the start (the server
        reads `lifespan.startup.failed` and exits)."""
        try:
            self.steps = plan(scope["app"], self.method, self.path)
        except FastPathMismatch as exc:
            await receive()  # lifespan.startup
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            raise
        await self.app(scope, receive, send)


def _dependant(app: Any, method: str, path: str) -> Dependant:
    # Newer FastAPI keeps included routers nested and lists their effective routes (with the
    # include-time dependencies) through iter_route_contexts; older FastAPI copied them.
    routes = getattr(fastapi.routing, "iter_route_contexts", iter)(app.routes)
    for route in routes:
        if getattr(route, "path", None) == path and method in (
            getattr(route, "methods", None) or ()
        ):
            dependant = getattr(route, "dependant", None)
            if not isinstance(dependant, Dependant):
                raise FastPathMismatch(f"{method} {path} is not served by a FastAPI route")
            return dependant
    raise FastPathMismatch(f"no route serves {method} {path}")


def _cannot_run(node: Dependant) -> str | None:
    params = [
        field.name
        for field in (
            *node.path_params,
            *node.query_params,
            *node.header_params,
            *node.cookie_params,
            *node.body_params,
        )
    ]
    if params:
        return f"reads request parameters ({', '.join(params)})"
    for attribute, what in _UNSUPPORTED_SPECIAL.items():
        if getattr(node, attribute, None):
            return f"takes {what}"
    if getattr(node, "concurrency", None) is not None:
        return "has a concurrency limit"
    if not _is_async(node.call):
        return "is not an async function (FastAPI would run it on a thread or as a generator)"
    return None


def _is_async(call: Any) -> bool:
    if inspect.iscoroutinefunction(call):
        return True
    dunder_call = getattr(call, "__call__", None)  # noqa: B004 (a callable instance)
    return not inspect.isclass(call) and inspect.iscoroutinefunction(dunder_call)


def _name(call: Any) -> str:
    return getattr(call, "__qualname__", None) or type(call).__name__
