"""Run records: one JSON object per line, appended atomically, read back tolerantly.

Appends take an exclusive lock and write the whole line with one `write` on an O_APPEND
descriptor, so two processes sharing a results file never interleave, and a killed run leaves
either its whole line or nothing. `has_record` (and the `canonical` setting key it compares)
live here, beside the records, because resuming a run needs them and selection does not own them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError

from . import files
from .errors import UsageError

MIN_FREE_BYTES = 1 << 20  # a file system with less free space than this is full for our purposes


def check_output_path(flag: str, path: str, example: str) -> Path:
    """What can be known before any compute about a file ivlib will write: not a directory (a trailing
    slash means one), not a device or other special file (`/dev/full`), not a symbolic link that loops
    or points nowhere, and on a file system that is not full. Returns the path."""
    p = Path(path)
    if path.endswith(("/", os.sep)):
        raise UsageError(f"{flag} '{path}' ends with '/', a directory; accepted: a file path, e.g. {p / example}")
    if os.path.islink(p):
        try:
            os.stat(p)
        except OSError as exc:
            target = os.readlink(p)
            why = "loops" if exc.errno == errno.ELOOP else f"points to '{target}', which does not exist"
            raise UsageError(f"{flag} '{path}' is a symbolic link that {why}; accepted: a regular file path") from None
    try:
        mode = p.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):  # a new file, or one under a file: the checks after say which
        mode = None
    except OSError as exc:
        raise UsageError(f"{flag} '{path}' cannot be used ({exc.strerror}); accepted: a regular file path") from None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise UsageError(
            f"{flag} '{path}' is not a regular file (a device, pipe or socket); accepted: a regular file path"
        )
    return p


def check_free_space(flag: str, path: str, directory: Path) -> None:
    try:
        vfs = os.statvfs(directory)
    except OSError:
        return  # no answer (some network file systems): the write itself will tell
    if vfs.f_bavail * vfs.f_frsize >= MIN_FREE_BYTES:
        return
    if vfs.f_blocks == 0:  # no storage at all (/proc, /sys): not full, but a place that holds no files
        raise UsageError(
            f"{flag} '{path}': '{directory}' is on a virtual file system with no storage (such as /proc or /sys); "
            "accepted: a path on a disk"
        )
    raise UsageError(
        f"{flag} '{path}': the file system holding '{directory}' is full "
        f"({vfs.f_bavail * vfs.f_frsize} bytes free); accepted: a path on a file system with space"
    )


def check_writable(path: str) -> None:
    """Fail before any compute if the record could not be written at the end."""
    p = check_output_path("--results", path, "runs.jsonl")
    parent = p.parent if str(p.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--results '{path}': cannot create directory '{parent}' ({exc.strerror})") from None
    if p.is_dir():
        raise UsageError(f"--results '{path}' is a directory; accepted: a .jsonl file path")
    if (p.exists() and not os.access(p, os.W_OK)) or not _can_create_in(parent):
        raise UsageError(f"--results '{path}' is not writable; accepted: a path in a writable directory")
    check_free_space("--results", path, parent)
    if p.exists() and p.stat().st_size:
        with open(p, "rb") as f:  # a torn line left by a killed writer may come first: look at a few
            head = [f.readline(1 << 20) for _ in range(3)]
        if not any(_is_record(line) for line in head):
            raise UsageError(
                f"--results '{path}' is not a JSONL results file (its first lines are not JSON objects); "
                "accepted: a new path or a file written by iv.py"
            )


def _is_record(line: bytes) -> bool:
    return isinstance(files.json_line(line)[0], dict)


def _can_create_in(directory: Path) -> bool:
    """Try it: permission bits say nothing for root, or on read-only and special file systems."""
    probe = directory / f".ivlib-write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C / SIGTERM that arrive inside the block take effect when it ends. Nests.

    Blocking the signals with a thread mask would not do: torch's worker threads leave them
    unblocked, the kernel may deliver a process signal to any of those, and Python then runs its
    handler in the main thread anyway. So the handlers themselves are swapped for ones that only
    note the signal, and the original handler runs on exit.
    """
    caught: list[int] = []
    try:
        previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {
            sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
    except ValueError:  # not the main thread: Python delivers no signals here anyway
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)  # e.g. raises KeyboardInterrupt or Terminated
            elif handler != signal.SIG_IGN:  # the default action (or a handler set outside Python)
                os.kill(os.getpid(), caught[0])


def append_record(path: str, record: dict[str, Any]) -> None:
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    with signals_held():  # a handler that raised between two partial writes would leave half a record
        _append_locked(path, line)


class WriteFailed(UsageError):
    """A record (or a file ivlib writes) could not be written: disk full, I/O error. One line, exit 2;
    what is on disk is said exactly (nothing of this record, or the whole record but not synced)."""


def _append_locked(path: str, line: bytes) -> None:
    """Append one whole line or nothing: a write that fails half-way is cut back to the file's length
    before it, so no fragment stays (the lock keeps other writers out meanwhile)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise WriteFailed(f"--results '{path}' cannot be opened ({exc.strerror}); the record was not written") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # a previous writer killed mid-line would glue our record to its fragment: start fresh
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        try:
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
        except OSError as exc:
            raise WriteFailed(f"--results '{path}': {_rolled_back(fd, size, exc)}") from None
        try:
            os.fsync(fd)
        except OSError as exc:
            raise WriteFailed(
                f"--results '{path}': the record was written whole but fsync failed ({exc.strerror}): the disk "
                "may not hold it; check the disk, then rerun with --resume"
            ) from None
    finally:
        os.close(fd)


def _rolled_back(fd: int, size: int, exc: OSError) -> str:
    """Cut a half-written record off; the message says whether that worked."""
    try:
        os.ftruncate(fd, size)
    except OSError as again:
        return (
            f"writing the record failed ({exc.strerror}) and cutting its fragment off failed too "
            f"({again.strerror}); the file's last line is torn (readers skip it)"
        )
    return f"writing the record failed ({exc.strerror}); the file is back to its previous {size} bytes"


class _Samples(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    path: StrictStr
    sha256: StrictStr
    n: StrictInt | None = None


class RecordSchema(BaseModel):
    """The fields of a run record that readers use (`select`, `report`, `--resume`), with their types;
    other fields (records of other versions) are allowed and kept. A record is checked, not converted:
    readers get the dict as it was written."""

    model_config = ConfigDict(extra="allow", strict=True)
    method: StrictStr
    model: StrictStr
    task: StrictStr
    split: StrictStr
    hyperparameters: dict[StrictStr, Any]
    metrics: dict[StrictStr, Any]
    seed: StrictInt | None = None
    n_eval_episodes: StrictInt | None = None
    time: StrictStr | None = None
    command: list[StrictStr] | None = None
    samples: _Samples | None = None
    label_words: list[StrictStr] | None = None
    task_kind: StrictStr | None = None
    demos: StrictStr | None = None
    demo_order: StrictStr | None = None


_ACCEPTED = {
    "hyperparameters": "an object",
    "metrics": "an object",
    "seed": "an integer or null",
    "n_eval_episodes": "an integer or null",
    "command": "a list of strings",
    "samples": "{path: string, sha256: string, n: integer}",
    "label_words": "a list of strings",
}


def record_problem(obj: Any) -> str | None:
    """Why a parsed line is not a run record (one short phrase), or None when it is one."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    try:
        RecordSchema.model_validate(obj)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = str(error["loc"][0])
        if error["type"] == "missing":
            return f"no '{key}'"
        shown = repr(obj[key])
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return f"'{key}' is {shown}; accepted: {_ACCEPTED.get(key, 'a string')}"
    return None


RESULTS_ACCEPTED = "a .jsonl results file written by iv.py"


def read_records(path: str) -> tuple[list[dict[str, Any]], list[int]]:
    """(the records, in file order; the numbers of the lines skipped). A line that is not a run record
    (cut short by a killed writer, not UTF-8, nested too deep, of the wrong types) is skipped with one
    warning naming it, never fatal; a path that is not a regular file of at most MAX_RESULTS_BYTES is
    refused whole (UsageError)."""
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    for number, line in files.lines("--results", path, files.MAX_RESULTS_BYTES, RESULTS_ACCEPTED):
        if line is not None and not line.strip():
            continue
        obj, why = files.json_line(line)
        why = why or record_problem(obj)
        if why is None:
            records.append(obj)
        else:
            bad.append(number)
            _warn(f"{path} line {number}: {'not a JSON object' if why == 'not valid JSON' else why}; skipped")
    return records, bad


def _warn(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # several processes (torchrun) read the same file: say it once
        print(f"warning: {message}", file=sys.stderr)


def canonical(hyperparameters: dict[str, Any]) -> str:
    """One string per setting, so equal settings compare equal whatever their key order."""
    return json.dumps(hyperparameters, sort_keys=True, separators=(",", ":"), default=str)


def has_record(
    records: Iterable[dict[str, Any]],
    model: str,
    task: str,
    method: str,
    split: str,
    hyperparameters: dict[str, Any],
    seed: int | None,
    n_eval_episodes: int | None,
) -> bool:
    """Whether this exact run is already in the file, so a resumed sweep can skip it."""
    wanted = canonical(hyperparameters)
    for r in records:
        if (r.get("model"), r.get("task"), r.get("method"), r.get("split")) != (model, task, method, split):
            continue
        if r.get("seed") != seed or r.get("n_eval_episodes") != n_eval_episodes:
            continue
        hp = r.get("hyperparameters")
        if isinstance(hp, dict) and canonical(hp) == wanted:
            return True
    return False
