"""A classification task as the methods see it: texts and integer labels per split, label words.

Hub datasets, local parquet/csv/jsonl files, StaICC's packaged datasets (ivlib/staicc.py) and
ivlib's generated tasks all go through `datasets`, so one code path is tested and the user's
offline files behave like hub data.
Splits a dataset lacks are carved from train with a fixed shuffle that does not depend on the
run's seed, so every run and method sees the same validation and test sets.
"""

from __future__ import annotations

import math
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from . import files, hub, staicc
from .builtin_tasks import BUILTIN_TASKS
from .errors import UsageError

ROLES = ("train", "validation", "test")
TEXT_FIELD_ORDER = ("question", "sentence", "sentence1", "premise", "question1", "text", "tweet")
PAIR_FIELDS = {"sentence1": "sentence2", "premise": "hypothesis", "question1": "question2"}
CARVE_SEED = 0
_LOCAL_LOADERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}


@dataclass
class Split:
    texts: list[str]
    labels: np.ndarray  # [N] int64 class indices (multiple choice: index of the correct option; open: 0)
    options: list[list[str]] | None = None  # multiple choice: each example's options
    answers: list[str] | None = None  # open vocabulary: each example's answer, any text

    def subset(self, idx: np.ndarray) -> Split:
        return Split(
            [self.texts[i] for i in idx],
            self.labels[idx],
            None if self.options is None else [self.options[i] for i in idx],
            None if self.answers is None else [self.answers[i] for i in idx],
        )

    def class_counts(self, n_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=n_classes)


@dataclass
class Task:
    name: str
    label_words: list[str]
    splits: dict[str, Split]
    provenance: dict[str, Any] = field(default_factory=dict)
    prompt: dict[str, Any] = field(default_factory=dict)  # its entry's `template` / `template_task`, if any
    inputs: str = "stripped"  # its texts as stored (verbatim) or with the whitespace around them removed

    def __post_init__(self) -> None:
        check_label_words(self.name, self.label_words)

    @property
    def multiple_choice(self) -> bool:
        return self.splits["train"].options is not None

    @property
    def open_vocabulary(self) -> bool:
        """Input -> any text (antonym, country-capital): no label set; each query has its own answer."""
        return self.splits["train"].answers is not None

    @property
    def kind(self) -> str:
        """classification, multiple_choice or open_vocabulary (what a protocol and a method accept)."""
        return (
            "multiple_choice"
            if self.multiple_choice
            else "open_vocabulary"
            if self.open_vocabulary
            else "classification"
        )

    @property
    def n_classes(self) -> int:
        """Classes; for multiple choice the most options any question has (the score width); for an
        open-vocabulary task one: each query's own answer, the one "class" it can be right about."""
        if self.multiple_choice:
            return max(len(o) for split in self.splits.values() for o in split.options or [])
        if self.open_vocabulary:
            return 1
        return len(self.label_words)


def _first_pair(values: list[str], same: Callable[[str], str]) -> tuple[str, str] | None:
    """The first two values that are one under `same`, or None."""
    first: dict[str, str] = {}
    for value in values:
        key = same(value)
        if key in first:
            return first[key], value
        first[key] = value
    return None


def check_label_words(name: str, words: list[str]) -> None:
    """Label words the model can tell apart: none empty once its whitespace is gone, and no two equal
    but for whitespace ('good' and ' good' are one answer to a reader, two to a tokenizer)."""
    blank = [w for w in words if not w.strip()]
    if blank:
        raise UsageError(f"task '{name}': label word {blank[0]!r} is empty or whitespace; accepted: a word per class")
    pair = _first_pair(words, lambda w: "".join(w.split()))
    if pair is not None:
        what = "repeat" if pair[0] == pair[1] else "differ only in whitespace:"
        raise UsageError(
            f"task '{name}': label_words {what} {pair[0]!r} and {pair[1]!r}; accepted: words that differ in more "
            "than whitespace, one per class"
        )


def _loader_for(data_files: Any) -> str:
    first = data_files if isinstance(data_files, str) else next(iter(data_files.values()))
    if isinstance(first, list):
        first = first[0]
    suffix = Path(first).suffix.lower()
    if suffix not in _LOCAL_LOADERS:
        raise UsageError(f"data file '{first}' has suffix '{suffix}'; accepted: .parquet, .csv, .json, .jsonl")
    return _LOCAL_LOADERS[suffix]


def _env_hint(spec: dict[str, Any]) -> str:
    """The environment variables the entry's paths came from, so a wrong or unset one is named."""
    used = spec.get("_env") or {}
    if not used:
        return ""
    values = ", ".join(f"{k} ({v})" for k, v in used.items())
    return f" (its path comes from {values}); accepted: set {' / '.join(used)} to the folder holding the files"


def _check_data_file(name: str, path: Path, spec: dict[str, Any]) -> None:
    """A data file that exists, is a file, and holds something (a library's traceback otherwise)."""
    if not path.exists():
        raise UsageError(f"task '{name}': data file '{path}' does not exist{_env_hint(spec)}")
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        raise UsageError(
            f"task '{name}': data file '{path}' is a directory; accepted: a file, or a list of the files in it"
        )
    if not stat.S_ISREG(mode):  # a pipe or device: its size says nothing, and reading it may never end
        raise UsageError(
            f"task '{name}': data file '{path}' is {files.kind(mode)}, not a file; accepted: a regular file"
        )
    if path.stat().st_size == 0:
        raise UsageError(f"task '{name}': data file '{path}' is empty (0 bytes); accepted: a file with examples")


def _in_memory(columns: dict[str, dict[str, list[Any]]], names: list[str]) -> Any:
    """A DatasetDict of text + ClassLabel columns, {split: {"text": [...], "label": [...]}}."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return datasets.DatasetDict({s: datasets.Dataset.from_dict(c, features=features) for s, c in columns.items()})


def _load_dataset_dict(name: str, spec: dict[str, Any]) -> Any:
    import datasets

    # `datasets` pings S3 to count every load, local parquet/csv/json included, unless the offline
    # variables were set before it was imported: a local run must not touch the network
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False

    if "builtin" in spec:
        generator = BUILTIN_TASKS.get(spec["builtin"])
        if generator is None:
            raise UsageError(
                f"task '{name}': unknown builtin '{spec['builtin']}'; accepted: {', '.join(BUILTIN_TASKS)}"
            )
        columns, names = generator()
        return _in_memory(columns, names)

    data_files = spec.get("data_files")
    if data_files is not None:
        files = [data_files] if isinstance(data_files, str) else list(data_files.values())
        for f in files:
            for p in f if isinstance(f, list) else [f]:
                _check_data_file(name, Path(p), spec)
        loader = spec.get("dataset") or _loader_for(data_files)
        if loader not in ("parquet", "csv", "json"):
            loader = _loader_for(data_files)
        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own log of a bad file would be a 2nd line
        try:
            return datasets.load_dataset(loader, data_files=data_files)
        except Exception as exc:  # pyarrow/pandas/json errors of many classes: all mean "not a readable table"
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UsageError(
                f"task '{name}': data files {files} cannot be read as {loader} ({reason}); "
                f"accepted: {loader} files with a row per example"
            ) from None
        finally:
            datasets.logging.set_verbosity(verbosity)
    if "dataset" not in spec:
        raise UsageError(f"task '{name}' has neither 'dataset', 'data_files' nor 'builtin'")
    online = hub.hub_reachable()  # offline: fail at once (or load from the cache), not after the retries
    try:
        return datasets.load_dataset(spec["dataset"], spec.get("subset"))
    except Exception as exc:  # hub errors come in many classes; all mean "cannot load this"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = (
            f"the hub ({hub.endpoint()}) cannot be reached and dataset '{spec['dataset']}' is not in the local HF cache"
            if not online
            else f"cannot load dataset '{spec['dataset']}' ({reason[:200]})"
        )
        raise UsageError(
            f"task '{name}': {where}; accepted: local data_files in the task (parquet/csv/jsonl with the same "
            f"columns, e.g. config/local.yaml), or a dataset already in the local cache ({hub.OFFLINE_HINT})"
        ) from None


def _text_columns(name: str, columns: list[str], spec: dict[str, Any]) -> list[str]:
    if "text_fields" in spec:
        fields = spec["text_fields"]
        fields = [fields] if isinstance(fields, str) else list(fields)
        missing = [f for f in fields if f not in columns]
        if missing:
            raise UsageError(f"task '{name}': text field '{missing[0]}' not in the data; columns: {', '.join(columns)}")
        return fields
    for f in TEXT_FIELD_ORDER:
        if f in columns:
            pair = PAIR_FIELDS.get(f)
            return [f, pair] if pair in columns else [f]
    raise UsageError(f"task '{name}': no text column found; set text_fields (columns: {', '.join(columns)})")


def _label_names(name: str, ds: Any, label_field: str, spec: dict[str, Any]) -> list[str]:
    feature = ds.features.get(label_field)
    if spec.get("label_names") is not None:  # null in an entry: not given
        return _checked_names(name, [str(n) for n in spec["label_names"]])
    if feature is not None and hasattr(feature, "names"):
        return _checked_names(name, list(feature.names))
    if "label_text" in ds.column_names:  # files such as shared/data: int label + its name
        columns = ds.select_columns([label_field, "label_text"]).to_dict()  # a Column iterates slowly
        pairs = sorted(
            {
                (i, str(t))
                for y, t in zip(columns[label_field], columns["label_text"])
                if (i := _as_index(y)) is not None and i >= 0
            }
        )
        names: dict[int, str] = {}
        for y, t in pairs:
            names.setdefault(y, t)
        if sorted(names) == list(range(len(names))):
            return _checked_names(name, [names[i] for i in range(len(names))])
    raise UsageError(f"task '{name}': label column '{label_field}' has no class names; set label_names in the task")


def _checked_names(name: str, names: list[str]) -> list[str]:
    """Class names as the data or the config give them, each once (a name twice makes two classes that
    a record, a confusion matrix or a label word cannot tell apart)."""
    pair = _first_pair(names, lambda n: n)
    if pair is not None:
        raise UsageError(f"task '{name}': label_names repeat {pair[0]!r}; accepted: a different name per class")
    return names


def _carve(train_n: int, missing: list[str]) -> dict[str, np.ndarray]:
    """Deterministic cut of a shuffled train: val = last 20% (or 10%/10% when test is missing too)."""
    order = np.random.default_rng(CARVE_SEED).permutation(train_n)
    if missing == ["validation"]:
        cut = int(train_n * 0.8)
        return {"train": order[:cut], "validation": order[cut:]}
    if missing == ["test"]:
        cut = int(train_n * 0.9)
        return {"train": order[:cut], "test": order[cut:]}
    a, b = int(train_n * 0.8), int(train_n * 0.9)
    return {"train": order[:a], "validation": order[a:b], "test": order[b:]}


MC_KEYS = ("options", "answer", "option_keys", "answer_base")
NO_LABEL = -1  # the hub's label of a hidden (test) example


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


INPUTS = ("stripped", "verbatim")  # how a task's input texts are kept (`--inputs`)


def _stripped(value: Any) -> str:
    return str(value).strip()


def _cleaner(inputs: str) -> Callable[[Any], str]:
    """How each text field is kept: stripped (ivlib's default), or as stored (a release that keeps a
    dataset's stored spaces writes other prompts: StaICC's SST-2 inputs end with one)."""
    return str if inputs == "verbatim" else _stripped


def _texts(
    name: str, role: str, columns: dict[str, list[Any]], text_cols: list[str], clean: Callable[[Any], str] = _stripped
) -> list[str]:
    """Each row's text fields joined; a missing one (None, NaN) is refused, not turned into "None"."""
    for column in text_cols:
        missing = [i for i, v in enumerate(columns[column]) if _missing(v)]
        if missing:
            raise UsageError(
                f"task '{name}': split '{role}' has {len(missing)} missing text(s) (None/NaN) in column '{column}', "
                f"first at row {missing[0]}; accepted: a text in every row (remove or fill those rows)"
            )
    return [" ".join(clean(v) for v in row) for row in zip(*(columns[c] for c in text_cols))]


def _as_index(value: Any) -> int | None:
    if isinstance(value, (bool, int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


def _labels(name: str, role: str, values: list[Any], names: list[str], field: str) -> np.ndarray:
    """[N] int64 class indices (or -1, no label): integers, or floats that are whole numbers (a
    column with a gap becomes float in pandas); text, None/NaN and indices outside label_names refused."""
    where = f"task '{name}': split '{role}' label column '{field}'"
    accepted = f"accepted: class indices 0..{len(names) - 1} (label_names: {', '.join(names)}), or -1 for no label"
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    array = np.asarray(values)
    if array.dtype.kind not in "iub":
        indices = [_as_index(v) for v in values]
        bad = [i for i, v in enumerate(indices) if v is None]
        if bad:
            first = values[bad[0]]
            if all(isinstance(values[i], str) for i in bad):
                what = f"{len(bad)} text label(s)"
            elif all(_missing(values[i]) for i in bad):
                what = f"{len(bad)} missing label(s) (None/NaN)"
            else:
                what = f"{len(bad)} value(s) that are not class indices"
            shown = "None/NaN" if _missing(first) else repr(first.item() if isinstance(first, np.generic) else first)
            raise UsageError(f"{where} holds {what}, first at row {bad[0]}: {shown}; {accepted}")
        array = np.asarray(indices)
    labels = array.astype(np.int64)
    outside = (labels < NO_LABEL) | (labels >= len(names))
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise UsageError(
            f"{where} has {int(outside.sum())} label(s) outside label_names, first at row {first}: {labels[first]}; "
            f"{accepted}"
        )
    return labels


def _field(row: dict[str, Any], path: str) -> Any:
    """A dotted path into nested records, e.g. `choices.text` of CommonsenseQA."""
    value: Any = row
    for part in path.split("."):
        value = value[part]
    return value


HIDDEN = "or empty / -1 for a hidden answer (dropped and counted)"


def _answer_index(where: str, answer: Any, keys: list[Any] | None, base: int, n_options: int) -> int | None:
    """The correct option's index, or None for a hidden answer (None/NaN, empty or -1, as hub test
    splits give it); an answer that names no option is refused, never dropped as if hidden."""
    if _missing(answer) or (isinstance(answer, str) and not answer.strip()):
        return None
    number = int(answer) if isinstance(answer, str) and re.fullmatch(r"\s*-?\d+\s*", answer) else None
    if not isinstance(answer, (str, bool)):
        number = _as_index(answer)
    if number == NO_LABEL and (keys is None or answer not in keys):
        return None
    if keys is not None:
        if answer in keys:
            return keys.index(answer)
        raise UsageError(f"{where}: answer {answer!r} is not one of its option keys {keys}; accepted: a key, {HIDDEN}")
    if number is None or not 0 <= number - base < n_options:
        raise UsageError(
            f"{where}: answer {answer!r} names none of its {n_options} options; accepted: "
            f"{base}..{base + n_options - 1} (answer_base {base}), {HIDDEN}"
        )
    return number - base


def _multiple_choice_split(
    name: str, ds: Any, role: str, spec: dict[str, Any], text_cols: list[str], clean: Callable[[Any], str]
) -> tuple[Split, int]:
    """Questions, their options, and the correct option's index, from the fields `spec` names."""
    mc = spec["multiple_choice"]
    if not isinstance(mc, dict) or "options" not in mc or "answer" not in mc or set(mc) - set(MC_KEYS):
        raise UsageError(
            f"task '{name}': multiple_choice must be a mapping with options and answer; "
            f"accepted keys: {', '.join(MC_KEYS)}"
        )
    base = int(mc.get("answer_base", 0))
    texts, labels, options = [], [], []
    for i, row in enumerate(ds):
        try:
            opts = (
                [str(row[f]) for f in mc["options"]]
                if isinstance(mc["options"], list)
                else [str(o) for o in _field(row, mc["options"])]
            )
            answer = _field(row, mc["answer"])
            keys = _field(row, mc["option_keys"]) if "option_keys" in mc else None
        except (KeyError, TypeError):
            raise UsageError(
                f"task '{name}': row {i} lacks a multiple_choice field ({mc}); columns: {', '.join(ds.column_names)}"
            ) from None
        where = f"task '{name}': split '{role}' row {i}"
        if len(opts) < 2:  # one option is always right: the score would say nothing
            raise UsageError(f"{where} has {len(opts)} option(s); accepted: two or more options per question")
        index = _answer_index(where, answer, None if keys is None else list(keys), base, len(opts))
        if index is None:  # hub test splits often hide the answer: dropped, and counted
            continue
        if any(_missing(row[c]) for c in text_cols):
            raise UsageError(
                f"task '{name}': split '{role}' row {i} has no text (None/NaN) in {', '.join(text_cols)}; "
                "accepted: a text in every row (remove or fill those rows)"
            )
        texts.append(" ".join(clean(row[c]) for c in text_cols))
        labels.append(index)
        options.append(opts)
    return Split(texts, np.asarray(labels, dtype=np.int64), options), len(ds) - len(texts)


PROMPT_KEYS = ("template", "template_task")  # a task entry's say in how its prompts are written


OPEN_KEYS = ("input", "output")


def _open_fields(name: str, spec: dict[str, Any], ds: Any) -> tuple[str, str]:
    """The input and output columns of an open-vocabulary task (`open_vocabulary: {input, output}`)."""
    given = spec["open_vocabulary"] or {}
    fields = (str(given.get("input", "input")), str(given.get("output", "output")))
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise UsageError(
            f"task '{name}': open_vocabulary column '{missing[0]}' not in the data; columns: {', '.join(ds.column_names)}"
        )
    return fields


def _open_split(
    name: str, ds: Any, role: str, fields: tuple[str, str], clean: Callable[[Any], str]
) -> tuple[Split, int]:
    """Inputs and their answers; a row whose input or answer is missing or empty is refused."""
    columns = ds.select_columns(list(dict.fromkeys(fields))).to_dict()
    texts, answers = columns[fields[0]], columns[fields[1]]
    for column, values in zip(fields, (texts, answers)):
        bad = [i for i, v in enumerate(values) if _missing(v) or not str(v).strip()]
        if bad:
            raise UsageError(
                f"task '{name}': split '{role}' has {len(bad)} missing or empty value(s) in column '{column}', "
                f"first at row {bad[0]}; accepted: a text in every row"
            )
    texts, answers = [clean(t) for t in texts], [str(a).strip() for a in answers]  # answers: always stripped
    return Split(texts, np.zeros(len(texts), dtype=np.int64), answers=answers), 0


def load_task(name: str, spec: dict[str, Any], inputs: str = "stripped") -> Task:
    """A registry task; `inputs` verbatim keeps its texts' stored whitespace (recorded in its provenance)."""
    if inputs not in INPUTS:
        raise UsageError(f"inputs '{inputs}' is not accepted; accepted: {', '.join(INPUTS)}")
    task = _load_any(name, spec, _cleaner(inputs))
    task.prompt = {k: spec[k] for k in PROMPT_KEYS if k in spec}
    task.inputs = inputs
    if inputs != "stripped":  # only then: earlier records' provenance stays as it was
        task.provenance["inputs"] = inputs
    return task


def _load_any(name: str, spec: dict[str, Any], clean: Callable[[Any], str]) -> Task:
    if "staicc" not in spec:
        return _load_task(name, spec, _load_dataset_dict(name, spec), clean)
    # StaICC's data: its own label words and split roles unless the entry names others
    source = staicc.load(name, spec["staicc"], spec.get("staicc_split", "original"))
    columns: dict[str, dict[str, list[Any]]] = {
        s: {"text": [t for t, _ in rows], "label": [y for _, y in rows]} for s, rows in source.splits.items()
    }
    defaults: dict[str, Any] = {"label_words": source.label_words, **({"splits": source.roles} if source.roles else {})}
    task = _load_task(name, {**defaults, **spec}, _in_memory(columns, source.class_names), clean)
    task.provenance["staicc"] = source.provenance
    return task


def _load_task(name: str, spec: dict[str, Any], dsd: Any, clean: Callable[[Any], str]) -> Task:
    explicit = dict(spec.get("splits") or {})
    # a role left to its default name must not share a split another role claims (sst2's test is
    # the hub's "validation": validation is then carved from train, never the test set itself)
    mapping = {role: role for role in ROLES if role not in explicit.values()}
    mapping.update(explicit)
    mapping.setdefault("train", "train")
    for role in mapping:
        if role not in ROLES:
            raise UsageError(f"task '{name}': unknown split role '{role}'; accepted: {', '.join(ROLES)}")
    if mapping["train"] not in dsd:
        raise UsageError(
            f"task '{name}': dataset has no split '{mapping['train']}' for train; splits: {', '.join(dsd)}"
        )
    label_field = spec.get("label_field", "label")
    train_ds = dsd[mapping["train"]]
    multiple_choice = "multiple_choice" in spec
    if multiple_choice:
        text_cols = _text_columns(name, train_ds.column_names, spec)
        return _assemble(
            name, [], dsd, mapping, partial(_multiple_choice_split, name, spec=spec, text_cols=text_cols, clean=clean)
        )
    if "open_vocabulary" in spec:
        return _assemble(
            name, [], dsd, mapping, partial(_open_split, name, fields=_open_fields(name, spec, train_ds), clean=clean)
        )
    if label_field not in train_ds.column_names:
        raise UsageError(
            f"task '{name}': label column '{label_field}' not found; columns: {', '.join(train_ds.column_names)}"
        )
    names = _label_names(name, train_ds, label_field, spec)
    given = spec.get("label_words")
    words = [str(w) for w in (names if given is None else given)]  # null in an entry: not given
    if len(words) != len(names):
        raise UsageError(f"task '{name}': {len(words)} label_words for {len(names)} classes")
    text_cols = _text_columns(name, train_ds.column_names, spec)

    def to_split(ds: Any, role: str) -> tuple[Split, int]:
        columns = ds.select_columns([*dict.fromkeys([*text_cols, label_field])]).to_dict()  # a Column iterates slowly
        texts = _texts(name, role, columns, text_cols, clean)
        labels = _labels(name, role, columns[label_field], names, label_field)
        keep = labels != NO_LABEL  # hub test splits often carry -1: dropped, and counted in the provenance
        if not keep.all():
            texts = [t for t, k in zip(texts, keep) if k]
            labels = labels[keep]
        return Split(texts, labels), int((~keep).sum())

    return _assemble(name, words, dsd, mapping, to_split)


def cross_split_duplicates(splits: dict[str, Split]) -> dict[str, int]:
    """Per pair of splits ("train/test"), how many rows of the second hold a text the first holds too:
    a test example also seen in training (as a demonstration or fitting episode) measures memory, not
    learning, and a user should see it. Pairs without any are left out."""
    texts = {role: set(split.texts) for role, split in splits.items()}
    found = {}
    for first, second in (("train", "validation"), ("train", "test"), ("validation", "test")):
        if first in splits and second in splits:
            n = sum(text in texts[first] for text in splits[second].texts)
            if n:
                found[f"{first}/{second}"] = n
    return found


def _assemble(
    name: str, words: list[str], dsd: Any, mapping: dict[str, str], to_split: Callable[[Any, str], tuple[Split, int]]
) -> Task:
    """Present splits converted, missing ones carved from train, provenance recorded (with the rows
    dropped for having no label, per split, so a record says what it was computed on)."""
    present = {role: dsd[mapping[role]] for role in ROLES if role in mapping and mapping[role] in dsd}
    missing = [role for role in ROLES if role not in present]
    provenance: dict[str, Any] = {"splits": {r: mapping[r] for r in present}}
    splits: dict[str, Split] = {}
    dropped: dict[str, int] = {}
    for role, ds in present.items():
        splits[role], n_dropped = to_split(ds, role)
        if n_dropped:
            dropped[role] = n_dropped
    if dropped:
        provenance["dropped_unlabelled"] = dropped
    if missing:
        whole = splits["train"]
        cuts = _carve(len(whole.texts), missing)
        for role, idx in cuts.items():
            splits[role] = whole.subset(idx)
        provenance["carved"] = {
            "from": mapping["train"],
            "roles": missing,
            "seed": CARVE_SEED,
            "sizes": {r: int(len(i)) for r, i in cuts.items()},
        }
    leaks = cross_split_duplicates(splits)
    if leaks:  # only when there are some: records of tasks without any stay as they were
        provenance["cross_split_duplicates"] = leaks
    for role, split in splits.items():
        if len(split.texts) == 0:
            why = f" (its {dropped[role]} rows have no label)" if dropped.get(role) else ""
            raise UsageError(f"task '{name}': split '{role}' is empty{why}; accepted: a split with labelled examples")
        empty = [i for i, t in enumerate(split.texts) if not t.strip()]
        if empty:  # an empty input makes a prompt of separators only; better fixed in the data than guessed
            raise UsageError(
                f"task '{name}': split '{role}' has {len(empty)} empty text(s), first at row {empty[0]}; "
                "accepted: non-empty text fields (remove or fill those rows)"
            )
    return Task(name=name, label_words=words, splits=splits, provenance=provenance)
