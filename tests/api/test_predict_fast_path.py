"""POST /predict's fast path (app/api/fast_path.py) runs exactly what the route declares.

A dependency added to the route, to its router or to the app is run by the fast path, or,
if the fast path cannot run it as FastAPI would, the app refuses to start: never skipped.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.testclient import TestClient

from app import main
from app.api import predict
from app.api.deps import authorise_predict, bearer_scheme
from app.api.fast_path import FastPathMismatch, plan
from app.api.transport import PREDICT_PATH
from app.errors import Forbidden

LEVELS = ("route", "router", "app")
JSON = {"Content-Type": "application/json"}
# A well-formed body for a model that does not exist: past the checks, the handler says 404.
BODY = orjson.dumps(
    {"model": "nope", "instances": np.zeros((1, 32, 32, 3), dtype=np.uint8).tolist()}
)


def declare(monkeypatch: pytest.MonkeyPatch, level: str, dependency: Callable[..., Any]) -> None:
    """Make create_app declare `dependency` for POST /predict on the route, on the predict
    router, or on the app."""
    extra = [Depends(dependency)]
    if level == "app":
        monkeypatch.setattr(main, "FastAPI", functools.partial(FastAPI, dependencies=extra))
        return
    router = APIRouter(tags=["predict"], dependencies=extra if level == "router" else [])
    for route in predict.router.routes:
        on_route = extra if level == "route" and route.path == PREDICT_PATH else []
        router.add_api_route(
            route.path,
            route.endpoint,
            methods=sorted(route.methods),
            dependencies=[*route.dependencies, *on_route],
        )
    monkeypatch.setattr(predict, "router", router)


def test_the_fast_path_makes_the_calls_the_route_declares(settings):
    steps = plan(main.create_app(settings), "POST", PREDICT_PATH)
    assert [step.call for step in steps] == [bearer_scheme, authorise_predict, predict.predict]
    assert steps[1].results == (("credentials", 0),)  # the bearer header's credentials


@pytest.mark.parametrize("level", LEVELS)
def test_a_dependency_added_at_any_level_runs_on_the_fast_path(
    monkeypatch, settings, client_for, expect_error, level
):
    on_fast_path: list[bool] = []

    async def gatekeeper(request: Request) -> None:
        # The router puts the endpoint in the scope before solving; the fast path does not.
        on_fast_path.append("endpoint" not in request.scope)
        raise Forbidden("the gatekeeper says no")

    declare(monkeypatch, level, gatekeeper)
    with client_for(settings, "predict") as client:
        error = expect_error(
            client.post(PREDICT_PATH, content=BODY, headers=JSON), 403, "forbidden"
        )
    assert error["message"] == "the gatekeeper says no"
    assert on_fast_path == [True]


def audit(request: Request) -> None:
    """Sync: FastAPI would run it on a thread."""


async def traced(x_trace: str = Header("")) -> None:
    """Reads a header parameter."""


async def scoped() -> AsyncIterator[None]:
    """A generator: FastAPI would run its exit after the response."""
    yield


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize(
    ("dependency", "words"),
    [
        (audit, "audit is not an async function"),
        (traced, r"traced reads request parameters \(x_trace\)"),
        (scoped, "scoped is not an async function"),
    ],
    ids=["sync", "header", "generator"],
)
def test_a_dependency_the_fast_path_cannot_run_stops_the_start(
    monkeypatch, settings, client_for, level, dependency, words
):
    declare(monkeypatch, level, dependency)
    with pytest.raises(FastPathMismatch, match=words):
        with client_for(settings):
            pass


def test_an_app_without_the_route_does_not_start():
    application = FastAPI()
    application.add_middleware(predict.PredictFastPath)
    with pytest.raises(FastPathMismatch, match="no route serves POST /predict"):
        with TestClient(application):
            pass


def test_dependency_overrides_apply_to_post_predict(settings, client_for, expect_error):
    with client_for(settings, "read") as client:  # a key without the predict scope
        expect_error(client.post(PREDICT_PATH, content=BODY, headers=JSON), 403, "forbidden")
        client.app.dependency_overrides[authorise_predict] = lambda: None
        response = client.post(PREDICT_PATH, content=BODY, headers=JSON)
        expect_error(response, 404, "model_not_found")  # past the (overridden) check


def test_served_without_a_lifespan_the_fast_path_plans_on_first_use(
    settings, client_for, expect_error
):
    client = client_for(settings, "predict")  # not entered: no lifespan runs
    expect_error(client.post(PREDICT_PATH, content=BODY, headers=JSON), 404, "model_not_found")
    expect_error(
        client.post(PREDICT_PATH, content=BODY, headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
