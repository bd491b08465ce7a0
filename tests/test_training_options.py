"""Each training option is declared once, on TrainConfig (app/ml/params.py).

The request schema, the public parameters, the CLI flags, the idempotency and comparison
field lists and the docs' table are derived from it; the jobs column and its migration are
written by hand, and checked here against the declaration (on the ORM and on a migrated
database). The last tests add a throwaway option and watch every derived place pick it up.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import runpy
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from app import cli, remote_cli
from app.jobs import service
from app.migrate import upgrade
from app.ml.options import Option, markdown_table, option, options_of
from app.ml.params import OPTIONS, TrainConfig
from app.models import Job
from app.reports import compare
from app.schemas import JobCreate, JobParameters, job_create_model, job_parameters_model

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_BOUNDS = {
    "ge": "minimum",
    "gt": "exclusiveMinimum",
    "le": "maximum",
    "lt": "exclusiveMaximum",
}
JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}
COLUMN_TYPES = {int: sa.Integer, float: sa.Float, bool: sa.Boolean, str: sa.String}


# ----------------------------------------------------------------------------- the columns
class Column(NamedTuple):
    type: sa.types.TypeEngine[Any]
    nullable: bool
    server_default: str | None  # as SQL text, unquoted


def _sql_text(default: Any) -> str | None:
    """A server default as plain text: "0", "constant", "false" (quotes and casts dropped)."""
    if default is None:
        return None
    if not isinstance(default, str):  # a SQL expression such as sa.false()
        default = str(default.compile(compile_kwargs={"literal_binds": True}))
    return default.split("::")[0].strip("'\"")


def orm_columns() -> dict[str, Column]:
    return {
        c.name: Column(
            c.type, bool(c.nullable), _sql_text(c.server_default and c.server_default.arg)
        )  # type: ignore[attr-defined]
        for c in Job.__table__.columns
    }


def database_columns(url: str) -> dict[str, Column]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = sa.inspect(conn).get_columns("jobs")
    finally:
        engine.dispose()
    return {r["name"]: Column(r["type"], r["nullable"], _sql_text(r["default"])) for r in rows}


def _same_default(o: Option, text: str) -> bool:
    if o.type is bool:
        return text.lower() in (("1", "true") if o.default else ("0", "false"))
    if o.type is str:
        return text == o.default
    return o.default is not None and float(text) == o.default


def column_problems(options: tuple[Option, ...], columns: dict[str, Column]) -> list[str]:
    """How the jobs columns disagree with the declared options (empty when they agree).

    Every option is a column of its JSON type (a string column long enough for every
    choice), nullable exactly when a job may leave it null, and with a server default, if it
    has one, equal to the declared default (the value rows from before the column get).
    """
    problems = []
    for o in options:
        column = columns.get(o.name)
        if column is None:
            problems.append(f"{o.name}: no jobs column")
            continue
        wanted = COLUMN_TYPES[o.type]
        if not isinstance(column.type, wanted):
            problems.append(f"{o.name}: column type {column.type}, expected {wanted.__name__}")
        elif o.choices and (column.type.length or 0) < max(map(len, o.choices)):  # type: ignore[attr-defined]
            problems.append(f"{o.name}: {column.type} is too short for {max(o.choices, key=len)}")
        if column.nullable != o.optional:
            problems.append(f"{o.name}: nullable is {column.nullable}, expected {o.optional}")
        if column.server_default is not None and not _same_default(o, column.server_default):
            problems.append(
                f"{o.name}: server default {column.server_default}, expected {o.default}"
            )
    return problems


def test_every_option_has_a_matching_column_in_the_orm():
    assert column_problems(OPTIONS, orm_columns()) == []


def test_every_option_has_a_matching_column_after_the_migrations_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'cnn.db'}"
    upgrade(url)
    assert column_problems(OPTIONS, database_columns(url)) == []


def test_every_option_has_a_matching_column_after_the_migrations_on_postgresql(db_url):
    assert column_problems(OPTIONS, database_columns(db_url)) == []


def test_the_check_sees_a_wrong_type_nullability_and_server_default():
    columns = orm_columns()
    columns["epochs"] = Column(sa.Float(), False, None)
    columns["clipnorm"] = Column(sa.Float(), False, None)
    columns["cutout"] = Column(sa.Integer(), False, "4")
    columns["augment_flip"] = Column(sa.Integer(), False, "0")
    columns["lr_schedule"] = Column(sa.String(8), False, "constant")
    assert column_problems(OPTIONS, columns) == [
        "epochs: column type FLOAT, expected Integer",
        "augment_flip: column type INTEGER, expected Boolean",
        "cutout: server default 4, expected 0",
        "clipnorm: nullable is False, expected True",
        "lr_schedule: VARCHAR(8) is too short for triangular",
    ]


# ----------------------------------------------------------------------------- derived places
def _property(schema: dict[str, Any], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the field, its non-null branch) of a JSON schema property."""
    field = schema["properties"][name]
    return field, next(s for s in field.get("anyOf", [field]) if s.get("type") != "null")


def test_the_request_schema_states_every_option():
    schema = JobCreate.model_json_schema()
    assert list(schema["properties"]) == ["net", *(o.name for o in OPTIONS), "model_name"]
    for o in OPTIONS:
        field, value = _property(schema, o.name)
        assert field["default"] == o.request_default, o.name
        assert field["description"].startswith(o.help), o.name
        assert value["type"] == JSON_TYPES[o.type], o.name
        assert value.get("enum") == (list(o.choices) or None), o.name
        assert ("anyOf" in field) == o.optional, o.name
        for bound, key in SCHEMA_BOUNDS.items():
            assert value.get(key) == getattr(o, bound), (o.name, bound)


def _above(o: Option) -> Any:
    return o.le + 1 if o.le is not None else o.lt


@pytest.mark.parametrize("o", [o for o in OPTIONS if o.type in (int, float)], ids=lambda o: o.name)
def test_a_number_above_its_bound_is_refused_alike_by_the_api_and_by_train_config(o):
    expected = re.escape(f"expected {o.allowed()}")
    with pytest.raises(ValidationError, match=expected):
        JobCreate.model_validate({"net": "net1", o.name: _above(o)})
    with pytest.raises(ValueError, match=f"{o.name} must be .*Received: {o.name}="):
        TrainConfig(net="net1", **{o.name: _above(o)})
    # JSON types are strict: true is not 1 and "3" is not 3 (schemathesis ST201).
    for wrong_type in (True, "3"):
        with pytest.raises(ValidationError, match=expected):
            JobCreate.model_validate({"net": "net1", o.name: wrong_type})


def test_the_public_parameters_are_every_option_and_the_model_name():
    assert list(JobParameters.model_fields) == [*(o.name for o in OPTIONS), "model_name"]


def test_the_idempotency_check_compares_every_identity_option():
    identity = [o.name for o in OPTIONS if o.identity]
    assert service.PARAMETER_FIELDS == ("net", *identity, "model_name")
    # Today every option is part of a job's identity: every TrainConfig field is compared.
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(service.PARAMETER_FIELDS)


def test_the_comparison_lists_every_option_but_precision():
    assert compare.TRAINING_FIELDS == tuple(o.name for o in OPTIONS if o.name != "precision")


def _train_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices["train"]._actions}


def test_cnn_train_has_a_flag_per_option_with_its_default():
    flags = _train_flags(cli.build_parser())
    for o in OPTIONS:
        action = flags[o.name]
        assert action.option_strings[0] == o.flag
        assert action.default == o.request_default
        assert list(action.choices or ()) == list(o.choices)


@pytest.mark.parametrize("command", [["train", "--help"], ["jobs", "submit", "--help"]])
def test_the_help_of_the_commands_with_option_flags_prints(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(command)
    assert exit_.value.code == 0
    assert "--warmup-epochs" in capsys.readouterr().out  # its help has a literal "30%"


def test_the_docs_table_is_the_generated_one():
    script = runpy.run_path(str(ROOT / "scripts" / "training_options.py"))
    text = script["DOC"].read_text()
    assert script["render"](text) == text, "run: python scripts/training_options.py"
    assert markdown_table(OPTIONS) in text


# ----------------------------------------------------------------------------- a new option
@pytest.fixture
def with_dummy() -> type[TrainConfig]:
    """TrainConfig plus a throwaway option, declared the way docs/architecture.md says."""
    return dataclasses.make_dataclass(
        "WithDummy",
        [("dummy_level", int, option(3, "A throwaway option for this test.", ge=1, le=5))],
        bases=(TrainConfig,),
        frozen=True,
    )


def test_a_new_option_reaches_the_request_schema_and_the_public_parameters(with_dummy):
    request = job_create_model(with_dummy)
    field, _ = _property(request.model_json_schema(), "dummy_level")
    assert field["default"] == 3 and field["minimum"] == 1 and field["maximum"] == 5
    assert field["description"] == "A throwaway option for this test."
    assert (
        request.model_validate({"net": "net1", "dummy_level": 4}).parameters()["dummy_level"] == 4
    )
    assert request.model_validate({"net": "net1"}).parameters()["dummy_level"] == 3
    for bad in (6, True, "4"):
        with pytest.raises(ValidationError, match="dummy_level"):
            request.model_validate({"net": "net1", "dummy_level": bad})
    # The rules between options still apply to the derived schema.
    with pytest.raises(ValidationError, match="adamw"):
        request.model_validate({"net": "net1", "weight_decay": 0.1})
    assert "dummy_level" in job_parameters_model(with_dummy).model_fields


def test_a_new_option_reaches_the_cli_and_train_config(with_dummy):
    parser = argparse.ArgumentParser()
    cli.add_train_options(parser, options_of(with_dummy))
    assert parser.parse_args([]).dummy_level == 3
    # As `cnn train` builds its config: the net and the resolved precision come from elsewhere.
    given = {"net": "net1", "precision": "float32"}
    args = parser.parse_args(["--dummy-level", "4"])
    assert with_dummy.from_attributes(args, **given).dummy_level == 4
    with pytest.raises(ValueError, match="dummy_level must be an integer from 1 to 5"):
        with_dummy.from_attributes(parser.parse_args(["--dummy-level", "9"]), **given)


def test_a_new_option_reaches_cnn_jobs_submit(with_dummy, monkeypatch):
    monkeypatch.setattr("app.schemas.JobCreate", job_create_model(with_dummy))
    args = cli.build_parser().parse_args(["jobs", "submit", "net1", "--dummy-level", "4"])
    assert remote_cli._job_params(args) == {"net": "net1", "dummy_level": 4}


def test_a_new_option_reaches_the_field_lists_and_the_docs_table(with_dummy):
    options = options_of(with_dummy)
    assert service.job_identity(options)[-2:] == ("dummy_level", "model_name")
    assert compare.training_fields(options)[-1] == "dummy_level"
    row = "| `dummy_level` | 3 | an integer from 1 to 5 | yes | A throwaway option for this test. |"
    assert row in markdown_table(options)


def test_a_new_option_needs_its_jobs_column(with_dummy):
    options = options_of(with_dummy)
    assert column_problems(options, orm_columns()) == ["dummy_level: no jobs column"]
    # The column of docs/architecture.md's example (and its migration) is all it lacks.
    added = orm_columns() | {"dummy_level": Column(sa.Integer(), False, "3")}
    assert column_problems(options, added) == []


@pytest.mark.parametrize(
    ("declaration", "words"),
    [
        (option(1, "no upper bound", ge=0), "one lower"),
        (option(1, "two lower bounds", ge=0, gt=0, le=2), "one lower"),
        (option(5, "default out of range", ge=0, le=2), "its default is not allowed"),
        (option(1, "a misspelt role", ge=0, le=2, levr=True), "unexpected keyword"),
    ],
)
def test_an_incomplete_declaration_is_refused(declaration, words):
    config = dataclasses.make_dataclass(
        "Broken", [("broken", int, declaration)], bases=(TrainConfig,), frozen=True
    )
    with pytest.raises(TypeError, match=words):
        options_of(config)


def test_a_string_option_needs_its_choices():
    config = dataclasses.make_dataclass(
        "Broken", [("broken", str, option("x", "free text"))], bases=(TrainConfig,), frozen=True
    )
    with pytest.raises(TypeError, match="choices"):
        options_of(config)
