"""The Python API: ivlib's methods on a model and tokenizer already in memory.

It follows the transformers / steering-vectors shape: wrap what you loaded, fit a method, and
steer the model's own `model(...)` / `model.generate(...)` inside a `with` block. Everything
runs through the same pieces as the CLI (`ivlib.experiment`): the same episode streams, the same
fit, the same metrics and the same state files, so an API run and a CLI run of the same settings
agree exactly, and a file saved by one loads in the other.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import budget, experiment, record, runspec, templates
from .arguments import FLAG, METHOD, MODEL, NAME, PATH, SPLIT, TASK, WORDS, checked, kind, optional, setting
from .batching import NonFinite
from .config import load_config, lookup
from .episodes import Episode, Example, check_shots, in_order
from .episodes import sample_episodes as _sample
from .errors import UsageError
from .hooks import steering
from .layout import discover_layout
from .methods import METHODS, Method, get_method
from .models import LoadedModel
from .prompts import EncodedPrompt, PromptBatch, PromptEncoder, collate
from .protocol import Protocol
from .scoring import Scorer
from .state import check_save_path, checked_fit, load_state, read_meta, save_state
from .tasks import ROLES, Split, Task, _carve
from .tasks import load_task as _load_task_entry
from .templates import Template

_P = experiment.PROTOCOL_BY_NAME  # the protocol's declared settings: their defaults and checks are the CLI's
DEFAULT_STREAMS = {"train": "extract", "validation": "eval", "test": "eval"}
STREAMS = ("extract", "eval", "select")


def _is_module(value: Any) -> bool:
    return isinstance(value, torch.nn.Module) and hasattr(value, "get_input_embeddings")


def _is_tokenizer(value: Any) -> bool:
    from transformers import PreTrainedTokenizerBase

    return isinstance(value, PreTrainedTokenizerBase)


def _is_layout(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _is_prompts(value: Any) -> bool:
    listed = [value] if isinstance(value, EncodedPrompt) else value
    return isinstance(listed, Sequence) and all(isinstance(p, EncodedPrompt) for p in listed)


def _is_configs(value: Any) -> bool:
    listed = value if isinstance(value, (list, tuple)) else [value]
    return all(isinstance(v, (str, os.PathLike)) for v in listed)


def _configs(value: Any) -> str | list[str]:
    return [os.fspath(v) for v in value] if isinstance(value, (list, tuple)) else os.fspath(value)


# what the public functions' arguments accept: the run settings are the CLI's own declarations
RUN = {name: setting(_P[name]) for name in ("ext_shot", "episodes", "select_episodes", "seed", "max_example_tokens")}
BATCH, SHOT, N = setting(_P["batch_size"]), setting(_P["shot"]), setting(_P["eval_episodes"])
TORCH_MODEL = kind("a transformers model (torch.nn.Module with input embeddings)", _is_module)
TOKENIZER = kind("a transformers tokenizer", _is_tokenizer)
LAYOUT = optional(kind("{blocks: NAME, attn_out: NAME, mlp_out: NAME} (module names as strings)", _is_layout))
BOS = kind(
    "'auto', True or False",
    lambda v: v in ("auto", True, False) and not isinstance(v, (int, float)) or isinstance(v, bool),
)
PROMPTS = kind("an EncodedPrompt (ivlib.encode) or a list of them", _is_prompts)
CONFIGS = optional(kind("a YAML path (str or pathlib.Path) or a list of them", _is_configs, _configs))
STREAM = optional(kind(f"one of {', '.join(STREAMS)}", lambda v: v in STREAMS))
BUILT = kind("a fitted Method (ivlib.fit or ivlib.load)", lambda v: isinstance(v, Method))
TEMPLATE = optional(kind("a template name, a YAML path or an ivlib.Template", lambda v: isinstance(v, (str, Template))))
PROTOCOL = optional(kind("an ivlib.Protocol (ivlib.protocol_for(task, ...))", lambda v: isinstance(v, Protocol)))
ARCH = kind(
    "a tiny architecture: " + ", ".join(__import__("ivlib.tiny", fromlist=["TINY_ARCHS"]).TINY_ARCHS),
    lambda v: v in __import__("ivlib.tiny", fromlist=["TINY_ARCHS"]).TINY_ARCHS,
)


# ---- models -----------------------------------------------------------------------------------
@checked(arch=ARCH, seed=RUN["seed"])
def tiny_model(arch: str = "llama", seed: int = 0) -> tuple[Any, Any]:
    """A tiny random (model, tokenizer) of a supported family (`ivlib.tiny.TINY_ARCHS`) whose
    tokenizer knows the built-in task's words: for trying the API, and for tests, without a download."""
    from .builtin_tasks import vocabulary
    from .tiny import build_tiny

    return build_tiny(arch, vocabulary(), seed)


@checked(model=TORCH_MODEL, tokenizer=TOKENIZER, name=NAME, add_bos=BOS, layout=LAYOUT)
def wrap(
    model: Any,
    tokenizer: Any,
    name: str = "model",
    add_bos: bool | str = "auto",
    layout: dict[str, str] | None = None,
) -> LoadedModel:
    """A model and tokenizer already in memory, as ivlib's methods use them.

    `name` is what state files record (a file loads only for the same name: give the CLI's registry
    name to share files with it); `add_bos`: "auto" (if the tokenizer has a BOS token), True or
    False; `layout`: module names when discovery fails ({blocks: ..., attn_out: ...}, as in a
    registry entry). The device and dtype are read from the model; the model is put in eval mode
    and a tokenizer without a pad token gets one, as the CLI does.
    """
    model.eval()
    found = discover_layout(model, layout)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
    bos = tokenizer.bos_token_id is not None if add_bos == "auto" else bool(add_bos)
    weight = model.get_input_embeddings().weight
    return LoadedModel(name, model, tokenizer, found, weight.device, weight.dtype, "in-memory", bos)


# ---- tasks ------------------------------------------------------------------------------------
@checked(name=NAME, config=CONFIGS, inputs=setting(_P["inputs"]))
def load_task(name: str, config: str | Sequence[str] | None = None, inputs: str = _P["inputs"].default) -> Task:
    """A task of the registry (`ivlib/base.yaml`, with the YAML file `config`, or several files in
    order, merged over it); `inputs` "verbatim" keeps its texts' stored whitespace (= --inputs), and
    a protocol built for it by `protocol_for` takes that from the task."""
    return _load_task_entry(name, lookup(load_config(config).tasks, "task", name), inputs)


@checked(label_words=WORDS, name=NAME, inputs=setting(_P["inputs"]))
def task_from_lists(
    label_words: Sequence[str],
    train: tuple[Sequence[str], Sequence[int | str]],
    validation: tuple[Sequence[str], Sequence[int | str]] | None = None,
    test: tuple[Sequence[str], Sequence[int | str]] | None = None,
    name: str = "custom",
    inputs: str = _P["inputs"].default,
) -> Task:
    """A classification task from (texts, labels) per split; labels are class indices or label words.
    Texts are stripped as a registry task's are, or kept as given with `inputs="verbatim"`.

    Splits not given are carved from train as the registry's tasks are (validation: the last 20% of
    a fixed shuffle; both missing: 10% each).
    """
    words = list(label_words)
    if len(words) < 2 or not all(isinstance(w, str) and w.strip() for w in words):
        raise UsageError(f"label_words {words!r}: accepted: two or more non-empty strings")
    if len(set(words)) != len(words):
        raise UsageError(f"label_words {words!r} repeat a word; accepted: distinct words")
    given = {"train": train, "validation": validation, "test": test}
    splits: dict[str, Split] = {}
    for role in ROLES:
        if given[role] is not None:
            splits[role] = _split_from_lists(role, given[role], words, inputs)
    missing = [role for role in ROLES if role not in splits]
    carved: dict[str, Any] = {}
    if missing:
        cuts = _carve(len(splits["train"].texts), missing)
        whole = splits["train"]
        for role, idx in cuts.items():
            splits[role] = whole.subset(idx)
        carved = {
            "carved": {"from": "train", "roles": missing, "seed": 0, "sizes": {r: len(i) for r, i in cuts.items()}}
        }
    for role, split in splits.items():
        if len(split.texts) == 0:
            raise UsageError(f"task '{name}': split '{role}' is empty (too few training examples to carve it)")
    task = Task(
        name, words, splits, {"source": "lists", **carved, **({"inputs": inputs} if inputs != "stripped" else {})}
    )
    task.inputs = inputs
    return task


def _split_from_lists(role: str, pair: Any, words: list[str], inputs: str) -> Split:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise UsageError(f"{role}: accepted: a pair (texts, labels)")
    if isinstance(pair[0], (str, bytes)) or isinstance(pair[1], (str, bytes)):
        raise UsageError(f"{role}: (texts, labels) given a string; accepted: two lists, e.g. (['a film'], ['good'])")
    texts, labels = list(pair[0]), list(pair[1])
    if len(texts) != len(labels):
        raise UsageError(f"{role}: {len(texts)} texts but {len(labels)} labels; accepted: one label per text")
    if not texts:
        raise UsageError(f"{role}: no examples")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise UsageError(f"{role}: text {i} is empty or not a string; accepted: non-empty strings")
    index = [_label_index(role, i, label, words) for i, label in enumerate(labels)]
    kept = texts if inputs == "verbatim" else [t.strip() for t in texts]  # as a registry task's texts are
    return Split(kept, np.array(index, dtype=np.int64))


def _label_index(role: str, i: int, label: Any, words: list[str]) -> int:
    """A given label (a label word, or its index) as its index, checked."""
    if isinstance(label, str):
        if label not in words:
            raise UsageError(f"{role}: label {i} '{label}' is not a label word; accepted: {', '.join(words)}")
        return words.index(label)
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= label < len(words):
        return int(label)
    raise UsageError(f"{role}: label {i} {label!r} is out of range; accepted: 0..{len(words) - 1} or a label word")


# ---- episodes and prompts -----------------------------------------------------------------------
@checked(task=TASK, split=SPLIT, shot=SHOT, n=N, seed=RUN["seed"], stream=STREAM)
def sample_episodes(
    task: Task, split: str = "train", shot: int = 1, n: int = 200, seed: int = 42, stream: str | None = None
) -> list[Episode]:
    """`n` episodes of `shot` demonstrations per class from `split`, drawn as the CLI draws them.

    `stream` names the purpose: "extract" (what fitting uses, train's default), "eval" (what
    evaluation uses, validation's and test's default) or "select" (validation episodes a method
    selects on); the same (seed, split, stream) gives the same queries as a CLI run.
    """
    if split not in task.splits:
        raise UsageError(f"split '{split}' is not in task '{task.name}'; accepted: {', '.join(task.splits)}")
    purpose = stream or DEFAULT_STREAMS.get(split, "eval")
    check_shots(task.splits[split], split, task.n_classes, shot, task.label_words, "shot")
    return _sample(task.splits[split], task.n_classes, shot, n, seed, f"{split}/{purpose}")


@checked(
    lm=MODEL,
    task=TASK,
    max_example_tokens=RUN["max_example_tokens"],
    template=TEMPLATE,
    bos=setting(_P["bos"]),
    tokenize=setting(_P["tokenize"]),
)
def encoder(
    lm: LoadedModel,
    task: Task,
    max_example_tokens: int = _P["max_example_tokens"].default,
    template: str | Template | None = None,
    bos: str = _P["bos"].default,
    tokenize: str = _P["tokenize"].default,
) -> PromptEncoder:
    """The prompt encoder of a model and task (template, BOS, truncation, the labels' tokens); `template`,
    `bos` and `tokenize` as `ivlib.protocol_for` takes them (default: the task entry's template, else IV's;
    the model's BOS; the prompt tokenized whole); the inputs are kept as the task keeps them."""
    written = template if isinstance(template, Template) else templates.resolve(template, task.prompt, task.name)
    checked = _P["max_example_tokens"].check(max_example_tokens)
    return experiment.task_encoder(lm, task, checked, written, bos, tokenize)


@checked(lm=MODEL, task=TASK, max_example_tokens=RUN["max_example_tokens"])
def encode(
    lm: LoadedModel,
    task: Task,
    demos: Sequence[tuple[str, int | str]] = (),
    query: str | tuple[str, int | str] = "",
    max_example_tokens: int = _P["max_example_tokens"].default,
) -> EncodedPrompt:
    """One prompt as ivlib writes it: demonstrations (text, label index or word), then the query's text
    ending in its separator. `.ids` are its token ids; its separators are where IV edits."""
    words = task.label_words

    def label_of(value: Any) -> int:
        if isinstance(value, str) and value in words:
            return words.index(value)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(words):
            return int(value)
        raise UsageError(f"label {value!r} is not accepted; accepted: 0..{len(words) - 1} or a label word")

    def pair(value: Any, what: str) -> tuple[str, int]:
        if not (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], str)):
            raise UsageError(f"{what} {value!r} is not accepted; accepted: a pair (text, label index or word)")
        return value[0], label_of(value[1])

    if isinstance(demos, (str, bytes)) or not isinstance(demos, Sequence):
        raise UsageError(f"demos {demos!r} is not accepted; accepted: a list of (text, label) pairs")
    text, label = (query, -1) if isinstance(query, str) else pair(query, "query")
    if not text.strip():
        raise UsageError("query is empty; accepted: a non-empty text")
    shown = [pair(d, "demonstration") for d in demos]
    episode = Episode(tuple(Example(t, y) for t, y in shown), Example(text, label))
    return encoder(lm, task, max_example_tokens).encode(episode)


@checked(lm=MODEL, prompts=PROMPTS)
def batch(lm: LoadedModel, prompts: EncodedPrompt | Sequence[EncodedPrompt]) -> PromptBatch:
    """Prompts left-padded into one batch on the model's device (`input_ids`, `attention_mask` for
    `model(...)` or `model.generate(...)`)."""
    listed = [prompts] if isinstance(prompts, EncodedPrompt) else list(prompts)
    if not listed:
        raise UsageError("no prompts given")
    return collate(listed, lm.tokenizer.pad_token_id).to(lm.device)


# ---- methods ----------------------------------------------------------------------------------
def _build(method: Method | str, settings: dict[str, Any], seed: int) -> Method:
    """A method from a name and settings; a built one is used as is, or copied with other evaluation
    settings (e.g. IV's strength: several values share one fit, as on the command line)."""
    if isinstance(method, Method):
        if not settings:
            return method
        evaluated = {s.name: s for s in type(method).eval_settings()}
        other = sorted(k for k in settings if k not in evaluated)
        if other:
            raise UsageError(
                f"setting '{other[0]}' given with a built method; accepted there: its evaluation settings "
                f"({', '.join(evaluated) or 'none'}), or a method name with any of its settings"
            )
        return method.with_settings(**settings)
    if not isinstance(method, str):
        raise UsageError(f"method {method!r}: accepted: a method name or a Method instance")
    cls = get_method(method)
    try:
        return cls.from_settings(settings, seed)
    except TypeError as exc:
        raise UsageError(str(exc)) from None


def _scorer(
    lm: LoadedModel, task: Task, enc: PromptEncoder, batch_size: int | str, progress: bool, protocol: Protocol
) -> Scorer:
    return experiment.make_scorer(lm, task, enc, _P["batch_size"].check(batch_size), not progress, protocol)


@checked(task=TASK)
def protocol_for(
    task: Task,
    *,
    shot: int = _P["shot"].default,
    demos: str = _P["demos"].default,
    demo_order: str = _P["demo_order"].default,
    demo_draw: str = _P["demo_draw"].default,
    demo_source: str = _P["demo_source"].default,
    queries: str = _P["queries"].default,
    template: str | Template | None = None,
    inputs: str | None = None,
    bos: str = _P["bos"].default,
    tokenize: str = _P["tokenize"].default,
    score: str | None = None,
    metric: str = _P["metric"].default,
    max_new_tokens: int | None = None,
) -> Protocol:
    """How the task's queries are posed and judged, checked as the CLI checks its flags: `shot`
    (= --shot), `demos` ("episodic" or "fixed"), `demo_order` ("shuffled" or "class"), `template` (a
    built-in name, a family such as "dt", a YAML file or a `Template`; default: the task entry's, else
    IV's), `score` (first-token, full, full-mean, vocab, generate; default: the task kind's own),
    `metric` (what a method selecting on validation maximises: macro or accuracy); how episodes are drawn:
    `demo_draw` ("per-class" or "any"), `demo_source` ("split" or "train"), `queries` ("random" or "each"),
    StaICC's being any, train, each; how prompts become tokens: `inputs` (default: as the task was loaded,
    `load_task(..., inputs=)`), `bos` ("model" or "tokenizer"), `tokenize` ("prompt", or "pieces" as the IV
    release's Verbalizer tokenizes). `fit` and `evaluate` take these through
    `protocol=`."""
    return Protocol.build(
        shot=shot,
        demos=demos,
        demo_order=demo_order,
        demo_draw=demo_draw,
        demo_source=demo_source,
        queries=queries,
        template=template,
        inputs=task.inputs if inputs is None else inputs,
        bos=bos,
        tokenize=tokenize,
        score=score,
        metric=metric,
        max_new_tokens=max_new_tokens,
        task=task.name,
        task_entry=task.prompt,
    )


def _posed(given: Protocol | None, task: Task, **values: Any) -> Protocol:
    """The protocol given, or one built from the protocol arguments (never both)."""
    if given is None:
        return protocol_for(task, **values)
    if not isinstance(given, Protocol):
        raise UsageError(f"protocol {given!r}: accepted: an ivlib.Protocol (ivlib.protocol_for(task, ...))")
    changed = sorted(k for k, v in values.items() if v != PROTOCOL_DEFAULTS[k])
    if changed:
        raise UsageError(f"protocol given with {changed[0]}= as well; accepted: one of the two")
    return given


PROTOCOL_DEFAULTS: dict[str, Any] = {
    "shot": _P["shot"].default,
    "demos": _P["demos"].default,
    "demo_order": _P["demo_order"].default,
    "template": None,
    "score": None,
    "metric": _P["metric"].default,
    "max_new_tokens": None,
}


@checked(method=METHOD, lm=MODEL, task=TASK, batch_size=BATCH, shot=SHOT, progress=FLAG, protocol=PROTOCOL, **RUN)
def fit(
    method: Method | str,
    lm: LoadedModel,
    task: Task,
    *,
    ext_shot: int = _P["ext_shot"].default,
    episodes: int = _P["episodes"].default,
    shot: int = _P["shot"].default,
    select_episodes: int = _P["select_episodes"].default,
    seed: int = _P["seed"].default,
    batch_size: int | str = _P["batch_size"].default,
    max_example_tokens: int = _P["max_example_tokens"].default,
    demos: str = _P["demos"].default,
    demo_order: str = _P["demo_order"].default,
    template: str | Template | None = None,
    score: str | None = None,
    metric: str = _P["metric"].default,
    protocol: Protocol | None = None,
    progress: bool = False,
    **settings: Any,
) -> Method:
    """Fit a method (a `Method`, or a name and its settings) on the task's train split, as the CLI does.

    The arguments mean what the CLI's flags mean (`ext_shot` = -s, `episodes` = -e, `select_episodes`
    for methods that select on validation); the protocol (`shot`, `demos`, `demo_order`, `template`,
    `score`, `metric`, or a whole `protocol` from `ivlib.protocol_for`) is the one the method will be
    evaluated under: its selection prompts are written and judged that way, and its fitted state
    records it. The fitted method is returned, with `fit_info` (what a record's `fit` says) set. A
    method built by name takes `seed` as the CLI's does (FV: which labels its trials shuffle); a built
    one keeps its own.
    """
    given = (("ext_shot", ext_shot), ("episodes", episodes), ("select_episodes", select_episodes), ("seed", seed))
    values = {k: _P[k].check(v) for k, v in (*given, ("max_example_tokens", max_example_tokens))}
    posed = _posed(
        protocol, task, shot=shot, demos=demos, demo_order=demo_order, template=template, score=score, metric=metric
    )
    built = _build(method, settings, values["seed"])
    cls = type(built)
    runspec.check_method_task(cls, task)
    posed.check(cls, task.kind, METHODS)
    if cls.needs_fit and not cls.fits_at_eval_shot and values["ext_shot"] < 1:  # HC's is `shot`
        raise UsageError(f"ext_shot {ext_shot} is out of range; accepted: an integer >= 1")
    values["ext_shot"] = posed.fit_shot(cls, values["ext_shot"])  # HC: the evaluation's --shot
    _fit_built(built, lm, task, posed, values, (batch_size, progress))
    return built


def _fit_built(
    built: Method, lm: LoadedModel, task: Task, posed: Protocol, values: dict[str, Any], running: tuple[int | str, bool]
) -> None:
    """Fit a checked method as the CLI's fit step does (`running`: the batch size and whether to show
    progress); its `fit_budget` and `fit_info` set."""
    cls = type(built)
    fitting = cls.needs_fit or cls.needs_validation
    demo_set = experiment.check_data(task, cls, posed, "validation", values["seed"], fitting, values["ext_shot"])
    enc = encoder(lm, task, values["max_example_tokens"], posed.template, posed.bos, posed.tokenize)
    scorer = _scorer(lm, task, enc, *running, posed)
    train, select = experiment.fit_episodes(
        task, cls, posed, values["ext_shot"], values["episodes"], values["select_episodes"], values["seed"], demo_set
    )
    checked = select or train  # a method refuses what it cannot run before any compute, as in the CLI
    if checked:
        built.check_prompts(scorer, [enc.encode(e) for e in checked])
    with budget.counting(lm.model) as count, _advised(cls):
        if fitting:
            built.fit(scorer, enc, train, select)
    built.fit_budget = (
        experiment.fit_budget(built, train, select, count.tokens) if fitting else dict(experiment.NO_FIT_BUDGET)
    )
    built.fit_info = experiment.fit_info(
        built,
        posed,
        task,
        values["ext_shot"],
        values["episodes"],
        values["select_episodes"],
        values["seed"],
        values["max_example_tokens"],
    )


@dataclass
class Evaluation:
    """One evaluation: `metrics` as a CLI record's (point values and bootstrap intervals), and per
    episode the chosen answer (n_classes: none of them, under vocab and generate), the true one and the
    answer scores [N, W] (the rule's rows, see `ivlib.rules`)."""

    metrics: dict[str, Any]
    predictions: np.ndarray
    labels: np.ndarray
    scores: torch.Tensor
    episodes: list[Episode] = field(repr=False, default_factory=list)
    budget: dict[str, Any] = field(default_factory=dict)  # what the fit and each query consumed (a record's)


@checked(
    method=METHOD,
    lm=MODEL,
    task=TASK,
    split=SPLIT,
    shot=SHOT,
    n=N,
    seed=RUN["seed"],
    batch_size=BATCH,
    max_example_tokens=optional(RUN["max_example_tokens"]),
    progress=FLAG,
    protocol=PROTOCOL,
)
def evaluate(
    method: Method | str,
    lm: LoadedModel,
    task: Task,
    split: str = "validation",
    shot: int = _P["shot"].default,
    n: int = _P["eval_episodes"].default,
    seed: int = _P["seed"].default,
    *,
    batch_size: int | str = _P["batch_size"].default,
    max_example_tokens: int | None = None,
    demos: str = _P["demos"].default,
    demo_order: str = _P["demo_order"].default,
    template: str | Template | None = None,
    score: str | None = None,
    max_new_tokens: int | None = None,
    protocol: Protocol | None = None,
    progress: bool = False,
    **settings: Any,
) -> Evaluation:
    """Score `n` episodes of `split` with a fitted method (or a method that fits nothing, e.g. "icl").

    The episodes and metrics are the CLI's for the same seed, split, n and protocol (`shot`, `demos`:
    "fixed" scores every query with one demonstration set, its prefix encoded once; `demo_order`;
    `template`; `score`; or a whole `protocol`). `max_example_tokens` defaults to the one the method
    was fitted with (else the CLI's default).
    """
    built = _build(method, settings, seed)
    if split not in task.splits:
        raise UsageError(f"split '{split}' is not in task '{task.name}'; accepted: {', '.join(task.splits)}")
    posed = _posed(
        protocol,
        task,
        shot=shot,
        demos=demos,
        demo_order=demo_order,
        template=template,
        score=score,
        max_new_tokens=max_new_tokens,
    )
    _check_evaluable(built, task, posed)
    if max_example_tokens is None:  # the fit's
        max_example_tokens = (built.fit_info or {}).get("max_example_tokens", _P["max_example_tokens"].default)
    seed, n = _P["seed"].check(seed), _P["eval_episodes"].check(n)
    return _evaluate_built(built, lm, task, posed, (split, n, seed), max_example_tokens, (batch_size, progress))


def _check_evaluable(built: Method, task: Task, posed: Protocol) -> None:
    """Refuse, before anything is drawn, a method that cannot run on this task under this protocol, or is not fitted."""
    cls = type(built)
    runspec.check_method_task(cls, task)
    posed.check(cls, task.kind, METHODS)
    if not _fitted(built):
        raise UsageError(f"method '{cls.name}' is not fitted; call ivlib.fit or ivlib.load first")
    _check_fitted_protocol(built, task, posed)


def _check_fitted_protocol(built: Method, task: Task, posed: Protocol) -> None:
    """A fitted method is evaluated under the protocol it was fitted under, as the CLI's --load-vectors
    requires: a state learned from other prompts (or HC's centroids of other shots) would score
    prompts it never saw, and the result would name a protocol it did not run."""
    info, cls = built.fit_info or {}, type(built)
    selected = {k: v for k, v in info.items() if k != "metric"}  # what selection maximised: evaluation is the same
    clash = runspec.protocol_clash(selected, posed.fit_fields(cls, task.kind)) if info else None
    if clash:
        flag, was, now = clash
        name = flag.removeprefix("--").replace("-", "_")
        raise UsageError(
            f"method '{cls.name}' was fitted with {name}={was!r}; this evaluation has {now!r}; "
            f"accepted: protocol=ivlib.protocol_for(task, {name}={was!r})"
        )
    shot = posed.eval_shot(cls)
    if cls.fits_at_eval_shot and info.get("ext_shot", shot) != shot:
        raise UsageError(
            f"method '{cls.name}' was calibrated on {info['ext_shot']}-shot prompts and this evaluation has "
            f"{shot}-shot ones; accepted: shot={info['ext_shot']}"
        )


def _evaluate_built(
    built: Method,
    lm: LoadedModel,
    task: Task,
    posed: Protocol,
    drawing: tuple[str, int, int],
    max_example_tokens: int,
    running: tuple[int | str, bool],
) -> Evaluation:
    """Score a checked, fitted method as the CLI's evaluation does (`drawing`: split, n and seed;
    `running`: the batch size and whether to show progress)."""
    cls, (split, n, seed) = type(built), drawing
    demo_set = experiment.check_data(task, cls, posed, split, seed, False, 0)
    shot = posed.eval_shot(cls)
    drawn = experiment.evaluation_episodes(task, split, shot, n, seed, demo_set, "eval", posed.drawing)
    episodes = in_order(drawn, posed.demo_order)
    enc = encoder(lm, task, max_example_tokens, posed.template, posed.bos, posed.tokenize)
    scorer = _scorer(lm, task, enc, *running, posed)
    prompts = [enc.encode(e) for e in episodes]
    built.check_prompts(scorer, prompts)
    with budget.counting(lm.model) as count, _advised(cls):
        scores = experiment.score_prompts(built, scorer, prompts, f"{cls.name} eval ({split})", posed.fixed(cls))
    labels = np.array([p.label for p in prompts])
    predictions = scorer.predictions(scores, prompts)
    metrics = record.score_metrics(task, labels, predictions, scores, seed, scorer, prompts)
    spent = {**(built.fit_budget or experiment.NO_FIT_BUDGET), **experiment.eval_budget(episodes, count.tokens)}
    return Evaluation(metrics, predictions, labels, scores, episodes, spent)


@contextmanager
def _advised(cls: type[Method]) -> Iterator[None]:
    """An overflow's advice naming this method's own settings (as the CLI's does)."""
    try:
        yield
    except NonFinite as exc:
        raise exc.advised(cls.scaling_flags()) from None


def _fitted(method: Method) -> bool:
    """Whether a method can predict: one with state has it (fitted or loaded), others need no check."""
    if not type(method).has_state or method.fit_info is not None:
        return True
    try:
        state = method.state()
    except (AssertionError, AttributeError, TypeError):
        return False
    return bool(state) and all(v is not None for v in state.values())


# ---- fitted state -------------------------------------------------------------------------------
@checked(method=BUILT, path=PATH, lm=MODEL, task=TASK)
def save(method: Method, path: str, lm: LoadedModel, task: Task) -> None:
    """Write a fitted method's state as the CLI's --save-vectors does (the CLI's --load-vectors reads it)."""
    cls = type(method)
    if not cls.has_state:
        raise UsageError(f"method '{cls.name}' has no fitted state to save")
    info = getattr(method, "fit_info", None)
    if info is None:
        raise UsageError(f"method '{cls.name}' is not fitted; call ivlib.fit first")
    check_save_path(path)
    spent = method.fit_budget or experiment.UNKNOWN_FIT_BUDGET
    save_state(
        path, method.state(), {**experiment.state_identity(cls.name, lm.name, task, lm), "fit": info, "budget": spent}
    )


@checked(path=PATH, lm=MODEL, task=TASK)
def load(path: str, lm: LoadedModel, task: Task, **settings: Any) -> Method:
    """A method rebuilt from a state file (the API's or the CLI's --save-vectors), checked against the
    model and task; its fitting settings are the file's, evaluation settings (IV's strength) may be given."""
    meta = read_meta(path)
    name = meta.get("method")
    if not isinstance(name, str):
        raise UsageError(f"state file '{path}' names no method")
    cls = get_method(name)
    info = checked_fit(path, meta, (*cls.fit_settings(), _P["seed"]))  # as flags are checked
    fitted = {s.name: info[s.name] for s in cls.fit_settings() if s.name in info}
    clash = sorted(k for k in settings if k in fitted and settings[k] != fitted[k])
    if clash:
        raise UsageError(
            f"state file '{path}' was fitted with {clash[0]}={fitted[clash[0]]}; "
            f"given {settings[clash[0]]}; accepted: the same value, or leave it out"
        )
    method = _build(name, {**fitted, **settings}, int(info.get("seed", _P["seed"].default)))
    tensors, meta = load_state(path, experiment.state_identity(name, lm.name, task, lm))
    method.restore(path, tensors, lm.layout, task.n_classes)
    method.fit_info = meta.get("fit") or {}
    saved = meta.get("budget")
    method.fit_budget = dict(saved) if isinstance(saved, dict) else dict(experiment.UNKNOWN_FIT_BUDGET)
    return method


# ---- steering -----------------------------------------------------------------------------------
@checked(method=METHOD, lm=MODEL, every_position=FLAG)
@contextmanager
def steer(
    method: Method,
    lm: LoadedModel,
    prompt: EncodedPrompt | Sequence[EncodedPrompt] | PromptBatch | None = None,
    every_position: bool = False,
    **settings: Any,
) -> Iterator[PromptBatch | None]:
    """Inside the block, `lm.model(...)` and `lm.model.generate(...)` are steered by a fitted method.

    With `prompt` (from `ivlib.encode`; several are left-padded as `ivlib.batch` does), the method
    edits what its `predict` edits, at that prompt's positions: IV at its separators, TV and FV at
    the query's separator (the last token), SV the first L attention outputs there. Pass the
    yielded batch's `input_ids` (and `attention_mask`) to the model. The positions are absolute in
    the sequence, so under `generate` they are edited in the prefill only, not in the decoding
    steps. With `every_position=True` instead, a steady vector is added at every position of every
    forward, prompt and generated tokens alike (IV: its query-slot vector, FV: its vector; TV and
    SV replace activations and have none). Evaluation settings may be given for this block (IV: `strength=`). The hooks are removed
    on exit, also when the block raises.
    """
    method = _build(method, settings, _P["seed"].default)
    _check_steering(method, prompt is not None, every_position)
    if prompt is None:
        empty = torch.empty(0, dtype=torch.long, device=lm.device)
        edits = method.edit(lm, _no_positions(lm, empty))
    else:
        prompts = prompt if isinstance(prompt, PromptBatch) else batch(lm, prompt)
        edits = method.edit(lm, prompts)
    rows = None if prompt is None else int(prompts.input_ids.shape[0])
    with steering(lm.model, edits, positions=not every_position, every_position=every_position, n_rows=rows):
        yield None if prompt is None else prompts


def _check_steering(method: Method, prompted: bool, every_position: bool) -> None:
    """Refuse, by the method's declared `steers`, a way of steering it cannot do; then an unfitted method."""
    cls, name = type(method), method.name
    if not cls.steers:
        raise UsageError(f"method '{name}' does not steer activations; accepted: {_steering()}")
    if every_position and prompted:
        raise UsageError("every_position adds at every position and edits no prompt positions; give no prompt")
    if not every_position and not prompted:
        raise UsageError("steer needs a prompt (ivlib.encode) to edit its positions, or every_position=True")
    if every_position and "every_position" not in cls.steers:
        raise UsageError(
            f"method '{name}' steers only at a prompt's positions (it has no vector to add at every "
            f"position); accepted with every_position: {_steering('every_position')}"
        )
    if prompted and "prompt" not in cls.steers:
        raise UsageError(f"method '{name}' steers at every position only; accepted: every_position=True and no prompt")
    if not _fitted(method):
        raise UsageError(f"method '{name}' is not fitted; call ivlib.fit or ivlib.load first")


def _steering(how: str | None = None) -> str:
    """The registered methods that can steer so (their declared `steers`; any way, without `how`), for a
    refusal's message."""
    return ", ".join(name for name, cls in METHODS.items() if cls.steers and (how is None or how in cls.steers))


def _no_positions(lm: LoadedModel, empty: torch.Tensor) -> PromptBatch:
    """A batch of no rows: a method's edit built from it has no positions, only its steady vectors."""
    none = torch.empty(0, 0, dtype=torch.long, device=lm.device)
    return PromptBatch(none, none, none, empty, empty, empty, empty, empty, empty)
