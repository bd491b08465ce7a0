"""The prediction core: input validation, image decoding, the compiled Predictor, the cache."""

from __future__ import annotations

import base64
import gc
import io
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.ml.inference import (
    InputError,
    ModelArtifactError,
    ModelCache,
    ModelIntegrityError,
    Predictor,
    decode_b64,
    decode_image,
    images_to_batch,
    instances_to_batch,
    parse_json,
    predict_probabilities,
    sha256_file,
    tune_gc_for_serving,
)
from app.ml.nets import CLASS_NAMES

RNG = np.random.default_rng(0)


def pixels(n: int = 2) -> np.ndarray:
    return RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def tiny_model(dtype: str | None = None, classes: int = 10):
    import keras
    from keras import layers

    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            layers.Conv2D(4, 3, activation="relu", dtype=dtype),
            layers.GlobalAveragePooling2D(dtype=dtype),
            layers.Dense(classes, activation="softmax", dtype=dtype),
        ]
    )


@dataclass
class Row:
    """What the cache reads from a registry row."""

    name: str
    version: int
    sha256: str
    artifact_path: str


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[object, Path, str]:
    model = tiny_model()
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    model.save(path)
    return model, path, sha256_file(path)


@pytest.fixture(scope="module")
def predictor(saved) -> Predictor:
    _, path, sha = saved
    return Predictor.from_path(path, sha, name="tiny", version=1)


# ----------------------------------------------------------------------- instances_to_batch


def test_instances_become_float32_in_unit_range():
    x = pixels(3)
    batch = instances_to_batch(x.tolist())
    assert batch.dtype == np.float32 and batch.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(batch, x.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(instances_to_batch(x), batch)
    # Float pixel values are fine too, as long as they are in 0-255.
    assert instances_to_batch((x + 0.5).clip(0, 255).tolist()).max() <= 1.0


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
        instances_to_batch(value)
    assert info.value.code == code
    assert words in info.value.message
    assert "reshape" not in info.value.message


def test_ragged_instances_name_the_culprit():
    x = pixels(3).tolist()
    x[1][5].pop()  # row 5 of image 1 now has 31 pixels
    with pytest.raises(InputError) as info:
        instances_to_batch(x)
    assert info.value.code == "bad_shape"
    assert "instance 1" in info.value.message and "unequal length" in info.value.message

    y = pixels(3).tolist()
    y[2] = np.zeros((16, 16, 3), dtype=int).tolist()  # well formed, wrong size
    with pytest.raises(InputError) as info:
        instances_to_batch(y)
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
    assert gc.isenabled()


def test_serving_gc_tuning_never_turns_the_collector_off():
    before = gc.get_threshold()
    try:
        tune_gc_for_serving()
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0  # what was alive is out of the collector's walks
        assert gc.get_threshold()[0] >= 10_000
        parse_json(b'{"instances": [[1, 2.5]]}')
        with pytest.raises(InputError):
            parse_json(b"{")
        assert gc.isenabled()
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


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
    out = decode_image(encode(big), resize=True)
    assert out.shape == (32, 32, 3)
    # A flat image stays flat through the antialiasing filter.
    flat = np.full((100, 100, 3), 77, dtype=np.uint8)
    assert (decode_image(encode(flat), resize=True) == 77).all()


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


# ----------------------------------------------------------------------- the Predictor


def test_predictor_matches_the_model(saved, predictor):
    model, _, sha = saved
    assert predictor.sha256 == sha and (predictor.name, predictor.version) == ("tiny", 1)
    for n in (1, 7, 64):
        x = pixels(n).astype(np.float32) / 255
        probs = predictor.predict(x)
        assert probs.dtype == np.float32 and probs.shape == (n, 10)
        np.testing.assert_allclose(probs, np.asarray(model(x, training=False)), atol=1e-5)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    # TensorFlow: one trace (at warm-up) serves every batch size; JAX: one program per
    # power-of-two bucket (1, 8, 64).
    from app.ml import backend

    assert predictor._forward.traces() == (3 if backend.is_jax() else 1)


def test_predict_probabilities(predictor):
    x = pixels(4)
    out = predict_probabilities(predictor, images_to_batch(list(x)))
    assert len(out) == 4
    for item in out:
        assert len(item["probabilities"]) == 10
        assert abs(sum(item["probabilities"]) - 1) < 1e-5
        assert item["class_id"] == int(np.argmax(item["probabilities"]))
        assert item["class_name"] == CLASS_NAMES[item["class_id"]]
    # A single uint8 image (what decode_image returns) gives the same answer as in a batch.
    single = predict_probabilities(predictor, x[2])
    np.testing.assert_allclose(single[0]["probabilities"], out[2]["probabilities"], atol=1e-6)


def test_sha256_mismatch_refuses_to_load(saved):
    _, path, sha = saved
    wrong = ("0" if sha[0] != "0" else "1") + sha[1:]
    with pytest.raises(ModelIntegrityError, match="refusing to load"):
        Predictor.from_path(path, wrong)


def test_tampered_file_is_caught(saved, tmp_path):
    _, path, sha = saved
    copy = tmp_path / "tampered.keras"
    copy.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ModelIntegrityError):
        Predictor.from_path(copy, sha)


def test_missing_and_broken_artifacts(tmp_path):
    with pytest.raises(ModelArtifactError, match="does not exist"):
        Predictor.from_path(tmp_path / "nope.keras")
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(ModelArtifactError, match="could not load"):
        Predictor.from_path(junk, sha256_file(junk))


def test_safe_mode_refuses_lambda_layers(tmp_path):
    import keras

    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Lambda(lambda t: t * 2),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(ModelArtifactError, match="could not load"):
        Predictor.from_path(path, sha256_file(path))


def test_a_model_that_is_not_cifar10_is_refused():
    with pytest.raises(ModelArtifactError, match=r"expected \(32, 32, 3\) -> \(10,\)"):
        Predictor(tiny_model(classes=5))


def test_bfloat16_model_answers_float32_rows_summing_to_one():
    model = tiny_model(dtype="mixed_bfloat16")
    probs = Predictor(model).predict(pixels(8).astype(np.float32) / 255)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)


# ----------------------------------------------------------------------- the cache


def test_cache_loads_checks_and_resolves_relative_paths(saved):
    _, path, sha = saved
    cache = ModelCache(2, artifact_dir=path.parent)
    p = cache.get(Row("tiny", 1, sha, path.name))
    assert isinstance(p, Predictor) and p.sha256 == sha
    assert cache.get(Row("tiny", 1, sha, str(path))) is p
    with pytest.raises(ModelIntegrityError):
        cache.get(Row("tiny", 2, "f" * 64, str(path)))
    assert cache.keys() == [("tiny", 1, sha)]  # a failed load is not cached


def test_cache_is_a_bounded_lru(saved):
    model, _, _ = saved
    loads: list[int] = []

    def loader(row, _path):
        loads.append(row.version)
        return Predictor(model, name=row.name, version=row.version)

    cache = ModelCache(2, loader=loader)
    rows = [Row("m", v, f"{v:064x}", "unused") for v in (1, 2, 3)]
    a = cache.get(rows[0])
    cache.get(rows[1])
    assert cache.get(rows[0]) is a  # a hit moves version 1 to the front
    cache.get(rows[2])  # evicts version 2, the least recently used
    assert [k[1] for k in cache.keys()] == [1, 3]
    cache.get(rows[1])  # loaded again
    assert loads == [1, 2, 3, 2] and len(cache) == 2
    with pytest.raises(ValueError, match="size must be at least 1"):
        ModelCache(0)


def test_concurrent_requests_for_one_model_load_it_once(saved):
    model, _, _ = saved
    loads: list[int] = []

    def slow_loader(row, _path):
        loads.append(row.version)
        time.sleep(0.2)  # long enough for every thread to arrive while the load runs
        return Predictor(model, name=row.name, version=row.version)

    cache = ModelCache(2, loader=slow_loader)
    row = Row("m", 1, "a" * 64, "unused")
    got: list[Predictor] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(row))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [1]
    assert len(got) == 6 and all(p is got[0] for p in got)
