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

from . import distributed as dist
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
    """A record's samples log is missing or does not match its checksum."""


def read_samples(record: dict[str, Any], base: str | Path) -> list[dict[str, Any]] | None:
    """The record's episodes, or None when it has no log; raises SamplesError if the log is bad."""
    entry = record.get("samples")
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        return None
    path = Path(base) / entry["path"]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SamplesError(f"samples log '{path}' cannot be read ({exc.strerror})") from None
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise SamplesError(f"samples log '{path}' does not match the record's sha256")
    return [json.loads(line) for line in data.splitlines() if line.strip()]
