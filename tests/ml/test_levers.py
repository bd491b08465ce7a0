"""Issue 11's levers do what they say: augmentation, label smoothing, schedules, early stopping."""

import math

import numpy as np
import pytest

from app.ml.data import Cifar10
from app.ml.params import TrainConfig
from app.ml.training import split_validation, train


def config(**overrides):
    base = dict(net="net1", epochs=2, batch_size=32, precision="float32", seed=1)
    return TrainConfig(**(base | overrides))


def synthetic(n_train=160, n_test=40, seed=0, random_labels=False):
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 10, size=n)
        x = rng.integers(0, 60, size=(n, 32, 32, 3))
        if not random_labels:
            x += (y * 20)[:, None, None, None]
        return x.astype(np.uint8), y.astype(np.int64)

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    return Cifar10(x_train, y_train, x_test, y_test, source="synthetic")


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "bad",
    [
        {"augment_crop": -1},
        {"augment_crop": 17},
        {"cutout": 33},
        {"label_smoothing": 1.0},
        {"weight_decay": 0.01},  # needs adamw
        {"optimizer": "adamw", "weight_decay": -1},
        {"clipnorm": 0},
        {"lr_schedule": "step"},
        {"warmup_epochs": 2},  # not below epochs=2
        {"early_stopping_patience": 0},
        {"early_stopping_patience": 3, "validation_split": 0.0},
    ],
)
def test_lever_bounds_are_enforced(bad):
    with pytest.raises(ValueError, match="Received"):
        config(**bad)


def test_levers_are_off_by_default():
    assert config().levers == {}
    assert config(augment_flip=True, lr_schedule="cosine").levers == {
        "augment_flip": True,
        "lr_schedule": "cosine",
    }


# ----------------------------------------------------------------------------- augmentation
def _images(n=6, seed=3):
    rng = np.random.default_rng(seed)
    return rng.random((n, 32, 32, 3)).astype("float32") + 0.1  # no zero pixels in the source


def test_pad_crop_gives_windows_of_the_same_image_and_is_off_at_inference():
    from app.ml.augment import RandomPadCrop

    x = _images()
    layer = RandomPadCrop(4, seed=7)
    out = np.asarray(layer(x, training=True))
    assert out.shape == x.shape
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    padded = np.pad(x, [(0, 0), (4, 4), (4, 4), (0, 0)])
    shifts = []
    for i in range(len(x)):
        # Image i's output is a 32x32 window of image i's padded copy (so its label still fits).
        match = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if np.array_equal(out[i], padded[i, dy : dy + 32, dx : dx + 32])
        ]
        assert match, f"image {i} is not a crop of its own source"
        shifts.append(match[0])
    assert any(shift != (4, 4) for shift in shifts)  # not all centred: the batch changed
    assert not np.array_equal(out, x)


def test_flip_and_cutout_change_the_batch_and_keep_each_image_in_place():
    import keras

    from app.ml.augment import Cutout

    x = _images(16)
    flip = keras.layers.RandomFlip("horizontal", seed=5)
    flipped = np.asarray(flip(x, training=True))
    mirrored = [np.allclose(flipped[i], x[i, :, ::-1]) for i in range(len(x))]
    unchanged = [np.allclose(flipped[i], x[i]) for i in range(len(x))]
    assert all(m or u for m, u in zip(mirrored, unchanged, strict=True))
    assert any(mirrored) and any(unchanged)

    cut = np.asarray(Cutout(8, seed=5)(x, training=True))
    for i in range(len(x)):
        erased = np.all(cut[i] == 0, axis=-1)
        assert 0 < erased.sum() <= 64  # one square of at most 8x8, clipped at the border
        rows, cols = np.nonzero(erased)
        assert erased[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        np.testing.assert_array_equal(cut[i][~erased], x[i][~erased])
    np.testing.assert_array_equal(np.asarray(Cutout(8)(x, training=False)), x)


def test_augmented_model_trains_and_stores_the_plain_net():
    result = train(
        config(epochs=1, augment_crop=4, augment_flip=True, cutout=8), synthetic(n_train=64)
    )
    assert result.model.name == "net1"  # the augmentation front is not in the stored model
    assert not any("augment" in layer.name for layer in result.model.layers)
    assert math.isfinite(result.epochs[0].loss)


# ----------------------------------------------------------------------------- label smoothing
def test_label_smoothing_follows_its_formula():
    from app.ml.optim import SmoothedSparseCrossentropy, make_loss

    rng = np.random.default_rng(0)
    logits = 4 * rng.normal(size=(5, 10))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = p.argmax(axis=1)  # confident and right: smoothing must raise the loss
    eps = 0.1
    target = np.full((5, 10), eps / 10) + (1 - eps) * np.eye(10)[y]
    expected = float(np.mean(-(target * np.log(p)).sum(axis=1)))
    got = float(SmoothedSparseCrossentropy(eps)(y, p.astype("float32")))
    assert got == pytest.approx(expected, rel=1e-5)
    plain = float(np.mean(-np.log(p[np.arange(5), y])))
    assert float(SmoothedSparseCrossentropy(0.0)(y, p.astype("float32"))) == pytest.approx(
        plain, rel=1e-5
    )
    assert got > plain * 1.1
    assert make_loss(config()) == "sparse_categorical_crossentropy"


# ----------------------------------------------------------------------------- schedules
def test_schedule_shapes():
    from app.ml.optim import lr_at

    def at(schedule, t, warm=0):
        return lr_at(t, peak=1.0, schedule=schedule, epochs=10, warmup_epochs=warm)

    assert [at("constant", t) for t in (0, 5, 10)] == [1.0, 1.0, 1.0]
    assert [at("constant", t, warm=2) for t in (0, 1, 2, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert at("cosine", 0) == 1.0 and at("cosine", 5) == pytest.approx(0.5)
    assert at("cosine", 10) == pytest.approx(0.0, abs=1e-12)
    assert at("cosine", 2, warm=2) == 1.0 and at("cosine", 6, warm=2) == pytest.approx(0.5)
    assert at("one_cycle", 0) == pytest.approx(1 / 25) and at("one_cycle", 3) == 1.0
    assert at("one_cycle", 10) == pytest.approx(0.0) and at("one_cycle", 2, warm=2) == 1.0


def test_keras_schedule_matches_the_formula_step_by_step():
    from app.ml.optim import EpochSchedule, lr_at

    for name, warm in (("one_cycle", 0), ("cosine", 1), ("constant", 2)):
        schedule = EpochSchedule(0.01, name, epochs=5, steps_per_epoch=4, warmup_epochs=warm)
        for step in range(0, 21):
            expected = lr_at(step / 4, peak=0.01, schedule=name, epochs=5, warmup_epochs=warm)
            assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_learning_rate_follows_the_schedule_epoch_by_epoch_in_training():
    from app.ml.optim import config_lr_at

    cfg = config(epochs=4, lr_schedule="cosine", warmup_epochs=1, learning_rate=0.002)
    result = train(cfg, synthetic(n_train=80))
    logged = [r.learning_rate for r in result.epochs]
    expected = [config_lr_at(cfg, epoch) for epoch in (1, 2, 3, 4)]
    assert logged == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert logged[0] == pytest.approx(0.002) and logged[-1] == pytest.approx(0.0, abs=1e-9)


def test_adamw_and_clipnorm_reach_the_optimizer():
    from app.ml.optim import make_optimizer

    opt = make_optimizer(config(optimizer="adamw", weight_decay=0.05, clipnorm=1.5), 10)
    assert type(opt).__name__ == "AdamW"
    assert opt.weight_decay == pytest.approx(0.05) and opt.clipnorm == pytest.approx(1.5)


# ----------------------------------------------------------------------------- early stopping
def test_early_stopping_restores_the_best_epochs_weights():
    # Random labels: the net memorises the training images and validation loss soon rises.
    data = synthetic(n_train=100, random_labels=True, seed=4)
    cfg = config(epochs=8, early_stopping_patience=2, learning_rate=0.003, validation_split=0.3)
    result = train(cfg, data)
    val_losses = [r.val_loss for r in result.epochs]
    best = int(np.argmin(val_losses)) + 1
    assert result.best_epoch == best
    assert result.best_epoch < len(result.epochs)  # later epochs were worse
    if result.stopped_epoch is not None:
        assert result.stopped_epoch == best + 2 == len(result.epochs)
    # The returned (stored) model evaluates like the best epoch, not like the last one.
    x = data.x_train.astype("float32") / 255.0
    _, _, x_val, y_val = split_validation(x, data.y_train, cfg.validation_split)
    loss = result.model.evaluate(x_val, y_val, verbose=0, return_dict=True)["loss"]
    assert loss == pytest.approx(val_losses[best - 1], rel=1e-4)
    assert loss != pytest.approx(val_losses[-1], rel=1e-3)
