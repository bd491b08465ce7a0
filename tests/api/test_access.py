"""Every route's access rules (issue 8): no key 401, a key without the scope 403, another
key's job or model 403, the right key 2xx. A route missing from ROUTES fails
test_every_route_has_an_access_row: add a row when you add an endpoint."""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from app.models import ApiKey, Evaluation, ModelOwner

PIXELS = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def bearer(key: str | None) -> dict[str, str]:
    # An explicit empty header overrides the client's default admin key.
    return {"Authorization": f"Bearer {key}" if key else ""}


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(PIXELS).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class World:
    keys: dict[str, str]
    job: str  # a succeeded job of key "train_a", with epochs and an evaluation
    queued: str  # a queued job of key "train_a" (cancellable)
    revocable: int  # the id of a key that DELETE /keys/{id} may revoke
    extra: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> bytes:
    import keras
    from keras import layers

    model = keras.Sequential(
        [keras.Input((32, 32, 3)), layers.GlobalAveragePooling2D(), layers.Dense(10)]
    )
    path = tmp_path_factory.mktemp("access") / "tiny.keras"
    model.save(path)
    return path.read_bytes()


@pytest.fixture
def world(client, api_key, make_job, add_epochs, register_model, session_factory, tiny_model):
    keys = {
        "read": api_key("read"),
        "predict": api_key("predict"),
        "train_a": api_key("train", name="train-a"),
        "train_b": api_key("train", name="train-b"),
        "read_train_b": api_key("read,train", name="read-train-b"),
        "admin": client.admin_key,
    }
    with session_factory() as session:
        ids = dict(session.execute(select(ApiKey.name, ApiKey.id)).tuples().all())
        owner = ids["train-a"]
        session.add(ModelOwner(name="model-a", owner_id=owner, created_at=datetime.now(UTC)))
        session.commit()
    job = make_job("succeeded", owner_id=owner, model_name="model-a")
    add_epochs(job.id, 2)
    with session_factory() as session:
        session.add(
            Evaluation(
                job_id=job.id,
                test_loss=1.0,
                test_accuracy=0.5,
                first_image={
                    "probabilities": [0.1] * 10,
                    "predicted_class": 0,
                    "true_class": 0,
                    "match": True,
                },
                per_class_accuracy=[0.5] * 10,
                confusion_matrix=[[0] * 10 for _ in range(10)],
            )
        )
        session.commit()
    queued = make_job("queued", owner_id=owner, model_name="model-a")
    register_model("model-a", content=tiny_model, job_id=job.id)
    sweep = _sweep_of(session_factory, owner, job.id)
    return World(
        keys=keys,
        job=str(job.id),
        queued=str(queued.id),
        revocable=ids["read-train-b"],
        extra={"sweep": sweep},
    )


SWEEP_BODY = {
    "base": {"net": "net1", "model_name": "model-a", "epochs": 1, "train_limit": 10},
    "space": {"learning_rate": {"type": "float", "low": 0.001, "high": 0.01}},
    "max_trials": 1,
    "parallelism": 1,
}


def _sweep_of(session_factory, owner: int, job_id: uuid.UUID) -> str:
    """A running search of `owner` with one complete trial (the succeeded job)."""
    from optuna.distributions import FloatDistribution, distribution_to_json

    from app.models import Sweep, SweepTrial
    from app.sweeps.schemas import SearchCreate

    spec = SearchCreate.model_validate(SWEEP_BODY).model_dump(mode="json")
    sweep_id = uuid.uuid4()
    with session_factory() as session:
        session.add(Sweep(id=sweep_id, kind="search", status="running", spec=spec, max_trials=2,
                          parallelism=1, owner_id=owner, created_at=datetime.now(UTC)))  # fmt: skip
        session.add(
            SweepTrial(sweep_id=sweep_id, number=0, job_id=job_id, params={"learning_rate": 0.005},
                       distributions={"learning_rate": distribution_to_json(FloatDistribution(0.001, 0.01))},
                       system_attrs={}, state="complete", value=0.5, value_epoch=2, created_at=datetime.now(UTC))
        )  # fmt: skip
        session.commit()
    return str(sweep_id)


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # "{job}", "{queued}", "{key_id}" are filled from the world
    scopes: tuple[str, ...]  # any of these is enough; () = open
    ok: int
    owned: bool = False  # another key's job or model answers 403
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def url(self, world: World) -> str:
        return self.path.format(
            job=world.job, queued=world.queued, key_id=world.revocable, sweep=world.extra["sweep"]
        )


INSTANCES = {"json": {"model": "model-a", "instances": [PIXELS.tolist()]}}
ROUTES = [
    Route("GET", "/health", (), 200),
    Route("GET", "/ready", (), 200),
    Route("GET", "/nets", ("read",), 200),
    Route("GET", "/summary/{net}".replace("{net}", "net1"), ("read",), 200),
    Route("POST", "/jobs", ("train",), 202, owned=True, kwargs={"json": {"net": "net1", "model_name": "model-a", "epochs": 1, "train_limit": 10}}),
    Route("GET", "/jobs", ("read", "train"), 200),
    Route("GET", "/jobs/{job}", ("read", "train"), 200, owned=True),
    Route("GET", "/jobs/{job}/history", ("read", "train"), 200, owned=True),
    Route("GET", "/jobs/{job}/history.png", ("read", "train"), 200, owned=True),
    Route("GET", "/jobs/{job}/evaluation", ("read", "train"), 200, owned=True),
    Route("POST", "/jobs/{queued}/cancel", ("train",), 200, owned=True),
    Route("GET", "/models", ("read",), 200),
    Route("GET", "/models/model-a", ("read",), 200),
    Route("PUT", "/models/model-a/aliases/production", ("train",), 200, owned=True, kwargs={"json": {"version": 1}}),
    Route("GET", "/models/model-a/versions/1/artifact", ("read",), 200),
    Route("GET", "/models/model-a/1/download", ("read",), 200),
    Route("POST", "/predict", ("predict",), 200, kwargs=INSTANCES),
    Route("POST", "/predict/image", ("predict",), 200, kwargs={"data": {"model": "model-a"}, "files": {"file": ("x.png", png_bytes(), "image/png")}}),
    Route("GET", "/jobs/{job}/events", ("read", "train"), 200, owned=True),
    Route("GET", "/compare?jobs={job}", ("read",), 200),
    Route("GET", "/compare.png?jobs={job}", ("read",), 200),
    Route("GET", "/report?jobs={job}", ("read",), 200),
    Route("POST", "/sweeps", ("train",), 201, owned=True, kwargs={"json": SWEEP_BODY}),
    Route("GET", "/sweeps", ("read", "train"), 200),
    Route("GET", "/sweeps/{sweep}", ("read", "train"), 200, owned=True),
    Route("GET", "/sweeps/{sweep}.png", ("read", "train"), 200, owned=True),
    Route("POST", "/sweeps/{sweep}/cancel", ("train",), 200, owned=True),
    Route("GET", "/metrics", ("read",), 200),
    Route("GET", "/workers", ("read",), 200),
    Route("GET", "/keys", ("admin",), 200),
    Route("POST", "/keys", ("admin",), 201, kwargs={"json": {"name": "new-key", "scopes": ["read"]}}),
    Route("DELETE", "/keys/{key_id}", ("admin",), 200),
]  # fmt: skip
# The OpenAPI document and its viewer stay open (docs/security.md): they hold no data.
OPEN_DOCS = {("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"), ("GET", "/redoc")}  # fmt: skip
# The key holding each scope in the world, owner of the job and model for "train".
HOLDER = {"read": "read", "predict": "predict", "train": "train_a", "admin": "admin"}


def _template(path: str) -> str:
    pairs = (("{job}", "{job_id}"), ("{queued}", "{job_id}"), ("{key_id}", "{key_id}"), ("{sweep}", "{sweep_id}"))  # fmt: skip
    for real, name in pairs:
        path = path.replace(real, name)
    path = path.split("?")[0]
    return (
        path.replace("/summary/net1", "/summary/{net}")
        .replace("/models/model-a", "/models/{name}")
        .replace("/aliases/production", "/aliases/{alias}")
        .replace("/versions/1/", "/versions/{version}/")
        .replace("/1/download", "/{version}/download")
    )


def test_every_route_has_an_access_row(client):
    served = {
        (method, path)
        for path, operations in client.get("/openapi.json").json()["paths"].items()
        for method in operations
    }
    served = {(method.upper(), path) for method, path in served}
    rows = {(route.method, _template(route.path)) for route in ROUTES}
    assert served == rows, f"routes without an access row: {sorted(served - rows)}"


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_access(route: Route, world: World, client, expect_error):
    url = route.url(world)

    def call(key: str | None) -> Any:
        return client.request(route.method, url, headers=bearer(key), **route.kwargs)

    if not route.scopes:
        assert call(None).status_code == route.ok
        return
    error = expect_error(call(None), 401, "unauthorized")
    assert "API key" in error["message"]
    expect_error(call("cnn_" + "0" * 43), 401, "unauthorized")

    lacking = [k for s, k in HOLDER.items() if s not in route.scopes and s != "admin"]
    for holder in lacking:
        expect_error(call(world.keys[holder]), 403, "forbidden")

    if route.owned:
        # Another train key: not its job, not its model name.
        expect_error(call(world.keys["train_b"]), 403, "forbidden")
        if route.method == "GET":
            # A key with `read` sees every job.
            assert call(world.keys["read_train_b"]).status_code == route.ok

    holder = HOLDER[route.scopes[-1]]
    response = call(world.keys[holder])
    assert response.status_code == route.ok, response.text


def test_a_train_key_lists_only_its_own_jobs(world, client):
    listed = client.get("/jobs", headers=bearer(world.keys["train_b"])).json()
    assert listed["total"] == 0 and listed["jobs"] == []
    mine = client.get("/jobs", headers=bearer(world.keys["train_a"])).json()
    assert {job["id"] for job in mine["jobs"]} == {world.job, world.queued}
    assert client.get("/jobs", headers=bearer(world.keys["read"])).json()["total"] == 2


def test_admin_may_act_on_any_job_and_model(world, client):
    admin = bearer(world.keys["admin"])
    assert client.post(f"/jobs/{world.queued}/cancel", headers=admin).status_code == 200
    moved = client.put("/models/model-a/aliases/prod", json={"version": 1}, headers=admin)
    assert moved.status_code == 200, moved.text


def test_the_poisoning_of_the_issue_is_refused(client, api_key, register_model, expect_error):
    """An existing model name cannot be taken over by another key's one-epoch job."""
    register_model("net1")  # written outside the API: administrators own it
    intruder = api_key("train")
    body = {"net": "net1", "model_name": "net1", "epochs": 1, "train_limit": 10}
    expect_error(client.post("/jobs", json=body, headers=bearer(intruder)), 403, "forbidden")
    # The default model_name is the net's name: the same refusal.
    body.pop("model_name")
    expect_error(client.post("/jobs", json=body, headers=bearer(intruder)), 403, "forbidden")
    expect_error(
        client.put(
            "/models/net1/aliases/production", json={"version": 1}, headers=bearer(intruder)
        ),
        403,
        "forbidden",
    )
    # A new name is the first submitter's; a second key cannot use it afterwards.
    body["model_name"] = f"mine-{uuid.uuid4().hex[:6]}"
    assert client.post("/jobs", json=body, headers=bearer(intruder)).status_code == 202
    expect_error(
        client.post("/jobs", json=body, headers=bearer(api_key("train"))), 403, "forbidden"
    )
