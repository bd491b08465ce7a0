"""The `data` loop (TensorFlow): `model.fit` on a tf.data pipeline from the uint8 arrays.

Imports TensorFlow; app.ml.loops imports this module only when the loop is chosen.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from app.ml.loops import FitPlan, KerasFitTrainer, chunked_steps


class DataTrainer(KerasFitTrainer):
    """`fit` on tf.data with `steps_per_execution` steps per call.

    Shuffling permutes indices (not 3 KB images) and each batch is one gather from the uint8
    array followed by the cast and /255 (the same float32 values as `normalise`).
    """

    def default_steps_per_execution(self, steps_per_epoch: int) -> int:
        return chunked_steps(steps_per_epoch)

    def training_data(self, plan: FitPlan) -> dict[str, Any]:
        batches = _batches(plan.x_train, plan.y_train, plan.batch_size, shuffle_seed=plan.seed)
        return {"x": batches, "shuffle": False}  # the pipeline shuffles

    def validation_data(self, plan: FitPlan) -> Any:
        if plan.validation is None:
            return None
        x_val, y_val = plan.validation
        return _batches(x_val, y_val, plan.batch_size)


def _batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, shuffle_seed: int | None = None
) -> tf.data.Dataset:
    """Batches of (float32 images in [0, 1], int64 labels); reshuffled every epoch with a seed."""
    images = tf.constant(x)
    labels = tf.constant(y.astype(np.int64))
    indices = tf.data.Dataset.range(len(x))
    if shuffle_seed is not None:
        indices = indices.shuffle(len(x), seed=shuffle_seed, reshuffle_each_iteration=True)

    def gather(idx: Any) -> Any:
        xb = tf.cast(tf.gather(images, idx), tf.float32) / tf.constant(255.0, tf.float32)
        return xb, tf.gather(labels, idx)

    return (
        indices.batch(batch_size)
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )
