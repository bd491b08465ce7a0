"""A sweep as GET /sweeps and GET /sweeps/{id} show it: trials with their curves, the best
trial by the objective (validation), the parameter importances."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Evaluation, Job, Sweep, SweepTrial
from app.sweeps import service
from app.sweeps.schemas import (
    EpochPoint,
    PlanEntry,
    SearchCreate,
    SweepCounts,
    SweepPublic,
    SweepSummary,
    TrialPublic,
)


def counts(trials: list[SweepTrial]) -> SweepCounts:
    found = SweepCounts()
    for trial in trials:
        setattr(found, trial.state, getattr(found, trial.state) + 1)
    return found


def best_trial(trials: list[SweepTrial], direction: str) -> SweepTrial | None:
    """The complete trial with the best value (the lowest number on a tie)."""
    complete = [t for t in trials if t.state == "complete" and t.value is not None]
    if not complete:
        return None
    sign = -1.0 if direction == "maximize" else 1.0
    return min(complete, key=lambda t: (sign * float(t.value or 0.0), t.number))


def _jobs(session: Session, trials: list[SweepTrial]) -> dict[uuid.UUID, tuple[str, float | None]]:
    ids = [t.job_id for t in trials if t.job_id is not None]
    if not ids:
        return {}
    rows = session.execute(
        select(Job.id, Job.status, Evaluation.test_accuracy)
        .outerjoin(Evaluation, Evaluation.job_id == Job.id)
        .where(Job.id.in_(ids))
    ).all()
    return {row.id: (row.status, row.test_accuracy) for row in rows}


def sweep_public(session: Session, sweep: Sweep) -> SweepPublic:
    spec = service.load_spec(sweep)
    trials = service.trials_of(session, sweep.id)
    epochs = service.epochs_of(session, sweep.id)
    jobs = _jobs(session, trials)
    plan = service.planned_jobs(spec)
    levers = {entry.role: list(entry.levers) for entry in plan or []}

    def public(trial: SweepTrial) -> TrialPublic:
        status, test_accuracy = (
            jobs.get(trial.job_id, (None, None)) if trial.job_id else (None, None)
        )
        return TrialPublic(
            number=trial.number,
            role=trial.role,
            levers=levers.get(trial.role) if trial.role else None,
            state=trial.state,  # type: ignore[arg-type]
            params=dict(trial.params),
            value=trial.value,
            value_epoch=trial.value_epoch,
            pruned_epoch=trial.pruned_epoch,
            error=trial.error,
            job_id=trial.job_id,
            job_status=status,
            test_accuracy=test_accuracy,
            curve=[
                EpochPoint(epoch=e.epoch, val_loss=e.val_loss, val_accuracy=e.val_accuracy)
                for e in epochs.get(trial.number, [])
            ],
            created_at=trial.created_at,
            finished_at=trial.finished_at,
        )

    shown = [public(t) for t in trials]
    best = best_trial(trials, str(spec.objective.direction))
    importances: dict[str, float] = {}
    note: str | None = "an ablation runs a fixed plan: it has no parameter importances"
    if isinstance(spec, SearchCreate):
        from app.sweeps import study

        importances, note = study.importances(spec, service.records(session, sweep, spec))
    session.rollback()
    return SweepPublic(
        id=sweep.id,
        name=spec.name,
        kind=sweep.kind,  # type: ignore[arg-type]
        status=sweep.status,  # type: ignore[arg-type]
        spec=dict(sweep.spec),
        objective=spec.objective,
        max_trials=sweep.max_trials,
        parallelism=sweep.parallelism,
        counts=counts(trials),
        trials=shown,
        best_trial=shown[best.number] if best is not None else None,
        importances=importances,
        importances_note=note,
        plan=[PlanEntry(**entry.to_dict()) for entry in plan] if plan is not None else None,
        error=sweep.error,
        created_at=sweep.created_at,
        finished_at=sweep.finished_at,
    )


def sweep_summaries(session: Session, sweeps: list[Sweep]) -> list[SweepSummary]:
    """The list's rows: counts and best value per sweep, from one query for all trials."""
    by_sweep: dict[uuid.UUID, list[SweepTrial]] = {s.id: [] for s in sweeps}
    if sweeps:
        for trial in session.scalars(
            select(SweepTrial)
            .where(SweepTrial.sweep_id.in_(list(by_sweep)))
            .order_by(SweepTrial.number)
        ):
            by_sweep[trial.sweep_id].append(trial)
    rows = []
    for sweep in sweeps:
        spec: Any = service.load_spec(sweep)
        trials = by_sweep[sweep.id]
        best = best_trial(trials, str(spec.objective.direction))
        rows.append(
            SweepSummary(
                id=sweep.id,
                name=spec.name,
                kind=sweep.kind,  # type: ignore[arg-type]
                status=sweep.status,  # type: ignore[arg-type]
                objective=spec.objective,
                max_trials=sweep.max_trials,
                parallelism=sweep.parallelism,
                counts=counts(trials),
                best_value=best.value if best is not None else None,
                best_trial=best.number if best is not None else None,
                created_at=sweep.created_at,
                finished_at=sweep.finished_at,
            )
        )
    return rows
