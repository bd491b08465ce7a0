"""A training run's parameters: the one place for their defaults and allowed values.

Kept free of heavy imports so that the API's schemas and the settings can read the same
defaults and choices that the training core enforces.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from app.ml.nets import get_net

Optimizer = Literal["adam", "sgd", "rmsprop"]
Precision = Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
PRECISIONS: tuple[str, ...] = get_args(Precision)


@dataclass(frozen=True)
class TrainConfig:
    """One run's parameters; the defaults are the course's (Adam, batch 128, 20% split, 20 epochs)."""

    net: str
    epochs: int = 20
    batch_size: int = 128
    validation_split: float = 0.2
    optimizer: str = "adam"
    learning_rate: float = 0.001
    seed: int = 0
    train_limit: int | None = None
    precision: str = "auto"

    def __post_init__(self) -> None:
        get_net(self.net)
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1. Received: epochs={self.epochs}"),
            (
                self.batch_size >= 1,
                f"batch_size must be >= 1. Received: batch_size={self.batch_size}",
            ),
            (
                0.0 <= self.validation_split < 1.0,
                f"validation_split must be in [0, 1). Received: validation_split={self.validation_split}",
            ),
            (
                self.optimizer in OPTIMIZERS,
                f"optimizer must be one of {', '.join(OPTIMIZERS)}. Received: optimizer={self.optimizer!r}",
            ),
            (
                self.learning_rate > 0,
                f"learning_rate must be > 0. Received: learning_rate={self.learning_rate}",
            ),
            (
                self.precision in PRECISIONS,
                f"precision must be one of {', '.join(PRECISIONS)}. Received: precision={self.precision!r}",
            ),
            (
                self.train_limit is None or self.train_limit >= 2,
                f"train_limit must be >= 2 when set. Received: train_limit={self.train_limit}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_attributes(cls, source: Any, **overrides: Any) -> TrainConfig:
        """Read every field from `source`'s same-named attributes (a job row, CLI arguments)."""
        values = {f.name: getattr(source, f.name) for f in dataclasses.fields(cls)}
        return cls(**(values | overrides))


def default(name: str) -> Any:
    """The course's default for one parameter, e.g. default("batch_size") == 128."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]
