"""Issue 18 with two real API processes on one database: the /predict budget, the fair share
and key revocation hold across them, and an alias moved through one is served by both.

Two deployments: the embedded default (one SQLite file, counters in the database, changes
found by polling) and PostgreSQL with Redis (counters in Redis, changes pushed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from .fleet import PIXEL, Fleet, register, start_fleet, tiny_model

REDIS = "redis://127.0.0.1:6379/11"


@pytest.fixture(params=["sqlite", "postgresql+redis"])
def deployment(request, tmp_path, fresh_pg_database) -> Callable[..., Fleet]:
    """deployment(**settings) -> a started Fleet of two API processes (stopped afterwards)."""
    from app.config import Settings

    started: list[Fleet] = []

    def make(**overrides: Any) -> Fleet:
        base: dict[str, Any] = {"STATE_DIR": tmp_path / f"state-{len(started)}"}
        if request.param == "postgresql+redis":
            base.update(DATABASE_URL=fresh_pg_database(), CELERY_BROKER_URL=REDIS)
        fleet = start_fleet(Settings(_env_file=None, **{**base, **overrides}))
        started.append(fleet)
        return fleet

    yield make
    for fleet in started:
        fleet.stop()


def predict(url: str, key: str, images: int, model: str = "nope", **extra: Any) -> httpx.Response:
    body = {"model": model, "instances": [[PIXEL] * 32] * images, **extra}
    return httpx.post(
        f"{url}/predict", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def test_a_keys_budget_spent_across_both_replicas_gives_the_same_429s_as_on_one(deployment):
    fleet = deployment(PREDICT_RATE_PER_S=0.02, PREDICT_BURST=6)
    first, second = (r.url for r in fleet.replicas)
    sizes = [1, 3, 1, 1, 2, 1]  # images per request: 5 fit the burst, the 4th takes the last

    def statuses(key: str, urls: list[str]) -> list[int]:
        answers = [predict(urls[i % len(urls)], key, n) for i, n in enumerate(sizes)]
        for answer in answers:
            if answer.status_code == 429:
                assert "PREDICT_RATE_PER_S" in answer.json()["error"]["message"]
                assert int(answer.headers["retry-after"]) >= 1
        return [a.status_code for a in answers]

    alone = statuses(fleet.key("predict"), [first])
    spread = statuses(fleet.key("predict"), [first, second])
    assert alone == [404, 404, 404, 404, 429, 429]  # admitted (no such model) until in debt
    assert spread == alone


def test_the_fair_share_holds_across_replicas(deployment):
    fleet = deployment(PREDICT_CAPACITY_IMAGES_PER_S=200, PREDICT_FAIR_WINDOW_S=1.0)
    first, second = (r.url for r in fleet.replicas)
    heavy, light = fleet.key("predict"), fleet.key("predict")
    # The heavy key alone, on the first replica: the whole fleet is its own (3 x 64 images
    # at once is less than the 200 images/s the fleet is said to serve, so that stays it).
    assert all(predict(first, heavy, 64).status_code == 404 for _ in range(3))
    # The light key predicts on the second replica: now 2 active keys, 100 images/s each;
    # the heavy key asks for 128 images per request from three clients at once.
    refused = {"heavy": 0, "light": 0}
    deadline = time.monotonic() + 3

    def client(who: str, url: str, key: str, images: int) -> None:
        while time.monotonic() < deadline:
            answer = predict(url, key, images)
            if answer.status_code == 429:
                refused[who] += 1
                assert "2 active keys" in answer.json()["error"]["message"]
            else:
                assert answer.status_code == 404

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, "light", second, light, 1)]
        futures += [pool.submit(client, "heavy", first, heavy, 128) for _ in range(3)]
        for future in futures:
            future.result()
    assert refused["heavy"] > 0 and refused["light"] == 0
    # The light key stops: once it is no longer active, the heavy key is alone again.
    time.sleep(1.5)
    predict(first, heavy, 1)  # its debt is forgiven as soon as it is alone
    assert all(predict(first, heavy, 64).status_code == 404 for _ in range(8))


def test_a_key_revoked_through_one_replica_stops_on_both_within_auth_cache_s(deployment):
    fleet = deployment(AUTH_CACHE_S=4.0)
    # SQLite: the other replica's cached principal expires within AUTH_CACHE_S. PostgreSQL:
    # the revocation is pushed, well before that.
    pushed = fleet.settings.database_url.startswith("postgresql")
    bound = 1.5 if pushed else 4.0 + 0.5
    urls = [r.url for r in fleet.replicas]
    admin, key = fleet.key("admin"), fleet.key("predict", name="to-revoke")
    for url in urls:  # accepted and cached by both
        assert predict(url, key, 1).status_code == 404
    keys = httpx.get(f"{urls[0]}/keys", headers={"Authorization": f"Bearer {admin}"}).json()
    key_id = next(k["id"] for k in keys["keys"] if k["name"] == "to-revoke")
    revoked_at = time.monotonic()
    response = httpx.delete(
        f"{urls[0]}/keys/{key_id}", headers={"Authorization": f"Bearer {admin}"}
    )
    assert response.status_code == 200
    assert predict(urls[0], key, 1).status_code == 401  # the replica that revoked it: at once
    while predict(urls[1], key, 1).status_code != 401:
        assert time.monotonic() - revoked_at < bound, "the other replica still accepts it"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("replica-models")
    return [tiny_model(folder / f"m{seed}.keras", seed) for seed in (1, 2)]


def test_an_alias_moved_through_one_replica_is_served_by_both(deployment, two_models):
    fleet = deployment()
    urls = [r.url for r in fleet.replicas]
    for content in two_models:
        register(fleet.settings, "pair", content)
    admin = fleet.key("admin")
    auth = {"Authorization": f"Bearer {admin}"}

    def move(url: str, version: int) -> None:
        response = httpx.put(
            f"{url}/models/pair/aliases/live", json={"version": version}, headers=auth
        )
        assert response.status_code == 200, response.text

    def served(url: str) -> int:
        answer = predict(url, admin, 1, model="pair", alias="live")
        assert answer.status_code == 200, answer.text
        return int(answer.json()["model"]["version"])

    move(urls[0], 1)
    for url in urls:  # both replicas load and serve version 1 (warm from now on)
        deadline = time.monotonic() + 60
        while served(url) != 1:
            assert time.monotonic() < deadline
    lags = []
    for move_no in range(6):
        target = 2 if move_no % 2 == 0 else 1
        through, other = (urls[0], urls[1]) if move_no % 3 else (urls[1], urls[0])
        moved = time.monotonic()
        move(through, target)
        assert served(through) == target  # the replica it was moved through: at once
        while served(other) != target:
            # The bound is 2 s at p99 (bench/bench_replicas.py measures it); this
            # generous bound only catches a replica that never follows.
            assert time.monotonic() - moved < 10, f"move {move_no} never reached {other}"
            time.sleep(0.02)
        lags.append(time.monotonic() - moved)
    ready = [httpx.get(f"{url}/ready").json() for url in urls]
    for state in ready:
        assert state["status"] == "ready" and not state["problems"]
        assert {(m["name"], m["version"], m["warm"]) for m in state["models"]} >= {
            ("pair", 1, True),
            ("pair", 2, True),
        }
    assert len({state["replica"] for state in ready}) == 2
    assert max(lags) < 10
