"""The pixel scale every net is trained on, in a module of its own: the data pipeline and
the net's blocks (whitening from training images) both need it, and neither may import the
other (app.ml.data imports the nets)."""

from __future__ import annotations

import numpy as np


def normalise(x: np.ndarray) -> np.ndarray:
    """Pixels as float32 in [0, 1] (x / 255), the scale every net is trained on."""
    return np.asarray(x, dtype=np.float32) / np.float32(255.0)
