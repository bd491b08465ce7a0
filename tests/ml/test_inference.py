"""The prediction core: the compiled Predictor and the model cache (input parsing and
decoding live in app.serving.inputs, tested in tests/serving/test_inputs.py)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from app.ml.data import normalise
from app.ml.inference import (
    ModelArtifactError,
    ModelCache,
    ModelIntegrityError,
    Predictor,
    predict_probabilities,
    sha256_file,
)
from app.ml.nets import CLASS_NAMES

RNG = np.random.default_rng(0)


def pixels(n: int = 2) -> np.ndarray:
    return RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


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
    out = predict_probabilities(predictor, normalise(x))
    assert len(out) == 4
    for item in out:
        assert len(item["probabilities"]) == 10
        assert abs(sum(item["probabilities"]) - 1) < 1e-5
        assert item["class_id"] == int(np.argmax(item["probabilities"]))
        assert item["class_name"] == CLASS_NAMES[item["class_id"]]
    # A single uint8 image (what decode_image returns) gives the same answer as in a batch.
    single = predict_probabilities(predictor, x[2])
    np.testing.assert_allclose(single[0]["probabilities"], out[2]["probabilities"], atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 32, 32), (2, 28, 28, 3), (32, 32, 3)])
def test_a_batch_of_another_shape_is_a_value_error_not_a_request_error(predictor, shape):
    from app.errors import DomainError

    with pytest.raises(ValueError, match=r"shape \(N, \*\(32, 32, 3\)\)") as info:
        predictor.predict(np.zeros(shape, dtype=np.float32))
    assert not isinstance(info.value, DomainError)  # app.serving words the client's errors


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
