"""GET /ready and the swap of a moved alias (issue 18): what an API process holds, whether
each version is warm, a new target loaded and warmed before it is served, a target that
fails to load leaving the old version serving (and /ready saying why), PREDICT_PRELOAD."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from app.serving.service import parse_preload

PIXEL = [[0, 0, 0]] * 32


@pytest.fixture(scope="module")
def contents(tmp_path_factory) -> list[bytes]:
    import keras
    from keras import layers

    found = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential(
            [keras.Input((32, 32, 3)), layers.GlobalAveragePooling2D(), layers.Dense(10)]
        )
        path = Path(tmp_path_factory.mktemp("ready")) / f"m{seed}.keras"
        model.save(path)
        found.append(path.read_bytes())
    return found


def corrupt(register_model: Any, name: str, content: bytes) -> Any:
    """A version whose file does not match its registered sha256: it never loads."""
    row = register_model(name, content)
    Path(row.artifact_path).write_bytes(content + b"tampered")
    return row


def served(client: Any, **which: Any) -> int:
    answer = client.post("/predict", json={"instances": [[PIXEL] * 32], **which})
    assert answer.status_code == 200, answer.text
    return int(answer.json()["model"]["version"])


def test_ready_needs_no_key_and_lists_what_this_process_holds(client, register_model, contents):
    register_model("pair", contents[0])
    state = client.get("/ready", headers={"Authorization": ""}).json()
    assert state["status"] == "ready" and state["models"] == [] and state["problems"] == []
    assert state["pushed"] is True  # PostgreSQL: registry changes are pushed here
    assert served(client, model="pair") == 1
    state = client.get("/ready").json()
    assert state["models"] == [{"name": "pair", "version": 1, "warm": True, "serves": ["latest"]}]


def test_a_moved_alias_is_served_only_once_its_version_is_warm(client, register_model, contents):
    register_model("pair", contents[0])
    v2 = register_model("pair", contents[1])
    assert client.put("/models/pair/aliases/live", json={"version": 1}).status_code == 200
    assert served(client, model="pair", alias="live") == 1
    service = client.app.state.prediction
    assert service.cache.peek(v2) is None
    # The move returns once this process has loaded and warmed version 2...
    assert client.put("/models/pair/aliases/live", json={"version": 2}).status_code == 200
    assert service.cache.peek(v2) is not None
    assert served(client, model="pair", alias="live") == 2  # ...and serves it from then on


def test_a_target_that_fails_to_load_leaves_the_old_version_serving(
    client, register_model, contents
):
    register_model("pair", contents[0])
    corrupt(register_model, "pair", contents[1])  # version 2
    assert client.put("/models/pair/aliases/live", json={"version": 1}).status_code == 200
    assert served(client, model="pair", alias="live") == 1
    assert client.put("/models/pair/aliases/live", json={"version": 2}).status_code == 200
    for _ in range(3):
        assert served(client, model="pair", alias="live") == 1
    ready = client.get("/ready")
    assert ready.status_code == 200  # it still serves everything it serves
    (problem,) = ready.json()["problems"]
    assert "pair@live points at version 2, which failed to load" in problem
    assert (
        "does not match the registered sha256" in problem and "version 1 keeps serving" in problem
    )
    assert ".keras" not in problem  # never the artifact's path: /ready needs no key
    # A good version later: served, and the problem is gone.
    register_model("pair", contents[1])  # version 3
    assert client.put("/models/pair/aliases/live", json={"version": 3}).status_code == 200
    assert served(client, model="pair", alias="live") == 3
    assert client.get("/ready").json()["problems"] == []


def test_a_change_made_elsewhere_is_pushed_and_swapped_the_same_way(
    client, register_model, contents, session_factory
):
    from app.registry import versions

    register_model("pair", contents[0])
    assert client.put("/models/pair/aliases/live", json={"version": 1}).status_code == 200
    assert served(client, model="pair", alias="live") == 1
    assert served(client, model="pair") == 1  # the latest
    # Another process (a worker, the CLI, a replica) registers a version 2 that cannot load
    # and moves the alias to it.
    corrupt(register_model, "pair", contents[1])
    with session_factory() as session:
        versions.set_alias(session, "pair", "live", 2)
        session.commit()
    deadline = time.monotonic() + 10
    while len(client.get("/ready").json()["problems"]) < 2:
        assert time.monotonic() < deadline, "the change never reached this process"
        time.sleep(0.05)
    assert served(client, model="pair", alias="live") == 1
    assert served(client, model="pair") == 1
    problems = " ".join(client.get("/ready").json()["problems"])
    assert "pair@live points at version 2" in problems
    assert "pair (latest) points at version 2" in problems


def test_preloaded_models_are_warm_before_the_process_is_ready(
    settings, client_for, register_model, contents, expect_error
):
    register_model("pair", contents[0])
    variant = settings.model_copy(update={"PREDICT_PRELOAD": "pair, ghost@live"})
    with client_for(variant) as c:
        deadline = time.monotonic() + 60
        while True:
            answer = c.get("/ready")
            error = expect_error(answer, 503, "not_ready")
            if "not loaded yet" not in error["message"]:
                break
            assert time.monotonic() < deadline
        assert "preload ghost@live: no registered model named 'ghost'" in error["message"]
        details = error["details"]
        assert {"name": "pair", "version": 1, "warm": True, "serves": ["latest"]} in details[
            "models"
        ]
    with client_for(settings.model_copy(update={"PREDICT_PRELOAD": "pair:1"})) as c:
        deadline = time.monotonic() + 60
        while c.get("/ready").status_code != 200:
            assert time.monotonic() < deadline


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("net1@", "is not `name`"),
        ("../x", "is not `name`"),
        ("net1:0", "is not `name`"),
        ("net1:2@live", "is not `name`"),
        ("a,b,c,d,e", "MODEL_CACHE_SIZE=4"),
    ],
)
def test_preload_entries_are_checked_at_start(value, words):
    with pytest.raises(ValueError, match=words):
        parse_preload(value, limit=4)
    assert [p.name for p in parse_preload(" net1 , net2@live,net3:7 ", limit=4)] == [
        "net1",
        "net2",
        "net3",
    ]
