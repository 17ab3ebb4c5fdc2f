"""One mechanism for every activation edit: add to, and/or read, a module's output at given positions.

A hook keeps only the rows it was asked to read (as float32 copies), never whole activations,
and is removed on exit even when the forward raises. Positions are passed as flat (row, col)
index tensors, so each layer's edit is one indexed add, with no Python loop over tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def write_at(
    hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, add: torch.Tensor | None, replace: torch.Tensor | None
) -> None:
    """hidden[rows, cols] = replace, then += add ([N, D] each), in place: the one edit every hook makes."""
    if replace is not None:
        hidden.index_put_((rows, cols), replace.to(hidden.device, hidden.dtype))
    if add is not None:  # positions are distinct, so a gather, add and scatter is exact and
        # avoids accumulate=True, whose sort-based CUDA kernel cost several ms per forward (bench/RESULTS.md)
        hidden.index_put_((rows, cols), hidden[rows, cols] + add.to(hidden.device, hidden.dtype))


_paused = [False]  # inside `prompt_edits_paused`: position edits and reads do nothing


@contextmanager
def prompt_edits_paused() -> Iterator[None]:
    """Position edits and reads (`edit_outputs`, `edit_inputs`) skip the forwards run inside the block.

    Their (row, col) positions are the prompt's: a forward the scorer runs afterwards over the
    prompt's cache (a label's continuation under --score full, a decoding step under --score
    generate) has other rows and columns, and an edit there would land on answer tokens, or out of
    range. Edits of every position (`map_outputs`, I2CL's) are the model's own state and stay on."""
    outer, _paused[0] = _paused[0], True
    try:
        yield
    finally:
        _paused[0] = outer


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

    def __call__(self, _module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        if _paused[0]:
            return output
        hidden = output[0] if isinstance(output, tuple) else output  # [B, T, D]
        rows = self.rows.to(hidden.device, non_blocking=True)
        cols = self.cols.to(hidden.device, non_blocking=True)
        write_at(hidden, rows, cols, self.add, self.replace)
        if self.read:
            self.value = hidden[rows, cols].float()
        return output


@contextmanager
def _installed(modules: Sequence[nn.Module], hooks: Sequence[Callable[..., Any]], pre: bool) -> Iterator[None]:
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

    def watcher(i: int) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            fn(i, output[0] if isinstance(output, tuple) else output)

        return hook

    with _installed(modules, [watcher(i) for i in range(len(modules))], pre=False):
        yield


@contextmanager
def map_outputs(modules: Sequence[nn.Module], fn: Callable[[int, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace `modules[i]`'s output ([B, T, D]; a tuple's first element) by `fn(i, hidden)`, a new tensor.

    For edits of every position at once that are not an indexed write (I2CL's b * out + a * v): the
    result is returned, never written in place, so autograd can differentiate through it while a
    fit learns the edit's parameters, and the module's own output is left as it was.
    """

    def mapper(i: int) -> Callable[[nn.Module, tuple[Any, ...], Any], Any]:
        def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
            if isinstance(output, tuple):
                return (fn(i, output[0]), *output[1:])
            return fn(i, output)

        return hook

    with _installed(modules, [mapper(i) for i in range(len(modules))], pre=False):
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

    def __call__(self, _module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if _paused[0]:
            return args
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
    values = [s.value for s in sites if s.value is not None]
    if len(values) != len(sites):
        raise RuntimeError("stack_reads: a site was not read (no forward ran inside its block, or read=False)")
    return torch.stack([v.to(values[0].device) for v in values])


@dataclass
class Edit:
    """What a method does to one forward: at (rows, cols) of `modules[l]`'s output, replace with
    `replace[l]` and/or add `add[l]` ([N, D]); `steady[l]` ([D]) is what it adds at every position
    when a caller steers a whole generation (None: the method has no such vector, e.g. TV replaces).
    `transform(l, hidden)` (optional) maps `modules[l]`'s whole output to a new tensor of its shape,
    every position of every forward, before the indexed edits: for an edit that depends on each
    activation itself rather than on where it sits (ICV's norm-preserving shift), so it applies the
    same way in `predict` and under `steering`, prompt and generated tokens alike.

    Methods build one (`Method.edit`) and use it in `predict` (`with edit.apply():`, positions
    relative to the batch); `steering` applies the same edit to a caller's `model(...)` or
    `model.generate(...)`, at absolute positions of the sequence.
    """

    modules: Sequence[nn.Module]
    rows: torch.Tensor
    cols: torch.Tensor
    add: torch.Tensor | Sequence[torch.Tensor | None] | None = None
    replace: torch.Tensor | Sequence[torch.Tensor | None] | None = None
    steady: Sequence[torch.Tensor] | None = None
    transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None

    def apply(self) -> AbstractContextManager[list[OutputSite]]:
        """The edit on one forward over the whole batch (what `predict` runs)."""
        if self.transform is None:
            return edit_outputs(self.modules, self.rows, self.cols, self.add, replace=self.replace)
        return _transformed(self)


@contextmanager
def _transformed(edit: Edit) -> Iterator[list[OutputSite]]:
    """`edit.transform` on every position (installed first, so the indexed edits see its result), then the rest."""
    assert edit.transform is not None
    with (
        map_outputs(edit.modules, edit.transform),
        edit_outputs(edit.modules, edit.rows, edit.cols, edit.add, replace=edit.replace) as sites,
    ):
        yield sites


class PositionClock:
    """Where the current forward of a model starts in its sequence, for hooks that edit absolute positions.

    A forward pre-hook on the top model reads the KV cache it is given: its length is the number of
    positions already encoded (0 for a prefill, or any call without a cache), so under `generate`
    the prefill covers positions 0..T-1 and each decoding step one position after them. A cache
    whose length cannot be read falls back to counting the positions seen since the last forward
    without a cache.
    """

    def __init__(self) -> None:
        self.start = 0
        self.seen = 0

    def __call__(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        width = 0 if ids is None else int(ids.shape[1])
        cache = next((kwargs[k] for k in ("cache", "past_key_values") if kwargs.get(k) is not None), None)
        if cache is None:
            start = 0
        elif hasattr(cache, "get_seq_length"):
            start = int(cache.get_seq_length())
        elif isinstance(cache, (tuple, list)) and cache and cache[0] is not None:  # legacy tuples
            start = int(cache[0][0].shape[-2])
        else:
            start = self.seen
        self.start, self.seen = start, start + width


class PositionalSite:
    """A forward hook that edits absolute positions of a sequence that arrives in several forwards.

    Each forward covers columns [clock.start, clock.start + T); the listed (row, col) edits that
    fall inside are applied there (so a prompt's edits apply in generate's prefill only), and
    `steady` is added at every position of every forward. A forward of k x `n_rows` rows (generate
    with beams or several sequences per prompt repeats each row k times, adjacent) edits every copy.
    """

    def __init__(
        self,
        clock: PositionClock,
        rows: torch.Tensor,
        cols: torch.Tensor,
        add: torch.Tensor | None = None,
        replace: torch.Tensor | None = None,
        steady: torch.Tensor | None = None,
        n_rows: int | None = None,
    ):
        self.clock, self.rows, self.cols = clock, rows, cols
        self.add, self.replace, self.steady, self.n_rows = add, replace, steady, n_rows

    def __call__(self, _module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output  # [B, T, D]
        start, width = self.clock.start, hidden.shape[1]
        rows, cols = self.rows.to(hidden.device), self.cols.to(hidden.device)
        inside = (cols >= start) & (cols < start + width) & (rows < hidden.shape[0])
        if inside.any():
            rows, cols = rows[inside], cols[inside] - start
            pick = inside.nonzero().squeeze(1)  # which listed edits apply, repeated with the rows below
            copies = hidden.shape[0] // self.n_rows if self.n_rows else 1
            if self.n_rows and copies > 1 and hidden.shape[0] == copies * self.n_rows:
                rows = (rows[:, None] * copies + torch.arange(copies, device=rows.device)).reshape(-1)
                cols, pick = cols.repeat_interleave(copies), pick.repeat_interleave(copies)
            write_at(
                hidden,
                rows,
                cols,
                None if self.add is None else self.add.to(hidden.device)[pick],
                None if self.replace is None else self.replace.to(hidden.device)[pick],
            )
        if self.steady is not None:
            hidden.add_(self.steady.to(hidden.device, hidden.dtype))
        return output


@contextmanager
def steering(
    model: nn.Module, edit: Edit, positions: bool = True, every_position: bool = False, n_rows: int | None = None
) -> Iterator[None]:
    """Apply `edit` to every forward of `model` inside the block: its (rows, cols) as absolute positions
    of the sequence (if `positions`), and/or its steady vectors at every position (if `every_position`);
    its `transform`, if any, at every position of every forward either way.
    `n_rows`: the edit's batch size, so a forward that repeats each row k times edits every copy.

    The hooks are removed on exit, also when the block raises.
    """
    if every_position and edit.steady is None and edit.transform is None:
        raise ValueError("this edit has nothing to apply at every position (no steady vector, no transform)")
    clock = PositionClock()
    n = len(edit.modules)

    def part(values: torch.Tensor | Sequence[torch.Tensor | None] | None, i: int) -> torch.Tensor | None:
        return None if values is None or not positions else values[i]

    sites = [
        PositionalSite(
            clock,
            edit.rows if positions else edit.rows[:0],
            edit.cols if positions else edit.cols[:0],
            part(edit.add, i),
            part(edit.replace, i),
            edit.steady[i] if every_position and edit.steady is not None else None,
            n_rows,
        )
        for i in range(n)
    ]
    handle = model.register_forward_pre_hook(clock, with_kwargs=True)
    transform = map_outputs(edit.modules, edit.transform) if edit.transform is not None else nullcontext()
    try:
        with transform, _installed(edit.modules, sites, pre=False):
            yield
    finally:
        handle.remove()
