"""The ablation of exercise 19: which of NET IV's levers buys how many points over NET III.

A lever is a set of job options that the baseline and the target set differently. The plan
runs, with one seed and one epoch budget: the baseline, the target, each lever added to the
baseline alone, each lever removed from the target alone, the baseline's net with every
other lever (`net3+all`), and the target's net with none (`net4+none`). The last two are
also "the architecture added to the baseline" and "the architecture removed from the
target", so they are not run twice.

Learning rate and batch size belong to the schedule lever: a one-cycle schedule's peak is
set for its batch size (the linear scaling rule), so moving one without the other measures
a mistuned schedule, not the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.ml.params import OPTIONS

# Lever -> the job options it sets. "architecture" is the net.
LEVERS: dict[str, tuple[str, ...]] = {
    "architecture": ("net",),
    "augmentation": ("augment_crop", "augment_flip"),
    "label_smoothing": ("label_smoothing",),
    "adamw": ("optimizer", "weight_decay"),
    "schedule": ("lr_schedule", "warmup_epochs", "learning_rate", "batch_size"),
    "training_share": ("validation_split",),
}
# The same for every job of the plan (the request's top level sets the first three).
SHARED = ("epochs", "seed", "train_limit")

# NET III as the course trains it (JobCreate's defaults are the course's settings).
BASELINE: dict[str, Any] = {"net": "net3"}
# NET IV's recipe (docs/course.md, scripts/report_jobs_cpu.json).
TARGET: dict[str, Any] = {
    "net": "net4",
    "batch_size": 256,
    "validation_split": 0.1,
    "optimizer": "adamw",
    "learning_rate": 0.003,
    "weight_decay": 0.05,
    "lr_schedule": "one_cycle",
    "augment_crop": 4,
    "augment_flip": True,
    "label_smoothing": 0.2,
}


@dataclass(frozen=True)
class PlanEntry:
    """One job of the plan: its role, the levers it has on, and its POST /jobs options."""

    role: str
    levers: tuple[str, ...]
    options: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "levers": list(self.levers), "options": self.options}


def _options(job: Any) -> dict[str, Any]:
    return dict(job.model_dump()) if hasattr(job, "model_dump") else dict(job)


def varied_levers(baseline: dict[str, Any], target: dict[str, Any]) -> list[str]:
    """The levers whose options differ between baseline and target, in LEVERS' order."""
    return [
        lever for lever, fields in LEVERS.items() if any(baseline[f] != target[f] for f in fields)
    ]


def _unowned_differences(baseline: dict[str, Any], target: dict[str, Any]) -> list[str]:
    owned = {f for fields in LEVERS.values() for f in fields} | set(SHARED) | {"model_name"}
    names = [o.name for o in OPTIONS if o.name not in owned]
    return [name for name in names if baseline[name] != target[name]]


def plan(baseline_job: Any, target_job: Any) -> list[PlanEntry]:
    """The plan between two jobs' options (JobCreate or dicts); ValueError when a plan job
    would break a rule between options, or when baseline and target differ in an option
    that no lever owns (its effect could not be told apart)."""
    from app.schemas import JobCreate

    baseline, target = _options(baseline_job), _options(target_job)
    stray = _unowned_differences(baseline, target)
    if stray:
        raise ValueError(
            f"baseline and target differ in {', '.join(stray)}, which no lever owns; "
            "make them equal (levers: "
            + "; ".join(f"{lever} = {', '.join(fields)}" for lever, fields in LEVERS.items())
            + ")"
        )
    varied = varied_levers(baseline, target)
    if not varied:
        raise ValueError("baseline and target are the same job: nothing to ablate")
    names = {
        baseline["net"]: baseline.get("model_name") or baseline["net"],
        target["net"]: target.get("model_name") or target["net"],
    }

    def build(role: str, levers: tuple[str, ...]) -> PlanEntry:
        options = dict(baseline)
        for lever in levers:
            for field in LEVERS[lever]:
                options[field] = target[field]
        options["model_name"] = names[options["net"]]
        try:
            JobCreate.model_validate(options)
        except ValueError as exc:
            raise ValueError(f"the plan's job {role!r} is not a valid job: {exc}") from None
        return PlanEntry(role, levers, options)

    others = [lever for lever in varied if lever != "architecture"]
    entries = [build("baseline", ()), build("target", tuple(varied))]
    entries += [build(f"baseline+{lever}", (lever,)) for lever in others]
    entries += [
        build(f"target-{lever}", tuple(v for v in varied if v != lever)) for lever in others
    ]
    if "architecture" in varied:
        entries.append(build(f"{baseline['net']}+all", tuple(others)))
        entries.append(build(f"{target['net']}+none", ("architecture",)))
    unique: list[PlanEntry] = []
    for entry in entries:  # with one or two levers, some roles are the same job
        if all(entry.options != kept.options for kept in unique):
            unique.append(entry)
    return unique
