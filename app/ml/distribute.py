"""Multi-GPU jobs (issue 19): a job with `gpus` N > 1 trains under Keras' DataParallel.

Keras' distribution API (`keras.distribution.DataParallel` over
`keras.distribution.list_devices()`), on the JAX backend, which is where Keras implements
it: the variables are replicated on N devices of this worker, every batch of `batch_size`
images (the global batch) is split into N equal shards, and the gradients are averaged
across devices in one compiled step, so one optimizer update per global batch as on one
device. The learning rate is the job's, unscaled (docs/scaling.md, "Multi-GPU jobs").

Every batch must split evenly, the last partial one too, so a multi-GPU job leaves out the
last (n mod N) training images and the last (m mod N) validation images: at most N - 1 of
each (`even_shards` in app/ml/training.py). A job asking for more devices than the worker sees fails with a
message that says so; a job with gpus 0 or 1 trains exactly as before, outside any
distribution.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from app.ml import backend


class DistributionError(RuntimeError):
    """The job's devices cannot be had here; the job fails with this message (no retry)."""


def describe_devices(gpus: int) -> str:
    """What the job records as its device: 'GPU:0 <name>', or '2 x GPU:0 <name>' for N > 1."""
    label = backend.describe_device()
    return f"{gpus} x {label}" if gpus > 1 else label


def check_loop(gpus: int, loop: str) -> str:
    """The loop a job trains with: Keras' own `fit` for N > 1 (it shards the batches under a
    distribution; the single-device compiled loops do not)."""
    if gpus <= 1:
        return loop
    if loop not in ("auto", "fit"):
        raise ValueError(f"gpus > 1 trains with loop='fit'. Received: loop={loop!r}, gpus={gpus}")
    return "fit"


def devices_for(gpus: int) -> list[str]:
    """The first `gpus` devices Keras lists (GPUs where there are any, else CPU devices)."""
    if not backend.is_jax():
        raise DistributionError(
            f"a job with gpus={gpus} needs a worker on the JAX backend (KERAS_BACKEND=jax): "
            f"Keras' DataParallel runs on JAX. This worker runs {backend.name()}"
        )
    import keras

    found = list(keras.distribution.list_devices())
    if len(found) < gpus:
        raise DistributionError(
            f"the job asks for {gpus} devices but this worker sees {len(found)} "
            f"({', '.join(found) or 'none'}); set WORKER_GPUS to the GPUs the worker really "
            f"has, or submit the job with gpus <= {len(found)}"
        )
    return found[:gpus]


@contextmanager
def data_parallel(gpus: int) -> Iterator[Any]:
    """Within: models built, loaded and fitted are data-parallel over `gpus` devices (N > 1);
    for 0 or 1 nothing changes. Yields the distribution, or None."""
    if gpus <= 1:
        yield None
        return
    import keras

    distribution = keras.distribution.DataParallel(devices=devices_for(gpus))
    with distribution.scope():
        yield distribution
