"""app.serving.inputs: every input form gives the same batch; bad input is an InputError.

Also the pieces each form is made of: JSON parsing, `instances`, PNG/JPEG and base64
decoding, and the per-request pixel budget."""

from __future__ import annotations

import base64
import io
import json
import math
import struct
import zlib

import numpy as np
import orjson
import pytest
from PIL import Image

from app.errors import InputError
from app.ml.data import normalise
from app.serving.inputs import (
    PixelBudget,
    decode_b64,
    decode_image,
    decode_images,
    decode_upload,
    instances_to_batch,
    parse_json,
    parse_json_body,
    parse_raw_body,
    raw_shape,
)

RNG = np.random.default_rng(3)
X = RNG.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pixels(n: int = 2) -> np.ndarray:
    return RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def encode(
    arr: np.ndarray, fmt: str = "PNG", mode: str | None = None, size: tuple[int, int] | None = None
) -> bytes:
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    if size:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def tensor(arr: np.ndarray, **over: object) -> dict[str, object]:
    return {"b64": b64(arr.tobytes()), "shape": list(arr.shape), "dtype": "uint8", **over}


def body(**fields: object) -> bytes:
    return orjson.dumps({"model": "m", **fields})


def test_every_form_gives_the_same_float32_batch_to_the_last_bit():
    from_instances = parse_json_body(body(instances=X.tolist()), 8).batch
    from_tensor = parse_json_body(body(tensor=tensor(X)), 8).batch
    shape = raw_shape("3,32,32,3", X.nbytes, 8)
    from_raw = parse_raw_body(X.tobytes(), shape, {"model": "m"}).batch
    parsed = parse_json_body(body(images=[{"b64": b64(encode(i))} for i in X]), 8)
    assert parsed.batch is None and parsed.images is not None  # decoded later
    from_png = decode_images(parsed.images, False, 10**6)
    for batch in (from_tensor, from_raw, from_png):
        assert batch is not None and batch.dtype == np.float32
        np.testing.assert_array_equal(batch, from_instances)
    np.testing.assert_array_equal(from_instances, X.astype(np.float32) / np.float32(255))


@pytest.mark.parametrize(
    ("text", "length", "expected"),
    [
        ("3,32,32,3", 3 * 3072, (3, 32, 32, 3)),
        ("[3, 32, 32, 3]", 3 * 3072, (3, 32, 32, 3)),
        ("32,32,3", 2 * 3072, (2, 32, 32, 3)),
        (None, 5 * 3072, (5, 32, 32, 3)),
    ],
)
def test_raw_shapes(text, length, expected):
    assert raw_shape(text, length, 8) == expected


@pytest.mark.parametrize(
    ("text", "length", "code"),
    [
        ("3,32,32,3", 2 * 3072, "bad_shape"),  # the length does not match the shape
        ("3,32,32,1", 3 * 1024, "bad_shape"),
        ("3,32,32", 3 * 3072, "bad_shape"),
        ("a,b", 3072, "bad_shape"),
        (None, 3071, "bad_shape"),
        (None, None, "bad_shape"),
        ("0,32,32,3", 0, "empty_batch"),
        ("9,32,32,3", 9 * 3072, "too_many_instances"),
        ("-1,32,32,3", 3072, "bad_shape"),
    ],
)
def test_bad_raw_shapes_are_refused_before_the_body_is_read(text, length, code):
    with pytest.raises(InputError) as info:
        raw_shape(text, length, 8)
    assert info.value.code == code


@pytest.mark.parametrize(
    ("tens", "code"),
    [
        (tensor(X, shape=[3, 32, 32]), "bad_shape"),
        (tensor(X, shape=[2, 32, 32, 3]), "bad_shape"),  # length disagrees with the shape
        (tensor(X, shape=[3, 32, 32, "3"]), "bad_shape"),
        (tensor(X, shape=[9, 32, 32, 3]), "too_many_instances"),
        (tensor(X, dtype="float32"), "bad_value"),
        (tensor(X, b64="!" * math.ceil(X.nbytes / 3) * 4), "bad_base64"),
        (tensor(X, b64=123), "bad_base64"),
        ({"b64": "AAAA"}, "validation_error"),
        ({**tensor(X), "extra": 1}, "validation_error"),
        ("not an object", "validation_error"),
    ],
)
def test_bad_tensors(tens, code):
    with pytest.raises(InputError) as info:
        parse_json_body(body(tensor=tens), 8)
    assert info.value.code == code
    assert len(info.value.message) < 300


def test_options_and_forms():
    parsed = parse_json_body(body(instances=X[:1].tolist(), top_k=3, output="probabilities"), 8)
    assert parsed.options.top_k == 3 and parsed.options.output == "probabilities"
    for fields, words in (
        ({"instances": X[:1].tolist(), "top_k": 11}, "top_k"),
        ({"instances": X[:1].tolist(), "output": "xml"}, "output"),
        ({"instances": X[:1].tolist(), "tensor": tensor(X)}, "exactly one of"),
    ):
        with pytest.raises(InputError) as info:
            parse_json_body(body(**fields), 8)
        assert info.value.code == "validation_error" and words in info.value.message


def test_resize_has_a_pixel_budget_per_request():
    big = encode(X[0], size=(200, 100))  # 20,000 pixels each
    images = [b64(big)] * 3
    assert decode_images(images, True, 60_000).shape == (3, 32, 32, 3)
    with pytest.raises(InputError) as info:
        decode_images(images, True, 50_000)
    assert info.value.code == "image_size" and "images[2]" in info.value.message


def test_the_pixel_budget_bounds_each_image_and_the_whole_request():
    budget = PixelBudget(1_000)
    with pytest.raises(InputError) as info:
        budget.take(40, 30)  # 1,200 pixels: more than the whole budget
    assert info.value.code == "image_size" and "at most 1000 pixels" in info.value.message
    budget.take(30, 20)
    budget.take(20, 20)
    with pytest.raises(InputError) as info:
        budget.take(20, 10)  # 200 more, 0 left
    assert info.value.code == "image_size" and "add up to more than 1000" in info.value.message


def test_a_resize_always_spends_a_budget_of_the_callers():
    """decode_image never resizes on an unbounded budget: the caller (a request, or `cnn
    predict` with PREDICT_RESIZE_MAX_PIXELS) passes one, so the limit exists once."""
    big = encode(X[0], size=(40, 40))  # 1,600 pixels
    assert decode_image(big, resize=True, budget=PixelBudget(2000)).shape == (32, 32, 3)
    with pytest.raises(InputError) as info:
        decode_image(big, resize=True, budget=PixelBudget(1024))
    assert info.value.code == "image_size" and "at most 1024 pixels" in info.value.message
    with pytest.raises(ValueError, match="PixelBudget"):
        decode_image(big, resize=True)


def test_an_upload_and_cnn_predict_decode_alike():
    """POST /predict/image (decode_upload) and `cnn predict` (decode_image, then the
    Predictor's own scaling of uint8) end in the same float32 batch."""
    for data, resize in ((encode(X[0]), False), (encode(X[1], "JPEG", size=(50, 40)), True)):
        upload = decode_upload(data, resize, 10**6)
        np.testing.assert_array_equal(
            upload, normalise(decode_image(data, resize, PixelBudget(10**6))[np.newaxis])
        )


def test_a_decompression_bomb_is_refused_before_decoding():
    data = bomb_png(20000, 20000)  # ~70 bytes that claim 400 million pixels
    for resize in (False, True):
        with pytest.raises(InputError) as info:
            decode_images([b64(data)], resize, 10**9)
        assert info.value.code == "image_size"


def bomb_png(width: int, height: int) -> bytes:
    """A PNG header claiming width x height RGB pixels, with a token IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_integer_instances_take_the_fast_path_and_agree_with_the_general_one():
    from app.serving.inputs import _fast_instances

    x = RNG.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    x[0, 0, 0] = [0, 9, 10]
    x[-1, -1, -1] = [99, 100, 255]
    compact = orjson.dumps({"model": "m", "instances": x.tolist(), "top_k": 2})
    spaced = json.dumps({"top_k": 2, "instances": x.tolist(), "model": "m"}, indent=1).encode()
    general = instances_to_batch(parse_json(compact)["instances"], 8)
    for raw in (compact, spaced):
        assert _fast_instances(raw, 8) is not None
        parsed = parse_json_body(raw, 8)
        np.testing.assert_array_equal(parsed.batch, general)
        assert parsed.options.top_k == 2


@pytest.mark.parametrize(
    "instances_text",
    [
        b"[[[[1.5,2,3]"
        + b",[1,2,3]" * 31
        + b"]"
        + (b",[" + b",".join([b"[1,2,3]"] * 32) + b"]") * 31
        + b"]]",
        b"[[[[256,2,3]"
        + b",[1,2,3]" * 31
        + b"]"
        + (b",[" + b",".join([b"[1,2,3]"] * 32) + b"]") * 31
        + b"]]",
        b"[[[[-1,2,3]"
        + b",[1,2,3]" * 31
        + b"]"
        + (b",[" + b",".join([b"[1,2,3]"] * 32) + b"]") * 31
        + b"]]",
        b"[[[[01,2,3]"
        + b",[1,2,3]" * 31
        + b"]"
        + (b",[" + b",".join([b"[1,2,3]"] * 32) + b"]") * 31
        + b"]]",
        b"[[[[1 2,2,3]"
        + b",[1,2,3]" * 31
        + b"]"
        + (b",[" + b",".join([b"[1,2,3]"] * 32) + b"]") * 31
        + b"]]",
        b"[[[[1,2]"
        + b",[1,2,3]" * 31
        + b"]"
        + (b",[" + b",".join([b"[1,2,3]"] * 32) + b"]") * 31
        + b"]]",
    ],
    ids=["float", "256", "negative", "leading_zero", "two_numbers", "short_pixel"],
)
def test_anything_unusual_leaves_the_fast_path(instances_text):
    from app.serving.inputs import _fast_instances

    raw = b'{"model": "m", "instances": ' + instances_text + b"}"
    assert _fast_instances(raw, 8) is None


def test_the_fast_path_reads_only_the_top_level_member():
    from app.serving.inputs import _fast_instances

    x = RNG.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8).tolist()
    nested = orjson.dumps({"model": "m", "tensor": {"instances": x}})
    assert _fast_instances(nested, 8) is None
    duplicate = orjson.dumps({"model": "m", "instances": x})[:-1] + b', "instances": [[1]]}'
    assert _fast_instances(duplicate, 8) is None
    with pytest.raises(InputError) as info:
        parse_json_body(duplicate, 8)  # JSON's last member wins, as in the general path
    assert info.value.code == "bad_shape"


# ----------------------------------------------------------------------- instances_to_batch


def test_instances_become_float32_in_unit_range():
    x = pixels(3)
    batch = instances_to_batch(x.tolist(), 8)
    assert batch.dtype == np.float32 and batch.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(batch, x.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(instances_to_batch(x, 8), batch)
    # Float pixel values are fine too, as long as they are in 0-255.
    assert instances_to_batch((x + 0.5).clip(0, 255).tolist(), 8).max() <= 1.0


@pytest.mark.parametrize(
    ("value", "code", "words"),
    [
        ("not a list", "bad_shape", "list of 32x32x3 images"),
        ({"a": 1}, "bad_shape", "got a dict"),
        ([], "empty_batch", "at least one"),
        (np.zeros((2, 32, 32, 1)).tolist(), "bad_shape", "got shape (2, 32, 32, 1)"),
        (
            np.zeros((2, 28, 28, 3)).tolist(),
            "bad_shape",
            "expected instances of shape (N, 32, 32, 3)",
        ),
        (np.zeros((32, 32, 3)).tolist(), "bad_shape", "wrap it in a list"),
        (np.zeros((1, 2, 32, 32, 3)).tolist(), "bad_shape", "got shape (1, 2, 32, 32, 3)"),
        (
            np.full((1, 32, 32, 3), 300).tolist(),
            "bad_range",
            "between 0 and 255; got values from 300",
        ),
        (np.full((1, 32, 32, 3), -1).tolist(), "bad_range", "from -1 to -1"),
        (np.full((1, 32, 32, 3), np.nan), "not_finite", "NaN"),
        (np.full((1, 32, 32, 3), np.inf).tolist(), "not_finite", "finite"),
        (np.full((1, 32, 32, 3), "7").tolist(), "bad_value", "numbers between 0 and 255"),
        ([[[[None] * 3] * 32] * 32], "bad_value", "nulls"),
    ],
)
def test_bad_instances_say_what_was_expected(value, code, words):
    with pytest.raises(InputError) as info:
        instances_to_batch(value, 256)  # the default PREDICT_MAX_INSTANCES
    assert info.value.code == code
    assert words in info.value.message
    assert "reshape" not in info.value.message


def test_ragged_instances_name_the_culprit():
    x = pixels(3).tolist()
    x[1][5].pop()  # row 5 of image 1 now has 31 pixels
    with pytest.raises(InputError) as info:
        instances_to_batch(x, 8)
    assert info.value.code == "bad_shape"
    assert "instance 1" in info.value.message and "unequal length" in info.value.message

    y = pixels(3).tolist()
    y[2] = np.zeros((16, 16, 3), dtype=int).tolist()  # well formed, wrong size
    with pytest.raises(InputError) as info:
        instances_to_batch(y, 8)
    assert "instance 2 has shape (16, 16, 3), expected (32, 32, 3)" in info.value.message


def test_too_many_instances():
    x = pixels(3).tolist()
    assert instances_to_batch(x, max_instances=3).shape[0] == 3
    with pytest.raises(InputError) as info:
        instances_to_batch(x, max_instances=2)
    assert info.value.code == "too_many_instances" and "at most 2" in info.value.message


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"x": [NaN]}', "not_finite"),
        (b'{"x": [1e400]}', "not_finite"),
        (b'{"x": [-Infinity]}', "not_finite"),
        (b'{"x": [1,', "bad_json"),
        (b"", "bad_json"),
    ],
)
def test_parse_json_errors(body, code):
    with pytest.raises(InputError) as info:
        parse_json(body)
    assert info.value.code == code


def test_parse_json_of_a_valid_body():
    assert parse_json(b'{"instances": [[1, 2.5]]}') == {"instances": [[1, 2.5]]}


# ----------------------------------------------------------------------- images and base64


def test_png_decodes_losslessly():
    x = pixels(1)[0]
    np.testing.assert_array_equal(decode_image(encode(x)), x)


def test_jpeg_decodes_to_rgb_32x32():
    x = np.full((32, 32, 3), (200, 40, 90), dtype=np.uint8)
    out = decode_image(encode(x, "JPEG"))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - x).max() <= 6  # JPEG is lossy, a flat colour nearly exact


def test_grayscale_and_rgba_are_converted_to_rgb():
    x = pixels(1)[0]
    gray = decode_image(encode(x, mode="L"))
    assert gray.shape == (32, 32, 3)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    rgba = decode_image(encode(x, mode="RGBA"))
    np.testing.assert_array_equal(rgba, x)  # the alpha channel is dropped


def test_wrong_size_is_refused_unless_resize_is_asked_for():
    big = RNG.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    with pytest.raises(InputError) as info:
        decode_image(encode(big))
    assert info.value.code == "image_size"
    assert "48x64, expected 32x32" in info.value.message and "resize" in info.value.message
    out = decode_image(encode(big), resize=True, budget=PixelBudget(10**6))
    assert out.shape == (32, 32, 3)
    # A flat image stays flat through the antialiasing filter.
    flat = np.full((100, 100, 3), 77, dtype=np.uint8)
    assert (decode_image(encode(flat), resize=True, budget=PixelBudget(10**6)) == 77).all()


@pytest.mark.parametrize(
    "data",
    [b"", b"definitely not an image", encode(pixels(1)[0])[:60], encode(pixels(1)[0], "GIF")],
    ids=["empty", "text", "truncated_png", "gif"],
)
def test_undecodable_images(data):
    with pytest.raises(InputError) as info:
        decode_image(data)
    assert info.value.code == "bad_image"
    assert "PNG or JPEG" in info.value.message


def test_standard_base64_decodes_and_url_safe_is_refused():
    # Find an image whose base64 uses '+' and '/', the characters URL-safe base64 replaces.
    for _ in range(50):
        x = pixels(1)[0]
        raw = encode(x)
        std = base64.b64encode(raw).decode()
        if "+" in std and "/" in std:
            break
    np.testing.assert_array_equal(decode_b64(std), x)
    with pytest.raises(InputError) as info:
        decode_b64(base64.urlsafe_b64encode(raw).decode())
    assert info.value.code == "bad_base64"
    assert "standard base64" in info.value.message and "URL-safe" in info.value.message


@pytest.mark.parametrize("value", ["abc", "ab=c", "a b c d", "@@@@", 123, None])
def test_invalid_base64(value):
    with pytest.raises(InputError) as info:
        decode_b64(value)
    assert info.value.code == "bad_base64"


def test_base64_of_a_non_image():
    with pytest.raises(InputError) as info:
        decode_b64(base64.b64encode(b"hello world").decode())
    assert info.value.code == "bad_image"
