"""The ablation's plan (app/sweeps/ablation.py) and its request (AblationCreate)."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from app.schemas import JobCreate
from app.sweeps.ablation import LEVERS, TARGET, plan
from app.sweeps.schemas import AblationCreate, SweepCreate

SPEC = TypeAdapter(SweepCreate)


def default_plan() -> dict[str, tuple[tuple[str, ...], dict]]:
    spec = SPEC.validate_python({"kind": "ablation", "epochs": 8})
    assert isinstance(spec, AblationCreate)
    return {e.role: (e.levers, e.options) for e in plan(spec.baseline, spec.target)}


def test_the_default_ablation_is_one_short_request_with_the_whole_plan():
    entries = default_plan()
    others = [lever for lever in LEVERS if lever != "architecture"]
    assert list(entries) == [
        "baseline",
        "target",
        *(f"baseline+{lever}" for lever in others),
        *(f"target-{lever}" for lever in others),
        "net3+all",
        "net4+none",
    ]
    assert entries["baseline"][0] == ()
    assert set(entries["target"][0]) == set(LEVERS)
    assert entries["net4+none"][0] == ("architecture",)
    assert set(entries["net3+all"][0]) == set(others)
    # Same seed and epoch budget for every job; every job is a valid POST /jobs body.
    for _, options in entries.values():
        assert options["epochs"] == 8 and options["seed"] == 0
        JobCreate.model_validate(options)


def test_baseline_is_the_course_net3_and_target_the_net4_recipe():
    entries = default_plan()
    baseline, target = entries["baseline"][1], entries["target"][1]
    course = JobCreate(net="net3").model_dump()
    assert {k: v for k, v in baseline.items() if k not in ("epochs",)} == {
        **{k: v for k, v in course.items() if k != "epochs"},
        "model_name": "net3",
    }
    for name, value in TARGET.items():
        assert target[name] == value
    assert target["model_name"] == "net4"


def test_each_lever_alone_changes_exactly_its_own_options():
    entries = default_plan()
    baseline, target = entries["baseline"][1], entries["target"][1]
    for lever, fields in LEVERS.items():
        if lever == "architecture":
            continue
        added = entries[f"baseline+{lever}"][1]
        changed = {k for k in added if added[k] != baseline[k]}
        assert changed == {f for f in fields if baseline[f] != target[f]}, lever
        removed = entries[f"target-{lever}"][1]
        changed = {k for k in removed if removed[k] != target[k]}
        assert changed == {f for f in fields if baseline[f] != target[f]}, lever
    # NET IV with none of the levers is the baseline on NET IV, registered as net4.
    none = entries["net4+none"][1]
    assert {k for k in none if none[k] != baseline[k]} == {"net", "model_name"}


def test_options_no_lever_owns_must_agree():
    with pytest.raises(ValidationError, match="cutout, which no lever owns"):
        SPEC.validate_python({"kind": "ablation", "target": {"cutout": 8}})


def test_the_budget_is_set_once_for_every_job():
    with pytest.raises(ValidationError, match="set it at the top level"):
        SPEC.validate_python({"kind": "ablation", "baseline": {"epochs": 3}})
    spec = SPEC.validate_python({"kind": "ablation", "epochs": 3, "train_limit": 500, "seed": 7})
    assert {
        (e.options["epochs"], e.options["seed"], e.options["train_limit"])
        for e in plan(spec.baseline, spec.target)
    } == {(3, 7, 500)}
    # What the service stores validates again to the same plan.
    again = SPEC.validate_python(spec.model_dump(mode="json"))
    assert plan(again.baseline, again.target) == plan(spec.baseline, spec.target)


def test_one_varied_lever_gives_two_jobs_not_duplicates():
    spec = SPEC.validate_python(
        {"kind": "ablation", "baseline": {"net": "net4"}, "target": {"net": "net4", "label_smoothing": 0.1,
         "batch_size": 128, "validation_split": 0.2, "optimizer": "adam", "learning_rate": 0.001,
         "weight_decay": 0.0, "lr_schedule": "constant", "augment_crop": 0, "augment_flip": False}}
    )  # fmt: skip
    assert [(e.role, e.levers) for e in plan(spec.baseline, spec.target)] == [
        ("baseline", ()),
        ("target", ("label_smoothing",)),
    ]


def test_the_same_job_twice_is_nothing_to_ablate():
    with pytest.raises(ValidationError, match="nothing to ablate"):
        SPEC.validate_python(
            {
                "kind": "ablation",
                "target": {
                    "net": "net3",
                    **{k: JobCreate(net="net3").model_dump()[k] for k in TARGET if k != "net"},
                },
            }
        )
