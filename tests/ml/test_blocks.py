"""NET V's building blocks (issue 21) on tiny data: each does what its docstring claims."""

import math

import keras
import numpy as np
import pytest

from app.ml.augment import AlternatingFlip, RandomPadCrop
from app.ml.blocks import PartialDirac, find_whitening, init_whitening
from app.ml.data import normalise
from app.ml.evaluation import TTA_VIEWS, evaluate, tta_probabilities, view
from app.ml.nets import build_net
from app.ml.optim import EpochSchedule, RecipeSGD, lr_at, make_optimizer
from app.ml.params import TrainConfig


def correlated_images(n=120, seed=0):
    """Smooth colour fields plus noise: neighbouring pixels and channels correlate, as in
    photographs, so whitening has something to undo."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 200, size=(n, 8, 8, 1)) + rng.uniform(0, 40, size=(n, 8, 8, 3))
    smooth = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
    noisy = smooth + rng.normal(0, 12, size=smooth.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def test_whitened_first_layer_output_has_near_identity_covariance_on_training_patches():
    model = build_net("net5")
    x = correlated_images()
    init_whitening(model, x)
    (layer,) = find_whitening(model)
    out = np.asarray(layer(normalise(x)), dtype=np.float64)  # (n, 31, 31, 24)
    first = out[..., :12].reshape(-1, 12)
    covariance = np.cov(first, rowvar=False, bias=True)
    assert np.abs(first.mean(axis=0)).max() < 1e-3  # the bias centres the patches
    assert np.allclose(covariance, np.eye(12), atol=0.03), np.round(covariance, 3)
    # The other 12 channels are the negatives (so GELU keeps both signs).
    np.testing.assert_allclose(out[..., 12:], -out[..., :12], atol=1e-4)
    # Before whitening the same patches are far from white.
    raw = np.stack(
        [normalise(x)[:, i : i + 31, j : j + 31, :] for i in (0, 1) for j in (0, 1)], axis=3
    ).reshape(-1, 12)
    assert not np.allclose(np.cov(raw, rowvar=False), np.eye(12), atol=0.5)


def test_whitening_kernel_is_frozen_and_its_bias_trainable():
    model = build_net("net5")
    (layer,) = find_whitening(model)
    assert [w.path for w in layer.trainable_weights] == [layer.bias.path]
    assert [w.path for w in layer.non_trainable_weights] == [layer.kernel.path]


def test_identity_init_makes_a_conv_the_identity_on_its_first_channels():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 9, 9, 4)).astype("float32")
    conv = keras.layers.Conv2D(
        6, 3, padding="same", use_bias=False, kernel_initializer=PartialDirac(seed=1)
    )
    y = np.asarray(conv(x))
    np.testing.assert_allclose(y[..., :4], x, atol=1e-6)
    assert np.abs(y[..., 4:]).mean() > 0.1  # the other filters are drawn, not zero


def test_alternating_flip_flips_exactly_the_complement_on_the_next_epoch():
    rng = np.random.default_rng(0)
    x = normalise(rng.integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8))
    layer = AlternatingFlip(steps_per_epoch=1, seed=5)
    mirrored = x[:, :, ::-1, :]

    def flipped(out):
        out = np.asarray(out)
        is_flipped = np.all(np.isclose(out, mirrored), axis=(1, 2, 3))
        is_same = np.all(np.isclose(out, x), axis=(1, 2, 3))
        assert np.all(is_flipped ^ is_same)  # each image is either itself or its mirror
        return is_flipped

    epochs = [flipped(layer(x, training=True)) for _ in range(3)]
    assert 16 < epochs[0].sum() < 48  # the first epoch is a coin per image
    np.testing.assert_array_equal(epochs[1], ~epochs[0])
    np.testing.assert_array_equal(epochs[2], epochs[0])
    # A different order of the same images flips the same images (the coin is the image's).
    order = rng.permutation(64)
    again = AlternatingFlip(steps_per_epoch=1, seed=5)
    out = np.asarray(again(x[order], training=True))
    np.testing.assert_array_equal(
        np.all(np.isclose(out, mirrored[order]), axis=(1, 2, 3)), epochs[0][order]
    )
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)


def test_translate_pads_by_reflection():
    x = np.arange(2 * 4 * 4 * 1, dtype="float32").reshape(2, 4, 4, 1)
    layer = RandomPadCrop(1, seed=0, mode="reflect")
    reflected = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    windows = {
        reflected[b, i : i + 4, j : j + 4].tobytes()
        for b in range(2)
        for i in range(3)
        for j in range(3)
    }
    for _ in range(5):
        out = np.asarray(layer(x, training=True))
        assert all(out[b].tobytes() in windows for b in range(2))


def test_tta_views_are_the_stated_shifts_and_flips():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 6, 6, 3)).astype("float32")
    np.testing.assert_array_equal(view(x, "flip"), x[:, :, ::-1])
    down = view(x, "shift_down_right")
    np.testing.assert_array_equal(down[:, 1:, 1:], x[:, :-1, :-1])
    np.testing.assert_array_equal(down[:, 0, 1:], x[:, 1, :-1])  # the edge reflected
    up = view(x, "shift_up_left")
    np.testing.assert_array_equal(up[:, :-1, :-1], x[:, 1:, 1:])
    np.testing.assert_array_equal(view(x, "shift_up_left_flip"), up[:, :, ::-1])
    for views in TTA_VIEWS.values():
        assert math.isclose(sum(weight for _, weight in views), 1.0)


def test_tta_prediction_is_the_weighted_mean_over_the_stated_views():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(4, 3),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(20, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=20)
    x = normalise(raw)
    got, views = tta_probabilities(model, x, "flip_translate")
    assert [v["name"] for v in views] == [name for name, _ in TTA_VIEWS["flip_translate"]]
    # By hand: 1/2 mean(identity, flip) + 1/2 mean over both shifts of mean(shift, its flip).
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    shifted = [padded[:, :32, :32], padded[:, 2:, 2:]]

    def p(images):
        return np.asarray(model.predict(np.ascontiguousarray(images), verbose=0))

    def mirror(images):
        return 0.5 * p(images) + 0.5 * p(images[:, :, ::-1])

    expected = 0.5 * mirror(x) + 0.5 * np.mean([mirror(s) for s in shifted], axis=0)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    result = evaluate(model, raw, y, tta="flip_translate")
    assert result.tta_views == views
    assert result.tta_accuracy == pytest.approx(float((expected.argmax(1) == y).mean()))
    assert evaluate(model, raw, y).tta_views is None


def test_triangular_schedule_is_airbenchs_triangle():
    peak, epochs = 2.0, 10
    assert lr_at(0, peak=peak, schedule="triangular", epochs=epochs) == pytest.approx(0.4)
    assert lr_at(2.3, peak=peak, schedule="triangular", epochs=epochs) == pytest.approx(2.0)
    assert lr_at(10, peak=peak, schedule="triangular", epochs=epochs) == pytest.approx(0.14)
    schedule = EpochSchedule(peak, "triangular", epochs, steps_per_epoch=7)
    for step in range(0, 71, 3):
        assert float(schedule(step)) == pytest.approx(
            lr_at(step / 7, peak=peak, schedule="triangular", epochs=epochs), rel=1e-5
        )


def small_bn_model():
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.Conv2D(3, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(scale=False, name="bn")(x)
    x = keras.layers.GlobalMaxPooling2D()(x)
    outputs = keras.layers.Dense(2, name="fc")(x)
    return keras.Model(inputs, outputs)


def sgd_config(**overrides):
    base = dict(net="net5", optimizer="sgd", learning_rate=0.1, epochs=1, batch_size=8)
    return TrainConfig(**(base | overrides))


def test_bias_lr_scale_applies_only_to_batchnorm_biases_with_coupled_decay_divided():
    model = small_bn_model()
    optimizer = make_optimizer(sgd_config(bias_lr_scale=64.0, weight_decay=0.01), 1, model)
    variables = model.trainable_variables
    before = [np.array(v) for v in variables]
    optimizer.apply([keras.ops.ones(v.shape) for v in variables], variables)
    for var, old in zip(variables, before, strict=True):
        if var.path.endswith("bn/beta"):
            # lr * 64 * (g + wd / 64 * w)
            expected = old - 0.1 * 64 * (1.0 + 0.01 / 64 * old)
        else:
            expected = old - 0.1 * (1.0 + 0.01 * old)
        np.testing.assert_allclose(np.array(var), expected, rtol=1e-5, atol=1e-6)
    assert any(v.path.endswith("bn/beta") for v in variables)


def test_frozen_variables_stop_changing_after_the_step_given():
    var = keras.Variable(np.zeros(3, dtype="float32"), name="bias")
    other = keras.Variable(np.zeros(3, dtype="float32"), name="other")
    optimizer = RecipeSGD(learning_rate=1.0, frozen_paths=[var.path], freeze_after_step=2)
    trail = []
    for _ in range(4):
        optimizer.apply([keras.ops.ones(3), keras.ops.ones(3)], [var, other])
        trail.append((float(var[0]), float(other[0])))
    assert trail == [(-1.0, -1.0), (-2.0, -2.0), (-2.0, -3.0), (-2.0, -4.0)]


def test_lookahead_moves_the_weights_as_stated():
    steps, total, lr = 3, 7, 0.5
    var = keras.Variable(np.array([1.0, -2.0], dtype="float32"), name="w")
    optimizer = RecipeSGD(learning_rate=lr, lookahead_steps=steps, total_steps=total)
    gradient = np.array([0.3, -0.1], dtype="float32")
    # The rule by hand: a plain SGD step, then at every 3rd step (and the last)
    # slow = d * slow + (1 - d) * w, w = slow, with d = 0.95^3 * (done / total)^3 (1 at the
    # last step when it is not a sync).
    w = np.array([1.0, -2.0])
    slow = w.copy()
    for done in range(1, total + 1):
        w = w - lr * gradient
        if done % steps == 0:
            d = 0.95**steps * (done / total) ** 3
            slow = d * slow + (1 - d) * w
            w = slow.copy()
        elif done == total:
            w = slow.copy()
        optimizer.apply([keras.ops.convert_to_tensor(gradient)], [var])
        np.testing.assert_allclose(np.array(var), w, rtol=1e-5, err_msg=f"step {done}")
    assert not np.allclose(w, np.array([1.0, -2.0]) - total * lr * gradient)


def test_recipe_options_refuse_combinations_that_do_not_fit():
    bad = [
        dict(net="net1", whiten=True),
        dict(net="net5", optimizer="adam", momentum=0.9),
        dict(net="net5", optimizer="sgd", nesterov=True),
        dict(net="net5", optimizer="adam", bias_lr_scale=64.0),
        dict(net="net5", optimizer="adam", lookahead_steps=5),
        dict(net="net5", augment_crop=2, augment_translate=2),
        dict(net="net5", augment_flip_mode="alternating"),
        dict(net="net1", optimizer="sgd", whiten_bias_epochs=3),
    ]
    for overrides in bad:
        with pytest.raises(ValueError):
            TrainConfig(**overrides)
