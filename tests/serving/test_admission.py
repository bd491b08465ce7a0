"""BodyBudget: /predict bodies admitted before they are read (issue 18 item 1)."""

from __future__ import annotations

import pytest

from app.errors import Overloaded, RateLimited
from app.serving.admission import ALWAYS_ADMITTED, BodyBudget

MB = 1024 * 1024


def test_a_caller_past_its_budget_is_rate_limited_and_others_are_not() -> None:
    budget = BodyBudget(per_caller=16 * MB, total=64 * MB)
    held = [budget.admit("key:1", 8 * MB) for _ in range(2)]
    with pytest.raises(RateLimited) as refused:
        budget.admit("key:1", 8 * MB)
    assert refused.value.headers == {"Retry-After": "1"}
    assert "PREDICT_INFLIGHT_BYTES_PER_KEY" in refused.value.message
    other = budget.admit("key:2", 8 * MB)
    assert budget.held == 24 * MB and budget.by_caller == {"key:1": 16 * MB, "key:2": 8 * MB}
    for admission in (*held, other):
        admission.close()
    assert budget.held == 0 and budget.by_caller == {}


def test_the_process_budget_refuses_large_bodies_but_never_small_ones() -> None:
    budget = BodyBudget(per_caller=16 * MB, total=32 * MB)
    held = [budget.admit(f"key:{i}", 16 * MB) for i in range(2)]
    with pytest.raises(Overloaded) as refused:
        budget.admit("key:3", ALWAYS_ADMITTED + 1)
    assert "PREDICT_INFLIGHT_BYTES" in refused.value.message
    # A one-image body is in the server's buffer already: refusing it would save nothing.
    with budget.admit("key:3", ALWAYS_ADMITTED):
        assert budget.held == 32 * MB + ALWAYS_ADMITTED
    for admission in held:
        admission.close()
    assert budget.held == 0


def test_a_chunked_body_is_charged_as_it_arrives_and_given_back_at_the_end() -> None:
    budget = BodyBudget(per_caller=MB, total=4 * MB)
    with budget.admit("anon:10.0.0.1", None) as admission:
        assert budget.held == 0
        admission.take(MB // 2)
        admission.take(MB // 2)
        with pytest.raises(RateLimited):
            admission.take(1)  # the caller's budget is full: the body is refused mid-way
        assert admission.held == MB
    assert budget.held == 0 and budget.by_caller == {}
