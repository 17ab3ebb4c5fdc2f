"""Choosing each method's setting on validation, so that test numbers are never used to tune.

A results file is an append-only log of runs (see results.py). Selection reads it tolerantly:
records from other versions, or lines cut short by a killed writer, are reported on stderr and
skipped, because one bad line should not cost a whole sweep's summary.
"""

from __future__ import annotations

import math
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import UsageError
from .protocol import marks
from .results import canonical, read_records

METRICS = ("macro", "micro", "weighted", "accuracy")
FALLBACK_METRIC = "accuracy"
REQUIRED = ("method", "model", "task", "split", "hyperparameters", "metrics")

# flags of iv.py that say where/how much to evaluate or where state goes, not what the setting is
_DROP_WITH_VALUE = ("-n", "--eval-episodes", "--results", "--save-vectors", "--load-vectors")
_DROP_ALONE = ("--run-test", "--quiet")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise UsageError(f"--metric '{metric}' is unknown; accepted: {', '.join(METRICS)}")
    return metric


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Records usable for analysis, in file order; every other line is one warning (`read_records`).

    Raises UsageError when there is nothing to analyse, since every later step would be empty.
    """
    records, _ = read_records(str(path))
    if not records:
        raise UsageError(
            f"--results '{path}' holds no valid run records; "
            f"accepted: a .jsonl file of records written by iv.py (fields {', '.join(REQUIRED)})"
        )
    return records


# ---- scoring ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """A record with the metric read out; `metric` differs from the one asked for on fallback."""

    record: dict[str, Any]
    order: int
    metric: str
    value: float
    ci_low: float | None
    ci_high: float | None

    @property
    def model(self) -> str:
        value: str = self.record["model"]
        return value

    @property
    def task(self) -> str:
        value: str = self.record["task"]
        return value

    @property
    def method(self) -> str:
        """The method as select and the report name it: its protocol variant appended (`icl@class`)."""
        return method_label(self.record)

    @property
    def split(self) -> str:
        value: str = self.record["split"]
        return value

    @property
    def setting(self) -> str:
        return canonical(self.record["hyperparameters"])

    @property
    def hyperparameters(self) -> dict[str, Any]:
        value: dict[str, Any] = self.record["hyperparameters"]
        return value


# Protocol settings whose values are different protocols rather than hyperparameters to choose on
# validation: select and the report keep each value's records apart, as a method of its own
# (`icl@fixed`, `icl@class` beside `icl`), so the paired comparison of the two stays possible. Only
# non-default values are recorded (`--demos fixed`, `--demo-order class`), so records without the key
# are the default.
def method_label(record: dict[str, Any]) -> str:
    """`method`, then `@value` for each protocol value the record holds (`iv@fixed`, `iv@fixed@class`,
    `icl@dt/sst2@full`): only values other than the defaults are recorded (`protocol.APART`)."""
    hp = record.get("hyperparameters")
    return str(record["method"]) + "".join(f"@{m}" for m in (marks(hp) if isinstance(hp, dict) else []))


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


# accuracy by another name: a classification record's micro-F1 is its accuracy (one label per query;
# a prediction of none of the labels, under --score vocab or generate, is a miss in both)
ALIASES = {"accuracy": "micro"}


def read_metric(record: dict[str, Any], metric: str) -> tuple[str, dict[str, Any]] | None:
    """The metric asked for, else accuracy (multiple-choice tasks report only that), else None;
    `accuracy` of a classification record is its micro-F1, named as people read it."""
    metrics = record.get("metrics") or {}
    for name in (metric, FALLBACK_METRIC):
        for key in (name, ALIASES.get(name)):
            entry = metrics.get(key) if key else None
            if isinstance(entry, dict) and _number(entry.get("value")) is not None:
                return name, entry
    return None


def score_records(records: Iterable[dict[str, Any]], metric: str = "macro") -> list[Scored]:
    """Records that carry a usable value; those without one are warned about once, here."""
    check_metric(metric)
    scored = []
    for order, record in enumerate(records):
        found = read_metric(record, metric)
        if found is None:
            warn(f"{_describe(record)}: no '{metric}' or '{FALLBACK_METRIC}' metric; skipped")
            continue
        name, entry = found
        scored.append(
            Scored(
                record, order, name, float(entry["value"]), _number(entry.get("ci_low")), _number(entry.get("ci_high"))
            )
        )
    return scored


def _describe(record: dict[str, Any]) -> str:
    when = f" at {record['time']}" if "time" in record else ""
    return f"record {record.get('method')}/{record.get('model')}/{record.get('task')} ({record.get('split')}){when}"


def _time(record: dict[str, Any]) -> datetime | None:
    raw = record.get("time")
    if not isinstance(raw, str):
        return None
    try:
        t = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def latest(candidates: list[Scored]) -> Scored:
    """The newest of several runs of one setting.

    By "time" when every candidate has one (files merged from several machines are not in
    time order); otherwise by file order, which is append order within one file.
    """
    times = [_time(c.record) for c in candidates]
    if all(t is not None for t in times):
        return max(zip(times, candidates), key=lambda tc: (tc[0], tc[1].order))[1]
    return max(candidates, key=lambda c: c.order)


def latest_per_setting(scored: Iterable[Scored]) -> list[Scored]:
    """One run per (model, task, method, split, setting, seed): re-runs replace earlier runs, other
    seeds are other runs."""
    groups: dict[tuple[Any, ...], list[Scored]] = {}
    for s in scored:
        groups.setdefault((s.model, s.task, s.method, s.split, s.setting, s.record.get("seed")), []).append(s)
    return sorted((latest(g) for g in groups.values()), key=lambda s: s.order)


def _seed_key(s: Scored) -> tuple[int, str]:
    seed = s.record.get("seed")
    return (0, f"{seed:020d}") if isinstance(seed, int) else (1, str(seed))


def over_seeds(runs: list[Scored]) -> Scored:
    """One seed's run as it is; several seeds' runs of one setting as one candidate: the mean value
    and mean interval bounds, with the latest run's record (what its command and setting come from)."""
    if len(runs) == 1:
        return runs[0]
    newest = latest(runs)

    def mean(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if len(known) == len(values) else None

    value = mean([r.value for r in runs])
    assert value is not None  # every Scored has a value
    return Scored(
        newest.record,
        newest.order,
        newest.metric,
        value,
        mean([r.ci_low for r in runs]),
        mean([r.ci_high for r in runs]),
    )


# ---- selection --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """The best validation setting of one method on one (model, task)."""

    best: Scored  # with several seeds: their mean (`over_seeds`)
    n_settings: int
    runs: tuple[Scored, ...] = ()  # the chosen setting's latest run per seed, by seed

    @property
    def n_seeds(self) -> int:
        return max(len(self.runs), 1)

    def run_for_seed(self, seed: int) -> Scored | None:
        """The chosen setting's run with this seed (what a test command for that seed starts from)."""
        return next((r for r in self.runs if r.record.get("seed") == seed), None)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.best.model, self.best.task, self.best.method


def best_of(candidates: list[Scored]) -> Scored:
    """Highest value; ties go to the higher ci_low (the more certain setting), and then to the
    alphabetically first canonical setting JSON, so a rerun of `select` never flips a choice."""
    by_setting = sorted(candidates, key=lambda s: s.setting)
    # max() keeps the first of equal keys, i.e. the alphabetically first setting
    return max(by_setting, key=lambda s: (s.value, s.ci_low if s.ci_low is not None else -math.inf))


def choose(scored: Iterable[Scored], split: str = "validation") -> list[Choice]:
    """Per (model, task, method), the best setting; a setting run with several seeds competes with
    its mean over them, so no seed's luck picks it."""
    groups: dict[tuple[str, str, str], dict[str, list[Scored]]] = {}
    for s in latest_per_setting(scored):
        if s.split == split:
            groups.setdefault((s.model, s.task, s.method), {}).setdefault(s.setting, []).append(s)
    choices = []
    for key in sorted(groups):
        settings = groups[key]
        best = best_of([over_seeds(runs) for runs in settings.values()])
        choices.append(Choice(best, len(settings), tuple(sorted(settings[best.setting], key=_seed_key))))
    return choices


def select_best(records: Iterable[dict[str, Any]], metric: str = "macro") -> list[Choice]:
    """Best validation setting per (model, task, method), sorted by that key.

    Only validation records take part: choosing on test would make the test number optimistic.
    Rule: latest run per setting; then the highest `metric` value; ties -> higher ci_low ->
    alphabetically first canonical hyperparameter JSON. A record without `metric` is scored by
    "accuracy" when it has it (noted in Scored.metric), and skipped with a warning otherwise.
    """
    return choose(score_records(records, metric))


# ---- test commands ----------------------------------------------------------------------------


def _eval_flags() -> set[str]:
    """Flags of every method's evaluation settings (they take several values, one record each)."""
    from .methods import METHODS  # here, not at import: reading results needs no torch

    return {s.flag for cls in METHODS.values() for s in cls.eval_settings()}


def strip_eval_flags(args: list[str]) -> list[str]:
    """The run's arguments minus those that say where and how much to evaluate.

    What remains identifies the setting, so a test run made from it is the same configuration.
    Handles `--flag value`, `--flag=value` and `-n5`; an evaluation setting's values (several,
    e.g. `--strength 0.1 0.5`) go too, since the record names the one it holds.
    """
    several = _eval_flags()
    out: list[str] = []
    skip_next = in_values = False
    for arg in args:
        if skip_next:
            skip_next = False
            continue
        if in_values and (not arg.startswith("-") or _is_number(arg)):
            continue
        in_values = False
        name = arg.split("=", 1)[0] if arg.startswith("--") else arg
        if name in several:
            in_values = "=" not in arg
            continue
        if name in _DROP_ALONE:
            continue
        if name in _DROP_WITH_VALUE:
            skip_next = "=" not in arg
            continue
        if arg.startswith("-n") and not arg.startswith("--") and arg[2:].isdigit():
            continue
        out.append(arg)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def command_args(command: list[str]) -> list[str]:
    """The run's arguments without the program: records name it (`python iv.py ...`, `ivlib ...`),
    records of older versions hold the arguments alone."""
    args = list(command)
    if args and Path(args[0]).name in ("ivlib", "iv.py"):
        return args[1:]
    if len(args) >= 2 and Path(args[0]).name.startswith("python") and Path(args[1]).name == "iv.py":
        return args[2:]
    return args


def make_test_command(record: dict[str, Any], results_path: str, eval_episodes: int | None = None) -> str | None:
    """Shell line that evaluates this record's setting on test, or None if the record has no command.

    The state the validation run saved or loaded (`--save-vectors` / `--load-vectors` PATH) is
    loaded when that file still exists and was fitted for this record's setting (method, model,
    task and the fitting settings agree); the fitting flags are then left out, since the file
    provides them. Otherwise the state is refitted on train, with the record's fitting settings
    (a record made with --load-vectors has none on its command line).
    """
    command = record.get("command")
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        return None
    given = command_args(command)
    args = strip_eval_flags(given)
    state = _usable_state(record, given)
    if state is not None:
        args = _strip_flags(args, _fit_flags(record)) + ["--load-vectors", state]
    elif _flag_value(given, "--load-vectors") is not None:
        args += _record_fit_settings(record, args)
    args += ["--run-test", "--results", str(results_path)]
    args += _chosen_eval_settings(record)
    if eval_episodes is not None:
        args += ["-n", str(eval_episodes)]
    return shlex.join(["python", "iv.py", *args])


def _flag_value(args: list[str], flag: str) -> str | None:
    """The last value given to `flag` (`--flag V` or `--flag=V`), else None."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _fit_setting_objects(record: dict[str, Any]) -> list[Any]:
    """The settings a state file holds for this record's method: the protocol's fitting settings
    and the method's own fit-role settings (what --load-vectors adopts)."""
    from .methods import METHODS
    from .runspec import PROTOCOL, PROTOCOL_FIT

    cls = METHODS.get(record.get("method", ""))
    if cls is None or not cls.has_state:
        return []
    return [s for s in PROTOCOL if s.name in PROTOCOL_FIT] + list(cls.fit_settings())


def _fit_flags(record: dict[str, Any]) -> set[str]:
    return {name for s in _fit_setting_objects(record) for name in (s.flag, s.short) if name}


def _usable_state(record: dict[str, Any], given: list[str]) -> str | None:
    """The state file named by the record's command, when it exists and matches the record."""
    path = _flag_value(given, "--load-vectors") or _flag_value(given, "--save-vectors")
    if path is None or not _fit_setting_objects(record) or not Path(path).is_file():
        return None
    from .state import read_meta

    try:
        meta = read_meta(path)
    except (UsageError, OSError, ValueError):
        return None
    if any(meta.get(k) != record.get(k) for k in ("method", "model", "task")):
        return None  # overwritten since by another fit
    fitted, hp = meta.get("fit") or {}, record.get("hyperparameters") or {}
    settings_differ = any(k in hp and hp[k] != v for k, v in fitted.items())
    if settings_differ or ("seed" in fitted and fitted["seed"] != record.get("seed")):
        return None  # refitted since with other settings or another seed
    return path


def _record_fit_settings(record: dict[str, Any], args: list[str]) -> list[str]:
    """`--flag value` of the record's fitting settings that the command does not give."""
    from .methods import METHODS

    hp = record.get("hyperparameters") or {}
    cls = METHODS.get(record.get("method", ""))
    follows_shot = {"ext_shot"} if cls is not None and cls.fits_at_eval_shot else set()  # HC's is --shot's
    out: list[str] = []
    for setting in (s for s in _fit_setting_objects(record) if s.name not in follows_shot):
        present = any(a == n or a.startswith(n + "=") for a in args for n in (setting.flag, setting.short) if n)
        if not present and hp.get(setting.name) is not None:
            out += [setting.flag, str(hp[setting.name])]
    return out


def _strip_flags(args: list[str], flags: set[str]) -> list[str]:
    """`args` without the given one-value flags (`--flag V`, `--flag=V`, `-sV`)."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0] if arg.startswith("--") else arg
        if name in flags:
            skip = "=" not in arg
            continue
        if not arg.startswith("--") and any(arg.startswith(f) and len(arg) > len(f) for f in flags if len(f) == 2):
            continue
        out.append(arg)
    return out


def _chosen_eval_settings(record: dict[str, Any]) -> list[str]:
    """`--flag value` of the record's evaluation settings: one fit may have served several values,
    and the test run must evaluate the chosen one."""
    from .methods import METHODS

    cls = METHODS.get(record.get("method", ""))
    hp = record.get("hyperparameters") or {}
    out: list[str] = []
    for setting in cls.eval_settings() if cls is not None else ():
        if hp.get(setting.name) is not None:
            out += [setting.flag, str(hp[setting.name])]
    return out


def test_for(choice: Choice, scored: Iterable[Scored]) -> Scored | None:
    """The latest test run of a chosen setting.

    Matched on hyperparameters, or else on the command line without its evaluation flags:
    settings such as tv's layer are picked during fitting and are recorded, not given, so a
    test run of the same command can in principle record a different value.
    """
    best = choice.best
    same = [s for s in scored if s.split == "test" and (s.model, s.task, s.method) == choice.key]
    exact = [s for s in same if s.setting == best.setting]
    if exact:
        return latest(exact)
    key = _command_key(best.record)
    by_command = [s for s in same if key is not None and _command_key(s.record) == key]
    return latest(by_command) if by_command else None


def _command_key(record: dict[str, Any]) -> tuple[str, ...] | None:
    command = record.get("command")
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        return None
    return tuple(strip_eval_flags(command_args(command)))
