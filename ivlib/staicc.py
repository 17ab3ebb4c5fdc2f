"""StaICC's ten classification datasets as ivlib tasks, read offline from the installed package.

StaICC (PyPI `StaICC`, a standard in-context classification benchmark) ships its datasets inside
its wheel, so a machine without the hub still has ten real tasks. ivlib finds the package's
folder and reads the files itself, never importing the package (its import loads its whole
toolkit) and never with `pickle.load`: the files are pickles, and a general unpickler runs any
callable a file names. The reader here admits no Python object at all, only the containers,
strings and numbers pickle builds by itself, and then checks the rows' shape.

Each file holds one dataset after StaICC dropped texts over 1024 characters and shuffled the rest
with its own generator (a linear congruential generator, seed 42; `StaICC/util/stable_random.py`).
That shuffle depends on the number of rows only, so it is undone exactly: rows come back in the
order of the hub dataset StaICC built the file from, and where StaICC concatenated several hub
splits (TREC, AG News, TweetEval emotion) and dropped nothing, those splits come back too.
`staicc_split: benchmark` gives instead StaICC's own calibration / demonstration / test split
(its protocol), as train = demonstration, validation = calibration, test = test.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from .errors import UsageError

PACKAGE = "StaICC"
INSTALL = "pip install 'ivlib[staicc]'"
DATA_FOLDER = "cached_dataset"
MAX_FILE_BYTES = 64 * 2**20  # StaICC 0.1.1's largest file (AG News) is 31.6 MB
SplitMode = Literal["original", "benchmark"]
SPLIT_MODES: tuple[str, ...] = get_args(SplitMode)

# StaICC's generator: x <- (A x + B) mod C from its fixed seed; each draw is x / C in [0, 1)
LCG_A, LCG_B, LCG_C, LCG_SEED = 1664525, 1013904223, 2**32, 42


@dataclass(frozen=True)
class StaiccDataset:
    file: str  # the file's stem in StaICC/cached_dataset/
    origin: str  # the hub dataset StaICC built the file from (for the provenance)
    parts: tuple[tuple[str, int], ...]  # the hub splits StaICC concatenated, in order, with their rows
    class_names: tuple[str, ...]  # the classes, in the order of the file's integer labels
    label_words: tuple[str, ...]  # StaICC's own label words (its default label space)
    benchmark: tuple[int, int, int] = (1024, 4096, 512)  # StaICC's calibration, demonstration, test sizes


NEG_POS = ("negative", "positive")
DATASETS: dict[str, StaiccDataset] = {
    "sst2": StaiccDataset("sst2", "glue/sst2", (("train", 67349),), NEG_POS, NEG_POS),
    "rotten_tomatoes": StaiccDataset(
        "rotten_tomatoes", "cornell-movie-review-data/rotten_tomatoes", (("train", 8530),), NEG_POS, NEG_POS
    ),
    "financial_phrasebank": StaiccDataset(
        "financial_phrasebank",
        "financial_phrasebank/sentences_allagree",
        (("train", 2264),),
        ("negative", "neutral", "positive"),
        ("negative", "neutral", "positive"),
        (1024, 512, 512),
    ),
    "sst5": StaiccDataset(
        "sst5",
        "SetFit/sst5",
        (("train", 8544),),
        ("very negative", "negative", "neutral", "positive", "very positive"),
        ("poor", "bad", "neutral", "good", "great"),
    ),
    "trec": StaiccDataset(
        "trec",
        "CogComp/trec (coarse labels)",
        (("train", 5452), ("test", 500)),
        ("abbreviation", "entity", "description and abstract concept", "human being", "location", "numeric value"),
        ("short", "entity", "description", "person", "location", "number"),
    ),
    "ag_news": StaiccDataset(
        "agnews",
        "ag_news",
        (("train", 120000), ("test", 7600)),
        ("world", "sports", "business", "sci/tech"),
        ("world", "sports", "business", "science"),
    ),
    "subjective": StaiccDataset(
        "subjective", "SetFit/subj", (("train", 8000),), ("objective", "subjective"), ("false", "true")
    ),
    "tweet_eval_emotion": StaiccDataset(
        "tweet_eval_emotion",
        "tweet_eval/emotion",
        (("train", 3257), ("validation", 374), ("test", 1421)),
        ("anger", "joy", "optimism", "sadness"),
        ("anger", "joy", "positive", "sad"),
        (1024, 3192, 512),
    ),
    "tweet_eval_hate": StaiccDataset(
        "tweet_eval_hate", "tweet_eval/hate", (("train", 9000),), ("non-hate", "hate"), ("normal", "hate")
    ),
    "hate_speech18": StaiccDataset(
        "hate_speech_18",
        "hate_speech18",
        (("train", 10944),),
        ("noHate", "hate", "idk/skip", "relation"),
        ("normal", "hate", "skip", "relation"),
    ),
}
BENCHMARK_ROLES = {"train": "demonstration", "validation": "calibration", "test": "test"}

Row = tuple[str, int]


@dataclass
class StaiccSource:
    """What a StaICC dataset gives a task: rows per split name, its classes and words, and how the
    splits were formed (the provenance a record carries)."""

    splits: dict[str, list[Row]]
    class_names: list[str]
    label_words: list[str]
    roles: dict[str, str]  # ivlib role -> split name, where the names are not the roles themselves
    provenance: dict[str, Any]


class _Refused(Exception):
    """A global the file names: never looked up, never called."""


class _DataOnly(pickle.Unpickler):
    """An unpickler that admits no Python object by name: a file can build lists, tuples, dicts,
    strings and numbers (pickle does these by itself), nothing that runs code. Every global (a class,
    a function such as os.system, and extension codes, which resolve through here too) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise _Refused(f"{module}.{name}")


def package_dir() -> Path:
    """StaICC's folder, found without importing it (a top-level find_spec runs no package code)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"StaICC tasks need the StaICC package, which is not installed; install it: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def _version() -> str | None:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def read_file(path: Path) -> tuple[Any, str]:
    """The file's data (built by the data-only unpickler) and its sha256; one line on any refusal."""
    accepted = f"accepted: the data files StaICC ships (reinstall it: {INSTALL})"
    if not path.is_file():
        raise UsageError(f"StaICC data file '{path}' does not exist; {accepted}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise UsageError(f"StaICC data file '{path}' has {size} bytes, over the {MAX_FILE_BYTES} read; {accepted}")
    data = path.read_bytes()
    try:
        return _DataOnly(io.BytesIO(data)).load(), hashlib.sha256(data).hexdigest()
    except _Refused as exc:
        raise UsageError(
            f"StaICC data file '{path}' names the Python object '{exc}', refused unread (only lists, tuples, "
            f"strings and integers are read); {accepted}"
        ) from None
    except Exception as exc:  # a damaged pickle fails in many classes: all mean "not StaICC's data"
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"StaICC data file '{path}' cannot be read as a pickle ({reason}); {accepted}") from None


def check_rows(path: Path, table: Any, n_classes: int) -> list[Row]:
    """(text, label) per row from StaICC's ([text], label) rows, after checking every row's shape."""
    if not isinstance(table, list) or not table:
        raise UsageError(
            f"StaICC data file '{path}' holds {type(table).__name__} (empty or not a list); accepted: a list of rows"
        )
    rows: list[Row] = []
    for i, row in enumerate(table):
        ok = isinstance(row, tuple) and len(row) == 2 and isinstance(row[0], list) and len(row[0]) == 1
        text, label = (row[0][0], row[1]) if ok else (None, None)
        if not (isinstance(text, str) and type(label) is int and 0 <= label < n_classes):
            shown = repr(row)[:80]
            raise UsageError(
                f"StaICC data file '{path}' row {i} is {shown}; accepted: ([text], label) rows with labels "
                f"0..{n_classes - 1}"
            )
        rows.append((text, label))
    return rows


def draws(n: int, k: int) -> list[int]:
    """The indices StaICC's generator picks, in order, drawing k of range(n) without repetition from its
    seed: each draw takes the remaining index at position int(u * remaining), u its next number. The same
    float arithmetic as StaICC's, so the same picks."""
    remaining = list(range(n))
    x = LCG_SEED
    picked = []
    for _ in range(k):
        x = (x * LCG_A + LCG_B) % LCG_C
        picked.append(remaining.pop(int(x / LCG_C * len(remaining))))
    return picked


def restore_order(stored: list[Row]) -> list[Row]:
    """The rows before StaICC's shuffle: the stored row j came from position draws(n, n)[j]."""
    original: list[Row | None] = [None] * len(stored)
    for j, i in enumerate(draws(len(stored), len(stored))):
        original[i] = stored[j]
    return [r for r in original if r is not None]


def _original_splits(ds: StaiccDataset, rows: list[Row]) -> tuple[dict[str, list[Row]], dict[str, Any]]:
    """The hub splits StaICC concatenated, where its row count shows nothing was dropped; else one pool."""
    origin_rows = sum(n for _, n in ds.parts)
    info: dict[str, Any] = {"origin_rows": origin_rows, "dropped_by_staicc": origin_rows - len(rows)}
    if len(ds.parts) == 1 or len(rows) != origin_rows:
        if len(ds.parts) > 1:
            info["original_splits"] = (
                f"not recoverable: the file has {len(rows)} rows, the hub splits {origin_rows}, so StaICC "
                "dropped some and the boundaries cannot be told apart; all rows are one 'train' pool"
            )
        return {"train": rows}, info
    splits, start = {}, 0
    for name, n in ds.parts:
        splits[name] = rows[start : start + n]
        start += n
    info["original_splits"] = {name: n for name, n in ds.parts}
    return splits, info


def _benchmark_splits(ds: StaiccDataset, stored: list[Row]) -> tuple[dict[str, list[Row]], dict[str, Any]]:
    """StaICC's own triplet split: its generator, from its seed, draws calibration + demonstration + test
    indices into the stored (shuffled) rows; each split keeps StaICC's order."""
    calibration, demonstration, test = ds.benchmark
    total = calibration + demonstration + test
    if len(stored) < total:
        raise UsageError(
            f"StaICC dataset '{ds.file}' has {len(stored)} rows, fewer than its benchmark split needs ({total})"
        )
    picked = draws(len(stored), total)
    cuts = {"calibration": picked[:calibration], "demonstration": picked[calibration : calibration + demonstration]}
    cuts["test"] = picked[calibration + demonstration :]
    info = {"benchmark_split": {"calibration": calibration, "demonstration": demonstration, "test": test}}
    return {name: [stored[i] for i in idx] for name, idx in cuts.items()}, info


def load(name: str, key: str, mode: str = "original") -> StaiccSource:
    """One StaICC dataset as splits of (text, label) rows, with its label words and provenance."""
    if key not in DATASETS:
        raise UsageError(f"task '{name}': unknown StaICC dataset '{key}'; accepted: {', '.join(DATASETS)}")
    if mode not in SPLIT_MODES:
        raise UsageError(f"task '{name}': staicc_split '{mode}' is unknown; accepted: {', '.join(SPLIT_MODES)}")
    ds = DATASETS[key]
    path = package_dir() / DATA_FOLDER / f"{ds.file}.dataset"
    table, digest = read_file(path)
    stored = check_rows(path, table, len(ds.class_names))
    if mode == "benchmark":
        splits, info = _benchmark_splits(ds, stored)
        order = "StaICC's stored (shuffled) order; splits drawn by its generator, as its benchmark does"
    else:
        splits, info = _original_splits(ds, restore_order(stored))
        order = "restored: StaICC's shuffle (its generator, seed 42) inverted, rows in the hub dataset's order"
    empty = {s: sum(not t.strip() for t, _ in rows) for s, rows in splits.items()}
    splits = {s: [(t, y) for t, y in rows if t.strip()] for s, rows in splits.items()}
    provenance: dict[str, Any] = {
        "dataset": key,
        "package_version": _version(),
        "file": f"{PACKAGE}/{DATA_FOLDER}/{path.name}",
        "sha256": digest,
        "rows": len(stored),
        "origin": ds.origin,
        "split_mode": mode,
        "order": order,
        **info,
    }
    if any(empty.values()):
        provenance["dropped_empty_text"] = {s: n for s, n in empty.items() if n}
    roles = BENCHMARK_ROLES if mode == "benchmark" else {}
    return StaiccSource(splits, list(ds.class_names), list(ds.label_words), roles, provenance)
