"""Search spaces and their bounds (app/sweeps/schemas.py) and Optuna as a library
(app/sweeps/study.py): ask, tell, should-prune and importances on a rebuilt study."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from app.sweeps import study
from app.sweeps.schemas import SearchCreate, SweepCreate
from app.sweeps.study import TrialRecord

SPEC = TypeAdapter(SweepCreate)


def search(**fields: Any) -> SearchCreate:
    body = {"base": {"net": "net1", "epochs": 4, "train_limit": 500}, **fields}
    body.setdefault(
        "space", {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}
    )
    spec = SPEC.validate_python(body)
    assert isinstance(spec, SearchCreate)
    return spec


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"net": {"type": "choice", "choices": ["net1"]}}, "'net' is not a training option"),
        ({"dropout": {"type": "float", "low": 0, "high": 1}}, "'dropout' is not a training option"),
        ({"learning_rate": {"type": "float", "low": 0.0, "high": 0.1}}, "learning_rate must be a number greater than 0"),
        ({"learning_rate": {"type": "float", "low": 0.01, "high": 20}}, "learning_rate must be"),
        ({"batch_size": {"type": "choice", "choices": [64, 100000]}}, "batch_size must be an integer from 1 to 8192"),
        ({"batch_size": {"type": "choice", "choices": [64.5]}}, "batch_size takes an integer"),
        ({"batch_size": {"type": "float", "low": 16, "high": 64}}, "batch_size takes a int or choice"),
        ({"optimizer": {"type": "choice", "choices": ["adam", "lion"]}}, "optimizer must be one of"),
        ({"augment_flip": {"type": "int", "low": 0, "high": 1}}, "takes a choice parameter"),
        ({"learning_rate": {"type": "float", "low": 0.1, "high": 0.01}}, "must not be above high"),
        ({"learning_rate": {"type": "float", "low": 0.001, "high": 0.01, "log": True, "step": 0.001}}, "either log or stepped"),
        ({"batch_size": {"type": "choice", "choices": [64, 64]}}, "repeat a value"),
    ],
)  # fmt: skip
def test_a_parameter_must_be_a_training_option_within_its_own_bounds(space, message):
    with pytest.raises(ValidationError, match=message):
        search(space=space)


def test_the_request_is_bounded_and_refuses_unknown_fields():
    many = {f"p{i}": {"type": "choice", "choices": [1]} for i in range(13)}
    with pytest.raises(ValidationError, match="at most 12"):
        search(space=many)
    with pytest.raises(ValidationError, match="less than or equal to 10000"):
        search(max_trials=10_001)
    with pytest.raises(ValidationError, match="Extra inputs"):
        search(budget=3)
    with pytest.raises(ValidationError, match="at most 32"):
        search(space={"seed": {"type": "choice", "choices": list(range(33))}})
    # The base job is validated exactly like POST /jobs.
    with pytest.raises(ValidationError, match="weight_decay needs optimizer='adamw'"):
        search(base={"net": "net1", "weight_decay": 0.1})


def test_the_objective_is_a_validation_metric_with_its_natural_direction():
    assert search().objective.direction == "maximize"
    assert search(objective={"metric": "val_loss"}).objective.direction == "minimize"
    with pytest.raises(ValidationError, match="val_loss is to minimize"):
        search(objective={"metric": "val_loss", "direction": "maximize"})
    with pytest.raises(ValidationError):
        search(objective={"metric": "test_accuracy"})
    with pytest.raises(ValidationError, match="does not compare across label_smoothing"):
        search(
            objective={"metric": "val_loss"},
            space={"label_smoothing": {"type": "float", "low": 0, "high": 0.2}},
        )
    with pytest.raises(ValidationError, match="validation_split must be > 0"):
        search(base={"net": "net1", "validation_split": 0})


def test_grid_needs_a_finite_grid():
    with pytest.raises(ValidationError, match="grid sampler needs"):
        search(sampler="grid")
    spec = search(
        sampler="grid",
        space={
            "batch_size": {"type": "int", "low": 32, "high": 128, "step": 32},
            "learning_rate": {"type": "float", "low": 0.001, "high": 0.003, "step": 0.001},
        },
    )
    assert study.grid_size(spec) == 4 * 3


def record(
    number: int,
    asked: study.Asked,
    state: str = "running",
    value: float | None = None,
    **epochs: float,
) -> TrialRecord:
    return TrialRecord(number, state, asked.params, asked.distributions, asked.system_attrs, value,
                       {int(k.removeprefix("e")): v for k, v in epochs.items()})  # fmt: skip


def test_ask_is_seeded_per_trial_and_stays_in_the_space():
    spec = search(sampler="random", seed=3)
    first = study.ask(spec, [])
    assert study.ask(spec, []) == first  # two advancers asking trial 0 ask the same job
    second = study.ask(spec, [record(0, first)])
    assert second.params != first.params
    assert 1e-4 <= second.params["learning_rate"] <= 1e-1
    assert study.ask(search(sampler="random", seed=4), []).params != first.params


def test_grid_visits_every_point_once_even_when_rebuilt_each_time():
    spec = search(sampler="grid", space={"batch_size": {"type": "choice", "choices": [16, 32, 64]},
                                          "augment_flip": {"type": "choice", "choices": [True, False]}})  # fmt: skip
    records: list[TrialRecord] = []
    for number in range(6):
        asked = study.ask(spec, records)
        records.append(record(number, asked))
    points = {(r.params["batch_size"], r.params["augment_flip"]) for r in records}
    assert len(points) == 6


def test_tpe_samples_with_running_trials_in_the_study():
    spec = search(sampler="tpe", seed=1)
    records: list[TrialRecord] = []
    for number in range(12):
        asked = study.ask(spec, records)
        records.append(record(number, asked, "complete", value=0.1 * (number % 4), e1=0.1))
    asked = study.ask(spec, [*records, record(12, study.ask(spec, records))])
    assert 1e-4 <= asked.params["learning_rate"] <= 1e-1


def test_tell_records_optunas_verdict():
    spec = search()
    asked = study.ask(spec, [])
    running = [record(0, asked, e1=0.3, e2=0.4)]
    assert study.tell(spec, running, 0, state="complete", value=0.4) == ("complete", 0.4)
    assert study.tell(spec, running, 0, state="pruned") == ("pruned", 0.4)  # the last value
    assert study.tell(spec, running, 0, state="fail") == ("fail", None)
    with pytest.warns(UserWarning, match="nan is not acceptable"):
        assert study.tell(spec, running, 0, state="complete", value=float("nan"))[0] == "fail"


def test_asha_prunes_a_trial_worse_than_an_earlier_one_at_the_same_rung():
    spec = search(pruner={"type": "asha", "min_resource": 1, "reduction_factor": 3})
    a = study.ask(spec, [])
    records = [record(0, a, e1=0.5)]
    prune, attrs = study.should_prune(spec, records, 0)
    assert not prune and attrs["completed_rung_0"] == 0.5
    records[0].system_attrs = attrs
    b = study.ask(spec, records)
    records.append(record(1, b, e1=0.3))
    prune, attrs = study.should_prune(spec, records, 1)
    assert prune and attrs["completed_rung_0"] == 0.3
    records[1].system_attrs = attrs
    # Better than both: promoted; at epoch 2 it is between rungs (the next is epoch 3).
    records.append(record(2, study.ask(spec, records), e1=0.6))
    prune, attrs = study.should_prune(spec, records, 2)
    assert not prune
    records[2].system_attrs, records[2].intermediate = attrs, {1: 0.6, 2: 0.1}
    assert study.should_prune(spec, records, 2)[0] is False


def test_importances_need_two_complete_trials():
    spec = search(space={"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                         "batch_size": {"type": "choice", "choices": [16, 32, 64]}})  # fmt: skip
    records: list[TrialRecord] = []
    found, note = study.importances(spec, records)
    assert found == {} and "at least 2 complete trials (0 so far)" in (note or "")
    for number in range(10):
        asked = study.ask(spec, records)
        value = 1.0 - abs(asked.params["learning_rate"] - 0.01) * 10  # only the rate matters
        records.append(record(number, asked, "complete", value=value))
    found, note = study.importances(spec, records)
    assert note is None and set(found) == {"learning_rate", "batch_size"}
    assert found["learning_rate"] >= found["batch_size"]
