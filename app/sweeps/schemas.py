"""POST /sweeps' body (a search or an ablation) and the sweep's public answers.

The base job of a search, and the baseline and target of an ablation, are JobCreate: a
trial's options are validated exactly like a POST /jobs body. A search parameter must be
a training option (app/ml/params.py) and its values or bounds must lie inside that
option's own bounds, so every trial asks for a job POST /jobs would accept. The bounds
that depend on the deployment (trials per sweep, parallel trials, sweeps per key) are
settings, checked by app.sweeps.service.
"""

from __future__ import annotations

import math
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from app.ml.options import Option
from app.ml.params import INT32_MAX, MAX_EPOCHS, OPTIONS
from app.schemas import JobCreate, UtcDatetime
from app.sweeps.ablation import BASELINE, TARGET

# Every input has an upper bound; these are the schema's own (the settings may lower some).
MAX_SPACE_PARAMS = 12
MAX_CHOICES = 32
MAX_TRIALS = 10_000
MAX_PARALLELISM = 64
# A grid larger than this is not a grid anyone runs: use random or tpe.
MAX_GRID_POINTS = 10_000
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.:+-]{0,127}$"

SEARCHABLE: dict[str, Option] = {o.name: o for o in OPTIONS}
Metric = Literal["val_accuracy", "val_loss"]
Direction = Literal["maximize", "minimize"]
DIRECTION_OF: dict[str, str] = {"val_accuracy": "maximize", "val_loss": "minimize"}
SweepKind = Literal["search", "ablation"]
SweepStatus = Literal["running", "finished", "cancelled"]
TrialState = Literal["running", "complete", "pruned", "fail"]

FiniteFloat = Annotated[float, Field(allow_inf_nan=False, ge=-1e12, le=1e12)]
BoundedInt = Annotated[int, Field(ge=-INT32_MAX, le=INT32_MAX)]
ChoiceValue = bool | BoundedInt | FiniteFloat | Annotated[str, Field(max_length=64)]


def _invalid(reason: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_sweep", "{reason}", {"reason": reason})


# ----------------------------------------------------------------------------- search space
class ChoiceParam(BaseModel):
    """One of a list of values (any option; the only kind for booleans and strings)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["choice"]
    choices: list[ChoiceValue] = Field(min_length=1, max_length=MAX_CHOICES)


class IntParam(BaseModel):
    """An integer from `low` to `high` (both included), every `step`; `log` samples evenly
    in log space (needs low >= 1 and step 1)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["int"]
    low: BoundedInt
    high: BoundedInt
    step: Annotated[int, Field(ge=1, le=INT32_MAX)] = 1
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> IntParam:
        if self.low > self.high:
            raise _invalid(f"low ({self.low}) must not be above high ({self.high})")
        if self.log and (self.low < 1 or self.step != 1):
            raise _invalid("a log range needs low >= 1 and step 1")
        return self


class FloatParam(BaseModel):
    """A number from `low` to `high`; `log` samples evenly in log space (needs low > 0);
    `step` makes it discrete (and griddable). log and step exclude each other."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["float"]
    low: FiniteFloat
    high: FiniteFloat
    step: Annotated[float | None, Field(gt=0, le=1e12, allow_inf_nan=False)] = None
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> FloatParam:
        if self.low > self.high:
            raise _invalid(f"low ({self.low:g}) must not be above high ({self.high:g})")
        if self.log and self.low <= 0:
            raise _invalid("a log range needs low > 0")
        if self.log and self.step is not None:
            raise _invalid("a float range is either log or stepped, not both")
        return self


Param = Annotated[ChoiceParam | IntParam | FloatParam, Field(discriminator="type")]


def check_param(name: str, param: ChoiceParam | IntParam | FloatParam) -> None:
    """ValueError unless `name` is a training option and every value the parameter can take
    is allowed by that option's own declaration."""
    option = SEARCHABLE.get(name)
    if option is None:
        raise ValueError(
            f"space: {name!r} is not a training option; expected one of: " + ", ".join(SEARCHABLE)
        )
    if isinstance(param, ChoiceParam):
        values = param.choices
        for value in values:
            if option.type in (int, float) and isinstance(value, bool):
                raise ValueError(f"space.{name}: {option.name} takes {option.allowed()}")
            if option.type is int and not isinstance(value, int):
                raise ValueError(f"space.{name}: {option.name} takes {option.allowed()}")
            if option.type is float and not isinstance(value, (int, float)):
                raise ValueError(f"space.{name}: {option.name} takes {option.allowed()}")
            if option.type in (bool, str) and not isinstance(value, option.type):
                raise ValueError(f"space.{name}: {option.name} takes {option.allowed()}")
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"space.{name}: the choices repeat a value")
    else:
        wanted = IntParam if option.type is int else FloatParam
        if not isinstance(param, wanted):
            kinds = "int or choice" if option.type is int else "float or choice"
            if option.type not in (int, float):
                kinds = "choice"
            raise ValueError(f"space.{name}: {option.name} takes a {kinds} parameter")
        values = [param.low, param.high]
    for value in values:
        problem = option.problem(value)
        if problem:
            raise ValueError(f"space.{name}: {problem}")


def grid_values(param: ChoiceParam | IntParam | FloatParam) -> list[Any] | None:
    """The values a grid walks for `param`, or None when it has no finite grid."""
    if isinstance(param, ChoiceParam):
        return list(param.choices)
    if isinstance(param, IntParam):
        if (param.high - param.low) // param.step >= MAX_GRID_POINTS:
            return None
        return list(range(param.low, param.high + 1, param.step))
    if param.step is None or (param.high - param.low) / param.step >= MAX_GRID_POINTS:
        return None
    count = math.floor((param.high - param.low) / param.step + 1e-9) + 1
    return [round(param.low + i * param.step, 12) for i in range(count)]


# ----------------------------------------------------------------------------- objective
class Objective(BaseModel):
    """What a trial is judged by: a validation metric, never a test one. The value of a
    trial is the metric at the epoch whose weights it registered: its last epoch, or the
    restored (best) epoch with early stopping."""

    model_config = ConfigDict(extra="forbid", strict=True)
    metric: Metric = "val_accuracy"
    direction: Direction | None = Field(
        default=None, description="Defaults to maximize for val_accuracy, minimize for val_loss."
    )

    @model_validator(mode="after")
    def _direction(self) -> Objective:
        natural = DIRECTION_OF[self.metric]
        if self.direction is None:
            self.direction = natural  # type: ignore[assignment]
        elif self.direction != natural:
            raise _invalid(f"{self.metric} is to {natural}, not to {self.direction}")
        return self


class Pruner(BaseModel):
    """`none`, or `asha`: asynchronous successive halving (Optuna's SuccessiveHalvingPruner)
    over the per-epoch objective metric. A trial is checked at epochs min_resource x
    reduction_factor^(min_early_stopping_rate + rung) and stopped unless it is in the best
    1/reduction_factor of the trials that reached that epoch."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["none", "asha"] = "none"
    min_resource: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = 1
    reduction_factor: Annotated[int, Field(ge=2, le=10)] = 3
    min_early_stopping_rate: Annotated[int, Field(ge=0, le=10)] = 0


# ----------------------------------------------------------------------------- requests
def _every_field_optional(model: type[BaseModel], title: str) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema.pop("required", None)
    schema.pop("examples", None)
    return {**schema, "title": title}


# An ablation side: any POST /jobs options, each optional (the side's defaults fill the
# rest), validated as JobCreate once merged.
JobOptions = Annotated[JobCreate, WithJsonSchema(_every_field_optional(JobCreate, "JobOptions"))]


class SearchCreate(BaseModel):
    """A hyperparameter search: trials sampled from `space` over the `base` job."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,  # "1" or true is not an integer: as the schema says (schemathesis)
        json_schema_extra={
            "examples": [
                {
                    "kind": "search",
                    "base": {"net": "net1", "epochs": 4, "train_limit": 2000},
                    "space": {
                        "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                        "batch_size": {"type": "choice", "choices": [32, 64, 128]},
                    },
                    "sampler": "tpe",
                    "max_trials": 12,
                    "parallelism": 2,
                    "objective": {"metric": "val_accuracy", "direction": "maximize"},
                    "pruner": {"type": "asha"},
                    "seed": 0,
                }
            ]
        },
    )

    kind: Literal["search"] = "search"
    name: str | None = Field(default=None, pattern=NAME_PATTERN, description="A label.")
    base: JobCreate = Field(description="The job every trial starts from (POST /jobs' body).")
    space: dict[Annotated[str, Field(max_length=64)], Param] = Field(
        min_length=1,
        max_length=MAX_SPACE_PARAMS,
        description="Training option -> its choices or range; a trial's value replaces the base's.",
    )
    sampler: Literal["grid", "random", "tpe"] = "tpe"
    max_trials: Annotated[int, Field(ge=1, le=MAX_TRIALS)] = 20
    parallelism: Annotated[int, Field(ge=1, le=MAX_PARALLELISM)] = 2
    objective: Objective = Field(default_factory=Objective)
    pruner: Pruner = Field(default_factory=Pruner)
    seed: Annotated[int, Field(ge=0, le=INT32_MAX)] = 0

    @model_validator(mode="after")
    def _space_fits_the_options(self) -> SearchCreate:
        try:
            for name, param in self.space.items():
                check_param(name, param)
        except ValueError as exc:
            raise _invalid(str(exc)) from None
        if self.objective.metric == "val_loss" and "label_smoothing" in self.space:
            raise _invalid(
                "val_loss is the smoothed loss under label smoothing, so it does not compare "
                "across label_smoothing values; search label_smoothing with val_accuracy"
            )
        if self.sampler == "grid":
            sizes = [grid_values(p) for p in self.space.values()]
            if any(v is None for v in sizes):
                raise _invalid(
                    "the grid sampler needs choices, int ranges or stepped float ranges of at "
                    f"most {MAX_GRID_POINTS} points"
                )
        if self.base.validation_split == 0 and "validation_split" not in self.space:
            raise _invalid(
                "the objective is a validation metric: base.validation_split must be > 0"
            )
        return self


class AblationCreate(BaseModel):
    """An ablation: a fixed plan of jobs between a baseline and a target recipe, all with
    the same seed and epoch budget (docs/sweeps.md has the plan)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"kind": "ablation", "epochs": 8}]},
    )

    kind: Literal["ablation"]
    name: str | None = Field(default=None, pattern=NAME_PATTERN, description="A label.")
    epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = Field(
        default=20, description="The epoch budget of every job of the plan."
    )
    seed: Annotated[int, Field(ge=0, le=INT32_MAX)] = 0
    train_limit: Annotated[int | None, Field(ge=10, le=INT32_MAX)] = None
    baseline: JobOptions = Field(
        default_factory=lambda: JobCreate.model_validate(BASELINE),
        description="Options over NET III with the course's settings (net3, Adam 0.001, "
        "batch 128, 20% validation, constant rate, no levers).",
    )
    target: JobOptions = Field(
        default_factory=lambda: JobCreate.model_validate(TARGET),
        description="Options over NET IV's recipe (net4, AdamW 0.003 with weight decay 0.05, "
        "batch 256, 10% validation, one-cycle, crop 4 + flip, label smoothing 0.2).",
    )
    parallelism: Annotated[int, Field(ge=1, le=MAX_PARALLELISM)] = 1
    objective: Objective = Field(default_factory=Objective)

    @model_validator(mode="before")
    @classmethod
    def _over_the_defaults(cls, data: Any) -> Any:
        """baseline and target are options over their defaults; the budget is shared."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        shared = {
            "epochs": data.get("epochs", 20),
            "seed": data.get("seed", 0),
            "train_limit": data.get("train_limit"),
        }
        for side, defaults in (("baseline", BASELINE), ("target", TARGET)):
            given = data.get(side, {})
            if isinstance(given, JobCreate):
                given = given.model_dump(exclude_unset=True)
            if not isinstance(given, dict):
                continue  # pydantic says what is wrong with it
            # A stored spec repeats the shared values inside each side: only a different
            # value is a second budget.
            repeated = sorted(k for k in set(given) & set(shared) if given[k] != shared[k])
            if repeated:
                raise _invalid(
                    f"{side}: {', '.join(repeated)} is the same for every job of an ablation: "
                    "set it at the top level"
                )
            data[side] = {**defaults, **given, **shared}
        return data

    @model_validator(mode="after")
    def _plan_is_valid(self) -> AblationCreate:
        from app.sweeps.ablation import plan

        try:
            plan(self.baseline, self.target)
        except ValueError as exc:
            raise _invalid(str(exc)) from None
        return self


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("kind", "search"))
    return str(getattr(value, "kind", "search"))


SweepCreate = Annotated[
    Annotated[SearchCreate, Tag("search")] | Annotated[AblationCreate, Tag("ablation")],
    Discriminator(_kind),
]


# ----------------------------------------------------------------------------- answers
class EpochPoint(BaseModel):
    epoch: int
    val_loss: float | None
    val_accuracy: float | None


class TrialPublic(BaseModel):
    """One trial: what it asked for, its job, and how it ended."""

    number: int = Field(description="0-based, as Optuna counts trials.")
    role: str | None = Field(description="The trial's role in an ablation's plan.")
    levers: list[str] | None = Field(description="Ablation: the levers this job has on.")
    state: TrialState
    params: dict[str, Any] = Field(
        description="Search: the sampled options. Ablation: every option of the job."
    )
    value: float | None = Field(description="The objective (a validation metric).")
    value_epoch: int | None = Field(description="The epoch the value was read at.")
    pruned_epoch: int | None = Field(description="The epoch after which the pruner stopped it.")
    error: str | None
    job_id: uuid.UUID | None
    job_status: str | None
    test_accuracy: float | None = Field(
        description="Shown beside the objective; never used to choose a trial."
    )
    curve: list[EpochPoint] = Field(description="The per-epoch validation curve.")
    created_at: UtcDatetime
    finished_at: UtcDatetime | None


class PlanEntry(BaseModel):
    role: str
    levers: list[str]
    options: dict[str, Any]


class SweepCounts(BaseModel):
    running: int = 0
    complete: int = 0
    pruned: int = 0
    fail: int = 0


class SweepPublic(BaseModel):
    id: uuid.UUID
    name: str | None
    kind: SweepKind
    status: SweepStatus
    spec: dict[str, Any] = Field(description="The request as validated (defaults filled in).")
    objective: Objective
    max_trials: int = Field(description="Trials this sweep asks at most (the plan's length).")
    parallelism: int
    counts: SweepCounts
    trials: list[TrialPublic]
    best_trial: TrialPublic | None = Field(
        description="The complete trial with the best objective (validation)."
    )
    importances: dict[str, float] = Field(
        description="Search: each parameter's importance (Optuna's PED-ANOVA, summing to 1)."
    )
    importances_note: str | None = Field(description="Why importances is empty, when it is.")
    plan: list[PlanEntry] | None = Field(description="Ablation: the jobs of the plan, in order.")
    error: str | None
    created_at: UtcDatetime
    finished_at: UtcDatetime | None


class SweepSummary(BaseModel):
    id: uuid.UUID
    name: str | None
    kind: SweepKind
    status: SweepStatus
    objective: Objective
    max_trials: int
    parallelism: int
    counts: SweepCounts
    best_value: float | None
    best_trial: int | None
    created_at: UtcDatetime
    finished_at: UtcDatetime | None


class SweepList(BaseModel):
    sweeps: list[SweepSummary]
    total: int
    limit: int
    offset: int
