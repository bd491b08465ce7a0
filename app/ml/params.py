"""A training run's parameters: the one place for their defaults and allowed values.

Kept free of heavy imports so that the API's schemas and the settings can read the same
defaults and choices that the training core enforces.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from app.ml.nets import get_net

Optimizer = Literal["adam", "sgd", "rmsprop", "adamw"]
Precision = Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"]
LrSchedule = Literal["constant", "cosine", "one_cycle"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
PRECISIONS: tuple[str, ...] = get_args(Precision)
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)

# Bounds of the training levers (issue 11), shared by TrainConfig, the API schema and the CLI.
MAX_AUGMENT_CROP = 16  # pixels of padding before the random 32x32 crop
MAX_CUTOUT = 32  # side of the erased square, pixels
MAX_CLIPNORM = 1e6
MAX_WEIGHT_DECAY = 1.0
MAX_PATIENCE = 1000


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
    # The levers (issue 11); every default leaves the course's nets exactly as defined.
    augment_crop: int = 0  # pad by this many pixels, then crop a random 32x32 window
    augment_flip: bool = False  # random horizontal flip
    cutout: int = 0  # erase one random square of this side (pixels)
    label_smoothing: float = 0.0
    weight_decay: float = 0.0  # decoupled weight decay; needs optimizer="adamw"
    clipnorm: float | None = None  # clip each gradient to this L2 norm
    lr_schedule: str = "constant"
    warmup_epochs: int = 0
    early_stopping_patience: int | None = None  # stop on val_loss, restore the best weights

    def __post_init__(self) -> None:
        get_net(self.net)
        checks = self._checks() + self._lever_checks()
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _lever_checks(self) -> list[tuple[bool, str]]:
        return [
            (
                0 <= self.augment_crop <= MAX_AUGMENT_CROP,
                f"augment_crop must be from 0 to {MAX_AUGMENT_CROP} pixels. "
                f"Received: augment_crop={self.augment_crop}",
            ),
            (
                0 <= self.cutout <= MAX_CUTOUT,
                f"cutout must be from 0 to {MAX_CUTOUT} pixels. Received: cutout={self.cutout}",
            ),
            (
                0.0 <= self.label_smoothing < 1.0,
                f"label_smoothing must be in [0, 1). Received: label_smoothing={self.label_smoothing}",
            ),
            (
                0.0 <= self.weight_decay <= MAX_WEIGHT_DECAY,
                f"weight_decay must be from 0 to {MAX_WEIGHT_DECAY}. "
                f"Received: weight_decay={self.weight_decay}",
            ),
            (
                self.weight_decay == 0.0 or self.optimizer == "adamw",
                "weight_decay needs optimizer='adamw' (decoupled weight decay). "
                f"Received: optimizer={self.optimizer!r}, weight_decay={self.weight_decay}",
            ),
            (
                self.clipnorm is None or 0.0 < self.clipnorm <= MAX_CLIPNORM,
                f"clipnorm must be null or in (0, {MAX_CLIPNORM:g}]. Received: clipnorm={self.clipnorm}",
            ),
            (
                self.lr_schedule in LR_SCHEDULES,
                f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}. "
                f"Received: lr_schedule={self.lr_schedule!r}",
            ),
            (
                0 <= self.warmup_epochs < self.epochs or self.warmup_epochs == 0,
                f"warmup_epochs must be from 0 to epochs - 1 ({self.epochs - 1}). "
                f"Received: warmup_epochs={self.warmup_epochs}",
            ),
            (
                self.early_stopping_patience is None
                or 1 <= self.early_stopping_patience <= MAX_PATIENCE,
                f"early_stopping_patience must be null or from 1 to {MAX_PATIENCE}. "
                f"Received: early_stopping_patience={self.early_stopping_patience}",
            ),
            (
                self.early_stopping_patience is None or self.validation_split > 0,
                "early_stopping_patience watches val_loss and needs validation_split > 0. "
                f"Received: validation_split={self.validation_split}",
            ),
        ]

    def _checks(self) -> list[tuple[bool, str]]:
        return [
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

    @classmethod
    def from_attributes(cls, source: Any, **overrides: Any) -> TrainConfig:
        """Read every field from `source`'s same-named attributes (a job row, CLI arguments)."""
        values = {
            f.name: getattr(source, f.name)
            for f in dataclasses.fields(cls)
            if hasattr(source, f.name)  # rows and namespaces older than a field keep its default
        }
        return cls(**(values | overrides))

    @property
    def levers(self) -> dict[str, Any]:
        """The issue-11 options that differ from their defaults (empty for the course's setup)."""
        return {
            name: getattr(self, name)
            for name in LEVER_FIELDS
            if getattr(self, name) != default(name)
        }


def default(name: str) -> Any:
    """The course's default for one parameter, e.g. default("batch_size") == 128."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]


LEVER_FIELDS: tuple[str, ...] = (
    "augment_crop",
    "augment_flip",
    "cutout",
    "label_smoothing",
    "weight_decay",
    "clipnorm",
    "lr_schedule",
    "warmup_epochs",
    "early_stopping_patience",
)
