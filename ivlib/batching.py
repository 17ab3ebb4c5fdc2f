"""The batched loop over many prompts: progress bars, length-sorted batches, out-of-memory halving,
and naming the layer that overflowed when a batch scores NaN.

Kept apart from the forward passes (`scoring.Scorer`) because it is policy, not model code: how
many rows go into one forward, what to do when they do not fit, how to report progress. A
`BatchRunner` knows nothing of scoring; it is handed the function that turns prompts into a
device batch, and each caller's per-batch function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from . import budget
from . import distributed as dist
from .errors import UsageError
from .hooks import watch_outputs
from .models import LoadedModel
from .prompts import EncodedPrompt, PromptBatch, length_order

T = TypeVar("T")
HALF = (torch.float16, torch.bfloat16)


class NonFinite(UsageError):
    """inf/NaN in the activations: a setting that scales the method's edits is too large, or the model
    overflowed in half precision. The runner does not know the method; `advised` names its own flags
    (`Method.scaling_flags`), so the advice says what this method can lower."""

    def __init__(self, what: str, dtype: torch.dtype, flags: tuple[str, ...] | None = None):
        self.what, self.dtype, self.flags = what, dtype, flags
        precision = str(dtype).removeprefix("torch.")
        half = f"--no-half (the model runs in {precision})" if dtype in HALF else ""
        if flags is None:
            lower = "smaller values of the settings that scale the method's edits"
        else:
            lower = f"a smaller {' or '.join(flags)}" if flags else ""
        accepted = ", or ".join(x for x in (lower, half) if x)
        tail = f"accepted: {accepted}" if accepted else f"the model itself overflows on these prompts in {precision}"
        super().__init__(f"{what}; {tail}")

    def advised(self, flags: tuple[str, ...]) -> NonFinite:
        """The same error, its advice naming the method's own settings."""
        return NonFinite(self.what, self.dtype, flags)


class BatchRunner:
    """Runs per-batch functions over many prompts at `batch_size` rows per forward.

    `batch_size` is the run's state, not a constant: with `shrink_on_oom` (--batch-size auto) an
    out-of-memory error halves it for the rest of the run, and the record reports what was used.
    """

    def __init__(
        self,
        lm: LoadedModel,
        make_batch: Callable[[list[EncodedPrompt]], PromptBatch],
        batch_size: int,
        quiet: bool = False,
        shrink_on_oom: bool = False,
    ):
        self.lm = lm
        self.make_batch = make_batch  # prompts -> device batch (the scorer's, which checks the context)
        self.batch_size = batch_size
        self.shrink_on_oom = shrink_on_oom  # --batch-size auto: halve and retry instead of failing
        self.quiet = quiet

    def progress(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=self.quiet, unit="ep", dynamic_ncols=True)

    def each(
        self,
        order: Sequence[int],
        fn: Callable[[list[int]], None],
        desc: str,
        fallback: Callable[[int], bool] | None = None,
    ) -> None:
        """Call `fn` on consecutive chunks of `order`, at most `batch_size` indices each, in order.

        The library's one out-of-memory policy, so every loop that can run out of memory fails and
        recovers the same way: a chunk that does not fit is run again, first through `fallback(rows)`
        where one is given (a cheaper way to run the same rows, e.g. fewer rows per inner forward:
        True = retry as is, False = it has nothing left), else at half the batch size with the rest
        of `order` re-split at the new size (--batch-size auto); with a fixed size the run stops with
        a one-line error. `fn` must leave no trace of a chunk that raised, since it runs again.
        """
        pending = list(order)
        while pending:
            idx = pending[: self.batch_size]
            try:
                fn(idx)
                fitted = True
            except torch.OutOfMemoryError:
                fitted = False  # handled below, once the traceback (and the tensors its frames hold) is gone
            if fitted:
                del pending[: len(idx)]
                continue
            if self.lm.device.type == "cuda":
                torch.cuda.empty_cache()
            if fallback is None or not fallback(len(idx)):
                self._halve(desc)

    def _halve(self, desc: str) -> None:
        """Halve the batch size (--batch-size auto), or stop with a one-line error naming the size that
        did not fit."""
        if not self.shrink_on_oom or self.batch_size == 1:
            raise UsageError(
                f"{desc}: out of memory at batch size {self.batch_size}; "
                "accepted: a smaller --batch-size, or --batch-size auto"
            )
        self.batch_size = max(1, self.batch_size // 2)

    def _nonfinite_report(self, batch: PromptBatch, fn: Callable[[PromptBatch], torch.Tensor], desc: str) -> NonFinite:
        """Re-run the failing batch watching every block's output, to name the first layer that overflowed."""
        first: list[int] = []
        mask = batch.attention_mask.bool()

        def check(layer: int, hidden: torch.Tensor) -> None:
            real = hidden[mask] if hidden.shape[:2] == mask.shape else hidden  # pads may hold anything
            if not first and not torch.isfinite(real).all():
                first.append(layer)

        with watch_outputs(self.lm.layout.blocks, check):
            fn(batch)
        where = f"first at layer {first[0]}" if first else "in the output head"
        return NonFinite(f"{desc}: non-finite values (inf/NaN) in the activations, {where}", self.lm.dtype)

    def shared(self, work: Callable[[], T], desc: str) -> list[T]:
        """This process's share of a split loop, then every process's result (see `distributed.share`).
        The processes then continue at the smallest batch size any of them reached, so they agree on
        it (and the record reports it). One process: `[work()]`."""
        start = budget.counted()
        results = dist.share(lambda: (work(), self.batch_size, budget.counted() - start), desc)
        self.batch_size = min(size for _, size, _ in results)
        mine = dist.rank()  # the others' shares of the split loop count as if run here (budget.py)
        budget.add_elsewhere(sum(tokens for i, (_, _, tokens) in enumerate(results) if i != mine))
        return [result for result, _, _ in results]

    def map(
        self,
        prompts: list[EncodedPrompt],
        fn: Callable[[PromptBatch], torch.Tensor],
        desc: str,
        fallback: Callable[[int], bool] | None = None,
    ) -> torch.Tensor:
        """Apply `fn` ([B] rows -> [B, ...]) to length-sorted batches; rows come back in input order.

        With several processes each runs whole batches of the single process's batching (dealt
        round-robin, `distributed.shard_batches`) and every process gets all rows back, so a row's
        output does not depend on the number of processes. Out of memory: see `each` (`fallback`
        is handed to it)."""
        mine = dist.shard_batches(length_order(prompts), self.batch_size)
        pieces: list[tuple[list[int], torch.Tensor]] = []
        with self.progress(len(mine), desc) as bar:

            def run(idx: list[int]) -> None:
                batch = self.make_batch([prompts[i] for i in idx])
                result = fn(batch).cpu()
                if torch.isnan(result).any():  # never score an overflow silently
                    raise self._nonfinite_report(batch, fn, desc)
                pieces.append((idx, result))
                bar.update(len(idx))

            def work() -> list[tuple[list[int], torch.Tensor]]:
                self.each(mine, run, desc, fallback)
                return pieces

            parts = self.shared(work, desc)
        return dist.rows_in_order(parts, len(prompts))
