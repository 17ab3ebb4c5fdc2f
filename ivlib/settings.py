"""Settings that describe themselves: the one declaration flags, checks, records and reports read.

A method (and the run's protocol) lists its settings once, as `Setting`s. From that list come the
command-line flags and their help, the range checks (the same for the CLI and the Python API, since
a method checks its values when it is built), the keys of the run record that `--resume` and
`select` match, the fitting settings saved with a state file and adopted on `--load-vectors`, and
which settings may take several values that share one fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

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
        if isinstance(coerced, (int, float)) and not isinstance(coerced, bool):
            if (self.low is not None and coerced < self.low) or (self.high is not None and coerced > self.high):
                raise UsageError(f"{self.flag} {value} is out of range; accepted: {self.accepted()}")
        return coerced


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
    """Constructor arguments (positional in declaration order, or by name) -> checked values, defaults filled."""
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
    return {s.name: s.check(values[s.name]) for s in settings}
