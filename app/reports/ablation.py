"""Exercise 19's why: how many points each lever gives, measured on an ablation's jobs.

An ablation (a sweep of kind "ablation", app/sweeps) trains a fixed plan with one seed and
one epoch budget: the baseline (NET III as the course trains it), the target recipe (NET IV
with its levers), each lever added to the baseline alone ("baseline+<lever>"), each lever
removed from the target alone ("target-<lever>"), the baseline's net with every lever
("net3+all") and the target's net with none ("net4+none"). The roles are read from
`app.sweeps.service.ablation_jobs(session, sweep_id) -> [(role, levers, job)]`, imported only
when a report asks for an ablation.

A lever's points are differences of accuracy, in percentage points:
- added to the baseline: acc(baseline+L) - acc(baseline);
- removed from the target: acc(target) - acc(target-L);
- the architecture: acc(<target net>+none) - acc(baseline), and acc(target) - acc(<baseline
  net>+all).
The accuracy is the validation accuracy of the weights each job kept (the report's choice of
the best job uses the same); test accuracy differences are given beside, never used to
decide. The two columns agree when a lever's effect does not depend on the other levers.
They disagree, an interaction, when |added - removed| exceeds NOISE_SE standard errors of
that difference: each accuracy p measured on n validation images varies by p(1 - p) / n
(binomial), and the four variances add up.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.errors import AblationNotFound
from app.reports.compare import kept_epoch, validation_images
from app.reports.export import AblationExport, JobEntry

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

BASELINE = "baseline"
TARGET = "target"
ADDED = "baseline+"
REMOVED = "target-"
ALL_LEVERS = "+all"
NO_LEVERS = "+none"
ARCHITECTURE = "architecture"
NOISE_SE = 2.0  # standard errors: about 95% of the differences that noise alone gives


def ablation_jobs(session: Session, sweep_id: uuid.UUID) -> Sequence[tuple[str, Any, Any]]:
    """The ablation's (role, levers, job) triples, from the sweeps service (the report reads
    the role and the job; the levers are named by the role).

    AblationNotFound (404) when this build has no sweeps, or the sweep has no ablation jobs.
    """
    try:
        from app.sweeps.service import ablation_jobs as from_sweeps
    except ModuleNotFoundError as exc:
        if exc.name not in ("app.sweeps", "app.sweeps.service"):
            raise
        raise AblationNotFound("this service has no sweeps, so no ablation to report") from None
    found = list(from_sweeps(session, sweep_id))
    if not found:
        raise AblationNotFound(f"sweep {sweep_id} is not an ablation, or has no jobs yet")
    return found


@dataclass(frozen=True)
class Measure:
    """One ablation job's numbers."""

    role: str
    job: JobEntry
    succeeded: bool
    val_accuracy: float | None  # of the kept weights
    test_accuracy: float | None
    validation_images: int | None

    @property
    def variance(self) -> float | None:
        """Binomial variance of val_accuracy: p(1 - p) / n."""
        p, n = self.val_accuracy, self.validation_images
        if p is None or not n:
            return None
        return p * (1.0 - p) / n


def measure(role: str, job: JobEntry) -> Measure:
    succeeded = job.status == "succeeded"
    kept = kept_epoch(job) if succeeded else None
    val = next((e.val_accuracy for e in job.epochs if e.epoch == kept), None)
    test = job.evaluation.test_accuracy if succeeded and job.evaluation else None
    return Measure(role, job, succeeded, val, test, validation_images(job))


@dataclass(frozen=True)
class LeverPoints:
    """One row of exercise 19's table: a lever added to the baseline and removed from the
    target. A pair is (without the lever, with it); None where the plan lacks the job."""

    lever: str
    added_pair: tuple[Measure | None, Measure | None]
    removed_pair: tuple[Measure | None, Measure | None]

    @staticmethod
    def _diff(pair: tuple[Measure | None, Measure | None], key: str) -> float | None:
        without, with_ = pair
        if without is None or with_ is None:
            return None
        a, b = getattr(without, key), getattr(with_, key)
        return None if a is None or b is None else b - a

    @property
    def added(self) -> float | None:
        return self._diff(self.added_pair, "val_accuracy")

    @property
    def removed(self) -> float | None:
        return self._diff(self.removed_pair, "val_accuracy")

    @property
    def added_test(self) -> float | None:
        return self._diff(self.added_pair, "test_accuracy")

    @property
    def removed_test(self) -> float | None:
        return self._diff(self.removed_pair, "test_accuracy")

    @property
    def noise(self) -> float | None:
        """NOISE_SE standard errors of added - removed; None without the four set sizes."""
        variances = [m.variance if m else None for m in (*self.added_pair, *self.removed_pair)]
        if any(v is None for v in variances):
            return None
        return NOISE_SE * math.sqrt(sum(v for v in variances if v is not None))

    @property
    def interaction(self) -> bool | None:
        """Whether the two measurements disagree beyond noise; None when one is missing."""
        if self.added is None or self.removed is None or self.noise is None:
            return None
        return abs(self.added - self.removed) > self.noise

    def changes(self) -> str:
        """What the lever changes, read from the jobs of one pair: "`net` net3 -> net4"."""
        for without, with_ in (self.added_pair, self.removed_pair):
            if without is not None and with_ is not None:
                return describe_change(without.job, with_.job)
        return "–"

    def split_differs(self) -> bool:
        """The pair validated on different sets (another validation_split)."""
        return any(
            a is not None
            and b is not None
            and a.job.training.get("validation_split") != b.job.training.get("validation_split")
            for a, b in (self.added_pair, self.removed_pair)
        )


def describe_change(without: JobEntry, with_: JobEntry) -> str:
    """The options that differ between two jobs, as `name` old -> new."""
    changes = [f"`net` {without.net} -> {with_.net}"] if without.net != with_.net else []
    for key, value in with_.training.items():
        old = without.training.get(key)
        if old != value and key not in ("epochs", "seed"):
            changes.append(f"`{key}` {old} -> {value}")
    return ", ".join(changes) or "no option differs"


def lever_points(ablation: AblationExport) -> tuple[list[LeverPoints], dict[str, Measure]]:
    """The table's rows (the architecture first, then each lever in plan order) and every
    role's measure."""
    measures = {e.role: measure(e.role, e.job) for e in ablation.entries}
    baseline, target = measures.get(BASELINE), measures.get(TARGET)
    rows = []
    if baseline is not None and target is not None:
        target_bare = _role_of_net(measures, target.job.net, NO_LEVERS)
        baseline_full = _role_of_net(measures, baseline.job.net, ALL_LEVERS)
        rows.append(LeverPoints(ARCHITECTURE, (baseline, target_bare), (baseline_full, target)))
    levers: list[str] = []
    for entry in ablation.entries:
        for prefix in (ADDED, REMOVED):
            if entry.role.startswith(prefix) and entry.role[len(prefix) :] not in levers:
                levers.append(entry.role[len(prefix) :])
    for lever in levers:
        rows.append(
            LeverPoints(
                lever,
                (baseline, measures.get(ADDED + lever)),
                (measures.get(REMOVED + lever), target),
            )
        )
    return rows, measures


def _role_of_net(measures: dict[str, Measure], net: str, suffix: str) -> Measure | None:
    """The measure of role '<net>+all' or '<net>+none' (by the job's net, whatever the name)."""
    return next(
        (m for role, m in measures.items() if role.endswith(suffix) and m.job.net == net),
        None,
    )


def budget(jobs: Sequence[JobEntry]) -> dict[str, list[Any]]:
    """The distinct epoch budgets, seeds and devices of the ablation's jobs."""
    out: dict[str, list[Any]] = {"epochs": [], "seed": [], "device": []}
    for job in jobs:
        for key, value in (
            ("epochs", job.epochs_requested),
            ("seed", job.training.get("seed")),
            ("device", job.device),
        ):
            if value not in out[key]:
                out[key].append(value)
    return out
