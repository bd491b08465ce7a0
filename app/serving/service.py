"""The prediction service of one API process: resolve, decode, batch, answer.

One `PredictionService` per app (created by create_app, started and stopped by its
lifespan). It holds the in-memory registry view, the model cache, one micro-batcher per
loaded model version, and a small thread pool of its own for the blocking steps (database
reads on a cache miss, model loads, large bodies, PNG/JPEG decoding). It also keeps the
registry view up to date (`refresh`: a moved alias is served only once its new version is
loaded and warm, and keeps its old version if the new one cannot load), loads the models of
PREDICT_PRELOAD at start, and says what it holds and whether it is ready (`readiness`, for
GET /ready). Nothing of /predict
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
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.errors import (
    ArtifactMissing,
    DomainError,
    InputError,
    ModelArtifactError,
    ModelIntegrityError,
    ModelUnavailable,
    Overloaded,
    public_message,
)
from app.metrics import cache_hit, cache_load, counting_batches, note_predict
from app.ml.inference import ModelCache, Predictor
from app.ml.nets import CLASS_NAMES
from app.quotas import charge_admitted
from app.registry.store import open_store
from app.schemas import ALIAS_PATTERN, MODEL_NAME_PATTERN, PredictOptions
from app.serving import inputs
from app.serving.admission import Admission, BodyBudget
from app.serving.batching import MicroBatcher
from app.serving.resolver import LATEST, RegistryView, ServedVersion

log = logging.getLogger(__name__)
T = TypeVar("T")

# Bodies up to this size are parsed on the event loop (one image is ~10 KB of JSON).
INLINE_BYTES = 64 * 1024
# A request alone in this process with at most this many images runs its pass inline.
INLINE_ROWS = 4
_CLASSES = list(CLASS_NAMES)
# The young generation's threshold while serving (see tune_gc_for_serving).
GC_THRESHOLD_0 = 20_000
# A failed preload, or a moved alias whose new version failed to load, is tried again this often.
RETRY_S = 30.0


@dataclass(frozen=True)
class Preload:
    """One entry of PREDICT_PRELOAD: `name`, `name@alias` or `name:version`."""

    text: str
    name: str
    version: int | None = None
    alias: str | None = None


def parse_preload(value: str, limit: int) -> list[Preload]:
    """PREDICT_PRELOAD -> its entries; ValueError naming a bad one (the app does not start)."""
    found = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        name, at, alias = part.partition("@")
        name, colon, number = name.partition(":")
        ok = re.fullmatch(MODEL_NAME_PATTERN, name) is not None
        if at:
            ok = ok and not colon and re.fullmatch(ALIAS_PATTERN, alias) is not None
        if colon:
            ok = ok and number.isdigit() and 1 <= int(number) <= 2**31 - 1
        if not ok:
            raise ValueError(
                f"PREDICT_PRELOAD: {part[:80]!r} is not `name`, `name@alias` or `name:version`"
            )
        found.append(Preload(part, name, int(number) if colon else None, alias if at else None))
    if len(found) > limit:
        raise ValueError(
            f"PREDICT_PRELOAD names {len(found)} models but MODEL_CACHE_SIZE={limit} holds fewer"
        )
    return found


@dataclass
class Readiness:
    """GET /ready's figures for this process."""

    ready: bool
    replica: str
    pushed: bool
    models: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class PredictionService:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.registry = RegistryView(sessions)
        self.store = open_store(settings)
        self.cache = ModelCache(settings.MODEL_CACHE_SIZE, locate=self._locate, loader=self._load)
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
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.preloads = parse_preload(settings.PREDICT_PRELOAD, settings.MODEL_CACHE_SIZE)
        # What keeps this process from being ready or serving a label's registered target.
        self.preload_problems: dict[str, str] = {}
        self.swap_problems: dict[tuple[str, str | None], str] = {}
        self.loading: set[tuple[str, int]] = set()  # versions being loaded and warmed now
        self.pushed: Callable[[], bool] = lambda: False  # whether changes are pushed here
        # Refreshes and preloads load models: on a thread of their own, one at a time, never
        # holding up /predict's pool.
        self._refresher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refresh")
        self._refreshing = threading.Lock()  # the route's refresh (alias_moved) waits its turn
        self._dirty: set[str] = set()
        self._dirty_lock = threading.Lock()
        self._preloader: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        tune_gc_for_serving()
        self._poller = asyncio.create_task(self._poll_registry())
        if self.preloads:
            self._preloader = asyncio.create_task(self._in_refresher(self.preload))

    async def stop(self) -> None:
        for task in (self._poller, self._preloader):
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        for batcher in list(self._batchers.values()):
            batcher.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._refresher.shutdown(wait=False, cancel_futures=True)

    async def _poll_registry(self) -> None:
        """The safety net of the pushed changes: notice registry changes made by other
        processes within REGISTRY_POLL_S, and retry failed loads every RETRY_S."""
        loop = asyncio.get_running_loop()
        retried = time.monotonic()
        while True:
            await asyncio.sleep(self.settings.REGISTRY_POLL_S)
            try:
                if await loop.run_in_executor(self.executor, self.registry.check):
                    self.changed()
                if time.monotonic() - retried > RETRY_S:
                    retried = time.monotonic()
                    for name, _ in list(self.swap_problems):
                        self.changed(name)
                    if self.preload_problems:
                        await self._in_refresher(self.preload)
            except Exception as exc:  # the database may be down for a moment: try again later
                log.warning("registry check failed: %s", exc)

    # ------------------------------------------------------------------ registry changes
    def changed(self, name: str | None = None) -> None:
        """A version or alias of `name` (None: of any name) changed somewhere: refresh it on
        the refresh thread, once however often it is told before the refresh starts."""
        names = [name] if name is not None else self.registry.names()
        for item in names:
            with self._dirty_lock:
                if item in self._dirty:
                    continue
                self._dirty.add(item)
            try:
                self._refresher.submit(self._refresh_dirty, item)
            except RuntimeError:  # the pool is shut down: the app is stopping
                return

    def _refresh_dirty(self, name: str) -> None:
        with self._dirty_lock:
            self._dirty.discard(name)
        try:
            self.refresh(name)
        except Exception as exc:  # the poll tries again
            log.warning("refreshing model %r failed: %s", name, exc)

    def alias_moved(self, name: str) -> None:
        """An alias of `name` moved through this process (called by the route, on its thread,
        after the commit): refresh now, so the very next request serves the new target, warm."""
        self.refresh(name)

    def refresh(self, name: str) -> None:
        """Bring `name` up to date with the registry (blocking: loads run here).

        A label (an alias, or the latest) whose target changed, and whose old target is
        loaded here, keeps serving the old version until the new one is loaded and warmed;
        if that fails, it keeps the old version and `readiness` says why. A label whose old
        target was not loaded here switches at once (its next request loads it, as always).
        """
        with self._refreshing:
            served = self.registry.served(name)
            if served is None:
                return  # never resolved here: its first request reads it
            fresh = self.registry.read(name)
            if fresh is None:
                self.registry.forget(name)
                self._clear_problems(name)
                return
            held = {version for held_name, version, _ in self.cache.keys() if held_name == name}
            cold = {
                label: (served[label], version)
                for label, version in fresh.targets().items()
                if served.get(label) not in (None, version)
                and served[label] in held
                and version not in held
            }
            for label, (old, _) in cold.items():
                self.registry.pin(name, label, old)
            for _, label in self.registry.pins(name):
                if label not in cold:
                    self.registry.unpin(name, label)
                    self.swap_problems.pop((name, label), None)
            self.registry.store(name, fresh)
            for version in sorted({new for _, new in cold.values()}):
                labels = [label for label, (_, new) in cold.items() if new == version]
                try:
                    self.cache.get(fresh.versions[version])
                except Exception as exc:
                    self._swap_failed(name, labels, version, cold, exc)
                    continue
                for label in labels:
                    self.registry.unpin(name, label)
                    self.swap_problems.pop((name, label), None)
                    log.info(
                        "%s now serves version %d (loaded and warm)", _label(name, label), version
                    )

    def _swap_failed(
        self,
        name: str,
        labels: list[str | None],
        version: int,
        cold: dict[str | None, tuple[int, int]],
        exc: Exception,
    ) -> None:
        reason = unservable(exc)
        for label in labels:
            old = cold[label][0]
            self.swap_problems[(name, label)] = (
                f"{_label(name, label)} points at version {version}, which failed to load "
                f"({reason}); version {old} keeps serving"
            )
        log.error(
            "model %r version %d failed to load; the old version keeps serving: %s",
            name,
            version,
            exc,
        )

    def _clear_problems(self, name: str) -> None:
        for key in [k for k in self.swap_problems if k[0] == name]:
            self.swap_problems.pop(key, None)

    def preload(self) -> None:
        """Load and warm PREDICT_PRELOAD (blocking); what fails is kept for `readiness`."""
        for item in self.preloads:
            try:
                self.cache.get(self.registry.resolve(item.name, item.version, item.alias))
            except Exception as exc:
                self.preload_problems[item.text] = f"preload {item.text}: {unservable(exc)}"
                log.error("PREDICT_PRELOAD %s failed: %s", item.text, exc)
            else:
                self.preload_problems.pop(item.text, None)

    # ------------------------------------------------------------------ readiness
    def readiness(self) -> Readiness:
        """What this process holds, whether each is warm, and whether it is ready: every
        PREDICT_PRELOAD entry warm (as its label resolves now) and the database answering
        (keys not seen lately are checked there). Blocking (one query)."""
        problems = list(self.preload_problems.values())
        labels: dict[tuple[str, int], list[str]] = {}
        for name in self.registry.names():
            for label, version in (self.registry.served(name) or {}).items():
                labels.setdefault((name, version), []).append(label or "latest")
        models = [
            {"name": n, "version": v, "warm": True, "serves": sorted(labels.get((n, v), []))}
            for n, v, _ in self.cache.keys()
        ]
        models += [
            {"name": n, "version": v, "warm": False, "serves": sorted(labels.get((n, v), []))}
            for n, v in sorted(self.loading)
        ]
        for item in self.preloads:
            if item.text in self.preload_problems:
                continue
            row = self.registry.lookup(item.name, item.version, item.alias)
            if row is None or self.cache.peek(row) is None:
                problems.append(f"preload {item.text}: not loaded yet")
        try:
            with self.sessions() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:
            problems.append(f"the database does not answer ({type(exc).__name__})")
        ready = not problems
        problems += list(self.swap_problems.values())
        return Readiness(ready, self.replica, self.pushed(), models, problems)

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
        await charge_admitted(parsed.rows)  # the /predict limits count images (app/quotas.py)
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
            raise ModelUnavailable(
                f"model {row.name!r} version {row.version} cannot be served: {unservable(exc)}"
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

    def _locate(self, row: Any) -> Path:
        """The version's local file, from the artifact store (copied into this process's
        cache and checked against the registered sha256 when the store is remote)."""
        try:
            return self.store.fetch_model(row.artifact_path, row.sha256)
        except ArtifactMissing as exc:
            raise ModelArtifactError(str(exc)) from exc
        except OSError as exc:  # the store is unreachable: the same answer, 503, for now
            raise ModelArtifactError(f"the artifact store failed: {exc.strerror}") from exc

    def _load(self, row: Any, path: Path) -> Predictor:
        self.loading.add((row.name, row.version))
        try:
            predictor = Predictor.from_path(path, row.sha256, name=row.name, version=row.version)
        finally:
            self.loading.discard((row.name, row.version))
        cache_load(row.name)
        # The model and its traced function are long-lived: take them out of the GC's walks.
        tune_gc_for_serving()
        return predictor

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _in_refresher(self, fn: Callable[[], None]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._refresher, fn)

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


def unservable(exc: Exception) -> str:
    """Why a model could not be loaded, in words fit for any caller (the log has the rest:
    artifact errors name absolute paths)."""
    if isinstance(exc, ModelIntegrityError):
        return "its artifact does not match the registered sha256"
    if isinstance(exc, ModelArtifactError):
        return "its artifact is missing or cannot be loaded"
    if isinstance(exc, DomainError):
        return public_message(exc.message)
    return f"{type(exc).__name__} (the log has the details)"


def _label(name: str, label: str | None) -> str:
    return f"{name}@{label}" if label is not LATEST else f"{name} (latest)"


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
