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
LrSchedule = Literal["constant", "cosine", "one_cycle", "triangular"]
Tta = Literal["none", "flip", "flip_translate"]
FlipMode = Literal["random", "alternating"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
TTA_MODES: tuple[str, ...] = get_args(Tta)
FLIP_MODES: tuple[str, ...] = get_args(FlipMode)
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
        "Weight decay: decoupled with adamw (w -= lr * wd * w per step), coupled with sgd "
        "(wd * w added to the gradient, so it follows the schedule and the momentum).",
        ge=0,
        le=1.0,
    )
    clipnorm: float | None = lever(None, "Clip each gradient to this L2 norm.", gt=0, le=1e6)
    lr_schedule: str = lever(
        "constant",
        "constant, cosine (to 0), one_cycle (peak learning_rate) or triangular (0.2 x peak "
        "up to the peak at 23% of the steps, down to 0.07 x peak: airbench's); see "
        "docs/course.md.",
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
    # NET V's recipe (issue 21); every default leaves the other nets' runs as they were.
    momentum: float = lever(
        0.0,
        "SGD momentum (Keras' rule: m = momentum * m - lr * g); needs optimizer sgd.",
        ge=0,
        lt=1,
    )
    nesterov: bool = lever(False, "Nesterov momentum; needs optimizer sgd and momentum > 0.")
    bias_lr_scale: float = lever(
        1.0,
        "Multiply the learning rate of every BatchNormalization bias (beta) by this (and "
        "divide its coupled weight decay by it, as airbench does); needs optimizer sgd "
        "when above 1.",
        ge=1,
        le=1000,
    )
    lookahead_steps: int = lever(
        0,
        "Lookahead: every N steps the slow weights move towards the trained ones by 1 - "
        "0.95^N * (step / total)^3, and the trained ones are reset to them (and at the last "
        "step); 0 = off.",
        ge=0,
        le=1000,
        unit="steps",
    )
    whiten: bool = lever(
        False,
        "Set the net's frozen 2x2 patch-whitening first layer from the training images' "
        "patch covariance before training; needs a net with one (net5).",
    )
    whiten_bias_epochs: int = lever(
        0,
        "Train the whitening layer's bias for the first N epochs only; 0 = every epoch.",
        ge=0,
        le=MAX_EPOCHS,
        unit="epochs",
    )
    augment_translate: int = lever(
        0,
        "Pad every training image by N pixels per side by reflection and crop a random "
        "32x32 window (training only); 0 = off. Not with augment_crop.",
        ge=0,
        le=MAX_AUGMENT_CROP,
        unit="pixels of padding",
    )
    augment_flip_mode: str = lever(
        "random",
        "With augment_flip: random (each image, each epoch) or alternating (each image "
        "flipped by a seeded coin in the first epoch, then on every other epoch exactly the "
        "ones not flipped the epoch before).",
        choices=FLIP_MODES,
    )
    tta: str = lever(
        "none",
        "Test-time augmentation at evaluation: none, flip (mean of the image and its "
        "mirror) or flip_translate (also both shifted by one pixel, reflected); the job's "
        "evaluation records the views and the accuracy with and without.",
        choices=TTA_MODES,
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
                self.weight_decay == 0.0 or self.optimizer in ("adamw", "sgd"),
                "weight_decay needs optimizer='adamw' (decoupled) or 'sgd' (coupled). "
                f"Received: optimizer={self.optimizer!r}, weight_decay={self.weight_decay}",
            ),
            (
                self.momentum == 0.0 or self.optimizer == "sgd",
                "momentum is SGD's; it needs optimizer='sgd'. "
                f"Received: optimizer={self.optimizer!r}, momentum={self.momentum}",
            ),
            (
                not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0),
                "nesterov needs optimizer='sgd' and momentum > 0. "
                f"Received: optimizer={self.optimizer!r}, momentum={self.momentum}",
            ),
            (
                self.bias_lr_scale == 1.0 or self.optimizer == "sgd",
                "bias_lr_scale needs optimizer='sgd'. "
                f"Received: optimizer={self.optimizer!r}, bias_lr_scale={self.bias_lr_scale}",
            ),
            (
                self.lookahead_steps == 0 or self.optimizer == "sgd",
                "lookahead_steps needs optimizer='sgd'. "
                f"Received: optimizer={self.optimizer!r}, lookahead_steps={self.lookahead_steps}",
            ),
            (
                not self.whiten or get_net(self.net).whitening,
                f"whiten needs a net whose first layer is the patch-whitening convolution "
                f"(net5). Received: net={self.net!r}",
            ),
            (
                self.whiten_bias_epochs == 0
                or (get_net(self.net).whitening and self.optimizer == "sgd"),
                "whiten_bias_epochs needs a net with the patch-whitening layer (net5) and "
                f"optimizer='sgd'. Received: net={self.net!r}, optimizer={self.optimizer!r}",
            ),
            (
                self.augment_translate == 0 or self.augment_crop == 0,
                "augment_translate and augment_crop are two ways of one shift; choose one. "
                f"Received: augment_crop={self.augment_crop}, "
                f"augment_translate={self.augment_translate}",
            ),
            (
                self.augment_flip_mode == "random" or self.augment_flip,
                "augment_flip_mode='alternating' needs augment_flip=true. "
                f"Received: augment_flip={self.augment_flip}",
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
