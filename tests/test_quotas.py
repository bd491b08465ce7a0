"""app/quotas.py's /predict limits: the rules (`settle`), the two shared stores running them
alike, and one process's PredictLimiter (lone keys admitted without asking, charges sent
later, contention decided by the store, an unreachable store failing open)."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from app.errors import RateLimited
from app.quotas import (
    ADMIT,
    CHARGE,
    DatabaseCounters,
    Outcome,
    PredictLimiter,
    RedisCounters,
    Rules,
    charge_admitted,
    counter_engine,
    settle,
)

REDIS = "redis://127.0.0.1:6379/11"
FAIR = Rules(rate=0.0, burst=256, fair=True, window_s=2.0, capacity=100.0)


def admit(rules: Rules, now: float, buckets: dict, active: int, who: str) -> float:
    return settle(rules, now, buckets, active, [(ADMIT, who, 1)])[0].wait


# ----------------------------------------------------------------------------- the rules
def test_a_key_alone_is_never_limited_by_the_share():
    buckets: dict = {}
    for step in range(200):  # 200 requests of 256 images in 2 s: 25,600 images/s
        now = step * 0.01
        assert admit(FAIR, now, buckets, 1, "a") == 0
        settle(FAIR, now, buckets, 1, [(CHARGE, "a", 255)])


def test_under_contention_the_429s_fall_on_the_key_above_its_share():
    buckets: dict = {}
    # Two active keys share the capacity (100 images/s): 50 each, a bucket of one second.
    assert admit(FAIR, 0.0, buckets, 2, "heavy") == 0
    settle(FAIR, 0.0, buckets, 2, [(CHARGE, "heavy", 63)])  # a 64-image request
    verdict = settle(FAIR, 0.1, buckets, 2, [(ADMIT, "heavy", 1)])[0]
    assert verdict.reason == "share"
    assert verdict.wait == pytest.approx((1 - (50 - 64 + 0.1 * 50)) / 50)
    for step in range(40):  # the light key: 20 images/s, within its share, never refused
        assert admit(FAIR, 0.1 + step * 0.05, buckets, 2, "light") == 0
    # The heavy key is admitted again once it has repaid its debt at its share's rate.
    assert admit(FAIR, 0.1 + verdict.wait + 0.01, buckets, 2, "heavy") == 0


def test_each_of_n_active_keys_gets_an_equal_share():
    for n in (2, 4):
        buckets: dict = {}
        served = {f"k{i}": 0 for i in range(n)}
        for step in range(1000):  # every key asks for 10 images every 10 ms: 1,000 images/s
            now = step * 0.01
            for who in served:
                if admit(FAIR, now, buckets, n, who) == 0:
                    settle(FAIR, now, buckets, n, [(CHARGE, who, 9)])
                    served[who] += 10
        for count in served.values():  # 10 s at 100/n images/s each, plus a full bucket
            assert count == pytest.approx(10 * 100 / n + 100 / n, abs=10)


def test_the_hard_cap_applies_alone_and_says_so():
    rules = Rules(rate=10.0, burst=20, fair=True, window_s=2.0, capacity=100.0)
    buckets: dict = {}
    assert admit(rules, 0.0, buckets, 1, "a") == 0
    settle(rules, 0.0, buckets, 1, [(CHARGE, "a", 29)])
    verdict = settle(rules, 0.0, buckets, 1, [(ADMIT, "a", 1)])[0]
    assert verdict.reason == "rate" and verdict.wait == pytest.approx(1.1)  # 10 in debt


# ----------------------------------------------------------------------------- the stores
@pytest.fixture
def sqlite_counters(tmp_path) -> Iterator[DatabaseCounters]:
    from app.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'counters.db'}"
    upgrade(url)
    counters = DatabaseCounters(counter_engine(url), FAIR)
    yield counters
    asyncio.run(counters.close())


@pytest.fixture
def pg_counters(fresh_pg_database) -> Iterator[DatabaseCounters]:
    from app.migrate import upgrade

    url = fresh_pg_database()
    upgrade(url)
    counters = DatabaseCounters(counter_engine(url), FAIR)
    yield counters
    asyncio.run(counters.close())


def random_ops(seed: int) -> list[tuple[float, list[tuple[str, str, int]]]]:
    """Batches of admissions and charges of four callers over 6 s, some in one second."""
    rng = random.Random(seed)
    batches, now = [], 1_700_000_000.0
    for _ in range(120):
        now += rng.choice([0.0, 0.01, 0.05, 0.3])
        ops = []
        for _ in range(rng.randint(1, 4)):
            who = f"key:{rng.randint(1, 4)}"
            ops.append(
                (ADMIT, who, 1) if rng.random() < 0.6 else (CHARGE, who, rng.randint(1, 255))
            )
        batches.append((now, ops))
    return batches


def run_store(store: Any, batches: list) -> list[Outcome]:
    async def go() -> list[Outcome]:
        try:
            return [await store.apply(now, ops) for now, ops in batches]
        finally:
            if isinstance(store, RedisCounters):
                await store.close()

    return asyncio.run(go())


def test_redis_and_the_database_run_the_same_rules(sqlite_counters, pg_counters):
    """The Lua script mirrors `settle`: the same operations, the same verdicts, on Redis,
    SQLite and PostgreSQL."""
    batches = random_ops(seed=18)
    redis_store = RedisCounters(REDIS, FAIR, f"test-{uuid.uuid4().hex[:8]}")
    results = {
        "redis": run_store(redis_store, batches),
        "sqlite": run_store(sqlite_counters, batches),
        "postgresql": run_store(pg_counters, batches),
    }
    refused = 0
    for i in range(len(batches)):
        ref = results["sqlite"][i]
        refused += sum(v.wait > 0 for v in ref.verdicts)
        for name, outcomes in results.items():
            got = outcomes[i]
            assert (got.active, got.members) == (ref.active, ref.members), (name, i)
            assert [v.reason for v in got.verdicts] == [v.reason for v in ref.verdicts], (name, i)
            assert [v.wait for v in got.verdicts] == pytest.approx(
                [v.wait for v in ref.verdicts], abs=1e-6
            ), (name, i)
    assert refused > 5  # the sequence really exercises refusals


# ----------------------------------------------------------------------------- the limiter
class CountingStore:
    """A store that remembers every call (in memory: this tests one process's limiter)."""

    def __init__(self, rules: Rules, fail: bool = False) -> None:
        self.rules, self.fail = rules, fail
        self.calls: list[list[tuple[str, str, int]]] = []
        self.buckets: dict = {}
        self.seen: dict = {}

    async def apply(self, now: float, ops: list) -> Outcome:
        self.calls.append(list(ops))
        if self.fail:
            raise ConnectionError("no counters today")
        for _, who, _ in ops:
            self.seen[who] = now
        recent = sorted(w for w, t in self.seen.items() if t >= now - self.rules.window_s)
        verdicts = settle(self.rules, now, self.buckets, len(recent), ops)
        members = tuple(recent) if len(recent) == 1 else ()
        return Outcome(verdicts, len(recent), members)

    async def close(self) -> None:
        pass


def limiter_with(store: CountingStore) -> PredictLimiter:
    return PredictLimiter(store.rules, lambda: store)


def test_a_lone_key_is_admitted_without_a_call_per_request_and_charged_later():
    store = CountingStore(FAIR)

    async def go() -> None:
        limiter = limiter_with(store)
        await limiter.start()
        try:
            await limiter.admit("key:1")  # first: the process knows nothing yet, so it asks
            await charge_admitted(64)
            for _ in range(50):
                await limiter.admit("key:1")
                await charge_admitted(1)
            assert len(store.calls) == 1
            await asyncio.sleep(0.2)  # the sync sends the charges
        finally:
            await limiter.stop()

    asyncio.run(go())
    charged = sum(n for call in store.calls for kind, who, n in call if kind == CHARGE)
    assert charged == 63 + 50  # the first request's 63 more images, then one per request
    assert len(store.calls) < 10


def test_contention_is_decided_by_the_store_and_refusals_carry_retry_after():
    store = CountingStore(FAIR)

    async def go() -> tuple[int, int]:
        limiter = limiter_with(store)
        await limiter.start()
        refused = {"key:1": 0, "key:2": 0}
        try:
            for _ in range(30):
                for who, images in (("key:1", 64), ("key:2", 1)):
                    try:
                        await limiter.admit(who)
                    except RateLimited as exc:
                        refused[who] += 1
                        assert int(exc.headers["Retry-After"]) >= 1
                        assert "equal share (50 images/s)" in exc.message
                        continue
                    await charge_admitted(images)
        finally:
            await limiter.stop()
        return refused["key:1"], refused["key:2"]

    heavy, light = asyncio.run(go())
    assert heavy > 20 and light == 0


def test_an_unreachable_store_admits_and_keeps_the_charges(caplog):
    store = CountingStore(Rules(rate=1.0, burst=1, fair=True, window_s=2.0, capacity=100.0))
    store.fail = True

    async def go() -> PredictLimiter:
        limiter = limiter_with(store)
        await limiter.start()
        for _ in range(5):
            await limiter.admit("key:1")  # a hard cap of 1 image/s, but nobody can count
            await charge_admitted(3)
        await limiter.stop()
        return limiter

    limiter = asyncio.run(go())
    assert sum(limiter._pending.values()) == 5 * 3  # kept for when the counters are back
    assert "unreachable" in caplog.text


def test_nothing_is_counted_when_both_limits_are_off():
    store = CountingStore(Rules(rate=0.0, burst=1, fair=False, window_s=2.0, capacity=1.0))

    async def go() -> None:
        limiter = limiter_with(store)
        await limiter.start()
        for _ in range(10):
            await limiter.admit("key:1")
            await charge_admitted(256)
        await limiter.stop()

    asyncio.run(go())
    assert store.calls == []
