"""The report's fixture database: hand-made jobs of every kind a report meets, written
through the ORM with fixed ids, so that its export (tests/reports/fixture/results.export.json)
and the report generated from it (tests/reports/fixture/results.md) are reproducible.

- NET I and NET II (6 epochs) overfit, NET II first; the test set ranks them the other way
  round from validation.
- NET III is a job recorded before issue 20 (no plain cross-entropy, no data record, no
  first image), with NET III's real 20-epoch shape: under-fitting, and a late val_loss rise
  of 0.039 within the tolerance.
- NET IV trained with label smoothing: its val_loss is the smoothed loss.
- An ablation (`ablation_source` plays app.sweeps.service.ablation_jobs): 4 epochs each, one
  job failed, one lever that interacts with the others, one that changes the validation set.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from app.models import EpochMetric, Evaluation, Job

SWEEP_ID = uuid.UUID("5f3c2a10-0000-4000-8000-000000000020")
EXPORTED_AT = "2026-11-28 12:00 UTC"
JOBS_FILE = "scripts/report_jobs.json"
DATA = {
    "archive": "cifar10-jpeg.tar.gz",
    "sha256": "d34c68f61cca57aa9144c8f25bda427abb9921bd642d5857a2fc1a6b4416f965",
    "first_test_image": (
        "the first of the test/ images sorted by path, then permuted by "
        "numpy.random.default_rng(0).permutation (app/ml/data.py): test/cat/0577.jpg"
    ),
    "train_images": 50_000,
    "test_images": 10_000,
}
COURSE = {
    "batch_size": 128,
    "validation_split": 0.2,
    "optimizer": "adam",
    "learning_rate": 0.001,
    "seed": 0,
    "train_limit": None,
}
AUGMENTATION = {"augment_crop": 4, "augment_flip": True}
LABEL_SMOOTHING = {"label_smoothing": 0.2}
ADAMW = {"optimizer": "adamw", "learning_rate": 0.003, "weight_decay": 0.05}
SCHEDULE = {"lr_schedule": "one_cycle"}
TRAINING_SHARE = {"validation_split": 0.1}
RECIPE = {**AUGMENTATION, **LABEL_SMOOTHING, **ADAMW, **SCHEDULE, **TRAINING_SHARE}
LEVERS = {
    "augmentation": AUGMENTATION,
    "label_smoothing": LABEL_SMOOTHING,
    "adamw": ADAMW,
    "schedule": SCHEDULE,
    "training_share": TRAINING_SHARE,
}

# fmt: off
NET3_ACC = [0.282, 0.418, 0.487, 0.533, 0.571, 0.598, 0.622, 0.641, 0.657, 0.671,
            0.683, 0.694, 0.705, 0.714, 0.722, 0.731, 0.739, 0.745, 0.751, 0.757]
NET3_VAL_ACC = [0.418, 0.497, 0.543, 0.581, 0.611, 0.631, 0.651, 0.662, 0.679, 0.690,
                0.701, 0.707, 0.716, 0.727, 0.733, 0.741, 0.748, 0.774, 0.752, 0.756]
NET3_LOSS = [2.30, 1.82, 1.62, 1.50, 1.41, 1.34, 1.28, 1.23, 1.19, 1.15,
             1.12, 1.09, 1.06, 1.03, 1.01, 0.98, 0.96, 0.924, 0.913, 0.903]
NET3_VAL_LOSS = [1.85, 1.55, 1.42, 1.31, 1.22, 1.15, 1.10, 1.06, 1.01, 0.98,
                 0.95, 0.93, 0.91, 0.90, 0.89, 0.875, 0.866, 0.854, 0.871, 0.893]
# fmt: on


def job_id(name: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"cnn-report-fixture/{name}")


def first_image(predicted: int, confidence: float) -> dict[str, Any]:
    """The first test image (a cat, class 3): `confidence` on `predicted`, the rest spread."""
    rest = (1.0 - confidence) / 9
    probabilities = [round(confidence if k == predicted else rest, 6) for k in range(10)]
    return {
        "probabilities": probabilities,
        "predicted_class": predicted,
        "true_class": 3,
        "match": predicted == 3,
    }


def ramp(start: float, end: float, n: int) -> list[float]:
    return [round(start + (end - start) * i / (n - 1), 4) for i in range(n)]


def add_job(
    session: Session,
    name: str,
    net: str,
    *,
    status: str = "succeeded",
    epochs: int,
    options: dict[str, Any],
    curves: dict[str, list[float | None]],
    evaluation: dict[str, Any] | None,
    precision: str = "float32",
) -> Job:
    """One job with its epoch rows and evaluation, at fixed times."""
    created = datetime(2026, 11, 28, 8, 0, tzinfo=UTC)
    job = Job(
        id=job_id(name),
        net=net,
        epochs=epochs,
        model_name=f"fixture-{name}",
        precision=precision,
        status=status,
        current_epoch=len(curves["loss"]),
        attempts=1,
        claims=1,
        cancel_requested=False,
        created_at=created,
        started_at=created + timedelta(minutes=1),
        finished_at=created + timedelta(minutes=30),
        worker="fixture-worker",
        device="CPU",
        **(COURSE | options),
    )
    session.add(job)
    session.flush()
    for i in range(len(curves["loss"])):
        session.add(
            EpochMetric(
                job_id=job.id,
                epoch=i + 1,
                seconds=60.0 + i,
                images_per_second=600.0,
                learning_rate=0.001,
                **{key: values[i] for key, values in curves.items()},
            )
        )
    if evaluation is not None:
        session.add(
            Evaluation(
                job_id=job.id,
                per_class_accuracy=[evaluation["test_accuracy"]] * 10,
                confusion_matrix=[[0] * 10 for _ in range(10)],
                **evaluation,
            )
        )
    return job


def course_curves(
    loss: list[float], acc: list[float], val_loss: list[float], val_acc: list[float]
) -> dict[str, list[float | None]]:
    """A run without label smoothing or weight penalties: val_ce_loss is val_loss."""
    return {"loss": loss, "accuracy": acc, "val_loss": val_loss, "val_accuracy": val_acc,
            "val_ce_loss": list(val_loss)}  # fmt: skip


def evaluation(test_accuracy: float, test_ce_loss: float, predicted: int, confidence: float):
    return {
        "test_loss": test_ce_loss,
        "test_accuracy": test_accuracy,
        "test_ce_loss": test_ce_loss,
        "first_image": first_image(predicted, confidence),
        "data": DATA,
    }


def listed(session: Session) -> list[uuid.UUID]:
    """NET I-IV, in the report's table order."""
    add_job(session, "net1", "net1", epochs=6, options={}, curves=course_curves(
        [1.60, 1.25, 1.04, 0.88, 0.74, 0.61], [0.42, 0.55, 0.63, 0.70, 0.77, 0.83],
        [1.40, 1.15, 1.02, 0.98, 1.03, 1.12], [0.50, 0.58, 0.63, 0.655, 0.66, 0.652],
    ), evaluation=evaluation(0.641, 1.09, 3, 0.41))  # fmt: skip
    add_job(session, "net2", "net2", epochs=6, options={}, curves=course_curves(
        [1.55, 1.10, 0.80, 0.52, 0.31, 0.17], [0.45, 0.62, 0.74, 0.84, 0.91, 0.95],
        [1.35, 1.10, 1.08, 1.20, 1.40, 1.65], [0.52, 0.61, 0.64, 0.63, 0.63, 0.62],
    ), evaluation=evaluation(0.646, 1.62, 5, 0.55))  # fmt: skip
    add_job(session, "net3", "net3", epochs=20, options={}, curves={
        "loss": NET3_LOSS, "accuracy": NET3_ACC, "val_loss": NET3_VAL_LOSS,
        "val_accuracy": NET3_VAL_ACC, "val_ce_loss": [None] * 20,
    }, evaluation={
        "test_loss": 0.905, "test_accuracy": 0.756, "test_ce_loss": None,
        "first_image": {}, "data": None,
    })  # fmt: skip
    add_job(session, "net4", "net4", epochs=6, options={**RECIPE, "batch_size": 256},
        precision="mixed_bfloat16", curves={
        "loss": [1.95, 1.62, 1.45, 1.33, 1.24, 1.17],
        "accuracy": [0.40, 0.62, 0.76, 0.85, 0.91, 0.95],
        "val_loss": [1.70, 1.45, 1.32, 1.22, 1.16, 1.12],
        "val_accuracy": [0.48, 0.63, 0.74, 0.80, 0.85, 0.87],
        "val_ce_loss": [1.20, 0.85, 0.66, 0.52, 0.45, 0.41],
    }, evaluation=evaluation(0.862, 0.44, 3, 0.93))  # fmt: skip
    session.commit()
    return [job_id(n) for n in ("net1", "net2", "net3", "net4")]


# role -> (net, options, final validation accuracy, final test accuracy); None: the job failed
PLAN: dict[str, tuple[str, dict[str, Any], float | None, float | None]] = {
    "baseline": ("net3", {}, 0.620, 0.615),
    "target": ("net4", RECIPE, 0.800, 0.790),
    "baseline+augmentation": ("net3", AUGMENTATION, 0.640, 0.630),
    "baseline+label_smoothing": ("net3", LABEL_SMOOTHING, 0.625, 0.620),
    "baseline+adamw": ("net3", ADAMW, 0.630, 0.622),
    "baseline+schedule": ("net3", SCHEDULE, 0.650, 0.640),
    "baseline+training_share": ("net3", TRAINING_SHARE, 0.628, 0.624),
    "target-augmentation": ("net4", {k: v for k, v in RECIPE.items() if k not in AUGMENTATION}
                            | {"augment_crop": 0, "augment_flip": False}, 0.740, 0.735),
    "target-label_smoothing": ("net4", RECIPE | {"label_smoothing": 0.0}, 0.794, 0.788),
    "target-adamw": ("net4", RECIPE | {"optimizer": "adam", "learning_rate": 0.001,
                                       "weight_decay": 0.0}, 0.788, 0.780),
    "target-schedule": ("net4", RECIPE | {"lr_schedule": "constant"}, None, None),
    "target-training_share": ("net4", RECIPE | {"validation_split": 0.2}, 0.792, 0.785),
    "net3+all": ("net3", RECIPE, 0.680, 0.675),
    "net4+none": ("net4", {}, 0.700, 0.690),
}  # fmt: skip


def ablation(session: Session) -> None:
    """The ablation's jobs: 4 epochs each, the same seed."""
    for role, (net, options, val_acc, test_acc) in PLAN.items():
        smoothing = options.get("label_smoothing", 0.0)
        if val_acc is None:  # died in its third epoch
            add_job(session, role, net, status="failed", epochs=4, options=options,
                    curves={"loss": [1.9, 1.6], "accuracy": [0.35, 0.48],
                            "val_loss": [1.8, 1.5], "val_accuracy": [0.40, 0.52],
                            "val_ce_loss": [1.4, 1.1]}, evaluation=None)  # fmt: skip
            continue
        val = ramp(val_acc - 0.21, val_acc, 4)
        # NET III's dropout keeps training below validation; NET IV's training leads.
        acc = [round(v + (0.03 if net == "net4" else -0.02), 4) for v in val]
        ce = ramp(1.6, 2.2 - 2.0 * val_acc, 4)
        add_job(session, role, net, epochs=4, options=options, curves={
            "loss": ramp(1.9, 2.2 - 2.0 * acc[-1] + smoothing, 4), "accuracy": acc,
            "val_loss": [round(c + smoothing * 2.5, 4) for c in ce], "val_accuracy": val,
            "val_ce_loss": ce,
        }, evaluation=evaluation(test_acc, round(2.1 - 2.0 * test_acc, 4), 3, val_acc))  # fmt: skip
    session.commit()


def ablation_source(session: Session, sweep_id: uuid.UUID) -> list[tuple[str, tuple, Job]]:
    """What app.sweeps.service.ablation_jobs answers for the fixture's sweep: each role with
    the names of the levers its job has on ("architecture" when it has the target's net)."""
    assert sweep_id == SWEEP_ID
    out = []
    for role in PLAN:
        lever = role.split("+", 1)[-1].split("-", 1)[-1]
        on = tuple(name for name in LEVERS if (name == lever) == role.startswith("baseline+"))
        if role in ("baseline", "net4+none"):
            on = ()
        elif role in ("target", "net3+all"):
            on = tuple(LEVERS)
        job = session.get(Job, job_id(role))
        assert job is not None
        if job.net == "net4":
            on = ("architecture", *on)
        out.append((role, on, job))
    return out


def build(session: Session) -> list[uuid.UUID]:
    """Write every fixture job; returns the listed jobs' ids in table order."""
    ids = listed(session)
    ablation(session)
    return ids
