"""The prediction core: a compiled Predictor over a loaded model, and a cache of them.

No requests in here: `app.serving` turns every input form (and `cnn predict` its image) into
a float32 batch and calls a `Predictor`; `predict_probabilities` is the one core both the
service's answers and the command's come from. Errors are ValueError for a wrong batch and
the ModelArtifactError family for a model that cannot be served; app.serving translates.
TensorFlow and Keras are imported only when a model is loaded, so importing this module (and
the API that uses it) stays cheap.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# The errors are domain errors (app.errors), re-exported here for the callers of this module.
from app.errors import ModelArtifactError as ModelArtifactError
from app.errors import ModelIntegrityError as ModelIntegrityError
from app.files import file_digest, resolve_artifact

# normalise is the training data's own scaling, so predicted inputs match what the net saw.
from app.ml.data import normalise
from app.ml.nets import CLASS_NAMES, INPUT_SHAPE, NUM_CLASSES

# ---------------------------------------------------------------------------- the model


def sha256_file(path: Path) -> str:
    return file_digest(path)[0]


def compile_forward(model: Any) -> Callable[[np.ndarray], Any]:
    """The model's inference pass, compiled once: `tf.function` on TensorFlow (one trace for
    every batch size), `jax.jit` on JAX (power-of-two batch buckets), from app/ml/backend.py,
    the one module that knows the framework."""
    from app.ml import backend

    return backend.compile_forward(model)


class Predictor:
    """A loaded model behind one compiled forward pass.

    `model.predict` builds a data pipeline per call (about 50 ms for one image here); the
    compiled forward pass (`compile_forward`: a `tf.function` with a fixed (None, 32, 32, 3)
    signature, or `jax.jit` on power-of-two batch buckets) answers in well under a
    millisecond. It is traced by a warm-up call at load, as TF Serving does, so the first
    request does not pay for tracing.
    """

    def __init__(
        self,
        model: Any,
        *,
        name: str | None = None,
        version: int | None = None,
        sha256: str | None = None,
    ) -> None:
        in_shape = tuple(model.input_shape[1:]) if hasattr(model, "input_shape") else None
        out_shape = tuple(model.output_shape[1:]) if hasattr(model, "output_shape") else None
        if in_shape != INPUT_SHAPE or out_shape != (NUM_CLASSES,):
            raise ModelArtifactError(
                f"the model maps {in_shape} -> {out_shape}; "
                f"expected {INPUT_SHAPE} -> ({NUM_CLASSES},) for CIFAR-10"
            )
        self.model = model
        self.name = name
        self.version = version
        self.sha256 = sha256
        self._forward = compile_forward(model)
        self.predict(np.zeros((1, *INPUT_SHAPE), dtype=np.float32))

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        expected_sha256: str | None = None,
        *,
        name: str | None = None,
        version: int | None = None,
    ) -> Predictor:
        """Load a `.keras` file in safe mode, after checking its sha256 when one is given."""
        path = Path(path)
        if not path.is_file():
            raise ModelArtifactError(f"the model artifact {path} does not exist")
        digest = sha256_file(path)
        if expected_sha256 is not None and digest != expected_sha256.lower():
            raise ModelIntegrityError(
                f"the model artifact {path} has sha256 {digest}, but {expected_sha256} was "
                "registered; refusing to load a modified file"
            )
        import keras

        import app.ml.blocks  # noqa: F401  (registers NET V's layers for loading)

        try:
            # safe_mode refuses lambda layers and other deserialised code in the file.
            model = keras.saving.load_model(path, compile=False, safe_mode=True)
        except Exception as exc:  # Keras raises many types for a bad file; all mean "unusable"
            raise ModelArtifactError(
                f"could not load the model artifact {path}: {type(exc).__name__}: {exc}"
            ) from exc
        return cls(model, name=name, version=version, sha256=digest)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 32, 32, 3) in [0, 1] -> float32 (N, 10) probabilities."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != INPUT_SHAPE:
            raise ValueError(
                f"Predictor.predict takes a batch of shape (N, *{INPUT_SHAPE}). "
                f"Received: shape={batch.shape}"
            )
        # A model trained under mixed_bfloat16 answers in bfloat16, whose rows sum to 1 only
        # within ~1e-2: cast and renormalise so clients always get float32 rows summing to 1
        # (a no-op within 1e-7 for float32 models).
        probs = np.asarray(self._forward(batch), dtype=np.float32)
        return probs / probs.sum(axis=1, keepdims=True)


def predict_probabilities(predictor: Predictor, batch: np.ndarray) -> list[dict[str, Any]]:
    """The one prediction core: a batch -> [{"probabilities", "class_id", "class_name"}].

    `batch` is (N, 32, 32, 3) or a single (32, 32, 3) image; uint8 pixels (as from
    app.serving.inputs.decode_image) are scaled to [0, 1], float input must already be in
    [0, 1].
    """
    batch = np.asarray(batch)
    if batch.ndim == len(INPUT_SHAPE):
        batch = batch[np.newaxis]
    if batch.dtype == np.uint8:
        batch = normalise(batch)
    probs = predictor.predict(batch)
    ids = probs.argmax(axis=1)
    return [
        {"probabilities": row, "class_id": int(i), "class_name": CLASS_NAMES[int(i)]}
        for row, i in zip(probs.tolist(), ids, strict=True)
    ]


# ---------------------------------------------------------------------------- the cache


class VersionLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def sha256(self) -> str: ...
    @property
    def artifact_path(self) -> str: ...


class ModelCache:
    """A bounded, thread-safe LRU of Predictors keyed by (name, version, sha256).

    The key holds no alias: a request resolves its alias through the registry first, so when
    an alias moves the next request asks for the new version, and the old Predictor stays
    until it is evicted. Two threads asking for the same missing key load it once.
    `locate(row)` gives the local file to load (the service's: a copy from the artifact
    store, fetched and checked on a miss); without it, the row's path under `artifact_dir`.
    """

    def __init__(
        self,
        size: int,
        *,
        artifact_dir: Path | None = None,
        locate: Callable[[VersionLike], Path] | None = None,
        loader: Callable[[VersionLike, Path], Predictor] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1. Received: size={size}")
        self.size = size
        self.artifact_dir = artifact_dir
        self._locate = locate
        self._loader = loader or _load_registered
        self._entries: OrderedDict[tuple[str, int, str], Predictor] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, int, str], threading.Lock] = {}

    def artifact_path(self, row: VersionLike) -> Path:
        """The artifact file; a relative path is taken relative to the artifact directory."""
        if self._locate is not None:
            return self._locate(row)
        if self.artifact_dir is None:
            return Path(row.artifact_path)
        return resolve_artifact(self.artifact_dir, row.artifact_path)

    def keys(self) -> list[tuple[str, int, str]]:
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def peek(self, row: VersionLike) -> Predictor | None:
        """The loaded Predictor for `row`, or None (never loads: safe on an event loop)."""
        with self._lock:
            return self._hit((row.name, row.version, row.sha256))

    def _hit(self, key: tuple[str, int, str]) -> Predictor | None:
        """The entry for `key`, marked most recently used (the caller holds the lock)."""
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
        return hit

    def get(self, row: VersionLike) -> Predictor:
        key = (row.name, row.version, row.sha256)
        with self._lock:
            hit = self._hit(key)
            if hit is not None:
                return hit
            key_lock = self._loading.setdefault(key, threading.Lock())
        # Load outside the cache lock so hits on other models are not blocked by a slow load.
        with key_lock:
            with self._lock:
                hit = self._hit(key)
            if hit is not None:
                return hit
            try:
                predictor = self._loader(row, self.artifact_path(row))
            except BaseException:
                with self._lock:
                    self._loading.pop(key, None)
                raise
            with self._lock:
                # Insert before dropping the key's lock entry, so no thread sees neither.
                self._entries[key] = predictor
                self._entries.move_to_end(key)
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
                self._loading.pop(key, None)
            return predictor


def _load_registered(row: VersionLike, path: Path) -> Predictor:
    return Predictor.from_path(path, row.sha256, name=row.name, version=row.version)
