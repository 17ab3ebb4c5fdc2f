"""Reading the files a user hands ivlib (results, samples logs, configs) so that no file can make a
reader hang, exhaust memory or raise a traceback.

A reader opens only a regular file: a directory, a named pipe (whose open waits for a writer), a
device (`/dev/zero` never ends) or a socket is refused in one line from its `stat`, before it is
opened. What is read is bounded: at most a stated number of bytes per file (the `MAX_*` constants,
also in the README), read line by line, a line at most `MAX_LINE_BYTES`, and a JSON line nested at
most `MAX_JSON_DEPTH` deep (checked before parsing, since the parser recurses). One bad line is
a reason the caller reports for that line; only a file that is not a file, or too big, is refused whole.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import UsageError

MiB = 1 << 20
MAX_RESULTS_BYTES = 512 * MiB  # a results file: about 100,000 records
MAX_SAMPLES_BYTES = 256 * MiB  # one run's samples log: about a million episodes
MAX_CONFIG_BYTES = 1 * MiB  # a YAML registry
MAX_LINE_BYTES = 1 * MiB  # one JSON line (a record is a few kB)
MAX_JSON_DEPTH = 32  # a record nests 4 deep; the parser's recursion limit is about 1,000

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def kind(mode: int) -> str:
    """What a non-regular file is, in words, for messages."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def regular_file(what: str, path: str | Path, accepted: str) -> os.stat_result:
    """The stat of `path`, a regular file (symbolic links followed); UsageError naming what it is
    otherwise. Nothing is opened, so a pipe or device cannot block or be read."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{what} '{path}' does not exist; accepted: {accepted}") from None
    except OSError as exc:
        raise UsageError(f"{what} '{path}' cannot be read ({exc.strerror}); accepted: {accepted}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{what} '{path}' is {kind(info.st_mode)}, not a file; accepted: {accepted}")
    return info


def _too_big(what: str, path: str | Path, size: int, limit: int, accepted: str) -> UsageError:
    return UsageError(
        f"{what} '{path}' holds {size:,} bytes, more than the {limit:,} ivlib reads; accepted: {accepted} "
        f"of at most {f'{limit // MiB} MiB' if limit % MiB == 0 else f'{limit:,} bytes'}"
    )


@contextmanager
def open_regular(what: str, path: str | Path, limit: int, accepted: str) -> Iterator[IO[bytes]]:
    """A regular file of at most `limit` bytes, opened for reading in binary. Checked by `stat` before
    the open and by `fstat` of what was opened (a path swapped for a pipe in between is refused too:
    the open does not wait, O_NONBLOCK)."""
    regular_file(what, path, accepted)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise UsageError(f"{what} '{path}' cannot be read ({exc.strerror}); accepted: {accepted}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"{what} '{path}' is {kind(info.st_mode)}, not a file; accepted: {accepted}")
        if info.st_size > limit:
            raise _too_big(what, path, info.st_size, limit, accepted)
        yield f


def read_bytes(what: str, path: str | Path, limit: int, accepted: str) -> bytes:
    """The whole file, refused if it is not a regular file or holds more than `limit` bytes (also one
    that grows past it while read)."""
    with open_regular(what, path, limit, accepted) as f:
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise UsageError(f"{what} '{path}' cannot be read ({exc.strerror}); accepted: {accepted}") from None
    if len(data) > limit:
        raise _too_big(what, path, len(data), limit, accepted)
    return data


def lines(what: str, path: str | Path, limit: int, accepted: str) -> Iterator[tuple[int, bytes | None]]:
    """(line number from 1, the line's bytes) of a regular file, read line by line; None for a line
    longer than MAX_LINE_BYTES (read past, not kept). The file as a whole is refused beyond `limit`."""
    with open_regular(what, path, limit, accepted) as f:
        total = number = 0

        def read(size: int) -> bytes:
            nonlocal total
            try:
                chunk = f.readline(size)
            except OSError as exc:
                raise UsageError(f"{what} '{path}' cannot be read ({exc.strerror}); accepted: {accepted}") from None
            total += len(chunk)
            if total > limit:  # it grew while being read
                raise _too_big(what, path, total, limit, accepted)
            return chunk

        while line := read(MAX_LINE_BYTES + 1):
            number += 1
            if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
                yield number, line
                continue
            while line and not line.endswith(b"\n"):
                line = read(MAX_LINE_BYTES)
            yield number, None


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings do not count)."""
    depth = deepest = 0
    for bracket in _BRACKET.findall(_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def json_line(line: bytes | None) -> tuple[Any, str | None]:
    """(the value, None), or (None, why the line is not one JSON value ivlib reads): never raises."""
    if line is None:
        return None, f"longer than {MAX_LINE_BYTES // MiB} MiB"
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        return None, f"JSON nested {depth} deep (at most {MAX_JSON_DEPTH})"
    try:
        return json.loads(text), None
    except (ValueError, RecursionError):  # JSONDecodeError; a number of more than 4,300 digits
        return None, "not valid JSON"
