"""Micro-batching: concurrent requests for one model version share one forward pass.

One `MicroBatcher` per served model version (TF Serving's batching, Triton's dynamic
batcher). Requests put their rows on its queue from the event loop and await a future; one
thread per batcher takes everything queued (up to `max_batch` rows), runs one forward pass,
and hands each caller its own slice of the output.

A request that arrives alone is run at once: the thread only waits (up to `window_s`) when
more rows are known to be on their way, i.e. requests for this model that are still being
parsed or decoded (`expect()` was called and `submit()` not yet). Under load, requests that
arrive while a pass is running queue up and go together into the next one, so batching
costs a lone caller nothing and grows with the load by itself.

Requests of many images are passed whole, never split: a 64-image request is already a good
batch, splitting it would cost copies and put its rows in different passes, and the
request's rows stay one contiguous slice. A request larger than `max_batch` runs alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class _Item:
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    loop: asyncio.AbstractEventLoop


def _deliver(results: list[tuple[asyncio.Future[np.ndarray], np.ndarray | BaseException]]) -> None:
    for future, value in results:
        if future.done():  # the caller went away (cancelled)
            continue
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)


class MicroBatcher:
    """Group concurrent calls of `forward` (float32 (N, ...) -> (N, k)) into batches."""

    def __init__(
        self,
        forward: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int = 64,
        window_s: float = 0.001,
        name: str = "model",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1. Received: max_batch={max_batch}")
        self.forward = forward
        self.max_batch = max_batch
        self.window_s = window_s
        self.name = name
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._expected = 0
        self._busy = False  # a pass is running (in the thread, or inline)
        self._closed = False
        self._thread: threading.Thread | None = None
        # Counters for tests and the benchmark: passes run, rows run, largest pass.
        self.passes = 0
        self.rows = 0
        self.largest = 0

    # -------------------------------------------------------------- event-loop side
    def expect(self) -> None:
        """A request for this model is being parsed: a pass may wait (window) for it."""
        with self._cond:
            self._expected += 1

    def unexpect(self) -> None:
        """That request will not come after all (it failed before submit)."""
        with self._cond:
            self._expected = max(0, self._expected - 1)
            self._cond.notify()

    async def submit(self, rows: np.ndarray, *, expected: bool = False) -> np.ndarray:
        """Queue `rows` and wait for their outputs (the same number of rows, same order)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError(f"the batcher of {self.name} is closed")
            if expected:
                self._expected = max(0, self._expected - 1)
            self._queue.append(_Item(rows, future, loop))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"batcher-{self.name}", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return await future

    def run_inline(self, rows: np.ndarray) -> np.ndarray | None:
        """Run `rows` now in the calling thread if nothing is queued or running, else None.

        For a caller that knows it is alone (no other request in flight): it saves the two
        thread hand-offs of a queued pass, which on a busy machine cost more than the pass.
        """
        with self._cond:
            if self._busy or self._queue or self._closed:
                return None
            self._busy = True
        try:
            out = self.forward(rows)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify()
        self.passes += 1
        self.rows += len(rows)
        self.largest = max(self.largest, len(rows))
        return out

    def close(self) -> None:
        """Stop the thread once the queue is empty (the model left the cache)."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    # -------------------------------------------------------------- the batching thread
    def _take(self, batch: list[_Item], rows: int) -> int:
        """Move queued items into `batch` while they fit in max_batch (at least one)."""
        while self._queue:
            n = len(self._queue[0].rows)
            if batch and rows + n > self.max_batch:
                break
            batch.append(self._queue.popleft())
            rows += n
        return rows

    def _run(self) -> None:
        while True:
            with self._cond:
                while (not self._queue or self._busy) and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return  # closed and drained
                batch: list[_Item] = []
                rows = self._take(batch, 0)
                if rows < self.max_batch and self._expected > 0 and self.window_s > 0:
                    deadline = time.perf_counter() + self.window_s
                    while rows < self.max_batch and self._expected > 0:
                        left = deadline - time.perf_counter()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                        rows = self._take(batch, rows)
                self._busy = True
            try:
                self._run_batch(batch, rows)
            finally:
                with self._cond:
                    self._busy = False

    def _run_batch(self, batch: list[_Item], rows: int) -> None:
        results: dict[
            asyncio.AbstractEventLoop,
            list[tuple[asyncio.Future[np.ndarray], np.ndarray | BaseException]],
        ] = {}
        try:
            x = batch[0].rows if len(batch) == 1 else np.concatenate([i.rows for i in batch])
            out = self.forward(x)
            start = 0
            for item in batch:
                n = len(item.rows)
                results.setdefault(item.loop, []).append((item.future, out[start : start + n]))
                start += n
        except BaseException as exc:  # every caller of this pass gets the error
            log.exception("forward pass of %s failed", self.name)
            for item in batch:
                results.setdefault(item.loop, []).append((item.future, exc))
        self.passes += 1
        self.rows += rows
        self.largest = max(self.largest, rows)
        for loop, delivered in results.items():
            try:
                loop.call_soon_threadsafe(_deliver, delivered)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass
