"""POST /predict and /predict/image through HTTP, on the real PostgreSQL registry."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from PIL import Image

from app.ml.nets import CLASS_NAMES

RNG = np.random.default_rng(7)


def image(h: int = 32, w: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tiny_model_bytes(tmp: Path, seed: int) -> tuple[bytes, Any]:
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            layers.Conv2D(4, 3, activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(10, activation="softmax"),
        ]
    )
    path = tmp / f"tiny-{seed}.keras"
    model.save(path)
    return path.read_bytes(), model


@pytest.fixture(scope="module")
def trained_net1(tmp_path_factory) -> bytes:
    """NET I trained by the core (app.ml.training.train) for one epoch on a tiny subset."""
    from app.ml.data import Cifar10
    from app.ml.training import TrainConfig, train

    rng = np.random.default_rng(0)
    data = Cifar10(
        x_train=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, 64),
        x_test=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, 8),
        source="synthetic",
    )
    result = train(TrainConfig(net="net1", epochs=1, batch_size=32, train_limit=48), data)
    assert len(result.epochs) == 1
    path = tmp_path_factory.mktemp("net1") / "net1.keras"
    result.model.save(path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> list[tuple[bytes, Any]]:
    folder = tmp_path_factory.mktemp("tiny")
    return [tiny_model_bytes(folder, seed) for seed in (1, 2)]


def predict(client: Any, **body: Any) -> Any:
    return client.post("/predict", content=orjson.dumps(body), headers=JSON)


JSON = {"Content-Type": "application/json"}


def check_answer(body: dict[str, Any], name: str, version: int, n: int) -> np.ndarray:
    assert body["model"] == {"name": name, "version": version}
    assert body["classes"] == list(CLASS_NAMES)
    assert len(body["predictions"]) == n
    probs = np.array([p["probabilities"] for p in body["predictions"]])
    assert probs.shape == (n, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs >= 0).all()
    for p, row in zip(body["predictions"], probs, strict=True):
        assert p["class_id"] == int(row.argmax())
        assert p["class_name"] == CLASS_NAMES[p["class_id"]]
    return probs


# ------------------------------------------------------------------------- happy paths


def test_one_image_in_three_forms_gets_identical_answers(client, register_model, trained_net1):
    register_model("net1", trained_net1)
    x = image()
    data = png(x)

    as_instances = predict(client, model="net1", instances=[x.tolist()])
    as_b64 = predict(client, model="net1", images=[{"b64": b64(data)}])
    as_upload = client.post(
        "/predict/image", data={"model": "net1"}, files={"file": ("x.png", data, "image/png")}
    )
    results = []
    for response in (as_instances, as_b64, as_upload):
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        results.append(check_answer(response.json(), "net1", 1, 1))
    np.testing.assert_allclose(results[0], results[1], atol=1e-6)
    np.testing.assert_allclose(results[0], results[2], atol=1e-6)


def test_batches_answer_per_instance_like_the_model(client, register_model, tiny_models):
    content, model = tiny_models[0]
    register_model("tiny", content)
    x = np.stack([image() for _ in range(5)])
    response = predict(client, model="tiny", instances=x.tolist())
    assert response.status_code == 200, response.text
    probs = check_answer(response.json(), "tiny", 1, 5)
    expected = np.asarray(model(x.astype(np.float32) / 255, training=False))
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    # The same images as base64 PNGs, one JPEG among them, in one request.
    images = [{"b64": b64(png(i))} for i in x] + [{"b64": b64(png(x[0], "JPEG"))}]
    response = predict(client, model="tiny", images=images)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(check_answer(response.json(), "tiny", 1, 6)[:5], probs, atol=1e-6)


def test_latest_version_and_alias_resolution(client, register_model, tiny_models, session_factory):
    from app.registry import versions as registry

    (c1, m1), (c2, m2) = tiny_models
    register_model("pair", c1)
    register_model("pair", c2)
    x = np.stack([image(), image()])
    want = {
        1: np.asarray(m1(x / np.float32(255), training=False)),
        2: np.asarray(m2(x / np.float32(255), training=False)),
    }
    assert not np.allclose(want[1], want[2], atol=1e-4)  # the two versions really differ

    def served(**which: Any) -> tuple[int, np.ndarray]:
        response = predict(client, model="pair", instances=x.tolist(), **which)
        assert response.status_code == 200, response.text
        body = response.json()
        return body["model"]["version"], check_answer(body, "pair", body["model"]["version"], 2)

    version, probs = served()
    assert version == 2  # without version or alias: the latest
    np.testing.assert_allclose(probs, want[2], atol=1e-5)
    version, probs = served(version=1)
    assert version == 1
    np.testing.assert_allclose(probs, want[1], atol=1e-5)

    # Moved through this API: the very next request follows the alias.
    assert client.put("/models/pair/aliases/production", json={"version": 1}).status_code == 200
    version, probs = served(alias="production")
    assert version == 1
    np.testing.assert_allclose(probs, want[1], atol=1e-5)
    assert client.put("/models/pair/aliases/production", json={"version": 2}).status_code == 200
    version, probs = served(alias="production")
    assert version == 2
    np.testing.assert_allclose(probs, want[2], atol=1e-5)

    # Moved by another process (here: straight in the database): served once the API's
    # registry check (every REGISTRY_POLL_S) has seen it.
    with session_factory() as session:
        registry.set_alias(session, "pair", "production", 1)
        session.commit()
    deadline = time.monotonic() + 30
    while served(alias="production")[0] != 1:
        assert time.monotonic() < deadline, "the alias move was never picked up"
        time.sleep(0.2)
    version, probs = served(alias="production")
    np.testing.assert_allclose(probs, want[1], atol=1e-5)

    # Through the API as well, and for uploads.
    assert client.put("/models/pair/aliases/production", json={"version": 1}).status_code == 200
    response = client.post(
        "/predict/image",
        data={"model": "pair", "alias": "production"},
        files={"file": ("x.png", png(x[0]), "image/png")},
    )
    assert response.status_code == 200, response.text
    assert response.json()["model"] == {"name": "pair", "version": 1}
    np.testing.assert_allclose(
        response.json()["predictions"][0]["probabilities"], want[1][0], atol=1e-5
    )


def test_resize_on_request(client, register_model, tiny_models, expect_error):
    register_model("tiny", tiny_models[0][0])
    big = png(image(64, 48))
    error = expect_error(
        predict(client, model="tiny", images=[{"b64": b64(big)}]), 422, "image_size"
    )
    assert "48x64, expected 32x32" in error["message"] and "resize" in error["message"]
    response = predict(client, model="tiny", images=[{"b64": b64(big)}], resize=True)
    assert response.status_code == 200, response.text
    check_answer(response.json(), "tiny", 1, 1)

    upload = {"file": ("big.png", big, "image/png")}
    expect_error(
        client.post("/predict/image", data={"model": "tiny"}, files=upload), 422, "image_size"
    )
    response = client.post("/predict/image", data={"model": "tiny", "resize": "true"}, files=upload)
    assert response.status_code == 200, response.text
    check_answer(response.json(), "tiny", 1, 1)


# ------------------------------------------------------------------------- bad input

PIXELS = image()


def _url_safe_png() -> str:
    for _ in range(50):
        encoded = base64.urlsafe_b64encode(png(image())).decode()
        if "-" in encoded or "_" in encoded:
            return encoded
    raise AssertionError("no URL-safe-specific characters in 50 random PNGs")


def _unpadded_png() -> str:
    for _ in range(50):
        encoded = b64(png(image()))
        if encoded.endswith("="):
            return encoded.rstrip("=")
    raise AssertionError("no padded base64 in 50 random PNGs")


BAD_BODIES = [
    # (id, body, status, code, words in the message)
    (
        "wrong_shape",
        {"instances": np.zeros((1, 32, 32, 1)).tolist()},
        422,
        "bad_shape",
        "expected instances of shape (N, 32, 32, 3)",
    ),
    ("unwrapped_image", {"instances": PIXELS.tolist()}, 422, "bad_shape", "wrap it in a list"),
    (
        "ragged",
        {"instances": [PIXELS.tolist(), PIXELS[:, :31].tolist()]},
        422,
        "bad_shape",
        "instance 1",
    ),
    (
        "value_300",
        {"instances": [np.full((32, 32, 3), 300).tolist()]},
        422,
        "bad_range",
        "between 0 and 255",
    ),
    (
        "value_minus_1",
        {"instances": [np.full((32, 32, 3), -1).tolist()]},
        422,
        "bad_range",
        "between 0 and 255",
    ),
    (
        "huge_1e308",
        {"instances": [np.full((32, 32, 3), 1e308).tolist()]},
        422,
        "bad_range",
        "between 0 and 255",
    ),
    ("strings", {"instances": [np.full((32, 32, 3), "1").tolist()]}, 422, "bad_value", "numbers"),
    ("empty", {"instances": []}, 422, "empty_batch", "at least one"),
    ("neither", {}, 422, "validation_error", "exactly one of"),
    (
        "both",
        {"instances": [PIXELS.tolist()], "images": [{"b64": b64(png(PIXELS))}]},
        422,
        "validation_error",
        "exactly one of",
    ),
    ("typo_field", {"instance": [PIXELS.tolist()]}, 422, "validation_error", "instance"),
    (
        "version_and_alias",
        {"instances": [PIXELS.tolist()], "version": 1, "alias": "x"},
        422,
        "validation_error",
        "either 'version' or 'alias'",
    ),
    (
        "version_0",
        {"instances": [PIXELS.tolist()], "version": 0},
        422,
        "validation_error",
        "version",
    ),
    (
        "undecodable",
        {"images": [{"b64": b64(b"GIF89a not really")}]},
        422,
        "bad_image",
        "images[0]: could not decode the image; expected a PNG or JPEG",
    ),
    ("url_safe_b64", {"images": [{"b64": _url_safe_png()}]}, 422, "bad_base64", "standard base64"),
    (
        "missing_padding",
        {"images": [{"b64": _unpadded_png()}]},
        422,
        "bad_base64",
        "standard base64",
    ),
    ("image_not_object", {"images": ["abc"]}, 422, "validation_error", '{"b64"'),
]


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [case[1:] for case in BAD_BODIES],
    ids=[case[0] for case in BAD_BODIES],
)
def test_bad_bodies_get_a_4xx_saying_what_was_expected(
    client, register_model, expect_error, body, status, code, words
):
    # Registered (images are decoded only for a model that exists), never loaded: every
    # case fails before the model would be.
    register_model("anything")
    body = {"model": "anything", **body}
    error = expect_error(predict(client, **body), status, code)
    assert words in error["message"]
    assert len(error["message"]) < 400  # says what is wrong without echoing the payload


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b'{"model": "m", "instances": [[[[NaN, 0, 0]]]]}', 422, "not_finite"),
        (b'{"model": "m", "instances": [[[[1e400, 0, 0]]]]}', 422, "not_finite"),
        (b'{"model": "m", "instances": [[[[0, 0, 0]]]', 400, "bad_json"),
        (b"", 400, "bad_json"),
        (b"[1, 2, 3]", 422, "validation_error"),
    ],
    ids=["nan", "1e400", "truncated", "empty", "array"],
)
def test_bad_json(client, expect_error, raw, status, code):
    expect_error(client.post("/predict", content=raw, headers=JSON), status, code)


def test_wrong_content_types_get_415(client, expect_error):
    body = orjson.dumps({"model": "m", "instances": [PIXELS.tolist()]})
    error = expect_error(
        client.post("/predict", content=body, headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    assert "application/json" in error["message"]
    upload = {"file": ("x.png", png(PIXELS), "image/png")}
    expect_error(
        client.post("/predict", data={"model": "m"}, files=upload), 415, "unsupported_media_type"
    )
    error = expect_error(
        client.post("/predict/image", content=body, headers=JSON), 415, "unsupported_media_type"
    )
    assert "multipart/form-data" in error["message"]


def test_bad_uploads(client, register_model, tiny_models, expect_error):
    register_model("tiny", tiny_models[0][0])
    post = client.post
    expect_error(
        post("/predict/image", data={"model": "tiny"}, files={"file": ("x", b"junk", "image/png")}),
        422,
        "bad_image",
    )
    expect_error(
        post(
            "/predict/image",
            data={"model": "tiny"},
            files={"file": ("x.gif", png(PIXELS, "GIF"), "image/gif")},
        ),
        422,
        "bad_image",
    )
    expect_error(  # no file at all
        post("/predict/image", data={"model": "tiny"}, files={"other": ("x", b"1", "text/plain")}),
        422,
        "validation_error",
    )
    expect_error(
        post(
            "/predict/image",
            data={"model": "tiny", "version": "abc"},
            files={"file": ("x.png", png(PIXELS), "image/png")},
        ),
        422,
        "validation_error",
    )


def test_an_upload_over_the_file_limit_is_refused_by_the_route(
    settings, client_for, register_model, tiny_models, expect_error
):
    """UPLOAD_MAX_FILE_BYTES bounds the file itself: a file just over it still fits the
    body limit (which leaves room for the form fields), and the route refuses it."""
    register_model("tiny", tiny_models[0][0])
    limit = 4096
    with client_for(settings.model_copy(update={"UPLOAD_MAX_FILE_BYTES": limit})) as small:
        fits = png(image(), "PNG")
        assert len(fits) <= limit
        ok = small.post(
            "/predict/image", data={"model": "tiny"}, files={"file": ("x.png", fits, "image/png")}
        )
        assert ok.status_code == 200, ok.text
        over = fits + b"\0" * (limit + 1 - len(fits))
        error = expect_error(
            small.post(
                "/predict/image",
                data={"model": "tiny"},
                files={"file": ("x.png", over, "image/png")},
            ),
            413,
            "too_large",
        )
    assert "4,096 bytes (UPLOAD_MAX_FILE_BYTES)" in error["message"]


def test_unknown_model_version_or_alias_is_404(client, register_model, tiny_models, expect_error):
    register_model("tiny", tiny_models[0][0])
    x = [PIXELS.tolist()]
    error = expect_error(predict(client, model="nope", instances=x), 404, "model_not_found")
    assert "nope" in error["message"]
    expect_error(predict(client, model="tiny", version=9, instances=x), 404, "model_not_found")
    expect_error(predict(client, model="tiny", alias="gone", instances=x), 404, "model_not_found")
    expect_error(
        client.post(
            "/predict/image",
            data={"model": "nope"},
            files={"file": ("x.png", png(PIXELS), "image/png")},
        ),
        404,
        "model_not_found",
    )


@pytest.fixture
def small_client(clean_db: None, settings: Any, client_for: Any) -> Iterator[Any]:
    """An app that takes at most 2 instances per request."""
    with client_for(settings.model_copy(update={"PREDICT_MAX_INSTANCES": 2})) as c:
        yield c


def test_too_many_instances(small_client, expect_error):
    x = [PIXELS.tolist()] * 3
    error = expect_error(predict(small_client, model="m", instances=x), 413, "too_many_instances")
    assert "at most 2" in error["message"]
    images = [{"b64": b64(png(PIXELS))}] * 3
    expect_error(predict(small_client, model="m", images=images), 413, "too_many_instances")


def test_tampered_or_missing_artifact_is_not_served(
    client, register_model, tiny_models, expect_error
):
    row = register_model("tiny", tiny_models[0][0])
    path = Path(row.artifact_path)
    path.write_bytes(tiny_models[1][0])  # another valid model, but not the registered bytes
    error = expect_error(
        predict(client, model="tiny", instances=[PIXELS.tolist()]), 503, "model_unavailable"
    )
    assert "sha256" in error["message"] and str(path) not in error["message"]
    path.unlink()
    error = expect_error(
        predict(client, model="tiny", instances=[PIXELS.tolist()]), 503, "model_unavailable"
    )
    assert "missing" in error["message"]


def test_openapi_documents_both_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    body = paths["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "version", "alias", "instances", "images", "resize"} <= set(body["properties"])
    assert "multipart/form-data" in paths["/predict/image"]["post"]["requestBody"]["content"]
