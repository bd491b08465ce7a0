"""A training run's parameters, each declared once: default, bound, help text and role.

TrainConfig's fields are the declaration (see app/ml/options.py for `option`). The API's
request schema and public parameters (app/schemas.py), the `cnn train` flags (app/cli.py),
the idempotency fields (app/jobs/service.py), the comparison's fields (app/reports/compare.py)
and the table in docs/training-options.md are derived from it. Only the jobs column
(app/models.py) and its migration are written by hand; tests/test_training_options.py checks
that they agree. docs/architecture.md, "Adding a training option", shows the three edits.

Kept free of heavy imports so that the API's schemas and the settings can read it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from app.ml.nets import get_net
from app.ml.options import Option, lever, option, options_of

Optimizer = Literal["adam", "sgd", "rmsprop", "adamw"]
Precision = Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"]
LrSchedule = Literal["constant", "cosine", "one_cycle"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
PRECISIONS: tuple[str, ...] = get_args(Precision)
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)

INT32_MAX = 2**31 - 1  # the jobs columns are 32-bit INTEGER on PostgreSQL
MAX_EPOCHS = 1000  # the service's JOB_MAX_EPOCHS setting may lower it further
MAX_AUGMENT_CROP = 16  # pixels of padding before the random 32x32 crop
MAX_CUTOUT = 32  # side of the erased square, pixels
MAX_GPUS = 16  # devices one job may ask for, and one worker may own (WORKER_GPUS)


@dataclass(frozen=True)
class TrainConfig:
    """One run's parameters; the defaults are the course's (Adam, batch 128, 20% split, 20 epochs)."""

    net: str
    epochs: int = option(20, "Passes over the training images.", ge=1, le=MAX_EPOCHS)
    batch_size: int = option(128, "Images per gradient step.", ge=1, le=8192)
    validation_split: float = option(
        0.2,
        "Fraction of the training images held out for val_loss and val_accuracy (the last "
        "ones, as Keras does).",
        ge=0,
        lt=1,
    )
    optimizer: str = option(
        "adam", "The Keras optimizer; adamw for decoupled weight decay.", choices=OPTIMIZERS
    )
    learning_rate: float = option(
        0.001, "The optimizer's learning rate (with an lr_schedule, its peak).", gt=0, le=10
    )
    seed: int = option(
        0,
        "Seeds the weights, the shuffling, the augmentation and train_limit's subset.",
        ge=0,
        le=INT32_MAX,
    )
    train_limit: int | None = option(
        None,
        "Train on a seeded random subset of N training images (smoke runs).",
        ge=10,
        le=INT32_MAX,
    )
    precision: str = option(
        "auto",
        "Mixed-precision policy; auto is bfloat16 where the hardware has it, else float32.",
        choices=PRECISIONS,
        compared=False,  # the comparison shows it in a column of its own
        null_means="the PRECISION setting of the process that trains",
    )
    gpus: int = option(
        0,
        "GPUs the job runs on: 0 = any one device (a GPU or the CPU); N > 1 splits every "
        "batch across N GPUs of one worker (data parallel, batch_size is the global batch).",
        ge=0,
        le=MAX_GPUS,
        unit="GPUs",
    )
    # The levers (issue 11, docs/course.md); every default leaves the course's nets as defined.
    augment_crop: int = lever(
        0,
        "Pad every training image by N zero pixels per side and crop a random 32x32 window "
        "(training only); 0 = off.",
        ge=0,
        le=MAX_AUGMENT_CROP,
        unit="pixels of padding",
    )
    augment_flip: bool = lever(False, "Mirror a random half of the training images left-right.")
    cutout: int = lever(
        0,
        "Erase one random NxN square of every training image (clipped at the border); 0 = off.",
        ge=0,
        le=MAX_CUTOUT,
        unit="pixels",
    )
    label_smoothing: float = lever(
        0.0,
        "Targets (1 - eps) * onehot + eps / 10; loss and val_loss are then the smoothed loss.",
        ge=0,
        lt=1,
    )
    weight_decay: float = lever(
        0.0,
        "Decoupled weight decay (w -= lr * wd * w per step); needs optimizer adamw.",
        ge=0,
        le=1.0,
    )
    clipnorm: float | None = lever(None, "Clip each gradient to this L2 norm.", gt=0, le=1e6)
    lr_schedule: str = lever(
        "constant",
        "constant, cosine (to 0) or one_cycle (peak learning_rate); see docs/course.md.",
        choices=LR_SCHEDULES,
    )
    warmup_epochs: int = lever(
        0,
        "Linear warm-up epochs (one_cycle: epochs to the peak, default 30%).",
        ge=0,
        le=MAX_EPOCHS,
        rule="below epochs",
    )
    early_stopping_patience: int | None = lever(
        None,
        "Stop after N epochs without a lower val_loss and keep the best epoch's weights; "
        "needs validation_split > 0.",
        ge=1,
        le=1000,
    )

    def __post_init__(self) -> None:
        get_net(self.net)
        for o in options_of(type(self)):
            problem = o.problem(getattr(self, o.name))
            if problem:
                raise ValueError(problem)
        for ok, message in self._rules():
            if not ok:
                raise ValueError(message)

    def _rules(self) -> list[tuple[bool, str]]:
        """The rules between options; JobCreate answers a broken one with a 422 and its text."""
        return [
            (
                self.weight_decay == 0.0 or self.optimizer == "adamw",
                "weight_decay needs optimizer='adamw' (decoupled weight decay). "
                f"Received: optimizer={self.optimizer!r}, weight_decay={self.weight_decay}",
            ),
            (
                self.warmup_epochs < self.epochs or self.warmup_epochs == 0,
                f"warmup_epochs must be from 0 to epochs - 1 ({self.epochs - 1}). "
                f"Received: warmup_epochs={self.warmup_epochs}",
            ),
            (
                self.gpus <= 1 or self.batch_size % self.gpus == 0,
                "batch_size must be a multiple of gpus (each device takes an equal share of "
                f"the batch). Received: batch_size={self.batch_size}, gpus={self.gpus}",
            ),
            (
                self.early_stopping_patience is None or self.validation_split > 0,
                "early_stopping_patience watches val_loss and needs validation_split > 0. "
                f"Received: validation_split={self.validation_split}",
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


OPTIONS: tuple[Option, ...] = options_of(TrainConfig)
LEVER_FIELDS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.lever)


def default(name: str) -> Any:
    """The course's default for one parameter, e.g. default("batch_size") == 128."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]
