"""The prediction service of one API process: resolve, decode, batch, answer.

One `PredictionService` per app (created by create_app, started and stopped by its
lifespan). It holds the in-memory registry view, the model cache, one micro-batcher per
loaded model version, and a small thread pool of its own for the blocking steps (database
reads on a cache miss, model loads, large bodies, PNG/JPEG decoding). Nothing of /predict
runs on the server's shared thread pool, so /health, jobs and history keep answering while
/predict is saturated; and at most `PREDICT_MAX_PENDING` requests are admitted at once
(503 `overloaded` with Retry-After past it), so a flood waits in the clients, not in memory.

Order of work for one request: parse the options and check the structure (cheap), resolve
the model in memory, decode images (the expensive part, only for a model that exists),
make sure the model is loaded, then the batched forward pass. Small bodies are handled on
the event loop itself (a thread hop costs more than parsing one image); anything large, and
any PNG/JPEG that asks for a resize, goes to the pool.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.errors import (
    InputError,
    ModelArtifactError,
    ModelIntegrityError,
    ModelUnavailable,
    Overloaded,
)
from app.metrics import cache_hit, cache_load, counting_batches, note_predict
from app.ml.inference import ModelCache, Predictor
from app.ml.nets import CLASS_NAMES
from app.schemas import PredictOptions
from app.serving import inputs
from app.serving.admission import Admission, BodyBudget
from app.serving.batching import MicroBatcher
from app.serving.resolver import RegistryView, ServedVersion

log = logging.getLogger(__name__)
T = TypeVar("T")

# Bodies up to this size are parsed on the event loop (one image is ~10 KB of JSON).
INLINE_BYTES = 64 * 1024
# A request alone in this process with at most this many images runs its pass inline.
INLINE_ROWS = 4
_CLASSES = list(CLASS_NAMES)
# The young generation's threshold while serving (see tune_gc_for_serving).
GC_THRESHOLD_0 = 20_000


class PredictionService:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.registry = RegistryView(sessions)
        self.cache = ModelCache(
            settings.MODEL_CACHE_SIZE, artifact_dir=settings.artifact_dir, loader=self._load
        )
        self.executor = ThreadPoolExecutor(
            max_workers=settings.PREDICT_THREADS, thread_name_prefix="predict"
        )
        self._batchers: dict[tuple[str, int, str], MicroBatcher] = {}
        # Bodies admitted before they are read (app/serving/admission.py, app/api/predict.py).
        self.bodies = BodyBudget(
            settings.PREDICT_INFLIGHT_BYTES_PER_KEY, settings.PREDICT_INFLIGHT_BYTES
        )
        self._pending = 0
        self._slots: asyncio.Semaphore | None = None
        self._poller: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        tune_gc_for_serving()
        self._poller = asyncio.create_task(self._poll_registry())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass
        for batcher in list(self._batchers.values()):
            batcher.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _poll_registry(self) -> None:
        """Notice registry changes made by other processes within REGISTRY_POLL_S."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.REGISTRY_POLL_S)
            try:
                await loop.run_in_executor(self.executor, self.registry.check)
            except Exception as exc:  # the database may be down for a moment: try again later
                log.warning("registry check failed: %s", exc)

    # ------------------------------------------------------------------ entry points
    async def predict_json(self, body: bytes) -> bytes:
        """A JSON /predict body -> the JSON answer (bytes)."""
        async with self._admitted():
            max_n = self.settings.PREDICT_MAX_INSTANCES
            if len(body) <= INLINE_BYTES:
                parsed = inputs.parse_json_body(body, max_n)
            else:
                parsed = await self._off_loop(inputs.parse_json_body, body, max_n)
            return await self._serve(parsed)

    def raw_shape(self, shape: str | None, length: int | None) -> tuple[int, ...]:
        """Check an octet-stream request's shape against its length before reading it."""
        return inputs.raw_shape(shape, length, self.settings.PREDICT_MAX_INSTANCES)

    async def predict_raw(
        self, body: bytes, shape: tuple[int, ...], fields: dict[str, Any]
    ) -> bytes:
        async with self._admitted():
            return await self._serve(inputs.parse_raw_body(body, shape, fields))

    async def predict_upload(self, data: bytes, fields: dict[str, Any]) -> bytes:
        async with self._admitted():
            return await self._serve(
                inputs.PredictInput(inputs.options(fields, form=True), upload=data)
            )

    # ------------------------------------------------------------------ the steps
    async def _serve(self, parsed: inputs.PredictInput) -> bytes:
        opts = parsed.options
        row = await self._resolve(opts)
        note_predict(
            model=row.name,
            input_form="b64" if parsed.images is not None else None,
        )
        batch = parsed.batch
        if batch is None:
            # A pass of this model may wait (up to the window) for rows being decoded now.
            waiting = self._batchers.get((row.name, row.version, row.sha256))
            if waiting is not None:
                waiting.expect()
            try:
                batch = await self._decode(parsed)
            except BaseException:
                if waiting is not None:
                    waiting.unexpect()
                raise
            try:
                predictor = await self._predictor(row)
                batcher = self._batcher(predictor, row)
            except BaseException:
                if waiting is not None:
                    waiting.unexpect()
                raise
            if waiting is not None and waiting is not batcher:
                waiting.unexpect()
            expected = waiting is batcher
        else:
            predictor = await self._predictor(row)
            batcher = self._batcher(predictor, row)
            expected = False
        probs = None
        if self._pending == 1 and len(batch) <= INLINE_ROWS and not expected:
            # Let every other request that is ready in this loop iteration reach this point
            # first; if none did, this one is alone: no batch to form, so skip the hand-off.
            await asyncio.sleep(0)
            if self._pending == 1:
                probs = batcher.run_inline(batch)
        if probs is None:
            probs = await batcher.submit(batch, expected=expected)
        return render(row, probs, opts)

    async def _resolve(self, opts: PredictOptions) -> ServedVersion:
        hit = self.registry.lookup(opts.model, opts.version, opts.alias)
        if hit is not None:
            return hit
        return await self._off_loop(self.registry.resolve, opts.model, opts.version, opts.alias)

    async def _decode(self, parsed: inputs.PredictInput) -> np.ndarray:
        opts = parsed.options
        budget = self.settings.PREDICT_RESIZE_MAX_PIXELS
        if parsed.upload is not None:
            args: tuple[Any, ...] = (parsed.upload, opts.resize, budget)
            fn: Callable[..., np.ndarray] = inputs.decode_upload
            size = len(parsed.upload)
        else:
            images = parsed.images or []
            args, fn = (images, opts.resize, budget), inputs.decode_images
            size = sum(len(s) for s in images)
        if size <= INLINE_BYTES and not opts.resize:
            return fn(*args)
        return await self._off_loop(fn, *args)

    async def _predictor(self, row: ServedVersion) -> Predictor:
        hit = self.cache.peek(row)
        if hit is not None:
            cache_hit(row.name)
            return hit
        try:
            return await self._off_loop(self.cache.get, row)
        except ModelArtifactError as exc:
            log.error("cannot serve %s v%s: %s", row.name, row.version, exc)
            problem = (
                "its artifact does not match the registered sha256"
                if isinstance(exc, ModelIntegrityError)
                else "its artifact is missing or cannot be loaded"
            )
            raise ModelUnavailable(
                f"model {row.name!r} version {row.version} cannot be served: {problem}"
            ) from None

    def _batcher(self, predictor: Predictor, row: ServedVersion) -> MicroBatcher:
        key = (row.name, row.version, row.sha256)
        batcher = self._batchers.get(key)
        if batcher is None:
            batcher = MicroBatcher(
                counting_batches(predictor.predict),
                max_batch=self.settings.PREDICT_MAX_BATCH,
                window_s=self.settings.PREDICT_BATCH_WINDOW_US / 1e6,
                name=f"{row.name}-v{row.version}",
            )
            self._batchers[key] = batcher
            # Models evicted from the cache take their batcher with them.
            loaded = set(self.cache.keys())
            for old in [k for k in self._batchers if k not in loaded and k != key]:
                self._batchers.pop(old).close()
        return batcher

    def _load(self, row: Any, path: Path) -> Predictor:
        predictor = Predictor.from_path(path, row.sha256, name=row.name, version=row.version)
        cache_load(row.name)
        # The model and its traced function are long-lived: take them out of the GC's walks.
        tune_gc_for_serving()
        return predictor

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ------------------------------------------------------------------ admission
    def admit(self, caller: str, declared: int | None) -> Admission:
        """A /predict body's admission, before a byte of it is read: refused at once when
        PREDICT_MAX_PENDING predictions are in progress already (503), or when its bytes do
        not fit the caller's or the process's budget (BodyBudget). A context manager: the
        bytes come back at its end."""
        self._check_pending()
        return self.bodies.admit(caller, declared)

    def _check_pending(self) -> None:
        if self._pending >= self.settings.PREDICT_MAX_PENDING:
            raise Overloaded(
                f"more than {self.settings.PREDICT_MAX_PENDING} predictions are in progress; "
                "retry in a moment"
            )

    @asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        """At most PREDICT_MAX_PENDING requests admitted (503 past it), of which at most
        PREDICT_CONCURRENCY are worked on at once; the others wait without costing the
        event loop anything, so that other routes' steps are not queued behind them."""
        self._check_pending()
        self._pending += 1
        try:
            if self._slots is None:
                self._slots = asyncio.Semaphore(self.settings.PREDICT_CONCURRENCY)
            async with self._slots:
                yield
        finally:
            self._pending -= 1


def tune_gc_for_serving() -> None:
    """Keep the cyclic collector cheap without ever turning it off.

    A 64-image JSON body is ~65,000 new lists; with the default thresholds every few hundred
    allocations trigger a collection, and the older generations hold TensorFlow's ~300,000
    long-lived objects, which made the parse ~500 ms instead of ~60 ms. Instead of pausing
    the collector (a counted pause can stay off while request streams overlap), move what
    is alive now (the framework, loaded and warmed-up models) into the permanent generation
    with gc.freeze(), so collections never walk it again, and raise the young-generation
    threshold so a large parse triggers a handful of collections, not hundreds. Called at
    start-up and again after each model load; the collector stays enabled throughout.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD_0, 20, 20)


def render(row: ServedVersion, probs: np.ndarray, opts: PredictOptions) -> bytes:
    """The answer in the requested form (see app.schemas.PredictResponse)."""
    out: dict[str, Any] = {"model": {"name": row.name, "version": row.version}, "classes": _CLASSES}
    k = opts.top_k
    if opts.output == "probabilities":
        if k is None:
            out["probabilities"] = probs.tolist()
        else:
            order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            out["probabilities"] = np.take_along_axis(probs, order, axis=1).tolist()
            out["class_ids"] = order.tolist()
        return orjson.dumps(out)
    ids = probs.argmax(axis=1).tolist()
    if k is None:
        out["predictions"] = [
            {"probabilities": row_, "class_id": i, "class_name": _CLASSES[i]}
            for row_, i in zip(probs.tolist(), ids, strict=True)
        ]
    else:
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(probs, order, axis=1).tolist()
        out["predictions"] = [
            {
                "class_id": i,
                "class_name": _CLASSES[i],
                "top_k": [
                    {"class_id": c, "class_name": _CLASSES[c], "probability": p}
                    for c, p in zip(cs, ps, strict=True)
                ],
            }
            for i, cs, ps in zip(ids, order.tolist(), top, strict=True)
        ]
    return orjson.dumps(out)


__all__ = ["InputError", "ModelUnavailable", "Overloaded", "PredictionService", "render"]
