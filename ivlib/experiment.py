"""One run as a library object: `Experiment` runs a `RunSpec` step by step, each step a function
whose frozen result the next step takes.

The CLI, a notebook and a launcher share this. The steps: `prepare` (`ivlib.runspec`: every check
that needs no model) -> `Prepared`; `load` (task, model, encoder) -> `Loaded`; `sample` (the
evaluation episodes) -> `Sampled`; `fit` (or load a fitted state) -> `Fitted`; then `evaluate`,
one record per evaluation setting (several share one fit). `Experiment` calls them in order and
keeps each result (None until its step has run); `run` does all of them. Every user error is a
`UsageError`, raised before any record or state file is touched; `progress` says what is safely on
disk, for an interrupt message.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np
import torch

from . import budget
from . import distributed as dist
from .episodes import (
    PAPER,
    Drawing,
    Episode,
    Example,
    check_shots,
    fixed_demos,
    in_order,
    sample_episodes,
    with_demos,
)
from .errors import UsageError
from .fingerprint import model_fingerprint
from .methods import Method, get_method
from .models import LoadedModel, load_model, resolve_device
from .prompts import EncodedPrompt, PromptEncoder, split_prefix
from .protocol import Protocol
from .record import git_commit, predicted_fraction, score_metrics, versions
from .results import append_record, signals_held
from .rules import Answers, make_rule
from .runspec import (
    AUTO_CPU,
    AUTO_GPU_START,
    PROTOCOL,
    PROTOCOL_BY_NAME,
    PROTOCOL_FIT,
    SPLITS,
    Prepared,
    RunSpec,
    check_method_task,
    prepare,
)
from .samples import sample_lines, samples_stem, write_samples
from .scoring import Scorer
from .state import FINGERPRINT_KEY, load_state, save_state
from .tasks import Task, load_task
from .templates import IV, Template

__all__ = [  # the run's pieces, here for a caller that runs one (the spec's own live in ivlib.runspec)
    "PROTOCOL",
    "PROTOCOL_BY_NAME",
    "PROTOCOL_FIT",
    "Experiment",
    "Fitted",
    "Loaded",
    "Prepared",
    "Progress",
    "RunSpec",
    "Sampled",
    "check_data",
    "demo_set",
    "evaluation_episodes",
    "fit_episodes",
    "fixed_scores",
    "make_scorer",
    "score_prompts",
    "task_encoder",
]


T = TypeVar("T")  # a step's result


@dataclass
class Progress:
    """What this run has safely written, so an interrupt can say so."""

    records: int = 0
    vectors: str | None = None


# ---- step 2: task, model, prompts -------------------------------------------------------------
@dataclass(frozen=True)
class Loaded:
    """What `load` loaded: the task and the model, and what is built from them."""

    task: Task
    demos: tuple[Example, ...] | None  # --demos fixed: the run's one set, built once
    device: torch.device
    lm: LoadedModel
    seconds: float  # the model's loading time
    encoder: PromptEncoder
    scorer: Scorer


def load(prepared: Prepared) -> Loaded:
    """Load the task and the model; check everything that needs them but no compute."""
    spec, cls = prepared.spec, prepared.method_cls
    device = resolve_device(dist.gpu_index(spec.gpu))  # several processes: -g + LOCAL_RANK
    task = load_task(spec.task, prepared.task_entry, prepared.protocol.inputs)
    check_method_task(cls, task)
    demos = check_data(task, cls, prepared.protocol, spec.split, spec.seed, prepared.fitting, spec.ext_shot)
    dist.setup(device)  # joins the launcher's process group; nothing with one process
    quiet = spec.quiet or not dist.is_main()
    t0 = time.perf_counter()
    lm = dist.main_first(  # the first load may convert and cache a checkpoint: the others reuse it
        lambda: load_model(
            spec.model,
            prepared.model_entry,
            device,
            no_half=spec.no_half,
            device_map=spec.device_map,
            mem_limit=spec.mem_limit,
            flash_attention=spec.flash_attention,
            quiet=quiet,
        )
    )
    seconds = time.perf_counter() - t0
    posed = prepared.protocol
    encoder = task_encoder(lm, task, spec.max_example_tokens, posed.template, posed.bos, posed.tokenize)
    scorer = make_scorer(lm, task, encoder, spec.batch_size, quiet, prepared.protocol)
    return Loaded(task, demos, device, lm, seconds, encoder, scorer)


# ---- step 3: episodes -------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampled:
    """The evaluation episodes and their prompts."""

    episodes: list[Episode]
    prompts: list[EncodedPrompt]


def sample(prepared: Prepared, loaded: Loaded) -> Sampled:
    """The evaluation episodes and their prompts; methods refuse prompts they cannot run here, before
    the fit (a run that cannot finish won't start)."""
    spec = prepared.spec
    demos = loaded.demos if prepared.fixed else None
    drawing = prepared.protocol.drawing
    drawn = evaluation_episodes(
        loaded.task, spec.split, prepared.eval_shot, spec.eval_episodes, spec.seed, demos, "eval", drawing
    )
    episodes = in_order(drawn, prepared.protocol.demo_order)
    prompts = [loaded.encoder.encode(e) for e in episodes]
    prepared.methods[0].check_prompts(loaded.scorer, prompts)
    return Sampled(episodes, prompts)


def run_fit_episodes(
    prepared: Prepared, task: Task, demos: tuple[Example, ...] | None
) -> tuple[list[Episode], list[Episode] | None]:
    """(training episodes, validation episodes to select on) of the run's method's declared needs."""
    spec = prepared.spec
    return fit_episodes(
        task,
        prepared.method_cls,
        prepared.protocol,
        spec.ext_shot,
        spec.episodes,
        spec.select_episodes,
        spec.seed,
        demos,
    )


# ---- step 4: fit, or load a fitted state ------------------------------------------------------
@dataclass(frozen=True)
class Fitted:
    """What `fit` leaves: the run's methods (the first fitted or loaded, the others sharing its state),
    the record's account of the fit, what it consumed, and its time."""

    methods: tuple[Method, ...]
    info: dict[str, Any]
    budget: dict[str, Any]
    seconds: float = 0.0


def identity(prepared: Prepared, loaded: Loaded) -> dict[str, Any]:
    """What a state file must match to be used for this run."""
    return state_identity(prepared.spec.method, prepared.spec.model, loaded.task, loaded.lm)


def state_identity(method: str, model: str, task: Task, lm: LoadedModel) -> dict[str, Any]:
    """What a state file records and a load checks (the CLI's and the Python API's alike)."""
    return {
        "method": method,
        "model": model,
        "task": task.name,
        "label_words": task.label_words,
        "n_layers": lm.layout.n_layers,
        "d_model": lm.layout.d_model,
        FINGERPRINT_KEY: model_fingerprint(lm),  # another model under the same name is refused
    }


def fit(prepared: Prepared, loaded: Loaded, progress: Progress) -> Fitted:
    """Fit the first method (or load its state), save it if asked, and share it with the others."""
    if prepared.spec.load_vectors:
        done = _load_fitted(prepared, loaded, prepared.spec.load_vectors)
    elif prepared.fitting:
        done = _fit_first(prepared, loaded, progress)
    else:
        done = Fitted(prepared.methods, {}, dict(NO_FIT_BUDGET))
    first, *others = done.methods
    if others:
        state = first.state()
        for other in others:
            other.load_state(state)
    return dataclasses.replace(done, info={**done.info, **_shared_by(prepared)})


def _shared_by(prepared: Prepared) -> dict[str, list[Any]]:
    """`shared_by_<setting>s`: the values of each evaluation setting given several that share this fit."""
    shared = {}
    for setting in prepared.method_cls.eval_settings():
        given = prepared.values[setting.name]
        if isinstance(given, list) and len(given) > 1:
            shared[f"shared_by_{setting.name}s"] = sorted({m.hyperparameters()[setting.name] for m in prepared.methods})
    return shared


def _load_fitted(prepared: Prepared, loaded: Loaded, path: str) -> Fitted:
    method = prepared.methods[0]
    tensors, meta = load_state(path, identity(prepared, loaded))
    method.restore(path, tensors, loaded.lm.layout, loaded.task.n_classes)
    info = {"loaded_from": path, "fitted_with": meta.get("fit"), **method.fit_summary()}
    saved = meta.get("budget")
    return Fitted(prepared.methods, info, dict(saved) if isinstance(saved, dict) else dict(UNKNOWN_FIT_BUDGET))


def _fit_first(prepared: Prepared, loaded: Loaded, progress: Progress) -> Fitted:
    spec, method = prepared.spec, prepared.methods[0]
    train, select = run_fit_episodes(prepared, loaded.task, loaded.demos)
    t0 = time.perf_counter()
    with budget.counting(loaded.lm.model) as count:
        method.fit(loaded.scorer, loaded.encoder, train, select)
    seconds = time.perf_counter() - t0
    info = fit_info(
        method,
        prepared.protocol,
        loaded.task,
        spec.ext_shot,
        spec.episodes,
        spec.select_episodes,
        spec.seed,
        spec.max_example_tokens,
    )
    spent = fit_budget(method, train, select, count.tokens)
    if spec.save_vectors:
        path, state = spec.save_vectors, method.state()
        meta = {**identity(prepared, loaded), "fit": info, "budget": spent}
        with signals_held():  # a small file: saved, and known to be saved, before an interrupt lands
            dist.together(lambda: save_state(path, state, meta) if dist.is_main() else None)
            progress.vectors = path
    return Fitted(prepared.methods, info, spent, seconds)


# ---- step 5: evaluate and record --------------------------------------------------------------
def evaluate(prepared: Prepared, loaded: Loaded, sampled: Sampled, fitted: Fitted, method: Method) -> dict[str, Any]:
    """Score the evaluation prompts with one fitted method; the record, not yet written."""
    spec, task, scorer, prompts = prepared.spec, loaded.task, loaded.scorer, sampled.prompts
    t0 = time.perf_counter()
    with budget.counting(loaded.lm.model) as count:
        scores = score_prompts(method, scorer, prompts, f"{spec.method} eval ({spec.split})", prepared.fixed)
    eval_s = time.perf_counter() - t0
    y_true = np.array([p.label for p in prompts])
    y_pred = scorer.predictions(scores, prompts)
    now = datetime.now(UTC)
    record = {
        "time": now.isoformat(timespec="seconds"),
        **shared_fields(prepared, loaded, fitted),
        "hyperparameters": prepared.hyperparameters(method),
        "metrics": score_metrics(task, y_true, y_pred, scores, spec.seed, scorer, prompts),
        "predicted_fraction": predicted_fraction(task, scorer, y_pred),
        "timing_s": {"load": round(loaded.seconds, 3), "fit": round(fitted.seconds, 3), "eval": round(eval_s, 3)},
        "eval_episodes_per_s": round(spec.eval_episodes / eval_s, 3) if eval_s > 0 else None,
        "batch_size": scorer.runner.batch_size,  # after any out-of-memory halving
        "budget": {**fitted.budget, **eval_budget(sampled.episodes, count.tokens)},
    }
    if spec.log_samples:  # written (atomically) before the record that points to it is appended
        rule, gold = scorer.rule, [p.answer[0] for p in prompts if p.answer] or None
        data = sample_lines(
            sampled.episodes, y_pred, scores[:, : rule.score_columns(task.n_classes)], rule.texts(scores, gold)
        )
        stem = samples_stem(spec.model, spec.task, spec.method, spec.split, now)
        record["samples"] = dist.together(lambda: write_samples(spec.results, stem, data))
    return record


def shared_fields(prepared: Prepared, loaded: Loaded, fitted: Fitted) -> dict[str, Any]:
    """The fields every record of this run shares: what ran, on what, under which protocol, from where."""
    spec, lm, task, protocol = prepared.spec, loaded.lm, loaded.task, prepared.protocol
    return {
        "model": spec.model,
        "task": spec.task,
        "split": spec.split,
        "method": spec.method,
        "seed": spec.seed,
        "n_eval_episodes": spec.eval_episodes,
        "n_fit_episodes": spec.episodes if prepared.fitting and prepared.method_cls.needs_fit else 0,
        "fit": fitted.info,
        "batch_size_requested": spec.batch_size,
        "device": str(loaded.device),
        **({"n_processes": dist.world_size()} if dist.active() else {}),  # absent with one: records as before
        **({"threads": spec.threads} if spec.threads is not None else {}),  # only when given: records as before
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device_map": spec.device_map,
        "model_source": lm.source,
        **({"model_identity": lm.identity} if lm.identity is not None else {}),  # GGUF only: which file ran
        "layout": lm.layout.describe(),
        "add_bos": lm.add_bos if protocol.bos == "model" else bool(loaded.encoder.bos),  # the prompts' own
        "label_words": task.label_words,
        **({"template": protocol.template.definition()} if protocol.template != IV else {}),
        "task_kind": task.kind,
        "task_provenance": task.provenance,
        "config_files": prepared.config.sources,
        "versions": versions(),
        "git_commit": git_commit(),
        "command": spec.command,
        **({"preset": spec.preset} if spec.preset else {}),
    }


class Experiment:
    """Runs one `RunSpec`: each step's frozen result is kept here (None until the step has run) and
    taken by the next step."""

    def __init__(self, spec: RunSpec):
        self.given = spec  # as given: `prepare` checks it into a new value (`spec`), never changing this one
        self.progress = Progress()
        self.method_cls: type[Method] = get_method(spec.method)
        self.prepared: Prepared | None = None
        self.loaded: Loaded | None = None
        self.sampled: Sampled | None = None
        self.fitted: Fitted | None = None

    @property
    def spec(self) -> RunSpec:
        """The checked spec once `prepare` has run, the given one before."""
        return self.prepared.spec if self.prepared is not None else self.given

    @property
    def pending(self) -> list[dict[str, Any]]:
        """The evaluation settings still to run (none before `prepare`)."""
        return list(self.prepared.pending) if self.prepared is not None else []

    def _step(self, value: T | None, step: str) -> T:
        """An earlier step's result, or the one line saying which step to call first."""
        if value is None:
            raise RuntimeError(f"Experiment: call {step}() first")
        return value

    def prepare(self) -> list[dict[str, Any]]:
        """Step 1: check the spec, the registry and the paths; the evaluation settings still to run
        (empty when --resume finds them all recorded)."""
        self.prepared = prepare(self.given)
        return self.pending

    def load(self) -> Loaded:
        """Step 2: the task and the model."""
        self.loaded = load(self._step(self.prepared, "prepare"))
        return self.loaded

    def sample(self) -> Sampled:
        """Step 3: the evaluation episodes and their prompts."""
        self.sampled = sample(self._step(self.prepared, "prepare"), self._step(self.loaded, "load"))
        return self.sampled

    def fit(self) -> Fitted:
        """Step 4: fit the method (or load its state)."""
        self.fitted = fit(self._step(self.prepared, "prepare"), self._step(self.loaded, "load"), self.progress)
        return self.fitted

    def fit_episodes(self) -> tuple[list[Episode], list[Episode] | None]:
        """(training episodes, validation episodes to select on) of the method's declared needs."""
        loaded = self._step(self.loaded, "load")
        return run_fit_episodes(self._step(self.prepared, "prepare"), loaded.task, loaded.demos)

    @property
    def identity(self) -> dict[str, Any]:
        """What a state file must match to be used for this run."""
        return identity(self._step(self.prepared, "prepare"), self._step(self.loaded, "load"))

    def evaluate(self, method: Method) -> dict[str, Any]:
        """Step 5: score the evaluation prompts with one fitted method; the record, not yet written."""
        return evaluate(
            self._step(self.prepared, "prepare"),
            self._step(self.loaded, "load"),
            self._step(self.sampled, "sample"),
            self._step(self.fitted, "fit"),
            method,
        )

    def write(self, record: dict[str, Any]) -> None:
        with signals_held():  # the interrupt message counts exactly the records in the file
            dist.together(lambda: append_record(self.spec.results, record) if dist.is_main() else None)
            self.progress.records += 1

    def evaluate_all(self, on_record: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Evaluate, write and report each evaluation setting as soon as it is done."""
        records = []
        fitted = self._step(self.fitted, "fit")
        for method in fitted.methods:
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
    def hyperparameters(self, method: Method) -> dict[str, Any]:
        """Everything that defines a run's setting (what --resume matches)."""
        prepared = self._step(self.prepared, "prepare")
        return prepared.hyperparameters(method)

    def label(self, record: dict[str, Any]) -> str:
        """The method, and the evaluation settings that vary within this run (`iv a2=0.5`)."""
        values = self.prepared.values if self.prepared is not None else {}
        varied = [
            s
            for s in self.method_cls.eval_settings()
            if isinstance(values.get(s.name), list) and len(values[s.name]) > 1
        ]
        hp = record["hyperparameters"]
        return " ".join([self.spec.method, *(f"{s.label}={hp[s.name]}" for s in varied)])


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


def check_data(
    task: Task, cls: type[Method], protocol: Protocol, split: str, seed: int, fitting: bool, ext_shot: int
) -> tuple[Example, ...] | None:
    """Refuse shot counts the splits cannot serve, before the model loads; the run's one fixed
    demonstration set (--demos fixed), built here once for evaluation and selection alike, else None."""
    if task.inputs != protocol.inputs:  # the record would claim prompts its texts cannot write
        raise UsageError(
            f"task '{task.name}' was loaded with {task.inputs} inputs and the protocol asks for inputs "
            f"'{protocol.inputs}'; accepted: load_task(..., inputs='{protocol.inputs}'), or inputs='{task.inputs}'"
        )
    selecting = fitting and cls.needs_validation
    shared = protocol.one_set and (protocol.fixed(cls) or selecting)
    demos = demo_set(task, protocol.shot, seed) if shared else None  # from train: refused here if too few
    per_class = protocol.drawing.per_class
    if not protocol.fixed(cls):
        source = "train" if protocol.drawing.from_train else split
        shot = protocol.eval_shot(cls)
        check_shots(task.splits[source], source, task.n_classes, shot, task.label_words, "--shot", per_class)
    if fitting and cls.needs_fit:
        fit_per_class, flag = protocol.fit_drawing(cls).per_class, "--shot" if cls.fits_at_eval_shot else "--ext-shot"
        check_shots(task.splits["train"], "train", task.n_classes, ext_shot, task.label_words, flag, fit_per_class)
    if selecting and demos is None:
        source = "train" if protocol.drawing.from_train else "validation"
        check_shots(task.splits[source], source, task.n_classes, protocol.shot, task.label_words, "--shot", per_class)
    return demos


def task_encoder(
    lm: LoadedModel,
    task: Task,
    max_example_tokens: int,
    template: Template,
    bos: str = "model",
    tokenize: str = "prompt",
) -> PromptEncoder:
    """The prompt encoder of a model and task (an open-vocabulary task's one class is its answer); its
    inputs kept as the task keeps them, its first tokens the model's BOS or the tokenizer's own, its
    text tokenized whole or piece by piece."""
    classes = task.n_classes if task.open_vocabulary else None
    add_bos: bool | str = lm.add_bos if bos == "model" else "tokenizer"
    strip = task.inputs == "stripped"
    return PromptEncoder(
        lm.tokenizer, task.label_words, add_bos, max_example_tokens, template, classes, strip, tokenize == "pieces"
    )


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
    scorer.bos = list(encoder.bos)
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
        sample_episodes(
            task.splits["train"], task.n_classes, ext_shot, episodes, seed, "train/extract", protocol.fit_drawing(cls)
        )
        if cls.needs_fit
        else []
    )
    calibrates_on_set = cls.fits_at_eval_shot and protocol.fixed(cls)  # HC under --demos fixed
    if protocol.one_set and demos is None and (cls.needs_validation or calibrates_on_set):
        demos = demo_set(task, protocol.shot, seed)
    if cls.fits_at_eval_shot:
        train = as_evaluated(train, protocol, demos if calibrates_on_set else None)
    if not cls.needs_validation:
        return train, None
    drawing = protocol.drawing
    drawn = evaluation_episodes(task, "validation", protocol.shot, select_episodes, seed, demos, "select", drawing)
    return train, in_order(drawn, protocol.demo_order)


def as_evaluated(train: list[Episode], protocol: Protocol, demos: tuple[Example, ...] | None) -> list[Episode]:
    """Calibration episodes written as the evaluated prompts are (HC): under --demos fixed every query
    gets the run's one set (a query that is one of its demonstrations is left out: it would meet
    itself), and the demonstrations take the protocol's order."""
    if demos is not None:
        inside = {d.text for d in demos}
        train = with_demos([e for e in train if e.query.text not in inside], demos)
    return in_order(train, protocol.demo_order)


def evaluation_episodes(
    task: Task,
    split: str,
    shot: int,
    n: int,
    seed: int,
    demos: tuple[Example, ...] | None,
    purpose: str = "eval",
    drawing: Drawing = PAPER,
) -> list[Episode]:
    """The episodes a run scores: episodic (drawn as `drawing` says), or (with `demos`, the --demos fixed
    set) the very same queries each with that one set."""
    stream = f"{split}/{purpose}"
    if demos is None:
        train = task.splits["train"] if drawing.from_train else None
        return sample_episodes(task.splits[split], task.n_classes, shot, n, seed, stream, drawing, train)
    queries = sample_episodes(task.splits[split], task.n_classes, 0, n, seed, stream, drawing)  # same stream
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
