"""What a run is, and step 1 of running it: `RunSpec` (the CLI's flags, one to one), the run's own
declared settings (`PROTOCOL`), and `prepare`, every check that needs no model (settings, registry,
paths, --resume), which turns a spec into a `Prepared` value: the spec checked (a new value: the
one given is never changed), the registry entries, the protocol, the method's settings and one
built method per evaluation setting still to run. Nothing here knows a method by name: what a
method needs comes from its declaration (`ivlib.methods.base.Method`).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import distributed as dist
from .config import Config, load_config, lookup
from .errors import UsageError
from .methods import METHODS, Method, get_method
from .protocol import DRAWING, WRITING, Protocol
from .protocol import SETTINGS as PROTOCOL_SETTINGS
from .results import check_writable, has_record, read_records
from .samples import check_samples_dir
from .settings import SEED, Setting, by_name
from .state import check_save_path, checked_fit, read_meta
from .tasks import Task
from .templates import IV
from .threads import use_threads

AUTO_GPU_START = 256  # --batch-size auto on GPU: first try, halved on each out-of-memory error
AUTO_CPU = 16  # on CPU larger batches buy little and cost memory
SPLITS = ("validation", "test")
# The most episodes of any kind one run draws: each episode is a few kB of examples and token ids
# held in memory at once (1,000,000 are gigabytes, and days of compute on a small model); a larger
# count is refused before anything is sampled instead of running out of memory while sampling.
MAX_EPISODES = 1_000_000
MEM_LIMIT = re.compile(r"^\d+(\.\d+)?\s*[KMG]i?B$", re.IGNORECASE)  # the units accelerate's max_memory reads


def parse_batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    return int(text)


# The run's settings shared by every method, then the protocol's (how a query is posed and judged,
# `protocol.Protocol`): the same declaration as a method's settings, so the CLI derives their flags and
# checks the same way.
PROTOCOL = (
    Setting(
        "ext_shot",
        int,
        4,
        "extraction demonstrations per class (methods that fit; hc: the --shot it is evaluated with)",
        low=0,
        short="-s",
    ),
    Setting("episodes", int, 200, "extraction episodes, drawn from train", low=1, high=MAX_EPISODES, short="-e"),
    Setting("eval_episodes", int, 10_000, "evaluation episodes", low=1, high=MAX_EPISODES, short="-n"),
    Setting(
        "select_episodes",
        int,
        200,
        "validation episodes a method selects on (tv: its layer, dt: its steps)",
        low=1,
        high=MAX_EPISODES,
    ),
    SEED,
    Setting(
        "batch_size",
        int,
        16,
        f"episodes per forward pass, or 'auto': on GPU start at {AUTO_GPU_START} and "
        f"halve on out-of-memory; on CPU {AUTO_CPU}",
        low=1,
        parse=parse_batch_size,
        accepts="a positive integer or 'auto'",
    ),
    Setting(
        "max_example_tokens", int, 256, "each example's input is truncated so input + separator + label fit", low=8
    ),
    *PROTOCOL_SETTINGS,
)
# protocol settings that define a fitted state: a loaded file's values become this run's
PROTOCOL_FIT = ("ext_shot", "episodes", "select_episodes", "max_example_tokens")
PROTOCOL_NAMES = frozenset(s.name for s in PROTOCOL_SETTINGS)  # checked by `Protocol.build`, once
_P: dict[str, Setting] = by_name(PROTOCOL)
PROTOCOL_BY_NAME: dict[str, Setting] = _P  # name -> the protocol's Setting (its default and check)


@dataclass
class RunSpec:
    """Everything one run needs, by registry name; the CLI's flags map onto it one to one.

    `settings` holds the method's own settings that were given (the others take the method's
    defaults); an evaluation setting (e.g. IV's `strength`) may hold a list of values, each
    evaluated with the same fit and written as its own record.
    """

    model: str
    task: str
    method: str = "iv"
    settings: dict[str, Any] = field(default_factory=dict)
    config: str | list[str] | None = None  # -c files, merged in order (one path is accepted too)
    split: str = "validation"
    ext_shot: int = _P["ext_shot"].default
    episodes: int = _P["episodes"].default
    shot: int = _P["shot"].default
    eval_episodes: int = _P["eval_episodes"].default
    select_episodes: int = _P["select_episodes"].default
    seed: int = _P["seed"].default
    batch_size: int | str = _P["batch_size"].default
    max_example_tokens: int = _P["max_example_tokens"].default
    demos: str = _P["demos"].default  # this and the eleven after it: the protocol (built once, in `prepare`)
    demo_order: str = _P["demo_order"].default
    demo_draw: str = _P["demo_draw"].default
    demo_source: str = _P["demo_source"].default
    queries: str = _P["queries"].default
    template: str | None = None
    inputs: str = _P["inputs"].default
    bos: str = _P["bos"].default
    tokenize: str = _P["tokenize"].default
    score: str | None = None
    metric: str = _P["metric"].default
    max_new_tokens: int | None = None
    gpu: int = -1
    no_half: bool = False
    device_map: str | None = None
    mem_limit: str | None = None
    flash_attention: bool = False
    threads: int | None = None  # torch CPU threads (ivlib.threads); None: torch's own
    results: str = "results/runs.jsonl"
    save_vectors: str | None = None
    load_vectors: str | None = None
    resume: bool = False
    quiet: bool = False
    log_samples: bool = False  # one JSONL line per evaluation episode beside the record (samples.py)
    command: list[str] | None = None  # what the record says was run
    preset: dict[str, Any] | None = None  # --preset: its name, its seeds and the flags that overrode it


@dataclass(frozen=True)
class Prepared:
    """A spec checked, with all that follows from it before any model loads (step 1's result)."""

    spec: RunSpec  # coerced values, --threads applied, a loaded state's fitting settings adopted
    method_cls: type[Method]
    config: Config
    model_entry: dict[str, Any]
    task_entry: dict[str, Any]
    protocol: Protocol  # how queries are posed and judged
    values: dict[str, Any]  # the method's settings; evaluation settings as lists
    pending: tuple[dict[str, Any], ...] = ()  # one entry per evaluation setting still to record
    methods: tuple[Method, ...] = ()  # built from `pending`; the first is the one fitted
    fitted_with: dict[str, Any] | None = None  # the --load-vectors file's fitting settings

    @property
    def kind(self) -> str:
        """The task's kind, known from the registry entry before the data loads."""
        return task_kind(self.task_entry)

    @property
    def eval_shot(self) -> int:
        return self.protocol.eval_shot(self.method_cls)

    @property
    def fixed(self) -> bool:
        """--demos fixed with demonstrations to fix (zero-shot is the same under either protocol)."""
        return self.protocol.fixed(self.method_cls)

    @property
    def fitting(self) -> bool:
        """Whether this run fits anything (methods that fit or select, unless the state is loaded)."""
        cls = self.method_cls
        return (cls.needs_fit or cls.needs_validation) and not self.spec.load_vectors

    def hyperparameters(self, method: Method) -> dict[str, Any]:
        """Everything that defines a run's setting, known before any compute (what --resume matches)."""
        cls, spec = self.method_cls, self.spec
        protocol = self.protocol.fields(cls, self.kind)  # defaults absent: earlier records still match
        return {
            **method.hyperparameters(),
            "shot": protocol.pop("shot"),
            "ext_shot": spec.ext_shot if cls.needs_fit else None,
            "episodes": spec.episodes if cls.needs_fit else None,
            **({"select_episodes": spec.select_episodes} if cls.needs_validation else {}),
            "max_example_tokens": spec.max_example_tokens,
            **protocol,
        }


def task_kind(task_entry: dict[str, Any]) -> str:
    """A task's kind from its registry entry (before its data loads)."""
    return next((k for k in ("multiple_choice", "open_vocabulary") if k in task_entry), "classification")


def prepare(spec: RunSpec) -> Prepared:
    """Check the spec, the registry and the paths (every check that needs no model, in this order, so
    the first problem is the one named); the evaluation settings still to run are `pending` (none
    when --resume finds them all recorded)."""
    cls = get_method(spec.method)
    if spec.quiet or not dist.is_main():  # with several processes only the main one reports progress
        silence_libraries()
    checked = checked_run(spec, cls)
    values = given_settings(cls, spec.settings)
    config = load_config(checked.config)
    model_entry = lookup(config.models, "model", checked.model)
    task_entry = lookup(config.tasks, "task", checked.task)
    protocol = build_protocol(checked, checked.task, task_entry)
    checked = dataclasses.replace(checked, ext_shot=protocol.fit_shot(cls, checked.ext_shot))  # HC: --shot
    prepared = Prepared(checked, cls, config, model_entry, task_entry, protocol, values)
    check_method_task(cls, prepared.kind, checked.task)
    protocol.check(cls, prepared.kind, METHODS)
    _check_paths(checked, cls)
    if checked.load_vectors:
        prepared = _adopt_fit_settings(prepared, checked.load_vectors)
    prepared = dataclasses.replace(prepared, values=_with_defaults(prepared))
    combos = _eval_combinations(prepared.values)
    if checked.resume:
        combos = _not_yet_recorded(prepared, combos)
    methods = tuple(cls.from_settings(c, checked.seed) for c in combos)  # one per evaluation setting
    return dataclasses.replace(prepared, pending=tuple(combos), methods=methods)


def checked_run(spec: RunSpec, cls: type[Method]) -> RunSpec:
    """The spec with the run's own settings checked (coerced by their declarations; the protocol's are
    checked when it is built) and --threads applied: a new value."""
    if spec.split not in SPLITS:
        raise UsageError(f"split '{spec.split}' is not accepted; accepted: {', '.join(SPLITS)}")
    coerced = {s.name: s.check(getattr(spec, s.name)) for s in PROTOCOL if s.name not in PROTOCOL_NAMES}
    checked = dataclasses.replace(spec, **coerced)
    if cls.needs_fit and not cls.fits_at_eval_shot and checked.ext_shot < 1:  # HC's is --shot
        raise UsageError(f"--ext-shot {checked.ext_shot} is out of range; accepted: an integer >= 1")
    _check_devices(checked)
    return dataclasses.replace(checked, threads=use_threads(checked.threads))  # applied before any compute


def _check_devices(spec: RunSpec) -> None:
    if spec.mem_limit and not spec.device_map:
        raise UsageError("--mem-limit needs --device-map")
    if spec.mem_limit and not MEM_LIMIT.match(spec.mem_limit):
        raise UsageError(
            f"--mem-limit '{spec.mem_limit}' is not accepted; accepted: a size in KB/MB/GB or KiB/MiB/GiB, e.g. 20GiB"
        )
    if spec.device_map and spec.gpu < 0:
        raise UsageError("--device-map needs a GPU (-g 0 or higher)")
    if spec.device_map and dist.active():
        raise UsageError(
            f"--device-map with {dist.world_size()} processes is not supported yet; accepted: one process "
            "spanning GPUs (--device-map), or several processes on one GPU each (no --device-map)"
        )


def given_settings(cls: type[Method], given: dict[str, Any]) -> dict[str, Any]:
    """The spec's method settings, checked. A setting of another method is ignored, so one flag set
    can serve a sweep over several methods (as scripts.sh's EXTRA does); a setting no method
    declares is refused."""
    own = by_name(cls.declared_settings())
    owners: dict[str, list[str]] = {}  # setting name -> the methods declaring it
    for method, other in METHODS.items():
        for s in other.declared_settings():
            owners.setdefault(s.name, []).append(method)
    values: dict[str, Any] = {}
    for name, value in given.items():
        if name in own:
            values[name] = _one_setting(own[name], value)
        elif name not in owners:
            raise UsageError(f"setting '{name}' is unknown; accepted: {', '.join(sorted(owners))}")
        elif isinstance(value, (list, tuple)) and len(value) > 1:  # one record each: not for this method
            raise UsageError(
                f"--{name.replace('_', '-')} takes several values only with a method that uses it "
                f"({', '.join(owners[name])}); method '{cls.name}' got {len(value)}"
            )
    return values


def _one_setting(setting: Setting, value: Any) -> Any:
    """A given value (an evaluation setting's several values: a list), checked."""
    if not isinstance(value, (list, tuple)):
        return setting.check(value)
    if not setting.many:
        raise UsageError(f"{setting.flag} takes one value; {len(value)} given")
    return [setting.check(v) for v in value]


def _check_paths(spec: RunSpec, cls: type[Method]) -> None:
    """The results file, the samples folder and the state files, before anything runs."""
    check_writable(spec.results)
    if spec.log_samples:
        check_samples_dir(spec.results)
    _check_state_flags(spec, cls)
    if spec.save_vectors:
        check_save_path(spec.save_vectors)


def _check_state_flags(spec: RunSpec, cls: type[Method]) -> None:
    flags = (("--load-vectors", spec.load_vectors), ("--save-vectors", spec.save_vectors))
    for flag, value in flags:
        if value is not None and not value.strip():  # '' would read as "not given": the save silently skipped
            raise UsageError(f"{flag} '{value}' is empty; accepted: a file path, e.g. vectors/iv.safetensors")
    if spec.load_vectors and spec.save_vectors:
        raise UsageError(
            f"--load-vectors and --save-vectors together: a loaded state is not refitted, so "
            f"'{spec.save_vectors}' would not be written; accepted: one of the two (copy the file to keep it elsewhere)"
        )
    for flag, value in flags:
        if value and not cls.has_state:
            fitted = ", ".join(name for name, c in METHODS.items() if c.has_state)
            raise UsageError(f"{flag}: method '{cls.name}' has no fitted state; accepted with: {fitted}")


def _adopt_fit_settings(prepared: Prepared, path: str) -> Prepared:
    """The fitting settings of the --load-vectors file taken, so the record (and --resume, select, the
    report) names the setting the state was really fitted with; a conflicting flag is refused."""
    spec, cls = prepared.spec, prepared.method_cls
    meta = read_meta(path)
    if meta.get("method") != spec.method:
        raise UsageError(
            f"--load-vectors '{path}' was fitted with method={meta.get('method')!r}; this run has {spec.method!r}"
        )
    settings = (*(_P[k] for k in PROTOCOL_FIT), *cls.fit_settings())
    fitted = checked_fit(path, meta, settings)  # each value through its flag's own check
    run: dict[str, Any] = {}
    values = dict(prepared.values)
    _check_fitted_shot(prepared, path, fitted)
    for setting in (s for s in settings if s.name in fitted and not _follows_shot(cls, s.name)):
        protocol = setting.name in PROTOCOL_FIT
        current = getattr(spec, setting.name) if protocol else values.get(setting.name, setting.default)
        if current == fitted[setting.name]:
            continue
        given = current != setting.default if protocol else setting.name in values
        if given:  # a conflict
            raise UsageError(
                f"--load-vectors '{path}' was fitted with {setting.flag} {fitted[setting.name]}; "
                f"this command gives {current}; accepted: the same value, or leave {setting.flag} out"
            )
        (run if protocol else values)[setting.name] = fitted[setting.name]
    _check_fitted_protocol(prepared, path, fitted)
    return dataclasses.replace(prepared, spec=dataclasses.replace(spec, **run), values=values, fitted_with=fitted)


def _follows_shot(cls: type[Method], name: str) -> bool:
    """Whether a fit setting is not the user's to give: a method fitting at the evaluation's shot (HC)
    has its -s set from --shot."""
    return name == "ext_shot" and cls.fits_at_eval_shot


def _check_fitted_shot(prepared: Prepared, path: str, fitted: dict[str, Any]) -> None:
    """A state calibrated on prompts of one --shot classifies prompts of that shot only (HC)."""
    spec = prepared.spec
    if prepared.method_cls.fits_at_eval_shot and fitted.get("ext_shot", spec.ext_shot) != spec.ext_shot:
        raise UsageError(
            f"--load-vectors '{path}' was calibrated on {fitted['ext_shot']}-shot prompts and this command "
            f"evaluates {spec.ext_shot}-shot ones; accepted: --shot {fitted['ext_shot']}"
        )


def _check_fitted_protocol(prepared: Prepared, path: str, fitted: dict[str, Any]) -> None:
    """A state was fitted on prompts of one template, inputs and BOS (and a selection judged by one rule
    and metric, in one demonstration order); using it under another would mix two protocols in one record."""
    clash = protocol_clash(fitted, prepared.protocol.fit_fields(prepared.method_cls, prepared.kind))
    if clash:
        flag, was, now = clash
        raise UsageError(
            f"--load-vectors '{path}' was fitted with {flag} {was}; this command gives {now}; accepted: {flag} {was}"
        )


def protocol_clash(fitted: dict[str, Any], wanted: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first protocol field (its flag, the fitted value, the wanted one) where a fit's record and
    the protocol it is to be used under differ; an absent field is its default (older files)."""
    for key, flag in FITTED_PROTOCOL.items():
        default = PROTOCOL_DEFAULTS[key]
        was, now = fitted.get(key, default), wanted.get(key, default)
        if was != now:
            return flag, was, now
    return None


def _with_defaults(prepared: Prepared) -> dict[str, Any]:
    """The method's settings, those not given taking the model entry's value where one is declared
    (unless a state file was loaded: its value is the fitted one), else the method's default."""
    values = dict(prepared.values)
    for setting in prepared.method_cls.declared_settings():
        if setting.name in values:
            continue
        key = setting.model_default
        loaded = bool(prepared.spec.load_vectors)
        entry_value = prepared.model_entry.get(key) if key is not None and not loaded else None
        values[setting.name] = setting.check(entry_value) if entry_value is not None else setting.default
    return values


def _eval_combinations(values: dict[str, Any]) -> list[dict[str, Any]]:
    """One settings dict per combination of evaluation-setting values (given order kept)."""
    lists = {k: v if isinstance(v, list) else [v] for k, v in values.items()}
    names = list(lists)
    combos = [dict(zip(names, chosen)) for chosen in itertools.product(*(lists[n] for n in names))]
    unique: dict[str, dict[str, Any]] = {}
    for combo in combos:
        unique.setdefault(repr(sorted(combo.items())), combo)
    return list(unique.values())


def _not_yet_recorded(prepared: Prepared, combos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    spec = prepared.spec
    if not Path(spec.results).is_file():
        return combos
    records, _ = read_records(spec.results)

    def recorded(combo: dict[str, Any]) -> bool:
        built = prepared.method_cls.from_settings(combo, spec.seed)
        hp = prepared.hyperparameters(built)
        return has_record(records, spec.model, spec.task, spec.method, spec.split, hp, spec.seed, spec.eval_episodes)

    return [c for c in combos if not recorded(c)]


# protocol keys a fitted state records (`Protocol.fit_fields`), with their flags and default values
FITTED_PROTOCOL = {
    "demos": "--demos",
    "template": "--template",
    "scoring": "--score",
    "metric": "--metric",
    "demo_order": "--demo-order",
    **{name: "--" + name.replace("_", "-") for name in (*DRAWING, *WRITING)},
}
PROTOCOL_DEFAULTS = {
    "demos": _P["demos"].default,
    "template": IV.key,
    "scoring": "(the task's own rule)",
    "metric": _P["metric"].default,
    "demo_order": _P["demo_order"].default,
    **{name: _P[name].default for name in (*DRAWING, *WRITING)},
}


def build_protocol(spec: Any, task: str, task_entry: dict[str, Any] | None) -> Protocol:
    """The run's protocol from a spec's values, read by the protocol's own declared settings, so a new
    setting of `Protocol.build` needs no edit here."""
    values = {setting.name: getattr(spec, setting.name) for setting in PROTOCOL_SETTINGS}
    return Protocol.build(**values, task=task, task_entry=task_entry)


def check_method_task(cls: type[Method], task: Task | str, name: str = "") -> None:
    """Refuse a method on a task kind it cannot run (class vectors or read-outs without classes); the
    kind is known from the registry entry, so this runs before anything loads."""
    kind = task if isinstance(task, str) else task.kind
    name = name or (task if isinstance(task, str) else task.name)
    supported = {"multiple_choice": "supports_multiple_choice", "open_vocabulary": "supports_open_vocabulary"}
    if kind in supported and not getattr(cls, supported[kind]):
        accepted = ", ".join(n for n, c in METHODS.items() if getattr(c, supported[kind]))
        why = "it steers towards class labels" if kind == "multiple_choice" else "it is built per class"
        raise UsageError(
            f"--method {cls.name} does not apply to {kind.replace('_', '-')} task '{name}' ({why}); "
            f"accepted: {accepted}"
        )


def silence_libraries() -> None:
    """--quiet: no progress bars or info chatter from datasets/transformers either."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
