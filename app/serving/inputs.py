"""Prediction input: every accepted form -> validated options and one float32 batch.

The one owner of the input rules of /predict and of `cnn predict`: parsing, decoding and the
pixel budget. The routers hand over the transport (the body's bytes, the query parameters,
an uploaded file); this module parses, checks and decodes, and raises only `InputError` (a
stable code plus a message that says what was expected and what came, never the payload).
Forms:

- JSON `instances`: (N, 32, 32, 3) nested lists of pixel values 0-255 (TF Serving rows);
- JSON `images`: [{"b64": standard base64 of a PNG or JPEG}];
- JSON `tensor`: {"b64": base64 of the raw uint8 bytes, "shape": [N, 32, 32, 3], "dtype": "uint8"};
- `application/octet-stream`: the raw uint8 bytes, the shape in the `shape` query parameter or
  the `X-Tensor-Shape` header (N alone may be left out: `shape=32,32,3` or no shape at all
  means as many images as the length holds);
- a PNG or JPEG file (POST /predict/image, and `cnn predict` through `decode_image`).

Work is split in two steps so that the caller can resolve the model in between: `parse_*`
checks the options and the structure (cheap, bounded by the body size; `instances` and raw
tensors come out as the batch right away), `decode_images` decodes PNG/JPEG pixels, the
expensive step, only once the model is known to exist, within the request's budget of source
pixels (PREDICT_RESIZE_MAX_PIXELS). Every form ends as the same float32 array (pixels / 255,
the training data's own `normalise`), so the same pixels give the same probabilities to the
last bit whichever form carried them.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from app.errors import InputError

# normalise is the training data's own scaling, so served inputs match what the net saw.
from app.ml.data import normalise
from app.ml.nets import INPUT_SHAPE
from app.schemas import PredictOptions

IMAGE_BYTES = math.prod(INPUT_SHAPE)
IMAGE_FORMATS = ("PNG", "JPEG")
_FORMS = ("instances", "images", "tensor")
_IMAGE_TEXT = "x".join(str(d) for d in INPUT_SHAPE)  # 32x32x3
_BATCH_TEXT = "(N, " + ", ".join(str(d) for d in INPUT_SHAPE) + ")"
_SHAPE_TEXT = "[N, " + ", ".join(str(d) for d in INPUT_SHAPE) + "]"
_EXACTLY_ONE = (
    "give exactly one of 'instances' (nested lists of pixel values), 'images' "
    '([{"b64": ...}]) or \'tensor\' ({"b64", "shape", "dtype": "uint8"})'
)


@dataclass
class PredictInput:
    """A parsed request: its options, and either the batch or the images still to decode."""

    options: PredictOptions
    batch: np.ndarray | None = None  # float32 (N, 32, 32, 3) in [0, 1]
    images: list[str] | None = None  # base64 PNG/JPEG strings, decoded by decode_images
    upload: bytes | None = None  # one uploaded PNG/JPEG file

    @property
    def rows(self) -> int:
        if self.batch is not None:
            return len(self.batch)
        return len(self.images) if self.images is not None else 1


def options(fields: dict[str, Any], form: bool = False) -> PredictOptions:
    """Validate the small fields; the message names each bad field (never its value).

    form: the fields are query or form text ("3"), not JSON values (which must be numbers).
    """
    try:
        opts = PredictOptions.model_validate(fields, context={"form": form})
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False):
            loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
            problems.append(f"{loc}: {err.get('msg', 'invalid')}")
        raise InputError("validation_error", "; ".join(problems)) from None
    if opts.version is not None and opts.alias is not None:
        raise InputError(
            "validation_error", "give either 'version' or 'alias' (or neither for the latest)"
        )
    return opts


def _check_count(n: int, what: str, max_instances: int) -> None:
    if n == 0:
        raise InputError("empty_batch", f"'{what}' is empty; send at least one image")
    if n > max_instances:
        raise InputError(
            "too_many_instances",
            f"at most {max_instances} {what} per request; got {n}. Split the batch.",
        )


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


def parse_json_body(body: bytes, max_instances: int) -> PredictInput:
    """A JSON /predict body -> options plus the batch (instances, tensor) or images to decode."""
    fast = _fast_instances(body, max_instances)
    if fast is not None:
        data, batch = fast
        opts = options({k: v for k, v in data.items() if k not in _FORMS})
        if any(data.get(form) is not None for form in _FORMS):
            raise InputError("validation_error", _EXACTLY_ONE)
        return PredictInput(opts, batch=normalise(batch))
    data = parse_json(body)
    if not isinstance(data, dict):
        raise InputError(
            "validation_error",
            "the body must be a JSON object with 'model' and one of 'instances', 'images' "
            "or 'tensor'",
        )
    given = [form for form in _FORMS if data.get(form) is not None]
    payload = {form: data.pop(form, None) for form in _FORMS}
    opts = options(data)
    if len(given) != 1:
        raise InputError("validation_error", _EXACTLY_ONE)
    form = given[0]
    if form == "instances":
        return PredictInput(opts, batch=instances_to_batch(payload["instances"], max_instances))
    if form == "tensor":
        return PredictInput(opts, batch=tensor_to_batch(payload["tensor"], max_instances))
    return PredictInput(opts, images=_image_list(payload["images"], max_instances))


def _image_list(images: Any, max_instances: int) -> list[str]:
    if not isinstance(images, list):
        raise InputError(
            "validation_error",
            '\'images\' must be a list of {"b64": "<standard base64 PNG or JPEG>"} objects',
        )
    _check_count(len(images), "images", max_instances)
    out = []
    for i, item in enumerate(images):
        if not isinstance(item, dict) or set(item) != {"b64"} or not isinstance(item["b64"], str):
            raise InputError(
                "validation_error",
                f'images[{i}] must be an object {{"b64": "<standard base64 PNG or JPEG>"}}',
            )
        out.append(item["b64"])
    return out


# ------------------------------------------------------------------------- instances


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


def instances_to_batch(instances: Any, max_instances: int) -> np.ndarray:
    """Validate a list of 32x32x3 images of pixel values 0-255 (nested lists or arrays) and
    return them as a float32 (N, 32, 32, 3) batch in [0, 1].

    A single image is rejected rather than guessed at: the body format is a list of images.
    """
    if not isinstance(instances, (list, tuple, np.ndarray)):
        raise InputError(
            "bad_shape",
            f"'instances' must be a list of {_IMAGE_TEXT} images (nested lists of pixel "
            f"values 0-255); got a {type(instances).__name__}",
        )
    _check_count(len(instances), "instances", max_instances)
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
            f"({_IMAGE_TEXT} pixels, RGB); got shape {arr.shape}",
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


# ------------------------------------------------------------------------- images


class PixelBudget:
    """How many source pixels one request may still decode to resize: PREDICT_RESIZE_MAX_PIXELS
    for all its images together, and so for any one of them (resizing costs per pixel).

    A request of many large images with resize=true would otherwise cost seconds of CPU
    before anything else happens; each image takes its width x height from this budget
    before its pixels are decoded, and the request is refused (422 image_size) once it
    runs out.
    """

    def __init__(self, pixels: int) -> None:
        self.total = pixels
        self.left = pixels

    def take(self, width: int, height: int) -> None:
        if width * height > self.total:
            raise InputError(
                "image_size",
                f"the image is {width}x{height}, too large to resize (at most {self.total} pixels)",
            )
        if width * height > self.left:
            raise InputError(
                "image_size",
                f"the images of this request add up to more than {self.total} pixels to "
                f"resize (this one is {width}x{height}); send smaller images or fewer per request",
            )
        self.left -= width * height


# Pillow refuses to open an image that declares far more pixels than any sane photo.
_BOMB = "the image declares more pixels than can be decoded safely; expected a 32x32 image"


def decode_image(
    data: bytes, resize: bool = False, budget: PixelBudget | None = None
) -> np.ndarray:
    """Decode a PNG or JPEG into uint8 RGB pixels of shape (32, 32, 3).

    Grayscale and palette images are converted to RGB; an alpha channel is dropped (not
    composited). An image of another size is refused with `image_size` unless `resize` is
    set; then its pixels come out of `budget` (the request's, or `cnn predict`'s: a resize
    without one is a programming error) and it is resized to
    32x32 with Pillow's antialiased bilinear filter. Only the header is read before the size
    checks, so a small file that declares huge dimensions (a decompression bomb) is refused
    with `image_size` before any pixel is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError("bad_image", "the image is empty; expected a PNG or JPEG file")
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise InputError("image_size", _BOMB) from None
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
        if budget is None:
            raise ValueError("decode_image(resize=True) needs the caller's PixelBudget")
        budget.take(*img.size)
    try:
        img.load()
        rgb = img.convert("RGB")
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    except Image.DecompressionBombError:
        raise InputError("image_size", _BOMB) from None
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


def decode_images(images: list[str], resize: bool, max_resize_pixels: int) -> np.ndarray:
    """Decode base64 PNG/JPEGs (after the model was resolved) into the float32 batch."""
    budget = PixelBudget(max_resize_pixels)
    decoded = []
    for i, s in enumerate(images):
        try:
            decoded.append(decode_b64(s, resize=resize, budget=budget))
        except InputError as exc:
            raise InputError(exc.code, f"images[{i}]: {exc.message}") from None
    return normalise(np.stack(decoded))


def decode_upload(data: bytes, resize: bool, max_resize_pixels: int) -> np.ndarray:
    """One uploaded PNG/JPEG file -> a batch of one."""
    image = decode_image(data, resize=resize, budget=PixelBudget(max_resize_pixels))
    return normalise(image[np.newaxis])


# ------------------------------------------------------------------------- fast instances
# `instances` of whole numbers 0-255 (what clients send: pixels) are read straight from the
# body's bytes with a few numpy passes, without building ~65,000 Python lists per 64 images
# (orjson's parse plus np.asarray of the lists cost several forward passes, all under the
# GIL). The structure is checked exactly: the body's brackets and commas, numbers removed,
# must equal those of an (N, 32, 32, 3) array, with exactly one number in each slot. Anything
# else (floats, negatives, strings, ragged lists, numbers above 255, leading zeros, a
# duplicate key) goes to the general path, which gives the same batch or the detailed error.

_KEY = b'"instances"'
_WS = b" \t\r\n"
_NOT_SKELETON = b"0123456789" + _WS
_SKELETONS: dict[int, bytes] = {}


def _skeleton_of_one() -> bytes:
    text = b"[" + b"," * (INPUT_SHAPE[-1] - 1) + b"]"
    for dim in reversed(INPUT_SHAPE[:-1]):
        text = b"[" + b",".join([text] * dim) + b"]"
    return text


_ONE = _skeleton_of_one()


def _skeleton(n: int) -> bytes:
    if n not in _SKELETONS:
        if len(_SKELETONS) > 8:
            _SKELETONS.clear()
        _SKELETONS[n] = b"[" + b",".join([_ONE] * n) + b"]"
    return _SKELETONS[n]


def _instances_span(body: bytes) -> tuple[int, int] | None:
    """Where the value of a `"instances": [...]` member starts and ends, or None."""
    pos = 0
    while True:
        i = body.find(_KEY, pos)
        if i < 0:
            return None
        j = i + len(_KEY)
        while j < len(body) and body[j] in _WS:
            j += 1
        if j < len(body) and body[j] == ord(":"):
            j += 1
            while j < len(body) and body[j] in _WS:
                j += 1
            if j < len(body) and body[j] == ord("["):
                break
        pos = i + 1
    # Usually the first "]]]]" closes the whole (N, 32, 32, 3) array (the skeleton check that
    # follows rejects any other reading, then the brackets are counted).
    close = body.find(b"]" * (len(INPUT_SHAPE) + 1), j)
    if close >= 0:
        return j, close + len(INPUT_SHAPE) + 1
    return _instances_span_counted(body, j)


def _instances_span_counted(body: bytes, j: int) -> tuple[int, int] | None:
    """The array starting at j ends where its brackets balance (whitespace between them)."""
    rest = np.frombuffer(body, dtype=np.uint8, offset=j)
    depth = np.cumsum((rest == ord("[")).astype(np.int32) - (rest == ord("]")))
    closed = np.flatnonzero(depth == 0)
    if not len(closed):
        return None
    return j, j + int(closed[0]) + 1


def _images_in(text: bytes, max_instances: int) -> int | None:
    """N if the array's brackets and commas are exactly those of (N, 32, 32, 3), else None."""
    skeleton = text.translate(None, _NOT_SKELETON)
    n = (len(skeleton) - 1) // (len(_ONE) + 1)
    if n < 1 or n > max_instances or skeleton != _skeleton(n):
        return None
    return n


def _fast_instances(body: bytes, max_instances: int) -> tuple[dict[str, Any], np.ndarray] | None:
    """(the other members, the uint8 batch) for integer pixel instances; None: use the
    general path."""
    span = _instances_span(body)
    if span is None:
        return None
    n = _images_in(body[span[0] : span[1]], max_instances)
    if n is None:
        # The first "]]]]" was not the end (brackets apart, or not this shape): count.
        counted = _instances_span_counted(body, span[0])
        if counted is None or counted == span:
            return None
        span = counted
        n = _images_in(body[span[0] : span[1]], max_instances)
        if n is None:
            return None
    start, end = span
    text = body[start:end]
    a = np.frombuffer(text, dtype=np.uint8)
    digit = a - np.uint8(ord("0"))  # wraps around for everything below '0'
    is_digit = digit < 10
    first = np.flatnonzero(is_digit[1:] & ~is_digit[:-1]) + 1
    last = np.flatnonzero(is_digit[:-1] & ~is_digit[1:])
    if len(first) != n * IMAGE_BYTES or len(last) != len(first):
        return None  # an empty slot, or two numbers in one: the general path says what
    length = last - first + 1
    if length.max() > 3 or ((length > 1) & (digit[first] == 0)).any():
        return None
    # Digits as numbers, everything else 0: the character before a number is never a digit,
    # so tens and hundreds come out 0 for shorter numbers (the hundreds only count when the
    # tens position is a digit of the same number).
    d = np.where(is_digit, digit, 0).astype(np.uint16)
    value = d[last] + is_digit[last - 1] * (10 * d[last - 1] + 100 * d[last - 2])
    if value.max() > 255:
        return None
    # Everything outside the array is parsed as JSON, with null in the array's place.
    data = parse_json(body[:start] + b"null" + body[end:])
    if not isinstance(data, dict) or "instances" not in data or data["instances"] is not None:
        return None
    del data["instances"]
    return data, value.astype(np.uint8).reshape(n, *INPUT_SHAPE)


# ------------------------------------------------------------------------- raw tensors


def check_shape(shape: Any, max_instances: int, where: str = "shape") -> tuple[int, ...]:
    """A declared tensor shape: [N, 32, 32, 3] with 1 <= N <= max_instances."""
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) != len(INPUT_SHAPE) + 1
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
    ):
        raise InputError(
            "bad_shape", f"'{where}' must be {_SHAPE_TEXT}: four integers, N images first"
        )
    if tuple(shape[1:]) != INPUT_SHAPE:
        raise InputError("bad_shape", f"'{where}' must be {_SHAPE_TEXT}; got {list(shape)}")
    if shape[0] < 0:
        raise InputError("bad_shape", f"'{where}' must be {_SHAPE_TEXT} with N >= 1")
    _check_count(shape[0], "images", max_instances)
    return tuple(shape)


def _raw_to_batch(data: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
    return normalise(np.frombuffer(data, dtype=np.uint8).reshape(shape))


def tensor_to_batch(tensor: Any, max_instances: int) -> np.ndarray:
    """JSON {"b64", "shape", "dtype": "uint8"} -> the batch; the shape and the base64
    length are checked before anything is decoded or allocated."""
    if (
        not isinstance(tensor, dict)
        or not {"b64", "shape"} <= set(tensor)
        or set(tensor)
        - {
            "b64",
            "shape",
            "dtype",
        }
    ):
        raise InputError(
            "validation_error",
            '\'tensor\' must be an object {"b64": "<standard base64 of uint8 bytes>", '
            f'"shape": {_SHAPE_TEXT}, "dtype": "uint8"}}',
        )
    dtype = tensor.get("dtype", "uint8")
    if dtype != "uint8":
        raise InputError(
            "bad_value", f"'tensor.dtype' must be \"uint8\" (pixels 0-255); got {str(dtype)[:20]!r}"
        )
    shape = check_shape(tensor["shape"], max_instances, "tensor.shape")
    s = tensor["b64"]
    if not isinstance(s, str):
        raise InputError("bad_base64", f"'tensor.b64' must be a string; got {type(s).__name__}")
    want = math.prod(shape)
    if len(s) != 4 * math.ceil(want / 3):
        raise InputError(
            "bad_shape",
            f"'tensor.b64' holds {len(s) * 3 // 4} bytes or so, but shape {list(shape)} needs "
            f"{want} bytes ({4 * math.ceil(want / 3)} base64 characters)",
        )
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            "bad_base64",
            "'tensor.b64' is not valid standard base64 (alphabet A-Z a-z 0-9 + /, '=' padding)",
        ) from None
    if len(data) != want:
        raise InputError(
            "bad_shape", f"'tensor.b64' holds {len(data)} bytes; shape {list(shape)} needs {want}"
        )
    return _raw_to_batch(data, shape)


def raw_shape(text: str | None, length: int | None, max_instances: int) -> tuple[int, ...]:
    """The shape of an octet-stream body, from `shape=N,32,32,3` (N may be left out, or the
    whole shape) and the body's declared length; checked before the body is read."""
    if text is None or not text.strip():
        dims: list[int] = []
    else:
        try:
            dims = [int(d) for d in text.replace(" ", "").strip("[]()").split(",") if d]
        except ValueError:
            raise InputError(
                "bad_shape", f"the shape must be comma-separated integers like {_SHAPE_TEXT}"
            ) from None
    if len(dims) <= len(INPUT_SHAPE) and tuple(dims) in ((), INPUT_SHAPE):
        if length is None:
            raise InputError(
                "bad_shape", f"give the shape {_SHAPE_TEXT} or a Content-Length for raw pixels"
            )
        if length % IMAGE_BYTES:
            raise InputError(
                "bad_shape",
                f"the body has {length} bytes, not a whole number of {IMAGE_BYTES}-byte "
                "32x32x3 uint8 images",
            )
        dims = [length // IMAGE_BYTES, *INPUT_SHAPE]
    shape = check_shape(dims, max_instances)
    if length is not None and length != math.prod(shape):
        raise InputError(
            "bad_shape",
            f"shape {list(shape)} needs {math.prod(shape)} bytes of uint8 pixels; the body "
            f"has {length}",
        )
    return shape


def parse_raw_body(body: bytes, shape: tuple[int, ...], fields: dict[str, Any]) -> PredictInput:
    """An octet-stream body (its shape already checked by raw_shape) -> the batch."""
    opts = options(fields, form=True)
    if len(body) != math.prod(shape):
        raise InputError(
            "bad_shape",
            f"shape {list(shape)} needs {math.prod(shape)} bytes of uint8 pixels; the body "
            f"has {len(body)}",
        )
    return PredictInput(opts, batch=_raw_to_batch(body, shape))
