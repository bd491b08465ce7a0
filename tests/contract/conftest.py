"""One live API process for the contract tests (see live.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .live import LiveApi, start_live_api, stop

# Jobs stay queued (no worker runs here): the fuzzer may create as many as it likes, and is
# not rate-limited (both limits have their own tests in tests/api/test_security.py).
LIVE_SETTINGS = {"MAX_ACTIVE_JOBS_PER_KEY": 1_000_000, "PREDICT_RATE_PER_S": 0}


@pytest.fixture(scope="session")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    live, proc = start_live_api(tmp_path_factory.mktemp("live"), **LIVE_SETTINGS)
    try:
        yield live
    finally:
        stop(proc)
