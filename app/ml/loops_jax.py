"""The `device` loop (JAX): a compiled on-device loop over Keras' stateless train and test steps.

The uint8 training and validation sets are put on the device once; each epoch is permuted
there (seeded by epoch, so a resumed run continues with the same order) and run as compiled
`jax.lax.scan`s over chunks of steps of `train_step`, the partial last batch as one more
compiled step; validation is a scan of `test_step`. Chunks are balanced, and the few steps a
chunk is padded with are masked out, so every epoch is exactly ceil(n / batch) updates.

Imports JAX and Keras; app.ml.loops imports this module only when the loop is chosen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

from app.ml.data import normalise
from app.ml.loops import FitPlan, Trainer, chunked_steps


class DeviceTrainer(Trainer):
    """`device`: the epochs as compiled scans over device arrays (see the module docstring)."""

    def default_steps_per_execution(self, steps_per_epoch: int) -> int:
        return chunked_steps(steps_per_epoch)

    def fit(self, plan: FitPlan) -> None:
        model = plan.model
        n, b = len(plan.x_train), plan.batch_size
        full, rest = divmod(n, b)
        steps = plan.steps_per_epoch
        k = max(1, min(plan.steps_per_execution, max(full, 1)))
        chunks = math.ceil(full / k) if full else 0
        k = math.ceil(full / chunks) if chunks else 0  # balanced chunks: < chunks masked steps

        x_dev = jax.device_put(plan.x_train)
        y_dev = jax.device_put(plan.y_train.astype(np.int32))
        validation = plan.validation
        val_dev = None
        if validation is not None:
            val_dev = jax.device_put(validation[0]), jax.device_put(validation[1].astype(np.int32))

        model._symbolic_build(data_batch=(normalise(plan.x_train[: min(b, n)]), y_dev[: min(b, n)]))

        def train_scan(state: Any, xs: Any, ys: Any, perm: Any, first: Any, count: Any) -> Any:
            def body(state: Any, i: Any) -> Any:
                idx = jax.lax.dynamic_slice(perm, ((first + i) * b,), (b,))
                logs, new = model.train_step(state, (_to_float(xs[idx]), ys[idx]))
                valid = i < count
                new = jax.tree.map(lambda a, o: jnp.where(valid, a, o), new, state)
                return new, logs

            return jax.lax.scan(body, state, jnp.arange(k))

        def train_rest(state: Any, xs: Any, ys: Any, perm: Any) -> Any:
            idx = jax.lax.dynamic_slice(perm, (full * b,), (rest,))
            return model.train_step(state, (_to_float(xs[idx]), ys[idx]))

        def permutation(epoch: Any) -> Any:
            return jax.random.permutation(jax.random.fold_in(jax.random.key(plan.seed), epoch), n)

        train_scan_c = jax.jit(train_scan)
        train_rest_c = jax.jit(train_rest)
        permutation_c = jax.jit(permutation)
        evaluate = _device_evaluator(model, b)

        callback_list = _callback_list(plan, steps)
        model.stop_training = False
        callback_list.on_train_begin()
        for epoch in range(plan.initial_epoch, plan.epochs):
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
            if val_dev is not None:
                val = evaluate(*val_dev)
                epoch_logs.update({f"val_{key}": value for key, value in val.items()})
            callback_list.on_epoch_end(epoch, epoch_logs)
            if model.stop_training:
                break
        callback_list.on_train_end()


def _to_float(xb: Any) -> Any:
    """uint8 pixels -> float32 in [0, 1], on the device (the same values as `normalise`)."""
    return xb.astype(jnp.float32) / jnp.float32(255.0)


def _callback_list(plan: FitPlan, steps: int) -> keras.callbacks.CallbackList:
    """The plan's callbacks as `fit` would wrap them: with a History, a progress bar if verbose."""
    return keras.callbacks.CallbackList(
        list(plan.callbacks),
        add_history=True,
        add_progbar=plan.verbose != 0,
        verbose=plan.verbose,
        epochs=plan.epochs,
        steps=steps,
        model=plan.model,
    )


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


def _device_evaluator(model: Any, batch_size: int) -> Callable[[Any, Any], dict[str, float]]:
    """Validation on device arrays: Keras' stateless `test_step` over full batches in one
    scan, then the partial batch; metrics accumulate as `evaluate` does (by sample)."""
    b = batch_size

    def full_batches(state: Any, xs: Any, ys: Any) -> Any:
        steps = xs.shape[0] // b

        def body(state: Any, i: Any) -> Any:
            xb = jax.lax.dynamic_slice_in_dim(xs, i * b, b)
            yb = jax.lax.dynamic_slice_in_dim(ys, i * b, b)
            logs, state = model.test_step(state, (_to_float(xb), yb))
            return state, logs

        state, logs = jax.lax.scan(body, state, jnp.arange(steps))
        return state, jax.tree.map(lambda v: v[-1], logs)

    def last_batch(state: Any, xs: Any, ys: Any) -> Any:
        start = (xs.shape[0] // b) * b
        logs, state = model.test_step(state, (_to_float(xs[start:]), ys[start:]))
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
