"""Per-episode logs (`--log-samples`, lm-eval's `--log_samples` convention): one JSONL line per
evaluation episode, written beside the record that points to it.

A line holds `episode` (its index in the run), `query_row` (the query's row in its split),
`demo_rows` (the demonstrations' rows, in prompt order; rows of train under `--demos fixed`),
`gold`, `pred`, `correct` and `scores` (every label's, or option's, score). The file is written whole to a temporary name and renamed
into place (`os.replace`), so it either exists complete or not at all, before the record that
names it is appended; the record holds its path (relative to the results file's directory) and
sha256, which a reader checks, so a log edited or swapped after the run is refused, not used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, ValidationError

from . import distributed as dist
from . import files
from .episodes import Episode
from .errors import UsageError


def sample_lines(
    episodes: Sequence[Episode], y_pred: np.ndarray, scores: Any, answers: Sequence[str] | None = None
) -> bytes:
    """The file's contents: one JSON object per episode, in episode order. `answers` (--score vocab or
    generate) is what the model answered in words: the predicted token, or the decoded text; a
    prediction of n_classes (`pred`) is then none of the labels."""
    table = np.asarray(scores.float().numpy() if hasattr(scores, "numpy") else scores, dtype=float)
    out = []
    for i, (ep, pred, row) in enumerate(zip(episodes, y_pred, table)):
        line: dict[str, Any] = {
            "episode": i,
            "query_row": ep.query.index,
            "demo_rows": [d.index for d in ep.demos],
            "gold": int(ep.query.label),
            "pred": int(pred),
            "correct": bool(int(pred) == ep.query.label),
            "scores": [round(float(x), 6) for x in row],
        }
        if answers is not None:
            line["answer"] = answers[i]
        out.append(json.dumps(line, separators=(",", ":")))
    return ("\n".join(out) + "\n").encode()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "unnamed"


def samples_dir(results: str) -> Path:
    """`runs.jsonl` -> `runs.samples/` beside it."""
    p = Path(results)
    return p.with_name(p.stem + ".samples")


def samples_stem(results: str, model: str, task: str, method: str, split: str, when: datetime) -> str:
    """The log's name without its content hash (added by `write_samples`)."""
    stamp = when.strftime("%Y%m%dT%H%M%S")
    return "_".join(_safe(x) for x in (model, task, method, split)) + f"_{stamp}"


def write_samples(results: str, stem: str, data: bytes) -> dict[str, Any]:
    """Write the log atomically (main process only); the record's `samples` field."""
    digest = hashlib.sha256(data).hexdigest()
    directory = samples_dir(results)
    path = directory / f"{stem}_{digest[:8]}.jsonl"
    if dist.is_main():
        _write_whole(path, data)
    base = Path(results).parent
    return {"path": os.path.relpath(path, base), "sha256": digest, "n": data.count(b"\n")}


def _write_whole(path: Path, data: bytes) -> None:
    """The log complete under its name, or no file at all (a full disk leaves no temporary behind)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UsageError(
            f"--log-samples: '{path}' could not be written ({exc.strerror}); no log and no record written"
        ) from None


def check_samples_dir(results: str) -> None:
    """Before any compute: the log folder beside --results can be made (no file of that name there)."""
    directory = samples_dir(results)
    if directory.exists() and not directory.is_dir():
        raise UsageError(
            f"--log-samples: '{directory}' is a file, not a folder; accepted: move it, or another --results path"
        )


class SamplesError(ValueError):
    """A record's samples log is missing, does not match its checksum, or does not hold what the record
    says (the callers warn in one line and go on without it)."""


class SampleLine(BaseModel):
    """One line of a samples log: `gold` and `pred` (what the readers compare) required, the rest as
    `sample_lines` writes it, checked when present (types checked, not converted)."""

    model_config = ConfigDict(extra="allow", strict=True)
    gold: StrictInt
    pred: StrictInt
    episode: StrictInt | None = None
    query_row: StrictInt | None = None
    demo_rows: list[StrictInt] | None = None
    correct: StrictBool | None = None
    scores: list[float] | None = None


SAMPLES_ACCEPTED = "the log iv.py --log-samples wrote"


def read_samples(record: dict[str, Any], base: str | Path) -> list[dict[str, Any]] | None:
    """The record's episodes, or None when it has no log; raises SamplesError if the log is bad: not a
    regular file of at most MAX_SAMPLES_BYTES, another checksum, or lines that are not the record's
    episodes (a checksum says the log was not changed, not that it was written by iv.py)."""
    entry = record.get("samples")
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        return None
    path = Path(base) / entry["path"]
    try:
        data = files.read_bytes("samples log", path, files.MAX_SAMPLES_BYTES, SAMPLES_ACCEPTED)
    except UsageError as exc:
        raise SamplesError(str(exc).split("; accepted:")[0]) from None
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise SamplesError(f"samples log '{path}' does not match the record's sha256")
    read = [_episode(path, number, line, record) for number, line in enumerate(data.split(b"\n"), start=1)]
    episodes = [e for e in read if e is not None]
    n = entry.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and len(episodes) != n:
        raise SamplesError(f"samples log '{path}' holds {len(episodes)} episodes; its record says {n}")
    return episodes


def _episode(path: Path, number: int, line: bytes, record: dict[str, Any]) -> dict[str, Any] | None:
    """One line as an episode (None for a blank line), checked against the line's place and the record."""
    if not line.strip():
        return None
    if len(line) > files.MAX_LINE_BYTES:
        why: str | None = f"longer than {files.MAX_LINE_BYTES // files.MiB} MiB"
        obj = None
    else:
        obj, why = files.json_line(line)
    if why is None:
        why = _line_problem(obj, number, record)
    if why is not None:
        raise SamplesError(f"samples log '{path}' line {number}: {why}")
    return obj


def _line_problem(obj: Any, number: int, record: dict[str, Any]) -> str | None:
    if not isinstance(obj, dict):
        return "not a JSON object"
    try:
        SampleLine.model_validate(obj)
    except ValidationError as exc:
        error = exc.errors()[0]
        return f"'{error['loc'][0]}' missing or of the wrong type" if error["loc"] else "not an episode"
    if obj.get("episode", number - 1) != number - 1:
        return f"episode {obj['episode']} where episode {number - 1} belongs"
    words, scores = record.get("label_words"), obj.get("scores")
    if record.get("task_kind") != "multiple_choice" and isinstance(words, list) and words:
        classes = len(words)
        if scores is not None and len(scores) != classes:
            return f"{len(scores)} scores for the record's {classes} label words"
    elif scores is not None:  # multiple choice: one score per option
        classes = len(scores)
    else:
        return "no scores, and no label_words in the record, to check gold and pred against"
    for key in ("gold", "pred"):
        if not 0 <= obj[key] < classes:
            return f"{key} {obj[key]} is out of range; accepted: 0..{classes - 1}"
    if obj.get("correct", obj["gold"] == obj["pred"]) != (obj["gold"] == obj["pred"]):
        return f"correct is {obj['correct']} for gold {obj['gold']} and pred {obj['pred']}"
    return None
