"""/predict's serving path: new input forms, micro-batching, in-memory resolution, lean output."""

from __future__ import annotations

import base64
import gc
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from PIL import Image

from app.ml.nets import CLASS_NAMES

RNG = np.random.default_rng(11)
JSON = {"Content-Type": "application/json"}
OCTET = {"Content-Type": "application/octet-stream"}


def images(n: int) -> np.ndarray:
    return RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tensor(x: np.ndarray) -> dict[str, Any]:
    return {"b64": b64(x.tobytes()), "shape": list(x.shape), "dtype": "uint8"}


def post(client: Any, **body: Any) -> Any:
    return client.post("/predict", content=orjson.dumps(body), headers=JSON)


def probs_of(response: Any) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([p["probabilities"] for p in response.json()["predictions"]])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[bytes]:
    import keras
    from keras import layers

    folder: Path = tmp_path_factory.mktemp("serving-models")
    out = []
    for seed in (5, 6):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential(
            [
                keras.Input((32, 32, 3)),
                layers.Conv2D(4, 3, activation="relu"),
                layers.GlobalAveragePooling2D(),
                layers.Dense(10, activation="softmax"),
            ]
        )
        path = folder / f"m{seed}.keras"
        model.save(path)
        out.append(path.read_bytes())
    return out


def test_new_input_forms_agree_with_the_old_ones_to_the_last_bit(client, register_model, models):
    register_model("forms", models[0])
    x = images(4)
    reference = probs_of(post(client, model="forms", instances=x.tolist()))
    answers = {
        "png": post(client, model="forms", images=[{"b64": b64(png(i))} for i in x]),
        "tensor": post(client, model="forms", tensor=tensor(x)),
        "octet, shape in the query": client.post(
            "/predict?model=forms&shape=4,32,32,3", content=x.tobytes(), headers=OCTET
        ),
        "octet, shape in a header, N left out": client.post(
            "/predict?model=forms",
            content=x.tobytes(),
            headers={**OCTET, "X-Tensor-Shape": "32,32,3"},
        ),
        "octet, no shape": client.post(
            "/predict?model=forms&version=1", content=x.tobytes(), headers=OCTET
        ),
    }
    for form, response in answers.items():
        np.testing.assert_array_equal(probs_of(response), reference, err_msg=form)
        assert response.json()["model"] == {"name": "forms", "version": 1}
    one = probs_of(post(client, model="forms", instances=x[:1].tolist()))
    upload = client.post(
        "/predict/image", data={"model": "forms"}, files={"file": ("x.png", png(x[0]), "image/png")}
    )
    np.testing.assert_array_equal(probs_of(upload), one)
    raw_one = client.post("/predict?model=forms", content=x[0].tobytes(), headers=OCTET)
    np.testing.assert_array_equal(probs_of(raw_one), one)


def test_concurrent_callers_each_get_their_own_probabilities(client, register_model, models):
    register_model("batched", models[0])
    x = images(24)
    alone = [probs_of(post(client, model="batched", instances=[img.tolist()]))[0] for img in x]
    service = client.app.state.prediction
    (batcher,) = service._batchers.values()
    forward = batcher.forward

    held: list[int] = []

    def held_forward(rows: np.ndarray) -> np.ndarray:
        # Hold the first pass until requests have queued behind it, so that passes are shared.
        deadline = time.monotonic() + 5
        while not held and len(batcher._queue) < 6 and time.monotonic() < deadline:
            time.sleep(0.005)
        held.append(len(rows))
        return forward(rows)

    batcher.forward = held_forward
    forms = ["instances", "tensor", "octet"]

    def one(i: int) -> np.ndarray:
        form = forms[i % 3]
        if form == "instances":
            response = post(client, model="batched", instances=[x[i].tolist()])
        elif form == "tensor":
            response = post(client, model="batched", tensor=tensor(x[i : i + 1]))
        else:
            response = client.post("/predict?model=batched", content=x[i].tobytes(), headers=OCTET)
        return probs_of(response)[0]

    passes_before = batcher.passes
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(one, range(len(x))))
    assert batcher.largest > 1  # some passes really were shared
    assert batcher.passes - passes_before < len(x)
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        # A batched pass may round the last bit differently from a pass of one row; a mix-up
        # between callers would be off by far more (random images differ at 1e-3 and above).
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6, err_msg=f"caller {i}")
        others = [np.abs(b - alone[j]).max() for j in range(len(x)) if j != i]
        assert min(others) > 1e-5


def test_resolution_is_in_memory_and_a_moved_alias_is_served_next(client, register_model, models):
    register_model("pair", models[0])
    register_model("pair", models[1])
    x = images(2).tolist()
    assert client.put("/models/pair/aliases/live", json={"version": 1}).status_code == 200
    first = probs_of(post(client, model="pair", alias="live", instances=x))
    registry_view = client.app.state.prediction.registry
    loads = registry_view.loads
    for _ in range(5):
        response = post(client, model="pair", alias="live", instances=x)
        assert response.json()["model"]["version"] == 1
        post(client, model="pair", instances=x)  # the latest: version 2
    assert registry_view.loads == loads  # no database read on the hot path

    assert client.put("/models/pair/aliases/live", json={"version": 2}).status_code == 200
    response = post(client, model="pair", alias="live", instances=x)
    assert response.json()["model"] == {"name": "pair", "version": 2}
    assert not np.allclose(probs_of(response), first, atol=1e-4)
    np.testing.assert_array_equal(
        probs_of(response), probs_of(post(client, model="pair", instances=x))
    )


def test_a_version_registered_elsewhere_is_served_without_waiting(client, register_model, models):
    register_model("grows", models[0])
    x = images(1).tolist()
    assert post(client, model="grows", instances=x).json()["model"]["version"] == 1
    register_model("grows", models[1])  # as a worker process would
    # An explicit new version is looked up at once; "latest" follows within REGISTRY_POLL_S.
    assert post(client, model="grows", version=2, instances=x).json()["model"]["version"] == 2
    deadline = time.monotonic() + 30
    while post(client, model="grows", instances=x).json()["model"]["version"] != 2:
        assert time.monotonic() < deadline, "the new version never became the latest"
        time.sleep(0.2)


def test_top_k_and_probabilities_only(client, register_model, models):
    register_model("lean", models[0])
    x = images(3)
    full = probs_of(post(client, model="lean", instances=x.tolist()))

    body = post(client, model="lean", instances=x.tolist(), output="probabilities").json()
    assert set(body) == {"model", "classes", "probabilities"}
    assert body["classes"] == list(CLASS_NAMES)
    np.testing.assert_array_equal(np.array(body["probabilities"]), full)

    body = post(client, model="lean", tensor=tensor(x), top_k=3).json()
    for row, p in zip(full, body["predictions"], strict=True):
        assert set(p) == {"class_id", "class_name", "top_k"}
        ids = [t["class_id"] for t in p["top_k"]]
        assert ids == list(np.argsort(-row, kind="stable")[:3])
        assert p["class_id"] == ids[0] and p["class_name"] == CLASS_NAMES[ids[0]]
        assert [t["class_name"] for t in p["top_k"]] == [CLASS_NAMES[i] for i in ids]
        np.testing.assert_array_equal([t["probability"] for t in p["top_k"]], row[ids])

    response = client.post(
        "/predict?model=lean&top_k=2&output=probabilities", content=x.tobytes(), headers=OCTET
    )
    body = response.json()
    assert set(body) == {"model", "classes", "probabilities", "class_ids"}
    order = np.argsort(-full, axis=1, kind="stable")[:, :2]
    assert body["class_ids"] == order.tolist()
    np.testing.assert_array_equal(body["probabilities"], np.take_along_axis(full, order, 1))


def test_the_model_is_resolved_before_any_image_is_decoded(client, expect_error):
    from tests.serving.test_inputs import bomb_png

    for data in (bomb_png(20000, 20000), b"GIF89a not an image"):
        body = {"model": "nope", "images": [{"b64": b64(data)}] * 8, "resize": True}
        expect_error(post(client, **body), 404, "model_not_found")


def test_images_too_large_to_decode_are_422_not_500(client, register_model, models, expect_error):
    from tests.serving.test_inputs import bomb_png

    register_model("guarded", models[0])
    bomb = bomb_png(20000, 20000)
    expect_error(post(client, model="guarded", images=[{"b64": b64(bomb)}]), 422, "image_size")
    expect_error(
        client.post(
            "/predict/image",
            data={"model": "guarded", "resize": "true"},
            files={"file": ("bomb.png", bomb, "image/png")},
        ),
        422,
        "image_size",
    )


def test_bad_raw_requests(client, register_model, models, expect_error):
    register_model("raw", models[0])
    x = images(2)
    error = expect_error(
        client.post("/predict?model=raw&shape=3,32,32,3", content=x.tobytes(), headers=OCTET),
        422,
        "bad_shape",
    )
    assert "6144" in error["message"] and "9216" in error["message"]
    expect_error(
        client.post("/predict?model=raw", content=x.tobytes()[:-1], headers=OCTET),
        422,
        "bad_shape",
    )
    expect_error(
        client.post("/predict?model=raw&colour=1", content=x.tobytes(), headers=OCTET),
        422,
        "validation_error",
    )
    expect_error(
        client.post("/predict", content=x.tobytes(), headers=OCTET), 422, "validation_error"
    )
    expect_error(
        client.post("/predict?model=gone", content=x.tobytes(), headers=OCTET),
        404,
        "model_not_found",
    )


def test_the_collector_stays_on_while_requests_overlap(client, register_model, models):
    register_model("gc", models[0])
    x = images(8).tolist()
    stop = threading.Event()
    seen_off: list[bool] = []

    def watch() -> None:
        while not stop.is_set():
            seen_off.append(not gc.isenabled())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: post(client, model="gc", instances=x), range(12)))
    finally:
        stop.set()
        watcher.join()
    assert gc.isenabled() and not any(seen_off)


def test_past_max_pending_the_answer_is_503_overloaded_with_retry_after(client, expect_error):
    service = client.app.state.prediction
    service._pending = service.settings.PREDICT_MAX_PENDING  # as if that many were in flight
    try:
        response = post(client, model="any", instances=images(1).tolist())
        expect_error(response, 503, "overloaded")
        assert response.headers["retry-after"] == "1"
    finally:
        service._pending = 0
    assert client.get("/health").status_code == 200
