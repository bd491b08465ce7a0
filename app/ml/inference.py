"""The prediction core: input decoding/validation, a compiled Predictor, and a model cache.

No HTTP in here: the /predict routes and the `cnn predict` command both call
`decode_image` / `instances_to_batch`, a `Predictor`, and `predict_probabilities`.
TensorFlow and Keras are imported only when a model is loaded, so importing this
module (and the API that uses it) stays cheap.
"""

from __future__ import annotations

import base64
import binascii
import gc
import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

# The errors are domain errors (app.errors), re-exported here for the callers of this module.
from app.errors import InputError as InputError
from app.errors import ModelArtifactError as ModelArtifactError
from app.errors import ModelIntegrityError as ModelIntegrityError
from app.files import file_digest, resolve_artifact

# normalise is the training data's own scaling, so served inputs match what the net saw.
from app.ml.data import normalise
from app.ml.nets import CLASS_NAMES, INPUT_SHAPE, NUM_CLASSES

IMAGE_FORMATS = ("PNG", "JPEG")
# A request asking for a resize still has to decode the whole image; refuse anything larger
# than this before decoding its pixels (a tiny PNG can declare gigapixel dimensions).
MAX_RESIZE_PIXELS = 4096 * 4096
_SHAPE_TEXT = "x".join(str(d) for d in INPUT_SHAPE)
_BATCH_TEXT = "(N, " + ", ".join(str(d) for d in INPUT_SHAPE) + ")"


# ---------------------------------------------------------------------------- input decoding


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


GC_THRESHOLD_0 = 20_000


def parse_json(body: bytes) -> Any:
    """Parse a request body with orjson (several times faster than json/pydantic for pixel
    arrays). JSON has no NaN/Infinity, so those get their own code instead of a syntax error."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        pos = getattr(exc, "pos", None)
        near = body[pos : pos + 9].lstrip(b"-+") if isinstance(pos, int) else b""
        if "infinity" in str(exc) or near.startswith((b"NaN", b"Inf", b"nan", b"inf")):
            raise InputError(
                "not_finite",
                "pixel values must be finite numbers between 0 and 255; the body holds NaN, "
                f"Infinity or a number too large for a double (at character {pos})",
            ) from None
        raise InputError("bad_json", f"the request body is not valid JSON: {exc}") from None


def _describe_ragged(instances: Sequence[Any] | np.ndarray) -> str:
    """Name the first instance that breaks the (N, 32, 32, 3) grid (only on the error path)."""
    for i, inst in enumerate(instances):
        try:
            shape = np.asarray(inst).shape
        except ValueError:
            return (
                f"instance {i} has nested lists of unequal length; each instance must be "
                f"{INPUT_SHAPE[0]} rows of {INPUT_SHAPE[1]} pixels of {INPUT_SHAPE[2]} values"
            )
        if shape != INPUT_SHAPE:
            return f"instance {i} has shape {shape}, expected {INPUT_SHAPE}"
    return f"the instances do not form one {_BATCH_TEXT} array"


def instances_to_batch(instances: Any, max_instances: int | None = None) -> np.ndarray:
    """Validate a list of 32x32x3 images of pixel values 0-255 (nested lists or arrays) and
    return them as a float32 (N, 32, 32, 3) batch in [0, 1].

    A single image is rejected rather than guessed at: the body format is a list of images.
    """
    if not isinstance(instances, (list, tuple, np.ndarray)):
        raise InputError(
            "bad_shape",
            f"'instances' must be a list of {_SHAPE_TEXT} images (nested lists of pixel "
            f"values 0-255); got a {type(instances).__name__}",
        )
    n = len(instances)
    if n == 0:
        raise InputError("empty_batch", "'instances' is empty; send at least one image")
    if max_instances is not None and n > max_instances:
        raise InputError(
            "too_many_instances",
            f"at most {max_instances} instances per request; got {n}. Split the batch.",
        )
    try:
        # No dtype: numpy infers int64/float64 for numbers and str/object for anything else,
        # which lets strings and nulls be refused instead of silently converted.
        arr = np.asarray(instances)
    except (ValueError, TypeError):
        raise InputError("bad_shape", _describe_ragged(instances)) from None
    if arr.dtype.kind not in "iuf":
        raise InputError(
            "bad_value",
            "pixel values must be numbers between 0 and 255; found strings, nulls, booleans "
            "or numbers too large to represent",
        )
    if arr.shape[1:] != INPUT_SHAPE:
        if arr.shape == INPUT_SHAPE:
            raise InputError(
                "bad_shape",
                f"'instances' must be a list of images, shape {_BATCH_TEXT}; "
                f"got one image of shape {INPUT_SHAPE}: wrap it in a list",
            )
        raise InputError(
            "bad_shape",
            f"expected instances of shape {_BATCH_TEXT} "
            f"({_SHAPE_TEXT} pixels, RGB); got shape {arr.shape}",
        )
    # min/max are one pass each; NaN propagates into them, so they also detect non-finite input.
    lo, hi = arr.min(), arr.max()
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(
            "not_finite", "pixel values must be finite numbers between 0 and 255; found NaN or inf"
        )
    if lo < 0 or hi > 255:
        raise InputError(
            "bad_range",
            f"pixel values must be between 0 and 255; got values from {lo:g} to {hi:g}",
        )
    return normalise(arr)


class PixelBudget:
    """How many source pixels one request may still decode (resizing costs per pixel).

    A request of many large images with resize=true would otherwise cost seconds of CPU
    before anything else happens; each image takes its width x height from this budget
    before its pixels are decoded, and the request is refused (422 image_size) once it
    runs out.
    """

    def __init__(self, pixels: int) -> None:
        self.total = pixels
        self.left = pixels

    def take(self, width: int, height: int) -> None:
        if width * height > self.left:
            raise InputError(
                "image_size",
                f"the images of this request add up to more than {self.total} pixels to "
                f"resize (this one is {width}x{height}); send smaller images or fewer per request",
            )
        self.left -= width * height


def decode_image(
    data: bytes, resize: bool = False, budget: PixelBudget | None = None
) -> np.ndarray:
    """Decode a PNG or JPEG into uint8 RGB pixels of shape (32, 32, 3).

    Grayscale and palette images are converted to RGB; an alpha channel is dropped (not
    composited). An image of another size is refused with `image_size` unless `resize` is
    set, then it is resized to 32x32 with Pillow's antialiased bilinear filter. Only the
    header is read before the size checks, so a small file that declares huge dimensions
    (a decompression bomb) is refused with `image_size` before any pixel is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError("bad_image", "the image is empty; expected a PNG or JPEG file")
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise InputError(
            "image_size",
            f"the image declares more than {MAX_RESIZE_PIXELS} pixels; expected a 32x32 image",
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InputError(
            "bad_image", "could not decode the image; expected a PNG or JPEG"
        ) from None
    height, width = INPUT_SHAPE[:2]
    if img.size != (width, height):
        if not resize:
            raise InputError(
                "image_size",
                f"the image is {img.size[0]}x{img.size[1]}, expected {width}x{height}; "
                "send a 32x32 image or ask for resize=true",
            )
        if img.size[0] * img.size[1] > MAX_RESIZE_PIXELS:
            raise InputError(
                "image_size",
                f"the image is {img.size[0]}x{img.size[1]}, too large to resize "
                f"(at most {MAX_RESIZE_PIXELS} pixels)",
            )
        if budget is not None:
            budget.take(*img.size)
    try:
        img.load()
        rgb = img.convert("RGB")
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    except Image.DecompressionBombError:
        raise InputError(
            "image_size",
            f"the image declares more than {MAX_RESIZE_PIXELS} pixels; expected a 32x32 image",
        ) from None
    except (OSError, ValueError, SyntaxError):
        raise InputError(
            "bad_image",
            "could not decode the image: it is truncated or corrupt; "
            "expected a complete PNG or JPEG",
        ) from None
    return np.asarray(rgb, dtype=np.uint8)


def decode_b64(s: Any, resize: bool = False, budget: PixelBudget | None = None) -> np.ndarray:
    """Decode a STANDARD base64 (RFC 4648 section 4, with padding) PNG/JPEG, as TF Serving's
    {"b64": ...}. URL-safe base64 ('-', '_') is refused, not guessed at."""
    if not isinstance(s, str):
        raise InputError("bad_base64", f"'b64' must be a string; got {type(s).__name__}")
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        hint = " (it looks URL-safe: '-' or '_' found)" if ("-" in s or "_" in s) else ""
        raise InputError(
            "bad_base64",
            "'b64' is not valid standard base64 (alphabet A-Z a-z 0-9 + /, '=' padding)" + hint,
        ) from None
    return decode_image(data, resize=resize, budget=budget)


def images_to_batch(images: Sequence[np.ndarray]) -> np.ndarray:
    """Stack decoded uint8 (32, 32, 3) images into a float32 batch in [0, 1]."""
    if not images:
        raise InputError("empty_batch", "no images given; send at least one image")
    return normalise(np.stack(images))


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
            raise InputError(
                "bad_shape",
                f"expected a batch of shape {_BATCH_TEXT}; got {batch.shape}",
            )
        # A model trained under mixed_bfloat16 answers in bfloat16, whose rows sum to 1 only
        # within ~1e-2: cast and renormalise so clients always get float32 rows summing to 1
        # (a no-op within 1e-7 for float32 models).
        probs = np.asarray(self._forward(batch), dtype=np.float32)
        return probs / probs.sum(axis=1, keepdims=True)


def predict_probabilities(predictor: Predictor, batch: np.ndarray) -> list[dict[str, Any]]:
    """The one prediction core: a batch -> [{"probabilities", "class_id", "class_name"}].

    `batch` is (N, 32, 32, 3) or a single (32, 32, 3) image; uint8 pixels (as from
    `decode_image`) are scaled to [0, 1], float input must already be in [0, 1].
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
    """

    def __init__(
        self,
        size: int,
        *,
        artifact_dir: Path | None = None,
        loader: Callable[[VersionLike, Path], Predictor] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1. Received: size={size}")
        self.size = size
        self.artifact_dir = artifact_dir
        self._loader = loader or _load_registered
        self._entries: OrderedDict[tuple[str, int, str], Predictor] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, int, str], threading.Lock] = {}

    def artifact_path(self, row: VersionLike) -> Path:
        """The artifact file; a relative path is taken relative to the artifact directory."""
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
