"""app/ml/backend.py and the training loops of app/ml/loops.py, on whichever Keras backend this
process runs (scripts/test.sh runs tests/ml under TensorFlow, then again under JAX)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from app.ml import backend
from app.ml.training import TrainConfig, checkpoint_epoch, train

from .test_training import synthetic

LOOPS_HERE = ["fit", "device"] if backend.is_jax() else ["fit", "data"]
ROOT = Path(__file__).resolve().parents[2]


def config(**overrides):
    base = dict(net="net1", epochs=2, batch_size=32, precision="float32", seed=1)
    return TrainConfig(**(base | overrides))


def test_name_follows_keras_backend_and_rejects_others(monkeypatch):
    assert backend.name() in backend.BACKENDS
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    with pytest.raises(backend.BackendError, match="tensorflow, jax"):
        backend.name()


def test_capability_parsing_and_precision_auto(monkeypatch):
    assert backend._capability("9.0") == (9, 0)
    assert backend._capability((7, 5)) == (7, 5)
    assert backend._capability(None) is None
    cases = {(9, 0): "mixed_bfloat16", (7, 5): "mixed_float16", (6, 1): "float32"}
    for cc, expected in cases.items():
        gpu = backend.Device("GPU", 0, "NVIDIA Test", cc)
        monkeypatch.setattr(backend, "gpus", lambda gpu=gpu: (gpu,))
        assert backend.resolve_precision("auto") == expected
        assert backend.describe_device() == "GPU:0 NVIDIA Test"
    assert backend.resolve_precision("float32") == "float32"
    monkeypatch.setattr(backend, "gpus", lambda: ())
    assert backend.describe_device() == "CPU"


def test_real_device_listing_on_this_host():
    assert backend.describe_device() in ("CPU",) or backend.describe_device().startswith("GPU:0 ")


class Recorder:
    """A Keras callback that logs what the loop drives, and the weights at each epoch end."""

    def __new__(cls, stop_after_epoch=None):
        import keras

        class _Recorder(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.events: list[tuple[str, int | None]] = []
                self.logs: list[dict] = []
                self.weights: list[list[np.ndarray]] = []

            def on_train_begin(self, logs=None):
                self.events.append(("train_begin", None))

            def on_epoch_begin(self, epoch, logs=None):
                self.events.append(("epoch_begin", epoch))

            def on_train_batch_end(self, batch, logs=None):
                self.events.append(("batch_end", batch))

            def on_epoch_end(self, epoch, logs=None):
                self.events.append(("epoch_end", epoch))
                self.logs.append(dict(logs or {}))
                self.weights.append([np.array(w) for w in self.model.get_weights()])
                if stop_after_epoch is not None and epoch >= stop_after_epoch:
                    self.model.stop_training = True

            def on_train_end(self, logs=None):
                self.events.append(("train_end", None))

        return _Recorder()


@pytest.mark.parametrize("loop", LOOPS_HERE)
def test_every_loop_drives_callbacks_and_syncs_the_model_each_epoch(loop):
    data = synthetic(n_train=150)  # 120 training images: 3 full batches of 32 and one of 24
    recorder = Recorder()
    result = train(config(epochs=2), data, loop=loop, steps_per_execution=2, callbacks=[recorder])
    kinds = [kind for kind, _ in recorder.events]
    assert kinds[0] == "train_begin" and kinds[-1] == "train_end"
    assert [e for k, e in recorder.events if k == "epoch_end"] == [0, 1]
    assert kinds.count("batch_end") >= 2  # at least one per epoch
    for logs in recorder.logs:
        assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(logs)
    # One optimizer update per batch, the last one partial, exactly as fit does.
    steps = math.ceil(120 / 32)
    assert int(np.asarray(result.model.optimizer.iterations.value)) == 2 * steps
    # The model's variables at the last epoch end are the returned model's.
    for seen, final in zip(recorder.weights[-1], result.model.get_weights(), strict=True):
        np.testing.assert_array_equal(seen, final)
    assert not all(
        np.array_equal(a, b) for a, b in zip(recorder.weights[0], recorder.weights[1], strict=True)
    )
    # The reported validation metrics are the model's own on those images.
    x_val = data.x_train[120:].astype(np.float32) / np.float32(255.0)
    again = result.model.evaluate(
        x_val, data.y_train[120:], batch_size=32, return_dict=True, verbose=0
    )
    assert result.epochs[-1].val_loss == pytest.approx(again["loss"], rel=1e-4, abs=1e-5)
    assert result.epochs[-1].val_accuracy == pytest.approx(again["accuracy"], abs=1e-6)


@pytest.mark.parametrize("loop", LOOPS_HERE)
def test_every_loop_stops_when_a_callback_asks(loop):
    recorder = Recorder(stop_after_epoch=0)
    result = train(config(epochs=4), synthetic(), loop=loop, callbacks=[recorder])
    assert [r.epoch for r in result.epochs] == [1]
    assert not result.cancelled


def test_the_fast_loop_resumes_exactly_from_its_checkpoint(tmp_path):
    loop = LOOPS_HERE[1]
    first = train(config(epochs=1), synthetic(), loop=loop, checkpoint_dir=tmp_path)
    assert checkpoint_epoch(tmp_path) == 1 and len(first.epochs) == 1
    resumed = train(config(epochs=2), synthetic(), loop=loop, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_epoch == 1 and [r.epoch for r in resumed.epochs] == [2]
    assert int(np.asarray(resumed.model.optimizer.iterations.value)) == 2 * 4


def test_compile_forward_matches_predict_for_any_batch_size():
    import keras

    from app.ml.nets import get_net

    keras.utils.set_random_seed(0)
    model = get_net("net1").builder()
    forward = backend.compile_forward(model)
    x = np.random.default_rng(0).random((5, 32, 32, 3), dtype=np.float32)
    expected = np.asarray(model.predict(x, verbose=0))
    for n in (1, 3, 5):
        out = forward(x[:n])
        assert out.dtype == np.float32 and out.shape == (n, 10)
        np.testing.assert_allclose(out, expected[:n], rtol=1e-5, atol=1e-6)


def test_loop_names_are_checked():
    with pytest.raises(ValueError, match="loop must be one of"):
        train(config(), synthetic(), loop="fast")
    other = "data" if backend.is_jax() else "device"
    with pytest.raises(ValueError, match="KERAS_BACKEND"):
        train(config(), synthetic(), loop=other)


# ---------------------------------------------------------------------------- cross-backend
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    from app.ml.inference import Predictor
    sys.path.insert(0, sys.argv[3])
    from test_backend_models import probe, saved_model
    folder, other = sys.argv[1], sys.argv[2]
    loaded = keras.saving.load_model(f"{folder}/{other}", safe_mode=True)
    mine = saved_model(f"{folder}/model-{keras.backend.backend()}.keras")
    out = {
        "backend": keras.backend.backend(),
        "loaded": np.asarray(loaded.predict(probe(), verbose=0)).tolist(),
        "served": Predictor(loaded).predict(probe()).tolist(),
        "mine": np.asarray(mine.predict(probe(), verbose=0)).tolist(),
    }
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.timeout(1200)
@pytest.mark.skipif(backend.is_jax(), reason="run once, from the TensorFlow pass")
def test_models_saved_under_one_backend_predict_identically_under_the_other(tmp_path):
    """TensorFlow here, JAX in one subprocess: each loads the other's .keras file."""
    pytest.importorskip("jax")
    import keras

    from app.ml.inference import Predictor

    from .test_backend_models import probe, saved_model

    on_tf = saved_model(str(tmp_path / "model-tensorflow.keras"))
    expected_tf = np.asarray(on_tf.predict(probe(), verbose=0))
    env = {**os.environ, "KERAS_BACKEND": "jax", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(tmp_path),
            "model-tensorflow.keras",
            str(Path(__file__).parent),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1000,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    on_jax = json.loads(line[len("RESULT ") :])
    assert on_jax["backend"] == "jax"
    np.testing.assert_allclose(on_jax["loaded"], expected_tf, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(on_jax["served"], expected_tf, rtol=1e-5, atol=1e-6)
    from_jax = keras.saving.load_model(tmp_path / "model-jax.keras", safe_mode=True)
    np.testing.assert_allclose(
        from_jax.predict(probe(), verbose=0), on_jax["mine"], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        Predictor(from_jax).predict(probe()), on_jax["mine"], rtol=1e-5, atol=1e-6
    )
