"""One mechanism for every activation edit: add to, and/or read, a module's output at given positions.

A hook keeps only the rows it was asked to read (as float32 copies), never whole activations,
and is removed on exit even when the forward raises. Positions are passed as flat (row, col)
index tensors, so each layer's edit is one indexed add, with no Python loop over tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn


class OutputSite:
    """What one hooked module does during a forward: an indexed replace or add, then a read."""

    def __init__(
        self,
        rows: torch.Tensor,
        cols: torch.Tensor,
        add: torch.Tensor | None,
        read: bool,
        replace: torch.Tensor | None = None,
    ):
        self.rows, self.cols, self.add, self.read, self.replace = rows, cols, add, read, replace
        self.value: torch.Tensor | None = None  # [N, D] float32 after the forward, if read

    def __call__(self, module: nn.Module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output  # [B, T, D]
        rows = self.rows.to(hidden.device, non_blocking=True)
        cols = self.cols.to(hidden.device, non_blocking=True)
        if self.replace is not None:
            hidden.index_put_((rows, cols), self.replace.to(hidden.device, hidden.dtype))
        if self.add is not None:  # positions are distinct, so a gather, add and scatter is exact and
            # avoids accumulate=True, whose sort-based CUDA kernel cost several ms per forward (bench/RESULTS.md)
            hidden.index_put_((rows, cols), hidden[rows, cols] + self.add.to(hidden.device, hidden.dtype))
        if self.read:
            self.value = hidden[rows, cols].float()
        return output


@contextmanager
def _installed(modules: Sequence[nn.Module], hooks: Sequence, pre: bool) -> Iterator[None]:
    """Register one hook per module; remove them all on exit, also when the forward raised."""
    handles = [(m.register_forward_pre_hook if pre else m.register_forward_hook)(h) for m, h in zip(modules, hooks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def watch_outputs(modules: Sequence[nn.Module], fn: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Call `fn(i, hidden)` with `modules[i]`'s output ([B, T, D]; a tuple's first element) after each
    of its forwards, changing nothing: for diagnostics that must see every layer, e.g. where a NaN began."""

    def watcher(i: int):
        def hook(module: nn.Module, args, output):
            fn(i, output[0] if isinstance(output, tuple) else output)

        return hook

    with _installed(modules, [watcher(i) for i in range(len(modules))], pre=False):
        yield


@contextmanager
def edit_outputs(
    modules: Sequence[nn.Module],
    rows: torch.Tensor,
    cols: torch.Tensor,
    add: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    read: bool = False,
    replace: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
) -> Iterator[list[OutputSite]]:
    """Hook `modules[l]`: set `replace[l]` and/or add `add[l]` ([N, D]) at (rows, cols), then read there if `read`.

    The N (row, col) positions must be distinct (every caller edits separators or the last token,
    one entry each): an add listed twice at one position would be applied once.

    Yields one `OutputSite` per module; after the forward, `site.value` holds the read rows.
    """
    sites = [
        OutputSite(rows, cols, None if add is None else add[i], read, None if replace is None else replace[i])
        for i in range(len(modules))
    ]
    with _installed(modules, sites, pre=False):
        yield sites


def vector_edit(
    module: nn.Module, vector: torch.Tensor, replace: bool = False
) -> Callable[[torch.Tensor, torch.Tensor], AbstractContextManager[list[OutputSite]]]:
    """An edit that adds one [D] `vector` to `module`'s output at the given (rows, cols), or with
    `replace` writes it there: TV's theta at one block and FV's function vector are this edit, so
    the layer search and evaluation (and both methods) share it."""

    def edit(rows: torch.Tensor, cols: torch.Tensor) -> AbstractContextManager[list[OutputSite]]:
        value = [vector.expand(len(rows), -1)]  # [N, D], a view of the one vector
        return (
            edit_outputs([module], rows, cols, replace=value)
            if replace
            else edit_outputs([module], rows, cols, add=value)
        )

    return edit


class InputSite:
    """A pre-hook on a module's first input: at (rows, cols), x <- x * keep + value, and/or read x there.

    `keep` and `value` are [N, F]; zeros in `keep` select the features to overwrite (one head's
    slice, say), so rows of one batch can patch different heads in one forward.
    """

    def __init__(
        self, rows: torch.Tensor, cols: torch.Tensor, read: bool, patch: tuple[torch.Tensor, torch.Tensor] | None = None
    ):
        self.rows, self.cols, self.read, self.patch = rows, cols, read, patch
        self.value: torch.Tensor | None = None  # [N, F] float32 after the forward, if read

    def __call__(self, module: nn.Module, args):
        x = args[0]  # [B, T, F]
        rows, cols = self.rows.to(x.device), self.cols.to(x.device)
        if self.patch is not None:
            keep, value = (t.to(x.device, x.dtype) for t in self.patch)
            x = x.clone()  # the input may be a view the caller still uses
            x[rows, cols] = x[rows, cols] * keep + value
            args = (x, *args[1:])
        if self.read:
            self.value = x[rows, cols].float()
        return args


def head_patch(mean_act: torch.Tensor, layer: int, heads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, value), each [len(heads), H * head_dim]: row j overwrites head heads[j] with its mean."""
    n_heads, hd = mean_act.shape[1], mean_act.shape[2]
    keep = torch.ones(len(heads), n_heads, hd)
    value = torch.zeros(len(heads), n_heads, hd)
    for j, h in enumerate(heads):
        keep[j, h] = 0
        value[j, h] = mean_act[layer, h]
    return keep.view(len(heads), -1), value.view(len(heads), -1)


@contextmanager
def edit_inputs(
    modules: Sequence[nn.Module],
    rows: torch.Tensor,
    cols: torch.Tensor,
    read: bool = False,
    patch: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
) -> Iterator[list[InputSite]]:
    """Pre-hook `modules[l]`: patch its input at (rows, cols) with `patch[l]` and/or read the input there."""
    sites = [InputSite(rows, cols, read, None if patch is None else patch[i]) for i in range(len(modules))]
    with _installed(modules, sites, pre=True):
        yield sites


def stack_reads(sites: Sequence[OutputSite]) -> torch.Tensor:
    """[L, N, D] float32 from the sites of one forward (on the first site's device)."""
    device = sites[0].value.device
    return torch.stack([s.value.to(device) for s in sites])
