"""The training loops behind `training.train`: the plain `fit`, a faster `fit` for TensorFlow,
and a compiled on-device loop for JAX.

Every loop takes the raw uint8 images and drives the same Keras `CallbackList` as `fit` does
(`on_train_begin`, `on_epoch_begin`, `on_train_batch_end` once per dispatched chunk of steps,
`on_epoch_end` with the epoch's logs, `on_train_end`; it stops when `model.stop_training` is
set), and the model's variables are in sync at every epoch end, so callbacks (the service's
reporter and checkpoints, early stopping, learning-rate logging) work the same in each.

- `fit`: the course's plain path, `model.fit` on float32 arrays (x / 255), one step per call.
- `data` (TensorFlow): `model.fit` on a `tf.data` pipeline that gathers shuffled batches from
  the uint8 arrays and normalises on the fly, with several steps per execution.
- `device` (JAX): the uint8 training set is put on the device once; each epoch is shuffled
  there and run as a few compiled `jax.lax.scan`s over chunks of steps of Keras' stateless
  `train_step`; validation likewise. The course's semantics are kept exactly: batch size, one
  optimizer update per batch with ceil(n / batch) batches per epoch (the last one partial),
  every image once per epoch, loss and accuracy weighted by samples as `fit` reports them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from app.ml import backend
from app.ml.data import normalise

LOOPS = ("auto", "fit", "data", "device")


def choose_loop(requested: str) -> str:
    """`auto`: the compiled device loop on JAX, the tf.data pipeline on TensorFlow."""
    if requested not in LOOPS:
        raise ValueError(f"loop must be one of {', '.join(LOOPS)}. Received: loop={requested!r}")
    if requested != "auto":
        if requested == "device" and not backend.is_jax():
            raise ValueError("loop='device' needs KERAS_BACKEND=jax")
        if requested == "data" and backend.is_jax():
            raise ValueError("loop='data' needs KERAS_BACKEND=tensorflow")
        return requested
    return "device" if backend.is_jax() else "data"


def default_steps_per_execution(loop: str, steps_per_epoch: int) -> int:
    """Steps per dispatch. On a GPU a whole epoch is a few milliseconds per step of work, so
    up to 256 steps (two chunks for CIFAR-10's 312 full batches); on a CPU 32 steps, which
    keeps a cancel within seconds for NET I and under a minute for the largest nets."""
    if loop == "fit":
        return 1
    if backend.on_gpu():
        return max(1, min(steps_per_epoch, 256))
    return max(1, min(steps_per_epoch, 32))


# ---------------------------------------------------------------------------- fit / data
def run_fit(
    model: Any,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    *,
    batch_size: int,
    epochs: int,
    initial_epoch: int,
    callbacks: list[Any],
    steps_per_execution: int = 1,
    verbose: int = 0,
) -> None:
    """The plain path: `fit` on float32 arrays (one step per execution unless asked)."""
    model.steps_per_execution = steps_per_execution
    model.make_train_function(force=True)
    model.fit(
        normalise(x_train),
        y_train,
        batch_size=batch_size,
        epochs=epochs,
        initial_epoch=initial_epoch,
        validation_data=None if x_val is None else (normalise(x_val), y_val),
        shuffle=True,
        callbacks=callbacks,
        verbose=verbose,
    )


def run_data(
    model: Any,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    *,
    batch_size: int,
    epochs: int,
    initial_epoch: int,
    callbacks: list[Any],
    steps_per_execution: int,
    seed: int,
    verbose: int = 0,
) -> None:
    """TensorFlow: `fit` on a tf.data pipeline from uint8, `steps_per_execution` steps per call.

    Shuffling permutes indices (not 3 KB images) and each batch is one gather from the uint8
    array followed by the cast and /255 (the same float32 values as `normalise`).
    """
    import tensorflow as tf

    def batches(x: np.ndarray, y: np.ndarray, shuffle: bool) -> Any:
        images = tf.constant(x)
        labels = tf.constant(y.astype(np.int64))
        indices = tf.data.Dataset.range(len(x))
        if shuffle:
            indices = indices.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)

        def gather(idx: Any) -> Any:
            xb = tf.cast(tf.gather(images, idx), tf.float32) / tf.constant(255.0, tf.float32)
            return xb, tf.gather(labels, idx)

        return (
            indices.batch(batch_size)
            .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE)
        )

    model.steps_per_execution = steps_per_execution
    model.make_train_function(force=True)
    model.fit(
        batches(x_train, y_train, True),
        epochs=epochs,
        initial_epoch=initial_epoch,
        validation_data=None if x_val is None or y_val is None else batches(x_val, y_val, False),
        shuffle=False,  # the pipeline shuffles
        callbacks=callbacks,
        verbose=verbose,
    )


# ---------------------------------------------------------------------------- device (JAX)
def run_device(
    model: Any,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    *,
    batch_size: int,
    epochs: int,
    initial_epoch: int,
    callbacks: list[Any],
    steps_per_execution: int,
    seed: int,
    verbose: int = 0,
) -> None:
    """JAX: the compiled on-device loop (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    import keras

    n, b = len(x_train), batch_size
    full, rest = divmod(n, b)
    steps = full + (1 if rest else 0)
    k = max(1, min(steps_per_execution, max(full, 1)))
    chunks = math.ceil(full / k) if full else 0
    k = math.ceil(full / chunks) if chunks else 0  # balanced chunks: < chunks masked steps

    x_dev = jax.device_put(x_train)
    y_dev = jax.device_put(y_train.astype(np.int32))
    xv_dev = None if x_val is None else jax.device_put(x_val)
    yv_dev = None if y_val is None else jax.device_put(y_val.astype(np.int32))

    def to_float(xb: Any) -> Any:
        return xb.astype(jnp.float32) / jnp.float32(255.0)

    model._symbolic_build(data_batch=(normalise(x_train[: min(b, n)]), y_dev[: min(b, n)]))

    def train_scan(state: Any, xs: Any, ys: Any, perm: Any, first: Any, count: Any) -> Any:
        def body(state: Any, i: Any) -> Any:
            idx = jax.lax.dynamic_slice(perm, ((first + i) * b,), (b,))
            logs, new = model.train_step(state, (to_float(xs[idx]), ys[idx]))
            valid = i < count
            new = jax.tree.map(lambda a, o: jnp.where(valid, a, o), new, state)
            return new, logs

        return jax.lax.scan(body, state, jnp.arange(k))

    def train_rest(state: Any, xs: Any, ys: Any, perm: Any) -> Any:
        idx = jax.lax.dynamic_slice(perm, (full * b,), (rest,))
        return model.train_step(state, (to_float(xs[idx]), ys[idx]))

    def permutation(epoch: Any) -> Any:
        return jax.random.permutation(jax.random.fold_in(jax.random.key(seed), epoch), n)

    train_scan_c = jax.jit(train_scan)
    train_rest_c = jax.jit(train_rest)
    permutation_c = jax.jit(permutation)
    evaluate = _device_evaluator(model, b)

    callback_list: Any = callbacks
    if not isinstance(callbacks, keras.callbacks.CallbackList):
        callback_list = keras.callbacks.CallbackList(
            callbacks,
            add_history=True,
            add_progbar=verbose != 0,
            verbose=verbose,
            epochs=epochs,
            steps=steps,
            model=model,
        )
    model.stop_training = False
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        # Read the state after the callbacks: one may have changed a variable (learning rate).
        state = model._get_jax_state(
            trainable_variables=True,
            non_trainable_variables=True,
            optimizer_variables=True,
            metrics_variables=True,
        )
        perm = permutation_c(epoch)
        logs: Any = None
        pending: Any = None
        for c in range(chunks):
            count = min(k, full - c * k)
            state, stacked = train_scan_c(state, x_dev, y_dev, perm, c * k, count)
            logs = jax.tree.map(lambda v, j=count - 1: v[j], stacked)
            _expose_state(model, state)
            if c == chunks - 1 and not rest:
                break  # the epoch's last dispatch is reported below, once it has finished
            if pending is not None:
                jax.block_until_ready(pending)  # at most two chunks in flight
            pending = logs
            callback_list.on_train_batch_end(min((c + 1) * k, full) - 1, logs)
            if model.stop_training:
                break
        if rest and not model.stop_training:
            logs, state = train_rest_c(state, x_dev, y_dev, perm)
            _expose_state(model, state)
        logs = {key: float(v) for key, v in logs.items()}  # waits for the epoch's last step
        callback_list.on_train_batch_end(steps - 1, logs)
        model.jax_state_sync()
        epoch_logs = dict(logs)
        if xv_dev is not None and yv_dev is not None:
            val = evaluate(xv_dev, yv_dev)
            epoch_logs.update({f"val_{key}": value for key, value in val.items()})
        callback_list.on_epoch_end(epoch, epoch_logs)
        if model.stop_training:
            break
    callback_list.on_train_end()


def _expose_state(model: Any, state: Any) -> None:
    """Let a callback that wants the variables call model.jax_state_sync(), as fit allows."""
    tv, ntv, ov, mv = state
    model._jax_state = {
        "trainable_variables": tv,
        "non_trainable_variables": ntv,
        "optimizer_variables": ov,
        "metrics_variables": mv,
    }
    model._jax_state_synced = False


def _device_evaluator(model: Any, batch_size: int) -> Any:
    """Validation on device arrays: Keras' stateless `test_step` over full batches in one
    scan, then the partial batch; metrics accumulate as `evaluate` does (by sample)."""
    import jax
    import jax.numpy as jnp

    b = batch_size

    def to_float(xb: Any) -> Any:
        return xb.astype(jnp.float32) / jnp.float32(255.0)

    def full_batches(state: Any, xs: Any, ys: Any) -> Any:
        steps = xs.shape[0] // b

        def body(state: Any, i: Any) -> Any:
            xb = jax.lax.dynamic_slice_in_dim(xs, i * b, b)
            yb = jax.lax.dynamic_slice_in_dim(ys, i * b, b)
            logs, state = model.test_step(state, (to_float(xb), yb))
            return state, logs

        state, logs = jax.lax.scan(body, state, jnp.arange(steps))
        return state, jax.tree.map(lambda v: v[-1], logs)

    def last_batch(state: Any, xs: Any, ys: Any) -> Any:
        start = (xs.shape[0] // b) * b
        logs, state = model.test_step(state, (to_float(xs[start:]), ys[start:]))
        return state, logs

    full_c = jax.jit(full_batches)
    last_c = jax.jit(last_batch)

    def evaluate(xs: Any, ys: Any) -> dict[str, float]:
        model.reset_metrics()
        state = model._get_jax_state(
            trainable_variables=True, non_trainable_variables=True, metrics_variables=True
        )
        logs: Any = None
        if xs.shape[0] >= b:
            state, logs = full_c(state, xs, ys)
        if xs.shape[0] % b:
            state, logs = last_c(state, xs, ys)
        return {key: float(v) for key, v in logs.items()}

    return evaluate
