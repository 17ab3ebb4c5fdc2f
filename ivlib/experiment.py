"""One run as a library object: a `RunSpec` says what to run, an `Experiment` runs it step by step.

The CLI, a notebook and a launcher share this. The steps can be called alone, in order:
`prepare` (every check that needs no model: settings, registry, paths, --resume), `load` (task,
model, encoder), `sample` (evaluation episodes), `fit` (or load a fitted state), then
`evaluate_all` (one record per evaluation setting; several share one fit). `run` does all of
them. Nothing here knows a method by name: what a method needs comes from its declaration
(`ivlib.methods.base.Method`). Every user error is a `UsageError`, raised before any record or
state file is touched; `progress` says what is safely on disk, for an interrupt message.
"""

from __future__ import annotations

import itertools
import platform
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, budget
from . import distributed as dist
from .config import REPO_DIR, Config, load_config, lookup
from .episodes import Episode, Example, check_shots, fixed_demos, in_order, sample_episodes, with_demos
from .errors import UsageError
from .fingerprint import model_fingerprint
from .methods import METHODS, Method, get_method
from .metrics import bootstrap_accuracy, bootstrap_f1
from .models import LoadedModel, load_model, resolve_device
from .prompts import EncodedPrompt, PromptEncoder, option_lengths, split_prefix
from .protocol import SETTINGS as PROTOCOL_SETTINGS
from .protocol import Protocol
from .results import append_record, check_writable, has_record, read_records, signals_held
from .rules import Answers, make_rule
from .samples import check_samples_dir, sample_lines, samples_stem, write_samples
from .scoring import Scorer
from .settings import Setting, by_name
from .state import FINGERPRINT_KEY, check_save_path, checked_fit, load_state, read_meta, save_state
from .tasks import Task, load_task
from .templates import IV, Template
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
    Setting("ext_shot", int, 4, "extraction demonstrations per class (methods that fit)", low=0, short="-s"),
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
    Setting("seed", int, 42, "seed of the episodes (and of the bootstrap): every method sees the same queries", low=0),
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
    demos: str = _P["demos"].default  # this and the four after it: the protocol (built once, in `prepare`)
    demo_order: str = _P["demo_order"].default
    template: str | None = None
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


@dataclass
class Progress:
    """What this run has safely written, so an interrupt can say so."""

    records: int = 0
    vectors: str | None = None


class Experiment:
    """Runs one `RunSpec`; the attributes below are filled by the steps, in order."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.progress = Progress()
        self.method_cls: type[Method] = get_method(spec.method)
        self.config: Config | None = None
        self.model_entry: dict[str, Any] = {}
        self.task_entry: dict[str, Any] = {}
        self.values: dict[str, Any] = {}  # the method's settings; evaluation settings as lists
        self.pending: list[dict[str, Any]] = []  # one entry per evaluation setting still to record
        self.methods: list[Method] = []  # built from `pending`
        self.fitted_with: dict[str, Any] | None = None  # the --load-vectors file's fitting settings
        self.fit_s = 0.0
        self.fit_info: dict[str, Any] = {}
        self.fit_budget: dict[str, Any] = dict(NO_FIT_BUDGET)  # what the fit consumed (budget.py)
        self.protocol: Protocol = Protocol()  # how queries are posed and judged; built by `prepare`
        self.demos: tuple[Example, ...] | None = None  # --demos fixed: the run's one set, built once by `load`

    # ---- what the spec implies ---------------------------------------------------------------
    @property
    def kind(self) -> str:
        """The task's kind, known from the registry entry before the data loads."""
        return next((k for k in ("multiple_choice", "open_vocabulary") if k in self.task_entry), "classification")

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

    # ---- step 1: every check that needs no model -----------------------------------------------
    def prepare(self) -> list[dict[str, Any]]:
        """Check the spec, the registry and the paths; returns the evaluation settings still to run
        (empty when --resume finds them all recorded)."""
        spec = self.spec
        if spec.quiet or not dist.is_main():  # with several processes only the main one reports progress
            _silence_libraries()
        self._check_run()
        spec.threads = use_threads(spec.threads)  # checked like a flag, applied before any compute
        self.values = self._given_settings()
        self.config = load_config(spec.config)
        self.model_entry = lookup(self.config.models, "model", spec.model)
        self.task_entry = lookup(self.config.tasks, "task", spec.task)
        self.protocol = build_protocol(spec, spec.task, self.task_entry)
        check_method_task(self.method_cls, self.kind, spec.task)
        self.protocol.check(self.method_cls, self.kind, METHODS)
        check_writable(spec.results)
        if spec.log_samples:
            check_samples_dir(spec.results)
        self._check_state_flags()
        if spec.save_vectors:
            check_save_path(spec.save_vectors)
        if spec.load_vectors:
            self._adopt_fit_settings()
        self._fill_defaults()
        combos = self._eval_combinations()
        if spec.resume:
            combos = self._not_yet_recorded(combos)
        self.pending = combos
        self.methods = [self._build(c) for c in combos]  # one per evaluation setting; the first is fitted
        return combos

    def _check_run(self) -> None:
        """The run's own settings (the protocol's are checked when it is built)."""
        spec, cls = self.spec, self.method_cls
        if spec.split not in SPLITS:
            raise UsageError(f"split '{spec.split}' is not accepted; accepted: {', '.join(SPLITS)}")
        for setting in PROTOCOL:
            if setting.name not in PROTOCOL_NAMES:
                setattr(spec, setting.name, setting.check(getattr(spec, setting.name)))
        if cls.needs_fit and spec.ext_shot < 1:
            raise UsageError(f"--ext-shot {spec.ext_shot} is out of range; accepted: an integer >= 1")
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

    def _given_settings(self) -> dict[str, Any]:
        """The spec's method settings, checked. A setting of another method is ignored, so one flag set
        can serve a sweep over several methods (as scripts.sh's EXTRA does); a setting no method
        declares is refused."""
        own = by_name(self.method_cls.settings)
        owners: dict[str, list[str]] = {}  # setting name -> the methods declaring it
        for method, cls in METHODS.items():
            for s in cls.settings:
                owners.setdefault(s.name, []).append(method)
        values: dict[str, Any] = {}
        for name, value in self.spec.settings.items():
            if name not in own:
                if name not in owners:
                    raise UsageError(f"setting '{name}' is unknown; accepted: {', '.join(sorted(owners))}")
                if isinstance(value, (list, tuple)) and len(value) > 1:  # one record each: not for this method
                    flag = "--" + name.replace("_", "-")
                    raise UsageError(
                        f"{flag} takes several values only with a method that uses it "
                        f"({', '.join(owners[name])}); method '{self.method_cls.name}' got {len(value)}"
                    )
                continue
            setting = own[name]
            many = isinstance(value, (list, tuple))
            if many and not setting.many:
                raise UsageError(f"{setting.flag} takes one value; {len(value)} given")
            values[name] = [setting.check(v) for v in value] if many else setting.check(value)
        return values

    def _check_state_flags(self) -> None:
        cls = self.method_cls
        for flag, value in (("--load-vectors", self.spec.load_vectors), ("--save-vectors", self.spec.save_vectors)):
            if value is not None and not value.strip():  # '' would read as "not given": the save silently skipped
                raise UsageError(f"{flag} '{value}' is empty; accepted: a file path, e.g. vectors/iv.safetensors")
        if self.spec.load_vectors and self.spec.save_vectors:
            raise UsageError(
                f"--load-vectors and --save-vectors together: a loaded state is not refitted, so "
                f"'{self.spec.save_vectors}' would not be written; accepted: one of the two (copy the file to keep it elsewhere)"
            )
        for flag, value in (("--load-vectors", self.spec.load_vectors), ("--save-vectors", self.spec.save_vectors)):
            if value and not cls.has_state:
                fitted = ", ".join(name for name, c in METHODS.items() if c.has_state)
                raise UsageError(f"{flag}: method '{cls.name}' has no fitted state; accepted with: {fitted}")

    def _adopt_fit_settings(self) -> None:
        """Take the fitting settings of the --load-vectors file, so the record (and --resume, select,
        the report) names the setting the state was really fitted with; refuse a conflicting flag."""
        spec, path = self.spec, self.spec.load_vectors
        assert path is not None
        meta = read_meta(path)
        if meta.get("method") != spec.method:
            raise UsageError(
                f"--load-vectors '{path}' was fitted with method={meta.get('method')!r}; this run has {spec.method!r}"
            )
        settings = (*(_P[k] for k in PROTOCOL_FIT), *self.method_cls.fit_settings())
        fitted = checked_fit(path, meta, settings)  # each value through its flag's own check
        self.fitted_with = fitted
        for setting in settings:
            if setting.name not in fitted:
                continue
            protocol = setting.name in PROTOCOL_FIT
            current = getattr(spec, setting.name) if protocol else self.values.get(setting.name, setting.default)
            if current == fitted[setting.name]:
                continue
            given = current != setting.default if protocol else setting.name in self.values
            if given:
                raise UsageError(
                    f"--load-vectors '{path}' was fitted with {setting.flag} {fitted[setting.name]}; "
                    f"this command gives {current}; accepted: the same value, or leave {setting.flag} out"
                )
            if protocol:
                setattr(spec, setting.name, fitted[setting.name])
            else:
                self.values[setting.name] = fitted[setting.name]
        self._check_fitted_protocol(fitted)

    def _check_fitted_protocol(self, fitted: dict[str, Any]) -> None:
        """A state was fitted on prompts of one template (and a selection judged by one rule and metric, in
        one demonstration order); using it under another would mix two protocols in one record."""
        wanted = self.protocol.fit_fields(self.method_cls, self.kind)
        for key, flag in FITTED_PROTOCOL.items():
            default = PROTOCOL_DEFAULTS[key]
            was, now = fitted.get(key, default), wanted.get(key, default)
            if was != now:
                raise UsageError(
                    f"--load-vectors '{self.spec.load_vectors}' was fitted with {flag} {was}; this command "
                    f"gives {now}; accepted: {flag} {was}"
                )

    def _fill_defaults(self) -> None:
        """Settings not given take the model entry's value where one is declared (unless a state file
        was loaded: its value is the fitted one), else the method's default."""
        for setting in self.method_cls.settings:
            if setting.name in self.values:
                continue
            key = setting.model_default
            entry_value = self.model_entry.get(key) if key is not None and not self.spec.load_vectors else None
            self.values[setting.name] = setting.check(entry_value) if entry_value is not None else setting.default

    def _eval_combinations(self) -> list[dict[str, Any]]:
        """One settings dict per combination of evaluation-setting values (given order kept)."""
        lists = {k: v if isinstance(v, list) else [v] for k, v in self.values.items()}
        names = list(lists)
        combos = [dict(zip(names, values)) for values in itertools.product(*(lists[n] for n in names))]
        unique: dict[str, dict[str, Any]] = {}
        for combo in combos:
            unique.setdefault(repr(sorted(combo.items())), combo)
        return list(unique.values())

    def _not_yet_recorded(self, combos: list[dict[str, Any]]) -> list[dict[str, Any]]:
        spec = self.spec
        if not Path(spec.results).is_file():
            return combos
        records, _ = read_records(spec.results)
        return [
            c
            for c in combos
            if not has_record(
                records,
                spec.model,
                spec.task,
                spec.method,
                spec.split,
                self.hyperparameters(self._build(c)),
                spec.seed,
                spec.eval_episodes,
            )
        ]

    def _build(self, values: dict[str, Any]) -> Method:
        return self.method_cls.from_settings(values, self.spec.seed)

    # ---- step 2: task, model, prompts ---------------------------------------------------------
    def load(self) -> None:
        """Load the task and the model; check everything that needs them but no compute."""
        spec, cls = self.spec, self.method_cls
        self.device = resolve_device(dist.gpu_index(spec.gpu))  # several processes: -g + LOCAL_RANK
        self.task = task = load_task(spec.task, self.task_entry)
        check_method_task(cls, task)
        self.demos = check_data(task, cls, self.protocol, spec.split, spec.seed, self.fitting, spec.ext_shot)
        dist.setup(self.device)  # joins the launcher's process group; nothing with one process
        t0 = time.perf_counter()
        self.lm = lm = dist.main_first(  # the first load may convert and cache a checkpoint: the others reuse it
            lambda: load_model(
                spec.model,
                self.model_entry,
                self.device,
                no_half=spec.no_half,
                device_map=spec.device_map,
                mem_limit=spec.mem_limit,
                flash_attention=spec.flash_attention,
                quiet=spec.quiet or not dist.is_main(),
            )
        )
        self.load_s = time.perf_counter() - t0
        self.encoder = task_encoder(lm, task, spec.max_example_tokens, self.protocol.template)
        quiet = spec.quiet or not dist.is_main()
        self.scorer = make_scorer(lm, task, self.encoder, spec.batch_size, quiet, self.protocol)

    # ---- step 3: episodes -------------------------------------------------------------------
    def sample(self) -> None:
        """The evaluation episodes and their prompts; methods refuse prompts they cannot run here."""
        spec, task = self.spec, self.task
        demos = self.demos if self.fixed else None
        drawn = evaluation_episodes(task, spec.split, self.eval_shot, spec.eval_episodes, spec.seed, demos)
        self.eval_episodes = in_order(drawn, self.protocol.demo_order)
        self.prompts = [self.encoder.encode(e) for e in self.eval_episodes]
        self.methods[0].check_prompts(self.scorer, self.prompts)  # before the fit: a run that cannot finish won't start

    def fit_episodes(self) -> tuple[list[Episode], list[Episode] | None]:
        """(training episodes, validation episodes to select on) of the method's declared needs."""
        spec = self.spec
        return fit_episodes(
            self.task,
            self.method_cls,
            self.protocol,
            spec.ext_shot,
            spec.episodes,
            spec.select_episodes,
            spec.seed,
            self.demos,
        )

    # ---- step 4: fit, or load a fitted state ----------------------------------------------------
    @property
    def identity(self) -> dict[str, Any]:
        """What a state file must match to be used for this run."""
        return {
            "method": self.spec.method,
            "model": self.spec.model,
            "task": self.spec.task,
            "label_words": self.task.label_words,
            "n_layers": self.lm.layout.n_layers,
            "d_model": self.lm.layout.d_model,
            FINGERPRINT_KEY: model_fingerprint(self.lm),  # another model under the same name is refused
        }

    def fit(self) -> None:
        """Fit the first method (or load its state), save it if asked, and share it with the others."""
        spec, cls = self.spec, self.method_cls
        method = self.methods[0]
        if spec.load_vectors:
            tensors, meta = load_state(spec.load_vectors, self.identity)
            method.restore(spec.load_vectors, tensors, self.lm.layout, self.task.n_classes)
            self.fit_info = {"loaded_from": spec.load_vectors, "fitted_with": meta.get("fit"), **method.fit_summary()}
            saved = meta.get("budget")
            self.fit_budget = dict(saved) if isinstance(saved, dict) else dict(UNKNOWN_FIT_BUDGET)
        elif self.fitting:
            train, select = self.fit_episodes()
            t0 = time.perf_counter()
            with budget.counting(self.lm.model) as count:
                method.fit(self.scorer, self.encoder, train, select)
            self.fit_s = time.perf_counter() - t0
            self.fit_info = self._fit_info(method)
            self.fit_budget = fit_budget(method, train, select, count.tokens)
            if spec.save_vectors:
                path, state = spec.save_vectors, method.state()
                meta = {**self.identity, "fit": self.fit_info, "budget": self.fit_budget}
                with signals_held():  # a small file: saved, and known to be saved, before an interrupt lands
                    dist.together(lambda: save_state(path, state, meta) if dist.is_main() else None)
                    self.progress.vectors = spec.save_vectors
        for setting in cls.eval_settings():
            given = self.values[setting.name]
            if isinstance(given, list) and len(given) > 1:
                self.fit_info[f"shared_by_{setting.name}s"] = sorted(
                    {m.hyperparameters()[setting.name] for m in self.methods}
                )
        if len(self.methods) > 1:
            state = method.state()
            for other in self.methods[1:]:
                other.load_state(state)

    def _fit_info(self, method: Method) -> dict[str, Any]:
        """The record's (and the state file's) account of the fit: its settings, then what it chose."""
        spec = self.spec
        return fit_info(
            method,
            self.protocol,
            self.task,
            spec.ext_shot,
            spec.episodes,
            spec.select_episodes,
            spec.seed,
            spec.max_example_tokens,
        )

    # ---- step 5: evaluate and record ------------------------------------------------------------
    def evaluate(self, method: Method) -> dict[str, Any]:
        """Score the evaluation prompts with one fitted method; the record, not yet written."""
        spec, task, scorer = self.spec, self.task, self.scorer
        t0 = time.perf_counter()
        with budget.counting(self.lm.model) as count:
            scores = score_prompts(method, scorer, self.prompts, f"{spec.method} eval ({spec.split})", self.fixed)
        eval_s = time.perf_counter() - t0
        y_true = np.array([p.label for p in self.prompts])
        y_pred = scorer.predictions(scores, self.prompts)
        metrics = score_metrics(task, y_true, y_pred, scores, spec.seed, scorer, self.prompts)
        answers = (
            [f"option_{i}" for i in range(task.n_classes)]
            if task.multiple_choice
            else [GOLD]
            if task.open_vocabulary
            else list(task.label_words)
        )
        if scorer.rule.can_say_none:
            answers.append(NONE)
        fractions = np.round(np.bincount(y_pred, minlength=len(answers)) / len(y_pred), 4).tolist()
        now = datetime.now(UTC)
        record = {
            "time": now.isoformat(timespec="seconds"),
            **self._shared_fields(),
            "hyperparameters": self.hyperparameters(method),
            "metrics": metrics,
            "predicted_fraction": dict(zip(answers, fractions)),  # a method that collapses onto one answer shows here
            "timing_s": {"load": round(self.load_s, 3), "fit": round(self.fit_s, 3), "eval": round(eval_s, 3)},
            "eval_episodes_per_s": round(spec.eval_episodes / eval_s, 3) if eval_s > 0 else None,
            "batch_size": scorer.runner.batch_size,  # after any out-of-memory halving
            "budget": {**self.fit_budget, **eval_budget(self.eval_episodes, count.tokens)},
        }
        if spec.log_samples:  # written (atomically) before the record that points to it is appended
            rule, gold = scorer.rule, [p.answer[0] for p in self.prompts if p.answer] or None
            data = sample_lines(
                self.eval_episodes, y_pred, scores[:, : rule.score_columns(task.n_classes)], rule.texts(scores, gold)
            )
            stem = samples_stem(spec.results, spec.model, spec.task, spec.method, spec.split, now)
            record["samples"] = dist.together(lambda: write_samples(spec.results, stem, data))
        return record

    def _shared_fields(self) -> dict[str, Any]:
        spec, lm, task = self.spec, self.lm, self.task
        assert self.config is not None
        return {
            "model": spec.model,
            "task": spec.task,
            "split": spec.split,
            "method": spec.method,
            "seed": spec.seed,
            "n_eval_episodes": spec.eval_episodes,
            "n_fit_episodes": spec.episodes if self.fitting and self.method_cls.needs_fit else 0,
            "fit": self.fit_info,
            "batch_size_requested": spec.batch_size,
            "device": str(self.device),
            **({"n_processes": dist.world_size()} if dist.active() else {}),  # absent with one: records as before
            **({"threads": spec.threads} if spec.threads is not None else {}),  # only when given: records as before
            "dtype": str(lm.dtype).removeprefix("torch."),
            "device_map": spec.device_map,
            "model_source": lm.source,
            **({"model_identity": lm.identity} if lm.identity is not None else {}),  # GGUF only: which file ran
            "layout": lm.layout.describe(),
            "add_bos": lm.add_bos,
            "label_words": task.label_words,
            **({"template": self.protocol.template.definition()} if self.protocol.template != IV else {}),
            "task_kind": task.kind,
            "task_provenance": task.provenance,
            "config_files": self.config.sources,
            "versions": _versions(),
            "git_commit": _git_commit(),
            "command": spec.command,
            **({"preset": spec.preset} if spec.preset else {}),
        }

    def write(self, record: dict[str, Any]) -> None:
        with signals_held():  # the interrupt message counts exactly the records in the file
            dist.together(lambda: append_record(self.spec.results, record) if dist.is_main() else None)
            self.progress.records += 1

    def evaluate_all(self, on_record: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Evaluate, write and report each evaluation setting as soon as it is done."""
        records = []
        for method in self.methods:
            record = self.evaluate(method)
            self.write(record)
            records.append(record)
            if on_record is not None:
                on_record(record)
        return records

    def run(self, on_record: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """All steps; the records written (none when --resume found every setting recorded)."""
        if not self.prepare():
            return []
        self.load()
        self.sample()
        self.fit()
        return self.evaluate_all(on_record)

    # ---- for people -----------------------------------------------------------------------------
    def label(self, record: dict[str, Any]) -> str:
        """The method, and the evaluation settings that vary within this run (`iv a2=0.5`)."""
        varied = [
            s
            for s in self.method_cls.eval_settings()
            if isinstance(self.values.get(s.name), list) and len(self.values[s.name]) > 1
        ]
        hp = record["hyperparameters"]
        return " ".join([self.spec.method, *(f"{s.label}={hp[s.name]}" for s in varied)])


# protocol keys a fitted state records (`Protocol.fit_fields`), with their flags and default values
FITTED_PROTOCOL = {"template": "--template", "scoring": "--score", "metric": "--metric", "demo_order": "--demo-order"}
PROTOCOL_DEFAULTS = {
    "template": IV.key,
    "scoring": "(the task's own rule)",
    "metric": _P["metric"].default,
    "demo_order": _P["demo_order"].default,
}


def build_protocol(spec: Any, task: str, task_entry: dict[str, Any] | None) -> Protocol:
    """The run's protocol from a spec's (or the API's) values: the one place both build it."""
    return Protocol.build(
        shot=spec.shot,
        demos=spec.demos,
        demo_order=spec.demo_order,
        template=spec.template,
        score=spec.score,
        metric=spec.metric,
        max_new_tokens=spec.max_new_tokens,
        task=task,
        task_entry=task_entry,
    )


def demo_set(task: Task, shot: int, seed: int) -> tuple[Example, ...]:
    """--demos fixed: the run's one demonstration set, from train, never a text of validation or test."""
    avoid = {t for name in SPLITS for t in task.splits[name].texts}
    return fixed_demos(task.splits["train"], task.n_classes, shot, seed, avoid, task.label_words)


def fixed_scores(method: Method, scorer: Scorer, prompts: list[EncodedPrompt], desc: str) -> torch.Tensor:
    """[N, C] scores of prompts sharing one demonstration set: the prefix (BOS + demonstrations) encoded
    once by the method, then every batch of queries run over it; the rare prompt whose tokens before the
    query differ from the shared prefix (see `split_prefix`) is scored whole. Equal to `predict` on the
    whole prompts."""
    shared, queries, differ = split_prefix(prompts)
    if not shared.ids:  # nothing before the query (no BOS, no demonstrations): nothing to share
        return scorer.runner.map(prompts, lambda b: method.predict(scorer, b), desc)
    scorer.check_context(max(len(p.ids) for p in prompts))  # the query batches do not hold the prefix
    prefix = method.prefix(scorer, scorer.batch([shared]))
    cut = sorted(set(range(len(prompts))) - set(differ))
    scores = scorer.runner.map([queries[i] for i in cut], lambda b: method.predict_over(scorer, prefix, b), desc)
    if not differ:
        return scores
    whole = scorer.runner.map([prompts[i] for i in differ], lambda b: method.predict(scorer, b), f"{desc}, whole")
    out = scores.new_empty(len(prompts), *scores.shape[1:])
    out[cut], out[differ] = scores, whole
    return out


# ---- the steps' pieces that need no spec: the Python API (ivlib.api) calls these too, so an API run
# sees the same checks and episodes, fits the same state and computes the same metrics as the CLI's
NONE = "(none)"  # predicted_fraction's key for answers that are none of the labels (vocab, generate)
GOLD = "(the gold answer)"  # an open-vocabulary task's one "label": each query's own answer


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


def check_data(
    task: Task, cls: type[Method], protocol: Protocol, split: str, seed: int, fitting: bool, ext_shot: int
) -> tuple[Example, ...] | None:
    """Refuse shot counts the splits cannot serve, before the model loads; the run's one fixed
    demonstration set (--demos fixed), built here once for evaluation and selection alike, else None."""
    selecting = fitting and cls.needs_validation
    shared = protocol.one_set and (protocol.fixed(cls) or selecting)
    demos = demo_set(task, protocol.shot, seed) if shared else None  # from train: refused here if too few
    if not protocol.fixed(cls):
        shot = protocol.eval_shot(cls)
        check_shots(task.splits[split], split, task.n_classes, shot, task.label_words, "--shot")
    if fitting and cls.needs_fit:
        check_shots(task.splits["train"], "train", task.n_classes, ext_shot, task.label_words, "--ext-shot")
    if selecting and demos is None:
        check_shots(task.splits["validation"], "validation", task.n_classes, protocol.shot, task.label_words, "--shot")
    return demos


def task_encoder(lm: LoadedModel, task: Task, max_example_tokens: int, template: Template) -> PromptEncoder:
    """The prompt encoder of a model and task (an open-vocabulary task's one class is its answer)."""
    classes = task.n_classes if task.open_vocabulary else None
    return PromptEncoder(lm.tokenizer, task.label_words, lm.add_bos, max_example_tokens, template, classes)


def make_scorer(
    lm: LoadedModel,
    task: Task,
    encoder: PromptEncoder,
    batch_size: int | str,
    quiet: bool,
    protocol: Protocol | None = None,
) -> Scorer:
    """The scorer of a run (CLI or API alike): the protocol's scoring rule and headline metric, label
    collisions refused where first tokens are compared, and --batch-size auto's first try (halved on
    out-of-memory from there)."""
    protocol = protocol or Protocol()
    name = protocol.rule(task.kind)
    if task.kind == "classification" and name in ("first-token", "vocab"):
        encoder.check_label_collisions()
    answers = Answers(tuple(task.label_words), tuple(encoder.label_ids), tuple(tuple(t) for t in encoder.label_tokens))
    rule = make_rule(name, answers, lm.tokenizer, protocol.template.stop, protocol.max_new_tokens)
    auto = batch_size == "auto"
    start = (AUTO_GPU_START if lm.device.type == "cuda" else AUTO_CPU) if auto else int(batch_size)
    scorer = Scorer(lm, encoder.label_ids, start, quiet, shrink_on_oom=auto, rule=rule)
    scorer.metric = protocol.metric if task.kind == "classification" else "accuracy"  # no classes: accuracy
    return scorer


def fit_episodes(
    task: Task,
    cls: type[Method],
    protocol: Protocol,
    ext_shot: int,
    episodes: int,
    select_episodes: int,
    seed: int,
    demos: tuple[Example, ...] | None = None,
) -> tuple[list[Episode], list[Episode] | None]:
    """(training episodes, validation episodes to select on) of the method's declared needs.

    The validation episodes are evaluation prompts: under --demos fixed their queries get the run's
    one set `demos` (a method selects for the set it is evaluated with), and they take the protocol's
    demonstration order. Training episodes stay episodic and shuffled: they are what a method learns
    from (the IV release orders only its 1-shot evaluation prompts)."""
    train = (
        sample_episodes(task.splits["train"], task.n_classes, ext_shot, episodes, seed, "train/extract")
        if cls.needs_fit
        else []
    )
    if not cls.needs_validation:
        return train, None
    if protocol.one_set and demos is None:
        demos = demo_set(task, protocol.shot, seed)
    drawn = evaluation_episodes(task, "validation", protocol.shot, select_episodes, seed, demos, "select")
    return train, in_order(drawn, protocol.demo_order)


def evaluation_episodes(
    task: Task, split: str, shot: int, n: int, seed: int, demos: tuple[Example, ...] | None, purpose: str = "eval"
) -> list[Episode]:
    """The episodes a run scores: episodic, or (with `demos`, the --demos fixed set) the very same queries
    each with that one set."""
    if demos is None:
        return sample_episodes(task.splits[split], task.n_classes, shot, n, seed, f"{split}/{purpose}")
    queries = sample_episodes(task.splits[split], task.n_classes, 0, n, seed, f"{split}/{purpose}")  # same stream
    return with_demos(queries, demos)


def score_prompts(method: Method, scorer: Scorer, prompts: list[EncodedPrompt], desc: str, fixed: bool) -> torch.Tensor:
    """[N, W] evaluation scores; prompts sharing fixed demonstrations share one encoded prefix where
    the method declares that exact (`caches_fixed_prefix`)."""
    if fixed and type(method).caches_fixed_prefix:
        return fixed_scores(method, scorer, prompts, desc)
    return scorer.runner.map(prompts, lambda b: method.predict(scorer, b), desc)


def fit_info(
    method: Method,
    protocol: Protocol,
    task: Task,
    ext_shot: int,
    episodes: int,
    select_episodes: int,
    seed: int,
    max_example_tokens: int,
) -> dict[str, Any]:
    """The record's (and the state file's) account of a fit: its settings, the protocol it was fitted
    under (a load must match it), then what it chose."""
    cls = type(method)
    evaluated = {s.name for s in cls.eval_settings()}
    return {
        **({"ext_shot": ext_shot, "episodes": episodes} if cls.needs_fit else {}),
        "seed": seed,
        "max_example_tokens": max_example_tokens,
        **{k: v for k, v in method.hyperparameters().items() if k not in evaluated},
        **({"select_episodes": select_episodes, "select_shot": protocol.shot} if cls.needs_validation else {}),
        **protocol.fit_fields(cls, task.kind),
        **method.fit_summary(),
    }


NO_FIT_BUDGET = {"fit_examples": 0, "selection_examples": 0, "fit_tokens": 0}  # a method that fits nothing
UNKNOWN_FIT_BUDGET = {"fit_examples": None, "selection_examples": None, "fit_tokens": None}  # an older state file


def fit_budget(method: Method, train: list[Episode], select: list[Episode] | None, tokens: int) -> dict[str, Any]:
    """What a fit consumed: distinct labeled examples (its own and its selection's) and token positions."""
    labeled = method.labeled_examples(train, select)
    return {"fit_examples": labeled["fit"], "selection_examples": labeled["selection"], "fit_tokens": tokens}


def eval_budget(episodes: list[Episode], tokens: int) -> dict[str, Any]:
    """What each evaluation query consumed: the labeled demonstrations it was shown, token positions."""
    return {
        "demonstrations_per_query": budget.per_query(episodes),
        "tokens_per_query": round(tokens / max(len(episodes), 1), 1),
    }


def score_metrics(
    task: Task,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    scores: Any,
    seed: int,
    scorer: Scorer | None = None,
    prompts: list[EncodedPrompt] | None = None,
) -> dict[str, Any]:
    """The record's `metrics`: F1s (or for multiple choice accuracies) with bootstrap intervals; under
    a whole-answer rule also the other normalisation's (`_sum` or `_mean`: the sum and the per-token
    mean are both recorded, the headline by the rule)."""
    rule = scorer.rule.name if scorer is not None else None
    if task.open_vocabulary:  # right or not: accuracy, the headline of every paper on such tasks
        return {"accuracy": bootstrap_accuracy(y_true, y_pred, seed=seed)}
    if task.multiple_choice:  # length-normalised (per token) is the headline unless the rule is `full`
        other = y_pred_other = None
        if scorer is not None and prompts is not None:
            lengths = option_lengths(prompts).clamp(min=1).to(scores.dtype)
            by_mean = (scores / lengths).argmax(dim=-1).numpy()
            by_sum = scores.argmax(dim=-1).numpy()
            other, y_pred_other = ("accuracy_mean", by_mean) if rule == "full" else ("accuracy_sum", by_sum)
        else:
            other, y_pred_other = "accuracy_sum", scores.argmax(dim=-1).numpy()
        return {
            "accuracy": bootstrap_accuracy(y_true, y_pred, seed=seed),
            other: bootstrap_accuracy(y_true, y_pred_other, seed=seed),
        }
    metrics = bootstrap_f1(y_true, y_pred, task.n_classes, seed=seed)
    if rule in ("full", "full-mean") and scorer is not None:
        lengths = torch.tensor([len(t) for t in scorer.rule.answers.tokens], dtype=scores.dtype)
        by_mean, by_sum = (scores / lengths).argmax(dim=-1).numpy(), scores.argmax(dim=-1).numpy()
        suffix, other_pred = ("_mean", by_mean) if rule == "full" else ("_sum", by_sum)
        metrics.update({k + suffix: v for k, v in bootstrap_f1(y_true, other_pred, task.n_classes, seed=seed).items()})
    return metrics


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _versions() -> dict[str, str]:
    import datasets
    import torch
    import transformers

    return {
        "ivlib": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "numpy": np.__version__,
    }


def _silence_libraries() -> None:
    """--quiet: no progress bars or info chatter from datasets/transformers either."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
