"""Data-parallel runs (`torchrun` / `accelerate launch`): which process this is, and the few exchanges
between processes that ivlib needs. Everything the rest of the library knows about process groups is here.

One process per model copy; the launcher's environment (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`) says
which. With one process (no launcher, or a launcher with one process) every helper below is the
identity and torch.distributed is never touched, so a plain run behaves exactly as before.

How work is split: `shard_batches` deals whole batches of the single process's length-sorted
batching round-robin, so each row is computed in the very batch it would be in with one process
(bitwise the same outputs on CPU whatever the number of processes); `shard_rows` cuts a short
list (one of IV's refresh windows) into contiguous parts.

Every exchange is one `all_gather_object` of a tagged payload (CPU tensors and Python objects):
a process whose share raised sends its error in place of its data, so all processes raise the
same `RunFailed` from the same exchange and stop together with one message, instead of the
others waiting forever on a collective that never comes. A process that fails anywhere else
(`fail_together`: e.g. a config or data file only it cannot read) joins the others' next exchange
with its error, and every run ends with one exchange (`finish`), so there always is a next one. A process that dies outright (killed,
out of host memory) is stopped by the launcher, which then terminates the others; an exchange
that loses its peer raises `RunFailed` too.

Test hook: `IVLIB_TEST_FAIL_RANK=R` (or `R:TEXT`) makes process R raise in its share of the first
split loop (whose description contains TEXT). It is read only in `share`, only with several
processes, and exists for tests/test_distributed.py.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import torch

from .errors import Terminated, UsageError

T = TypeVar("T")
TEST_FAIL_ENV = "IVLIB_TEST_FAIL_RANK"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this machine (torchrun and accelerate launch set LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size())))


def active() -> bool:
    """Whether this run is split over several processes."""
    return world_size() > 1


def is_main() -> bool:
    """The process that writes records and state files and prints (rank 0)."""
    return rank() == 0


class RunFailed(Exception):
    """A process of a data-parallel run failed; every process raises this from the same exchange.

    `usage`: the failure was a `UsageError` (exit code 2, like a bad flag), else 1."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


# ---- the process group ----------------------------------------------------------------------------


def gpu_index(gpu: int) -> int:
    """The GPU this process uses for `-g gpu`: gpu + LOCAL_RANK with several processes (with -g 0,
    process r on cuda:r); -1 stays CPU. Checked alike on every process, so all refuse together."""
    if not active() or gpu < 0:
        return gpu
    count, local = torch.cuda.device_count(), local_world_size()
    if gpu + local > count:
        raise UsageError(
            f"-g {gpu} with {local} processes on this machine needs GPUs {gpu}..{gpu + local - 1}; "
            f"{count} visible; accepted: -1 (CPU), or -g 0..{max(0, count - local)} with at most {count} processes"
            if count
            else f"-g {gpu}: no GPU is visible; accepted: -1 (CPU)"
        )
    return gpu + local_rank()


def setup(device: torch.device) -> None:
    """Join the launcher's process group once (gloo on CPU, nccl on GPU); nothing with one process."""
    if not active():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the device all_gather_object stages its bytes on under nccl
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    # kept for the process's life (several runs in one process share it), and left at its exit without
    # a barrier: an exception may end one process while the others wait in a collective
    atexit.register(teardown)


def settle() -> None:
    """Wait until every live process got here (after a `RunFailed`, once the main one has printed):
    the launcher terminates the others as soon as one exits, which must not cut the main one short."""
    if not active():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):  # a peer that died: nobody left to wait for
            dist.barrier()


def teardown(wait: bool = False) -> None:
    """Leave the process group. `wait`: at a barrier first, so that no process closes its connections
    while another is still inside a collective; only where every process is known to be on its way
    out (a command that succeeded passed `finish` on all), since a peer stuck elsewhere would hold it."""
    if not active():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        if wait:
            try:
                dist.barrier()
            except Terminated:
                raise
            except Exception:  # a peer that died: nobody left to wait for
                pass
        dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """End a launched process whose command returned `code`: leave the group, flush, and exit at once.
    What a normal exit does after that (interpreter finalization, C++ static destructors) is where
    torch's gloo threads have aborted a finished process (SIGABRT, "terminate called without an active
    exception", rarely, seen in CI), and the launcher then reports the whole run failed although every
    record was written. Everything ivlib writes is closed and synced by then; the standard streams and
    logging handlers are flushed here. Other atexit handlers do not run."""
    from .entry import EXIT_CODES

    try:
        teardown(wait=code == 0)
    except Terminated:  # while waiting for the others: the launcher is stopping the run
        code = EXIT_CODES["SIGTERM"]
    except KeyboardInterrupt:
        code = EXIT_CODES["SIGINT"]
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


# ---- splitting work --------------------------------------------------------------------------------


def shard_batches(order: Sequence[int], batch_size: int) -> list[int]:
    """This process's part of `order`: the single process's batches (consecutive chunks of
    `batch_size`), dealt round-robin. Chunked again at `batch_size` it gives back exactly those
    batches (only the last chunk of `order` can be short, and it is last in its process's part)."""
    if not active():
        return list(order)
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [i for chunk in chunks[rank() :: world_size()] for i in chunk]


def shard_rows(indices: Sequence[int]) -> list[int]:
    """This process's contiguous part of `indices`; sizes differ by at most one (earlier ranks larger)."""
    if not active():
        return list(indices)
    size, extra = divmod(len(indices), world_size())
    start = rank() * size + min(rank(), extra)
    return list(indices[start : start + size + (rank() < extra)])


def rows_in_order(parts: list[list[tuple[list[int], torch.Tensor]]], n_rows: int) -> torch.Tensor:
    """[n_rows, ...] from every process's (row indices, rows) pieces, each row at its index."""
    pieces = [piece for part in parts for piece in part]
    first = pieces[0][1]
    out = torch.empty((n_rows, *first.shape[1:]), dtype=first.dtype)
    for idx, rows in pieces:
        out[torch.tensor(idx)] = rows
    return out


# ---- exchanges -------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, UsageError) else f"{type(exc).__name__}: {exc}"


def _exchange(payload: Any, error: Exception | None = None) -> list[Any]:
    """Every process's payload, rank order; raises `RunFailed` on every process if any one failed."""
    import torch.distributed as dist

    mine = ("failed", _describe(error), isinstance(error, UsageError)) if error is not None else ("ok", payload)
    gathered: list[Any] = [None] * world_size()
    try:
        dist.all_gather_object(gathered, mine)
    except Exception as exc:  # a peer that died closes its connection
        raise RunFailed(
            f"another process of this run stopped before finishing its share ({type(exc).__name__})"
        ) from exc
    failures = [(r, item) for r, item in enumerate(gathered) if item[0] == "failed"]
    if failures:
        r, (_, message, usage) = failures[0]
        if usage and all(item[1] == message for _, item in failures) and len(failures) == world_size():
            raise RunFailed(message, usage=True)  # the same bad input everywhere: no process to name
        raise RunFailed(f"process {r} of {world_size()} failed: {message}", usage=usage)
    return [item[1] for item in gathered]


def _attempt(fn: Callable[[], T]) -> tuple[T | None, Exception | None]:
    try:
        return fn(), None
    except Terminated:  # a signal is not a failure to report: each process unwinds on its own
        raise
    except Exception as exc:
        return None, exc


def together(fn: Callable[[], T]) -> T:
    """`fn()` on every process (e.g. the main one writes, the others do nothing), then a check that
    every one succeeded: a failure anywhere is raised on all. One process: just `fn()`."""
    if not active():
        return fn()
    result, error = _attempt(fn)
    _exchange(None, error)
    return result  # type: ignore[return-value]  # no error: fn returned


def main_first(fn: Callable[[], T]) -> T:
    """`fn()` on the main process, then on the others: e.g. a model load that converts and caches a
    checkpoint the first time (the others then read the cache instead of converting it at once)."""
    if not active():
        return fn()
    first = together(fn if is_main() else lambda: None)
    later = together(lambda: None if is_main() else fn())
    return first if is_main() else later  # type: ignore[return-value]


def share(work: Callable[[], T], desc: str) -> list[T]:
    """Run this process's share of a split loop, then gather every process's result (rank order).
    Results must be picklable and on the CPU. One process: `[work()]`."""
    if not active():
        return [work()]

    def checked() -> T:
        _test_failure(desc)
        return work()

    result, error = _attempt(checked)
    return _exchange(result, error)


def fail_together(error: Exception, device: Callable[[], torch.device]) -> None:
    """Report a failure this process met outside any exchange (bad input it alone saw, before the process
    group existed or between two exchanges): join the group if need be and send the error into the
    others' next exchange, so every process raises `RunFailed` there and the main one names this
    process in its one line, instead of waiting at a collective until the launcher kills it. Returns
    only with one process, or when the group cannot be joined: the caller then reports alone."""
    if not active():
        return
    try:
        setup(device())
    except Exception:
        return
    _exchange(None, error)


def finish(device: Callable[[], torch.device]) -> None:
    """The run's last exchange, every process confirming it got to the end: a process whose run failed
    where the main one's had no exchange left (e.g. --resume found everything recorded there) is
    heard, not left waiting. Nothing with one process."""
    if not active():
        return
    setup(device())
    _exchange(None)


def _test_failure(desc: str) -> None:
    hook = os.environ.get(TEST_FAIL_ENV)
    if not hook:
        return
    target, _, text = hook.partition(":")
    if int(target) == rank() and text in desc:
        os.environ.pop(TEST_FAIL_ENV)  # once
        raise RuntimeError(f"failure injected by {TEST_FAIL_ENV} (test hook) in '{desc}'")
