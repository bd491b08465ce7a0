"""The model and inputs both sides of the cross-backend test build (no backend-specific code)."""

from __future__ import annotations

import numpy as np


def probe() -> np.ndarray:
    return np.random.default_rng(7).random((4, 32, 32, 3), dtype=np.float32)


def saved_model(path: str):
    """NET II with one step of training (so the optimizer has state), saved to `path`."""
    import keras

    from app.ml.nets import get_net

    keras.utils.set_random_seed(3)
    model = get_net("net2").builder()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(probe(), np.arange(4), epochs=1, verbose=0)
    model.save(path)
    return model
