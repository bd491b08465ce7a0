"""MicroBatcher: concurrent calls share passes, each caller gets exactly its own rows back."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from app.serving.batching import MicroBatcher


class Forward:
    """A fake model: row i -> [sum of row i, batch size]; the first pass can be held."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.hold.wait(10)
        self.batch_sizes.append(len(x))
        sums = x.reshape(len(x), -1).sum(axis=1)
        return np.stack([sums, np.full(len(x), len(x), dtype=x.dtype)], axis=1)


def rows(seed: int, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 4, 4, 3), dtype=np.float32)


def test_a_lone_request_runs_at_once_and_alone():
    forward = Forward()
    batcher = MicroBatcher(forward, max_batch=64, window_s=10.0)  # a window it must not wait

    async def main() -> np.ndarray:
        return await batcher.submit(rows(0))

    out = asyncio.run(asyncio.wait_for(main(), 5))
    assert forward.batch_sizes == [1]
    np.testing.assert_array_equal(out[:, 0], rows(0).reshape(1, -1).sum(axis=1))
    batcher.close()


def test_concurrent_requests_share_passes_and_get_their_own_rows():
    forward = Forward()
    batcher = MicroBatcher(forward, max_batch=16, window_s=0.0)
    sizes = [1, 3, 1, 2, 5, 1, 1, 4, 1, 2]  # 21 rows: more than one max_batch

    async def main() -> list[np.ndarray]:
        forward.hold.clear()
        first = asyncio.ensure_future(batcher.submit(rows(100)))
        while not forward.entered.is_set():  # the first pass is running and held
            await asyncio.sleep(0.001)
        others = [asyncio.ensure_future(batcher.submit(rows(i, n))) for i, n in enumerate(sizes)]
        await asyncio.sleep(0.05)
        forward.hold.set()
        await first
        return list(await asyncio.gather(*others))

    outs = asyncio.run(asyncio.wait_for(main(), 10))
    for i, (n, out) in enumerate(zip(sizes, outs, strict=True)):
        assert out.shape == (n, 2)
        np.testing.assert_array_equal(out[:, 0], rows(i, n).reshape(n, -1).sum(axis=1))
    # Held behind the first pass, the ten requests went in two passes (16 rows max each).
    assert forward.batch_sizes[0] == 1
    assert len(forward.batch_sizes) == 3 and sum(forward.batch_sizes) == 22
    assert max(forward.batch_sizes) <= 16
    batcher.close()


def test_a_request_larger_than_max_batch_runs_whole():
    forward = Forward()
    batcher = MicroBatcher(forward, max_batch=4, window_s=0.0)
    out = asyncio.run(batcher.submit(rows(1, 10)))
    assert forward.batch_sizes == [10] and out.shape == (10, 2)
    batcher.close()


def test_an_expected_request_is_waited_for_within_the_window():
    forward = Forward()
    batcher = MicroBatcher(forward, max_batch=64, window_s=5.0)

    async def main() -> None:
        batcher.expect()  # a second request is being decoded
        first = asyncio.ensure_future(batcher.submit(rows(0)))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(batcher.submit(rows(1), expected=True))
        await asyncio.gather(first, second)

    asyncio.run(asyncio.wait_for(main(), 10))
    assert forward.batch_sizes == [2]
    batcher.close()


def test_a_failing_pass_fails_each_of_its_callers():
    def broken(x: np.ndarray) -> np.ndarray:
        raise ValueError("boom")

    batcher = MicroBatcher(broken, max_batch=8, window_s=0.0)

    async def main() -> None:
        with pytest.raises(ValueError, match="boom"):
            await batcher.submit(rows(0))

    asyncio.run(main())
    batcher.close()


def test_run_inline_only_when_nothing_is_queued_or_running():
    forward = Forward()
    batcher = MicroBatcher(forward, max_batch=8, window_s=0.0)
    out = batcher.run_inline(rows(3, 2))
    assert out is not None and forward.batch_sizes == [2]
    np.testing.assert_array_equal(out[:, 0], rows(3, 2).reshape(2, -1).sum(axis=1))

    async def main() -> np.ndarray | None:
        forward.hold.clear()
        first = asyncio.ensure_future(batcher.submit(rows(0)))
        while not forward.entered.is_set():
            await asyncio.sleep(0.001)
        busy = batcher.run_inline(rows(1))  # a pass is running: not inline
        forward.hold.set()
        await first
        return busy

    forward.entered.clear()
    assert asyncio.run(asyncio.wait_for(main(), 10)) is None
    batcher.close()
