"""Sweeps as the API and the workers see them: create, read, list, cancel, and advance.

`advance` moves one sweep forward and is safe with any number of callers at once (the
API after creating a sweep, the sweep loop of every worker): it tells Optuna how the trials
whose jobs ended went (one conditional UPDATE per trial, `WHERE state = 'running'`), asks
for new trials while fewer than `parallelism` run, and finishes the sweep when the last
trial ends. A trial number is taken by inserting its row, and (sweep_id, number) is unique:
two advancers that ask at once ask for the same number and only one row is written. Each
trial's job is created through the jobs service with the Idempotency-Key
`sweep:<sweep id>:<number>` and the sweep owner's key, so ownership, quotas, fencing,
events, resume and cancel are the jobs' own; an advancer that died between creating the
job and writing the trial row leaves a job the next one adopts.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app import auth
from app.auth import AUTH_OFF, Principal
from app.config import Settings
from app.db import rowcount
from app.errors import (
    Forbidden,
    IdempotencyConflict,
    QuotaExceeded,
    RequestInvalid,
    SweepNotFound,
    SweepTerminal,
    SweepTooLarge,
    public_message,
)
from app.jobs import queue
from app.jobs import service as job_service
from app.ml.analysis import analyse
from app.models import ApiKey, EpochMetric, Job, Sweep, SweepTrial
from app.schemas import JobCreate
from app.states import InvalidTransition, JobStatus, is_terminal
from app.sweeps.ablation import PlanEntry, plan
from app.sweeps.schemas import (
    AblationCreate,
    ChoiceParam,
    SearchCreate,
    SweepCreate,
    grid_values,
)

if TYPE_CHECKING:
    from app.sweeps.study import TrialRecord

log = logging.getLogger(__name__)

RUNNING, FINISHED, CANCELLED = "running", "finished", "cancelled"
# A search whose first trials all fail stops rather than fail its whole budget.
FAILURES_BEFORE_GIVING_UP = 3
# Search spaces of at most this many grid points are checked point by point at creation.
CHECK_ALL_POINTS_UP_TO = 1000
Spec = SearchCreate | AblationCreate
_SPEC = TypeAdapter(SweepCreate)


def _now() -> datetime:
    return datetime.now(UTC)


def load_spec(sweep: Sweep) -> Spec:
    """The sweep's validated request, as stored."""
    return _SPEC.validate_python(sweep.spec)


def idempotency_key(sweep_id: uuid.UUID, number: int) -> str:
    return f"sweep:{sweep_id}:{number}"


def _problem(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())


# ----------------------------------------------------------------------------- create
def _search_corners(spec: SearchCreate) -> Iterable[dict[str, Any]]:
    """Options of trials worth checking before any runs: every grid point of a small grid;
    else all-lows, all-highs and each choice alone (rules between options that only some
    points break are found when such a point is sampled: that trial fails with the rule)."""
    base = spec.base.model_dump()
    grids = {name: grid_values(param) for name, param in spec.space.items()}
    size = 1
    for values in grids.values():
        size = size * len(values) if values is not None else CHECK_ALL_POINTS_UP_TO + 1
    if size <= CHECK_ALL_POINTS_UP_TO:
        names = list(grids)
        for point in itertools.product(*(grids[name] or [] for name in names)):
            yield base | dict(zip(names, point, strict=True))
        return
    ends = {
        name: (param.choices[0], param.choices[-1])
        if isinstance(param, ChoiceParam)
        else (param.low, param.high)
        for name, param in spec.space.items()
    }
    yield base | {name: low for name, (low, _) in ends.items()}
    yield base | {name: high for name, (_, high) in ends.items()}
    for name, param in spec.space.items():
        if isinstance(param, ChoiceParam):
            for value in param.choices:
                yield base | {name: value}


def planned_jobs(spec: Spec) -> list[PlanEntry] | None:
    return plan(spec.baseline, spec.target) if isinstance(spec, AblationCreate) else None


def trial_budget(spec: Spec) -> int:
    """How many trials the sweep asks at most: max_trials, the grid's size, the plan's length."""
    if isinstance(spec, AblationCreate):
        return len(plan(spec.baseline, spec.target))
    if spec.sampler == "grid":
        size = 1
        for param in spec.space.values():
            size *= len(grid_values(param) or [])
        return min(spec.max_trials, size)
    return spec.max_trials


def _check_trials(spec: Spec, settings: Settings) -> None:
    """Every job the sweep can be sure to ask is a valid job within the size bounds, and so
    is a search's base: it is documented as a job (JobCreate, whose OpenAPI bounds follow
    the settings) even where the space overrides the out-of-bounds field."""
    if isinstance(spec, AblationCreate):
        options = [entry.options for entry in planned_jobs(spec) or []]
    else:
        options = [spec.base.model_dump(), *_search_corners(spec)]
    for values in options:
        try:
            data = JobCreate.model_validate(values)
        except ValidationError as exc:
            raise RequestInvalid(
                f"a trial of this sweep would be refused: {_problem(exc)}"
            ) from None
        job_service.check_job_size(data, settings)


def _check_sweep_quota(session: Session, principal: Principal, limit: int) -> None:
    """QuotaExceeded when the key already has `limit` running sweeps (its row locked first,
    as for jobs, so two concurrent creations are counted one after the other)."""
    if principal.id is None:
        return
    session.execute(select(ApiKey.id).where(ApiKey.id == principal.id).with_for_update())
    active = session.scalar(
        select(func.count())
        .select_from(Sweep)
        .where(Sweep.owner_id == principal.id, Sweep.status == RUNNING)
    )
    if (active or 0) >= limit:
        raise QuotaExceeded(
            f"this key has {active} running sweeps, the most allowed "
            f"(MAX_ACTIVE_SWEEPS_PER_KEY={limit}); wait for one to finish or cancel one"
        )


def create_sweep(
    session: Session,
    spec: Spec,
    *,
    principal: Principal,
    settings: Settings,
    send: Callable[[uuid.UUID], bool] | None = None,
) -> Sweep:
    """Accept a sweep (POST /sweeps): check its bounds, store it, ask its first trials.

    SweepTooLarge past SWEEP_MAX_TRIALS or SWEEP_MAX_PARALLEL, RequestInvalid or JobTooLarge
    for a trial that would be refused, Forbidden for a model name of another key,
    QuotaExceeded past MAX_ACTIVE_SWEEPS_PER_KEY. The first trials are asked at once; a
    broker or quota problem then only delays them (the workers' sweep loop asks again).
    """
    budget = trial_budget(spec)
    problems = []
    if budget > settings.SWEEP_MAX_TRIALS:
        what = "the plan's jobs" if isinstance(spec, AblationCreate) else "max_trials"
        problems.append(
            f"{what} ({budget}) must be at most {settings.SWEEP_MAX_TRIALS} (SWEEP_MAX_TRIALS)"
        )
    if spec.parallelism > settings.SWEEP_MAX_PARALLEL:
        problems.append(
            f"parallelism must be at most {settings.SWEEP_MAX_PARALLEL} (SWEEP_MAX_PARALLEL)"
        )
    if problems:
        raise SweepTooLarge("; ".join(problems))
    _check_trials(spec, settings)
    if isinstance(spec, AblationCreate):
        names = {entry.options["model_name"] for entry in planned_jobs(spec) or []}
    else:
        names = {spec.base.model_name or spec.base.net}
    for name in sorted(names):
        auth.claim_model_name(session, principal, name, settings.MAX_MODEL_NAMES_PER_KEY)
    _check_sweep_quota(session, principal, settings.MAX_ACTIVE_SWEEPS_PER_KEY)
    sweep = Sweep(
        id=uuid.uuid4(),
        kind=spec.kind,
        status=RUNNING,
        spec=spec.model_dump(mode="json"),
        max_trials=budget,
        parallelism=spec.parallelism,
        owner_id=principal.id,
        created_at=_now(),
    )
    session.add(sweep)
    session.commit()
    try:
        advance(session, settings, sweep.id, send=send)
    except Exception:  # the sweep is stored; the workers' loop asks its trials
        log.exception("sweep %s: asking its first trials failed; the sweep loop retries", sweep.id)
        session.rollback()
    return get_sweep(session, sweep.id)


# ----------------------------------------------------------------------------- read
def get_sweep(session: Session, sweep_id: uuid.UUID) -> Sweep:
    sweep = session.get(Sweep, sweep_id, populate_existing=True)
    if sweep is None:
        raise SweepNotFound(f"no sweep with id {sweep_id}")
    return sweep


def check_access(principal: Principal, sweep: Sweep, *, write: bool = False) -> None:
    """As for jobs: `read` sees every sweep, a key its own; only the owner or an admin
    cancels."""
    if principal.owns(sweep.owner_id) or (not write and principal.allows("read")):
        return
    raise Forbidden("this sweep belongs to another API key")


def list_sweeps(
    session: Session,
    *,
    owner_id: int | None = None,
    status: str | None = None,
    kind: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Sweep], int]:
    """One page of sweeps, newest first, and how many match in all."""
    filters: list[ColumnElement[bool]] = []
    if owner_id is not None:
        filters.append(Sweep.owner_id == owner_id)
    if status is not None:
        filters.append(Sweep.status == status)
    if kind is not None:
        filters.append(Sweep.kind == kind)
    total = session.scalar(select(func.count()).select_from(Sweep).where(*filters)) or 0
    rows = session.scalars(
        select(Sweep)
        .where(*filters)
        .order_by(Sweep.created_at.desc(), Sweep.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(rows), total


def trials_of(session: Session, sweep_id: uuid.UUID) -> list[SweepTrial]:
    return list(
        session.scalars(
            select(SweepTrial).where(SweepTrial.sweep_id == sweep_id).order_by(SweepTrial.number)
        )
    )


def epochs_of(session: Session, sweep_id: uuid.UUID) -> dict[int, list[EpochMetric]]:
    """Trial number -> its job's stored epochs, in order (one query for the whole sweep)."""
    rows = session.execute(
        select(SweepTrial.number, EpochMetric)
        .join(EpochMetric, EpochMetric.job_id == SweepTrial.job_id)
        .where(SweepTrial.sweep_id == sweep_id)
        .order_by(SweepTrial.number, EpochMetric.epoch)
    ).all()
    found: dict[int, list[EpochMetric]] = {}
    for number, epoch in rows:
        found.setdefault(number, []).append(epoch)
    return found


def records(session: Session, sweep: Sweep, spec: SearchCreate) -> list[TrialRecord]:
    """The sweep's trials as app.sweeps.study.TrialRecord (rows + the objective per epoch)."""
    from app.sweeps.study import TrialRecord

    metric = spec.objective.metric
    epochs = epochs_of(session, sweep.id)
    return [
        TrialRecord(
            number=trial.number,
            state=trial.state,
            params=dict(trial.params),
            distributions=dict(trial.distributions or {}),
            system_attrs=dict(trial.system_attrs or {}),
            value=trial.value,
            intermediate={
                row.epoch: float(getattr(row, metric))
                for row in epochs.get(trial.number, [])
                if getattr(row, metric) is not None
            },
        )
        for trial in trials_of(session, sweep.id)
    ]


class AblationJob(NamedTuple):
    """One job of an ablation: its role in the plan, the levers it has on, the job."""

    role: str
    levers: tuple[str, ...]
    job: Job


def ablation_jobs(session: Session, sweep_id: uuid.UUID) -> list[AblationJob]:
    """An ablation's jobs in plan order, for the report: (role, levers, job).

    Roles: "baseline", "target", "baseline+<lever>", "target-<lever>", "<baseline net>+all"
    and "<target net>+none" (docs/sweeps.md); levers are those of app.sweeps.ablation.LEVERS
    that the job has on ("architecture" = the target's net). Only trials with a job are
    listed (a plan job that was never asked, or whose job was deleted, is absent).
    SweepNotFound for no such sweep, RequestInvalid for a search.
    """
    sweep = get_sweep(session, sweep_id)
    if sweep.kind != "ablation":
        raise RequestInvalid(f"sweep {sweep_id} is a {sweep.kind}, not an ablation")
    levers = {entry["role"]: tuple(entry["levers"]) for entry in _plan_dicts(sweep)}
    rows = session.execute(
        select(SweepTrial.role, Job)
        .join(Job, Job.id == SweepTrial.job_id)
        .where(SweepTrial.sweep_id == sweep_id)
        .order_by(SweepTrial.number)
    ).all()
    return [AblationJob(role, levers.get(role, ()), job) for role, job in rows if role]


def _plan_dicts(sweep: Sweep) -> list[dict[str, Any]]:
    spec = load_spec(sweep)
    return [entry.to_dict() for entry in planned_jobs(spec) or []]


# ----------------------------------------------------------------------------- cancel
def cancel_sweep(session: Session, sweep_id: uuid.UUID, settings: Settings) -> Sweep:
    """running -> cancelled, then cancel its queued and running trials' jobs.

    SweepTerminal when the sweep already ended. A trial asked by an advancer that had read
    the sweep as running just before is cancelled by that advancer or by the next one.
    """
    sweep = get_sweep(session, sweep_id)
    changed = rowcount(
        session.execute(
            update(Sweep)
            .where(Sweep.id == sweep_id, Sweep.status == RUNNING)
            .values(status=CANCELLED, finished_at=_now())
            .execution_options(synchronize_session=False)
        )
    )
    session.commit()
    if not changed:
        sweep = get_sweep(session, sweep_id)
        raise SweepTerminal(f"the sweep is already {sweep.status} and can no longer change")
    _cancel_trial_jobs(session, sweep_id)
    advance(session, settings, sweep_id)
    return get_sweep(session, sweep.id)


def _cancel_trial_jobs(session: Session, sweep_id: uuid.UUID) -> list[uuid.UUID]:
    ids = session.scalars(
        select(Job.id)
        .join(SweepTrial, SweepTrial.job_id == Job.id)
        .where(
            SweepTrial.sweep_id == sweep_id,
            Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
            Job.cancel_requested.is_(False),
        )
    ).all()
    session.rollback()
    for job_id in ids:
        try:
            job_service.cancel_job(session, job_id)
        except InvalidTransition:
            pass  # it ended meanwhile
    return list(ids)


# ----------------------------------------------------------------------------- advance
@dataclass
class AdvanceReport:
    told: list[int] = field(default_factory=list)
    asked: list[int] = field(default_factory=list)
    finished: bool = False


@dataclass(frozen=True)
class _Outcome:
    state: str
    value: float | None = None
    value_epoch: int | None = None
    error: str | None = None


def objective_epoch(job: Job, epochs: list[EpochMetric]) -> int | None:
    """The epoch whose weights the job registered: its last, or with early stopping the
    restored (lowest val_loss) epoch."""
    if not epochs:
        return None
    if job.early_stopping_patience is not None:
        rows = [
            {
                "loss": e.loss,
                "accuracy": e.accuracy,
                "val_loss": e.val_loss,
                "val_accuracy": e.val_accuracy,
            }
            for e in epochs
        ]
        best = analyse(rows).best_epoch
        if best is not None:
            return best
    return epochs[-1].epoch


def _metric_at(epochs: list[EpochMetric], epoch: int | None, metric: str) -> float | None:
    for row in epochs:
        if row.epoch == epoch:
            value = getattr(row, metric)
            return None if value is None else float(value)
    return None


def _outcome(
    trial: SweepTrial, job: Job | None, epochs: list[EpochMetric], metric: str
) -> _Outcome:
    """How a trial whose job ended went (Optuna's terms)."""
    if job is None:
        return _Outcome("fail", error="the trial's job no longer exists")
    if job.status == JobStatus.SUCCEEDED:
        epoch = objective_epoch(job, epochs)
        value = _metric_at(epochs, epoch, metric)
        if value is None:
            return _Outcome("fail", error=f"the job recorded no {metric}")
        return _Outcome("complete", value, epoch)
    if job.status == JobStatus.CANCELLED and trial.pruned_epoch is not None:
        return _Outcome(
            "pruned", _metric_at(epochs, trial.pruned_epoch, metric), trial.pruned_epoch
        )
    if job.status == JobStatus.CANCELLED:
        return _Outcome("fail", error="the trial's job was cancelled")
    return _Outcome(
        "fail", error=public_message(f"the trial's job failed: {job.error or 'no reason given'}")
    )


def _tell_finished(session: Session, sweep: Sweep, spec: Spec) -> list[int]:
    """Tell every running trial whose job ended how it went; returns their numbers."""
    rows = session.execute(
        select(SweepTrial, Job)
        .outerjoin(Job, Job.id == SweepTrial.job_id)
        .where(
            SweepTrial.sweep_id == sweep.id,
            SweepTrial.state == "running",
            or_(Job.id.is_(None), Job.status.in_([s.value for s in JobStatus if is_terminal(s)])),
        )
        .order_by(SweepTrial.number)
    ).all()
    if not rows:
        session.rollback()
        return []
    metric = spec.objective.metric
    epochs = epochs_of(session, sweep.id)
    study_records = records(session, sweep, spec) if isinstance(spec, SearchCreate) else []
    session.rollback()
    told = []
    for trial, job in rows:
        outcome = _outcome(trial, job, epochs.get(trial.number, []), metric)
        state, value = outcome.state, outcome.value
        if isinstance(spec, SearchCreate):
            from app.sweeps import study

            state, value = study.tell(spec, study_records, trial.number, state=state, value=value)
            for record in study_records:  # the next tell sees this one's end
                if record.number == trial.number:
                    record.state, record.value = state, value
        error = outcome.error
        if outcome.state == "complete" and state == "fail":
            error = f"Optuna refused the value {outcome.value!r}"
        changed = rowcount(
            session.execute(
                update(SweepTrial)
                .where(SweepTrial.id == trial.id, SweepTrial.state == "running")
                .values(
                    state=state,
                    value=value,
                    value_epoch=outcome.value_epoch,
                    error=error,
                    finished_at=_now(),
                )
                .execution_options(synchronize_session=False)
            )
        )
        session.commit()
        if changed:
            told.append(trial.number)
    return told


def owner_principal(session: Session, sweep: Sweep) -> Principal | None:
    """The principal the sweep's trials are created as; None when its key was revoked."""
    if sweep.owner_id is None:
        return AUTH_OFF
    row = session.get(ApiKey, sweep.owner_id)
    if row is None or row.revoked_at is not None:
        return None
    return Principal(id=row.id, name=row.name, scopes=frozenset(row.scopes.split()))


def _stop(session: Session, sweep_id: uuid.UUID, status: str, error: str) -> None:
    session.execute(
        update(Sweep)
        .where(Sweep.id == sweep_id, Sweep.status == RUNNING)
        .values(status=status, error=public_message(error), finished_at=_now())
        .execution_options(synchronize_session=False)
    )
    session.commit()


def _next_trial(
    session: Session, sweep: Sweep, spec: Spec, number: int
) -> tuple[dict[str, Any], dict[str, Any], str | None, dict[str, Any], dict[str, Any]]:
    """(job options, trial params, role, distributions, system attributes) of trial `number`."""
    if isinstance(spec, AblationCreate):
        entry = (planned_jobs(spec) or [])[number]
        return entry.options, entry.options, entry.role, {}, {}
    from app.sweeps import study

    asked = study.ask(spec, records(session, sweep, spec))
    options = spec.base.model_dump() | asked.params
    return options, asked.params, None, asked.distributions, asked.system_attrs


def _ask(
    session: Session,
    settings: Settings,
    sweep: Sweep,
    spec: Spec,
    send: Callable[[uuid.UUID], bool],
) -> list[int]:
    """Ask trials while fewer than `parallelism` run and the budget lasts."""
    asked: list[int] = []
    principal = owner_principal(session, sweep)
    if principal is None:
        _stop(session, sweep.id, CANCELLED, "the sweep's API key was revoked")
        return asked
    for _ in range(sweep.parallelism):
        states = session.scalars(
            select(SweepTrial.state).where(SweepTrial.sweep_id == sweep.id)
        ).all()
        number = len(states)
        running = sum(state == "running" for state in states)
        session.rollback()
        if running >= sweep.parallelism or number >= sweep.max_trials:
            break
        key = idempotency_key(sweep.id, number)
        existing = session.scalar(select(Job).where(Job.idempotency_key == key))
        options, params, role, distributions, attrs = _next_trial(session, sweep, spec, number)
        job: Job | None = None
        created = False
        error = None
        if existing is not None:
            if existing.owner_id != sweep.owner_id:
                _stop(session, sweep.id, CANCELLED, f"another key used the trial key {key}")
                break
            job = existing  # an advancer died after creating it: adopt it
            params = {name: getattr(existing, name) for name in params}
        else:
            try:
                data = JobCreate.model_validate(options)
            except ValidationError as exc:
                error = public_message(f"the sampled options are not a valid job: {_problem(exc)}")
            else:
                try:
                    job, created = job_service.create_job(
                        session, data, key, principal=principal, settings=settings
                    )
                except QuotaExceeded:
                    session.rollback()
                    break  # the key's job quota is full: the next advance tries again
                except IdempotencyConflict:
                    session.rollback()
                    break  # another advancer asked this number with other parameters
                except Forbidden as exc:
                    session.rollback()
                    _stop(session, sweep.id, CANCELLED, exc.message)
                    break
        session.add(
            SweepTrial(
                sweep_id=sweep.id,
                number=number,
                job_id=job.id if job is not None else None,
                role=role,
                params=params,
                distributions=distributions,
                system_attrs=attrs,
                state="running" if job is not None else "fail",
                error=error,
                created_at=_now(),
                finished_at=None if job is not None else _now(),
            )
        )
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            break  # another advancer wrote this number first
        finally:
            if job is not None and (created or job.enqueued_at is None) and send(job.id):
                job_service.mark_enqueued(session, job.id)
        asked.append(number)
    return asked


def _give_up_if_failing(session: Session, sweep: Sweep) -> None:
    states = session.scalars(
        select(SweepTrial.state).where(SweepTrial.sweep_id == sweep.id).order_by(SweepTrial.number)
    ).all()
    first = list(states[:FAILURES_BEFORE_GIVING_UP])
    if len(first) == FAILURES_BEFORE_GIVING_UP and all(s == "fail" for s in first):
        error = session.scalar(
            select(SweepTrial.error)
            .where(SweepTrial.sweep_id == sweep.id, SweepTrial.state == "fail")
            .order_by(SweepTrial.number.desc())
            .limit(1)
        )
        _stop(
            session,
            sweep.id,
            FINISHED,
            f"the first {FAILURES_BEFORE_GIVING_UP} trials failed, so the sweep stopped; "
            f"the last one: {error}",
        )
    else:
        session.rollback()


def _finish_if_done(session: Session, sweep: Sweep) -> bool:
    states = session.scalars(select(SweepTrial.state).where(SweepTrial.sweep_id == sweep.id)).all()
    session.rollback()
    if len(states) < sweep.max_trials or any(state == "running" for state in states):
        return False
    changed = rowcount(
        session.execute(
            update(Sweep)
            .where(Sweep.id == sweep.id, Sweep.status == RUNNING)
            .values(status=FINISHED, finished_at=_now())
            .execution_options(synchronize_session=False)
        )
    )
    session.commit()
    return bool(changed)


def _send(settings: Settings) -> Callable[[uuid.UUID], bool]:
    return lambda job_id: queue.enqueue_training(settings, job_id)


def advance(
    session: Session,
    settings: Settings,
    sweep_id: uuid.UUID,
    *,
    send: Callable[[uuid.UUID], bool] | None = None,
) -> AdvanceReport:
    """Tell the trials whose jobs ended, ask new ones, finish the sweep when it is done.

    `send(job_id) -> bool` hands a new trial's job to the broker (default: the training
    queue); a job it could not send stays queued for the jobs' sweep to send.
    """
    report = AdvanceReport()
    sweep = get_sweep(session, sweep_id)
    spec = load_spec(sweep)
    report.told = _tell_finished(session, sweep, spec)
    sweep = get_sweep(session, sweep_id)
    if sweep.status == RUNNING and isinstance(spec, SearchCreate):
        _give_up_if_failing(session, sweep)
        sweep = get_sweep(session, sweep_id)
    if sweep.status == RUNNING:
        report.asked = _ask(session, settings, sweep, spec, send or _send(settings))
        report.finished = _finish_if_done(session, sweep)
    if get_sweep(session, sweep_id).status == CANCELLED:
        # Also catches a trial asked by an advancer that read the sweep just before a cancel.
        if _cancel_trial_jobs(session, sweep_id):
            report.told += _tell_finished(session, sweep, spec)
    return report


def active_sweep_ids(session: Session) -> list[uuid.UUID]:
    """Sweeps with work left: running, or cancelled with trials not yet told."""
    running_trial = (
        select(SweepTrial.id)
        .where(SweepTrial.sweep_id == Sweep.id, SweepTrial.state == "running")
        .exists()
    )
    ids = session.scalars(
        select(Sweep.id)
        .where(or_(Sweep.status == RUNNING, running_trial))
        .order_by(Sweep.created_at)
    ).all()
    session.rollback()
    return list(ids)


def advance_all(
    sessions: sessionmaker[Session], settings: Settings
) -> dict[uuid.UUID, AdvanceReport]:
    """advance() every sweep with work left, each in its own session; one sweep's error is
    logged and does not stop the others."""
    reports: dict[uuid.UUID, AdvanceReport] = {}
    with sessions() as session:
        ids = active_sweep_ids(session)
    for sweep_id in ids:
        try:
            with sessions() as session:
                reports[sweep_id] = advance(session, settings, sweep_id)
        except Exception:
            log.exception("advancing sweep %s failed; the next round tries again", sweep_id)
    return reports
