"""app.serving.inputs: every input form gives the same batch; bad input is an InputError."""

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

from app.ml.inference import InputError
from app.serving.inputs import (
    decode_images,
    parse_json_body,
    parse_raw_body,
    raw_shape,
)

RNG = np.random.default_rng(3)
X = RNG.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(arr: np.ndarray, size: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if size:
        img = img.resize(size)
    img.save(buf, format="PNG")
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
    parsed = parse_json_body(body(images=[{"b64": b64(png(i))} for i in X]), 8)
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
    big = png(X[0], (200, 100))  # 20,000 pixels each
    images = [b64(big)] * 3
    assert decode_images(images, True, 60_000).shape == (3, 32, 32, 3)
    with pytest.raises(InputError) as info:
        decode_images(images, True, 50_000)
    assert info.value.code == "image_size" and "images[2]" in info.value.message


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
    from app.ml.inference import instances_to_batch, parse_json
    from app.serving.inputs import _fast_instances

    x = RNG.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    x[0, 0, 0] = [0, 9, 10]
    x[-1, -1, -1] = [99, 100, 255]
    compact = orjson.dumps({"model": "m", "instances": x.tolist(), "top_k": 2})
    spaced = json.dumps({"top_k": 2, "instances": x.tolist(), "model": "m"}, indent=1).encode()
    general = instances_to_batch(parse_json(compact)["instances"])
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
