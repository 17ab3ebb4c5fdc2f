"""Settings that describe themselves: the one declaration flags, checks, records and reports read.

A method (and the run's protocol) lists its settings once, as `Setting`s. From that list come the
command-line flags and their help, the range checks (the same for the CLI and the Python API, since
a method checks its values when it is built), the keys of the run record that `--resume` and
`select` match, the fitting settings saved with a state file and adopted on `--load-vectors`, and
which settings may take several values that share one fit.

A method declares its settings as one frozen dataclass (a `MethodSettings`), each field a
`setting_field` carrying the declaration: the field gives the name and the type, the metadata the
rest. A method then reads `self.settings.strength`, typed, and the `Setting`s are derived from the
fields (`MethodSettings.declared()`), so each setting is declared once.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

from .errors import UsageError

Role = Literal["fit", "eval"]
FIT: Role = "fit"  # part of what fitting computes: saved with the state, adopted on load
EVAL: Role = "eval"  # applied at evaluation only: several values can share one fit


@dataclass(frozen=True)
class Setting:
    """One named setting: its type, default, accepted range and help.

    `name` is the record key and the keyword of the method's constructor; the flag is derived
    from it (`ext_strength` -> `--ext-strength`). `optional` allows None, which means "the
    method's own rule" (e.g. FV's head count); `model_default` names a model-registry key whose
    value replaces the default (FV's `fv_heads`). `symbol` is the paper's name (a2), used where
    values are shown to a person.
    """

    name: str
    type: type
    default: Any
    help: str
    role: Role = FIT
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    optional: bool = False
    short: str | None = None
    symbol: str | None = None
    model_default: str | None = None
    parse: Callable[[str], Any] | None = None  # text -> value, when not `type` itself (e.g. 'auto')
    accepts: str | None = None  # what an error message says is accepted, when the derived text would not do
    # a larger value makes the method's edit of the activations larger: what an overflow (inf/NaN in the
    # activations) asks the user to lower, named by the method's own flag
    scales: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        return self.symbol or self.name

    @property
    def many(self) -> bool:
        """Whether several values may be given at once (each gets its own record, one fit)."""
        return self.role == EVAL

    def accepted(self) -> str:
        """What the error message says is accepted."""
        if self.accepts:
            return self.accepts
        if self.choices:
            return "one of " + ", ".join(self.choices)
        kind = {int: "an integer", float: "a finite number", str: "a string"}.get(self.type, self.type.__name__)
        bounds = [
            f">= {_number(self.low)}" if self.low is not None else "",
            f"<= {_number(self.high)}" if self.high is not None else "",
        ]
        return " ".join([kind, " and ".join(b for b in bounds if b)]).strip()

    def check(self, value: Any) -> Any:
        """The value, coerced to the declared type; UsageError naming the flag otherwise."""
        if value is None:
            if self.optional or self.default is None:
                return None
            raise UsageError(f"{self.flag} needs a value; accepted: {self.accepted()}")
        coerced = _coerce(self, value)
        if self.choices and coerced not in self.choices:
            raise UsageError(f"{self.flag} '{value}' is not accepted; accepted: {', '.join(self.choices)}")
        if isinstance(coerced, float) and not math.isfinite(coerced):
            raise UsageError(f"{self.flag} {value} is not a finite number; accepted: {self.accepted()}")
        number = isinstance(coerced, (int, float)) and not isinstance(coerced, bool)
        if number and (
            (self.low is not None and coerced < self.low) or (self.high is not None and coerced > self.high)
        ):
            raise UsageError(f"{self.flag} {value} is out of range; accepted: {self.accepted()}")
        return coerced


# The run's seed: its episodes, its bootstrap, and what a method that draws at random (`Method.takes_seed`) draws.
SEED = Setting(
    "seed", int, 42, "seed of the episodes (and of the bootstrap): every method sees the same queries", low=0
)


def _number(bound: float) -> str:
    """A bound as a person reads it: 1,000,000 rather than 1e+06."""
    return f"{int(bound):,}" if float(bound).is_integer() else f"{bound:g}"


def _coerce(setting: Setting, value: Any) -> Any:
    refused = UsageError(f"{setting.flag} {value!r} is not accepted; accepted: {setting.accepted()}")
    if isinstance(value, str) and setting.type is not str:  # text from a flag or a YAML file
        try:
            return (setting.parse or setting.type)(value)
        except ValueError:
            raise refused from None
    if isinstance(value, bool) and setting.type is not bool:
        raise refused
    if setting.type is float and isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, setting.type):
        return value
    raise refused


def by_name(settings: Iterable[Setting]) -> dict[str, Setting]:
    return {s.name: s for s in settings}


def bind(settings: Sequence[Setting], args: tuple[Any, ...], kwargs: dict[str, Any], owner: str) -> dict[str, Any]:
    """Constructor arguments (positional in declaration order, or by name) -> values by name, defaults
    filled; unchecked (the settings value checks them when it is built)."""
    if len(args) > len(settings):
        raise TypeError(f"{owner} takes at most {len(settings)} positional settings, got {len(args)}")
    values = {s.name: s.default for s in settings}
    for setting, value in zip(settings, args):
        values[setting.name] = value
    unknown = sorted(set(kwargs) - set(values))
    if unknown:
        raise TypeError(
            f"{owner} has no setting '{unknown[0]}'; accepted: its settings ({', '.join(values) or 'none'})"
        )
    values.update(kwargs)
    return values


# ---- a method's settings as one typed value ---------------------------------------------------------
DECLARATION = "ivlib.setting"  # the metadata key under which a field carries its declaration


def setting_field(
    default: Any,
    help: str,
    *,
    role: Role = FIT,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[str, ...] | None = None,
    short: str | None = None,
    symbol: str | None = None,
    model_default: str | None = None,
    parse: Callable[[str], Any] | None = None,
    accepts: str | None = None,
    scales: bool = False,
) -> Any:
    """A field of a `MethodSettings` dataclass and its declaration: everything a `Setting` holds but the
    name and the type, which the field itself gives (`float | None`: optional, None is a value)."""
    declaration = {
        "help": help,
        "role": role,
        "low": low,
        "high": high,
        "choices": choices,
        "short": short,
        "symbol": symbol,
        "model_default": model_default,
        "parse": parse,
        "accepts": accepts,
        "scales": scales,
    }
    return dataclasses.field(default=default, metadata={DECLARATION: declaration})


@dataclass(frozen=True)
class MethodSettings:
    """A method's settings, one frozen value: subclass it as a `@dataclass(frozen=True)` whose fields are
    `setting_field`s, and name it in the method's base, `class Mine(Method[MySettings])`.

    Building one checks (and coerces: text from a flag, an int for a float) every value by its
    declaration, so a value held here has passed the flag's own check, whoever built it."""

    def __post_init__(self) -> None:
        for setting in self.declared():
            object.__setattr__(self, setting.name, setting.check(getattr(self, setting.name)))

    @classmethod
    def declared(cls) -> tuple[Setting, ...]:
        """The `Setting` of each field, in declaration order."""
        if cls not in _DECLARED:  # checked once per class
            _DECLARED[cls] = _declared(cls)
        return _DECLARED[cls]

    @classmethod
    def bind(cls, args: tuple[Any, ...], kwargs: dict[str, Any], owner: str) -> Self:
        """From a method's constructor arguments (positional in declaration order, or by name)."""
        return cls(**bind(cls.declared(), args, kwargs, owner))

    def values(self) -> dict[str, Any]:
        """The settings by name, in declaration order (what a run record's hyperparameters hold)."""
        return {s.name: getattr(self, s.name) for s in self.declared()}


@dataclass(frozen=True)
class NoSettings(MethodSettings):
    """The settings of a method that has none."""


PLAIN_TYPES = (int, float, str)  # (a bool from text would need its own parse: bool('no') is True)


_DECLARED: dict[type[MethodSettings], tuple[Setting, ...]] = {}


def _declared(cls: type[MethodSettings]) -> tuple[Setting, ...]:
    if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} must be a @dataclass(frozen=True)")
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        declaration = f.metadata.get(DECLARATION)
        if declaration is None:
            raise TypeError(f"{cls.__name__}.{f.name}: declare it with setting_field(default, help, ...)")
        kind, optional = _plain(hints[f.name], f"{cls.__name__}.{f.name}")
        out.append(Setting(f.name, kind, f.default, optional=optional, **declaration))
    return tuple(out)


def _plain(hint: Any, where: str) -> tuple[type, bool]:
    """(the value type, whether None is accepted) of a field's annotation: int, float or str,
    optionally `| None`."""
    args = typing.get_args(hint)
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)] if args else [hint]
    if len(kinds) != 1 or kinds[0] not in PLAIN_TYPES:
        raise TypeError(f"{where}: a setting is an int, float or str (or one of them | None), not {hint}")
    return kinds[0], optional
