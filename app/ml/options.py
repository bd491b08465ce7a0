"""How a training option is declared: `option(...)` on a TrainConfig field, read by `options_of`.

The declaration (app/ml/params.py) states each option's default, bound, help text and role
once; the API schema, the CLI flags, the idempotency and comparison field lists and the
docs' table are derived from what `options_of` returns. Plain Python, cheap to import.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

_METADATA_KEY = "option"
Number = int | float


@dataclass(frozen=True)
class Option:
    """One option: its field's name, type and default, and what `option(...)` declared."""

    name: str
    type: type  # int, float, bool or str: the JSON type, the CLI parser, the column type
    nullable: bool  # the field's annotation allows None
    default: Any
    help: str
    ge: Number | None = None
    gt: Number | None = None
    le: Number | None = None
    lt: Number | None = None
    choices: tuple[str, ...] = ()
    unit: str = ""  # said after the range: "an integer from 0 to 32 (pixels)"
    rule: str = ""  # a cross-field rule, said after the range: "..., below epochs"
    identity: bool = True  # a different value is a different job (the Idempotency-Key check)
    lever: bool = False  # one of issue 11's levers (TrainConfig.levers, the CLI's lever group)
    compared: bool = True  # a column of the comparison's `training` fields
    null_means: str = ""  # a job may leave it null; then this decides (precision: the setting)

    @property
    def optional(self) -> bool:
        """A request, a job row and the CLI may leave it null."""
        return self.nullable or bool(self.null_means)

    @property
    def request_default(self) -> Any:
        """The default of a job (and of a CLI flag): null where a setting decides later."""
        return None if self.null_means else self.default

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def allowed(self) -> str:
        """The allowed values in words, e.g. "an integer from 1 to 1000" (API and CLI errors)."""
        if self.type is bool:
            text = "a boolean"
        elif self.choices:
            text = "one of " + ", ".join(self.choices)
        else:
            text = "an integer" if self.type is int else "a number"
            if self.gt is not None and self.lt is not None:
                text += f" greater than {_number(self.gt)} and below {_number(self.lt)}"
            elif self.gt is not None:
                text += f" greater than {_number(self.gt)} and at most {_number(self.le)}"
            elif self.lt is not None:
                text += f" from {_number(self.ge)} (inclusive) to {_number(self.lt)} (exclusive)"
            else:
                text += f" from {_number(self.ge)} to {_number(self.le)}"
        if self.unit:
            text += f" ({self.unit})"
        if self.rule:
            text += f", {self.rule}"
        return ("null or " if self.optional else "") + text

    def problem(self, value: Any) -> str | None:
        """Why `value` is refused (TrainConfig's message), or None when it is allowed."""
        if value is None:
            ok = self.nullable
        elif self.choices:
            ok = value in self.choices
        else:
            ok = (
                (self.ge is None or value >= self.ge)
                and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le)
                and (self.lt is None or value < self.lt)
            )
        if ok:
            return None
        allowed = self.allowed()
        if not self.nullable:  # null is a job's to send (precision), not TrainConfig's to take
            allowed = allowed.removeprefix("null or ")
        return f"{self.name} must be {allowed}. Received: {self.name}={value!r}"


def option(default: Any, help: str, **spec: Any) -> Any:
    """A TrainConfig field that is an option: `epochs: int = option(20, "...", ge=1, le=1000)`.

    `spec` takes Option's other fields: a number needs one lower (`ge` or `gt`) and one upper
    (`le` or `lt`) bound, a string its `choices`; `rule` names a rule between options
    (TrainConfig._rules) in the words of the allowed range.
    """
    return dataclasses.field(default=default, metadata={_METADATA_KEY: {"help": help, **spec}})


def lever(default: Any, help: str, **spec: Any) -> Any:
    """An option that is one of issue 11's levers (off by default, grouped as levers)."""
    return option(default, help, lever=True, **spec)


def options_of(config: type) -> tuple[Option, ...]:
    """The options of a TrainConfig class, in field order; TypeError for an incomplete one."""
    return _options_of(config)


@cache
def _options_of(config: Any) -> tuple[Option, ...]:
    hints = typing.get_type_hints(config)
    options = []
    for field in dataclasses.fields(config):
        spec = field.metadata.get(_METADATA_KEY)
        if spec is None:
            continue  # `net`: the subject of the run, not an option
        kind, nullable = _kind(hints[field.name])
        found = Option(field.name, kind, nullable, field.default, **spec)  # TypeError: unknown
        _check_declaration(found)
        options.append(found)
    return tuple(options)


def _kind(hint: Any) -> tuple[type, bool]:
    """(int, True) for `int | None`, (float, False) for `float`."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if not args:
        return hint, False
    (kind,) = args
    return kind, True


def _check_declaration(o: Option) -> None:
    """Every input has an upper bound and a JSON type the API and the columns can carry."""
    if o.type not in (int, float, bool, str):
        raise TypeError(f"option {o.name}: the type must be int, float, bool or str")
    if o.type is str and not o.choices:
        raise TypeError(f"option {o.name}: a string option needs its choices")
    if o.type in (int, float):
        if (o.ge is None) == (o.gt is None) or (o.le is None) == (o.lt is None):
            raise TypeError(
                f"option {o.name}: give one lower (ge or gt) and one upper (le or lt) bound"
            )
    if o.default is not None and o.problem(o.default):
        raise TypeError(f"option {o.name}: its default is not allowed: {o.problem(o.default)}")


def _number(value: Number | None) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _json(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"`{value}`" if isinstance(value, str) else _number(value)


def markdown_table(options: Sequence[Option]) -> str:
    """The docs' table of the options (docs/training-options.md), one row per option."""
    lines = [
        "| field | default | allowed | identity | what it does |",
        "|---|---|---|---|---|",
    ]
    for o in options:
        default = _json(o.request_default)
        if o.null_means:
            default += f" ({o.null_means})"
        identity = "yes" if o.identity else "no"
        text = o.help.replace("|", "\\|")
        lines.append(f"| `{o.name}` | {default} | {o.allowed()} | {identity} | {text} |")
    return "\n".join(lines) + "\n"
