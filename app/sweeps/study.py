"""Optuna as a library: a study rebuilt in memory from our trial rows, then ask, tell,
should-prune or importances on it, and what Optuna wrote handed back to be stored.

The service keeps a sweep's state in its own tables (sweeps, sweep_trials, and the jobs'
epochs as the intermediate values). Each operation rebuilds the study from them
(`rebuild`), makes one Optuna call, and returns what the call decided (the sampled
parameters and the attributes the sampler wrote, the final state, the pruner's verdict and
the rung values it wrote). Nothing of Optuna's storage outlives the call, so no Optuna
engine, pool or schema exists next to ours, and a restarted API or worker loses nothing.

Samplers are seeded per trial number (`seed + number`): the same rows and the same number
sample the same parameters, so two advancers racing for one trial number ask for the
same job. Imports optuna (about a second): import this module lazily.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
    json_to_distribution,
)
from optuna.trial import FrozenTrial, TrialState, create_trial

from app.sweeps.schemas import ChoiceParam, IntParam, SearchCreate, grid_values

optuna.logging.set_verbosity(logging.WARNING)

STATES: dict[str, TrialState] = {
    "running": TrialState.RUNNING,
    "complete": TrialState.COMPLETE,
    "pruned": TrialState.PRUNED,
    "fail": TrialState.FAIL,
}
STATE_NAMES = {state: name for name, state in STATES.items()}


@dataclass
class TrialRecord:
    """What the study needs of one trial: a sweep_trials row plus its job's epoch values."""

    number: int
    state: str
    params: dict[str, Any]
    distributions: dict[str, str]  # parameter -> distribution_to_json
    system_attrs: dict[str, Any] = field(default_factory=dict)
    value: float | None = None
    intermediate: dict[int, float] = field(default_factory=dict)  # epoch -> objective metric


@dataclass(frozen=True)
class Asked:
    params: dict[str, Any]
    distributions: dict[str, str]
    system_attrs: dict[str, Any]


def distributions(spec: SearchCreate) -> dict[str, BaseDistribution]:
    """Optuna's distribution of each parameter of the search space."""
    found: dict[str, BaseDistribution] = {}
    for name, param in spec.space.items():
        if isinstance(param, ChoiceParam):
            found[name] = CategoricalDistribution(param.choices)
        elif isinstance(param, IntParam):
            found[name] = IntDistribution(param.low, param.high, log=param.log, step=param.step)
        else:
            found[name] = FloatDistribution(param.low, param.high, log=param.log, step=param.step)
    return found


def make_sampler(spec: SearchCreate, number: int) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded for trial `number`."""
    if spec.sampler == "grid":
        grid = {name: grid_values(param) for name, param in spec.space.items()}
        return optuna.samplers.GridSampler(grid, seed=spec.seed)  # type: ignore[arg-type]
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed + number)
    # constant_liar: running trials count as bad ones, so parallel trials spread out.
    return optuna.samplers.TPESampler(seed=spec.seed + number, constant_liar=True)


def grid_size(spec: SearchCreate) -> int | None:
    """How many points the grid has (None for the other samplers)."""
    if spec.sampler != "grid":
        return None
    size = 1
    for param in spec.space.values():
        size *= len(grid_values(param) or [])
    return size


def make_pruner(spec: SearchCreate) -> optuna.pruners.BasePruner:
    if spec.pruner.type == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=spec.pruner.min_resource,
            reduction_factor=spec.pruner.reduction_factor,
            min_early_stopping_rate=spec.pruner.min_early_stopping_rate,
        )
    return optuna.pruners.NopPruner()


def _frozen(record: TrialRecord, intermediate: Mapping[int, float] | None = None) -> FrozenTrial:
    state = STATES[record.state]
    dists = {name: json_to_distribution(text) for name, text in record.distributions.items()}
    value = record.value if state in (TrialState.COMPLETE, TrialState.PRUNED) else None
    if state is TrialState.COMPLETE and value is None:
        state = TrialState.FAIL  # cannot happen from our rows; never let it stop a rebuild
    return create_trial(
        state=state,
        value=value,
        params={name: record.params[name] for name in dists},
        distributions=dists,
        system_attrs=dict(record.system_attrs),
        intermediate_values=dict(record.intermediate if intermediate is None else intermediate),
    )


def rebuild(
    spec: SearchCreate,
    records: Iterable[TrialRecord],
    *,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    hold_back: int | None = None,
) -> optuna.Study:
    """An in-memory study holding `records` in number order (trial k has number k).

    `hold_back`: that trial's last intermediate value is left out, for the caller to report.
    """
    study = optuna.create_study(
        direction=spec.objective.direction,
        sampler=sampler or optuna.samplers.RandomSampler(seed=spec.seed),
        pruner=pruner or optuna.pruners.NopPruner(),
    )
    for expected, record in enumerate(sorted(records, key=lambda r: r.number)):
        if record.number != expected:
            raise ValueError(f"trial numbers have a gap at {expected}")
        values = dict(record.intermediate)
        if record.number == hold_back and values:
            values.pop(max(values))
        study.add_trial(_frozen(record, values))
    return study


def _trial_id(study: optuna.Study, number: int) -> int:
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def ask(spec: SearchCreate, records: list[TrialRecord]) -> Asked:
    """The parameters of the next trial (number len(records)), from the spec's sampler."""
    number = len(records)
    study = rebuild(spec, records, sampler=make_sampler(spec, number))
    trial = study.ask(fixed_distributions=distributions(spec))
    if trial.number != number:
        raise RuntimeError(f"asked trial {trial.number}, expected {number}")
    frozen = study._storage.get_trial(trial._trial_id)
    return Asked(
        params=dict(frozen.params),
        distributions={name: distribution_to_json(d) for name, d in frozen.distributions.items()},
        system_attrs=dict(frozen.system_attrs),
    )


def tell(
    spec: SearchCreate,
    records: list[TrialRecord],
    number: int,
    *,
    state: str,
    value: float | None = None,
) -> tuple[str, float | None]:
    """Tell trial `number` how it ended; returns the state and value Optuna recorded (a
    complete trial whose value is not a finite number becomes `fail`)."""
    study = rebuild(spec, records)
    if state == "complete":
        frozen = study.tell(number, value, skip_if_finished=True)
    else:
        frozen = study.tell(number, state=STATES[state], skip_if_finished=True)
    return STATE_NAMES[frozen.state], frozen.value


def should_prune(
    spec: SearchCreate, records: list[TrialRecord], number: int
) -> tuple[bool, dict[str, Any]]:
    """Report trial `number`'s latest epoch to it and ask the pruner; returns the verdict and
    the trial's system attributes afterwards (ASHA writes the rung values it compared)."""
    record = next(r for r in records if r.number == number)
    if not record.intermediate:
        return False, dict(record.system_attrs)
    epoch = max(record.intermediate)
    study = rebuild(spec, records, pruner=make_pruner(spec), hold_back=number)
    trial = optuna.trial.Trial(study, _trial_id(study, number))
    trial.report(record.intermediate[epoch], epoch)
    verdict = trial.should_prune()
    return verdict, dict(study._storage.get_trial_system_attrs(trial._trial_id))


def importances(
    spec: SearchCreate, records: list[TrialRecord]
) -> tuple[dict[str, float], str | None]:
    """Optuna's parameter importances (PED-ANOVA), or {} and the reason there are none."""
    complete = [r for r in records if r.state == "complete"]
    if len(complete) < 2:
        return {}, f"importances need at least 2 complete trials ({len(complete)} so far)"
    study = rebuild(spec, records)
    try:
        found = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        return {}, f"Optuna could not compute importances yet: {exc}"
    return {name: float(value) for name, value in found.items()}, None
