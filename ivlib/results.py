"""Run records: one JSON object per line, appended atomically, read back tolerantly.

Appends take an exclusive lock and write the whole line with one `write` on an O_APPEND
descriptor, so two processes sharing a results file never interleave, and a killed run leaves
either its whole line or nothing.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from .errors import UsageError


def check_writable(path: str) -> None:
    """Fail before any compute if the record could not be written at the end."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--results '{path}': cannot create directory '{parent}' ({exc.strerror})") from None
    if p.is_dir():
        raise UsageError(f"--results '{path}' is a directory; accepted: a .jsonl file path")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"--results '{path}' is not writable")


def append_record(path: str, record: dict[str, Any]) -> None:
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # a previous writer killed mid-line would glue our record to its fragment: start fresh
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        written = 0
        while written < len(line):
            written += os.write(fd, line[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: str) -> tuple[list[dict[str, Any]], list[int]]:
    """(records, line numbers that did not parse): a bad line is skipped, not fatal."""
    records, bad = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad.append(number)
                continue
            if isinstance(obj, dict):
                records.append(obj)
            else:
                bad.append(number)
    return records, bad
