"""Forward passes that end in label scores, and the batched loop every method's evaluation uses."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import UsageError
from .kvcache import repeated_with_room
from .models import LoadedModel
from .prompts import EncodedPrompt, PromptBatch, collate, length_sorted_batches, option_lengths


class Scorer:
    """Runs a model on prompt batches and turns the answer position into per-label log-probs.

    Only the last column's logits are computed where the model allows it: the LM head over
    every position is a large share of a small model's compute and is never needed here.
    """

    def __init__(
        self, lm: LoadedModel, label_ids: list[int], batch_size: int, quiet: bool = False, shrink_on_oom: bool = False
    ):
        self.lm = lm
        self.label_ids = torch.tensor(label_ids, dtype=torch.long, device=lm.device)  # indexed every batch: moved once
        self.batch_size = batch_size
        self.shrink_on_oom = shrink_on_oom  # --batch-size auto: halve and retry instead of failing
        self.quiet = quiet
        self._keep_last = "logits_to_keep" in inspect.signature(lm.model.forward).parameters
        self._context = lm.context_length
        params = inspect.signature(lm.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x
        self.preallocate = True  # last-token searches write into a preallocated prefix cache (False: growing copy)

    @property
    def layout(self):
        return self.lm.layout

    def batch(self, prompts: list[EncodedPrompt]) -> PromptBatch:
        longest = max(len(p.ids) for p in prompts)
        if self._context is not None and longest > self._context:
            raise UsageError(
                f"a prompt of {longest} tokens exceeds the context of model '{self.lm.name}' "
                f"({self._context}); lower --shot/--ext-shot or --max-example-tokens"
            )
        return collate(prompts, self.lm.tokenizer.pad_token_id).to(self.lm.device)

    @torch.inference_mode()
    def forward(self, batch: PromptBatch) -> torch.Tensor:
        """Next-token logits at each row's answer position: [B, V]."""
        kwargs = {"logits_to_keep": 1} if self._keep_last else {}
        out = self.lm.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
            **kwargs,
        )
        return out.logits[:, -1]

    def last_token_variants(
        self, batch: PromptBatch, edits: Sequence[Callable[[], AbstractContextManager]]
    ) -> torch.Tensor:
        """[V, B, C] label log-probs of the same batch under V edits that touch only the last token."""
        groups = self.last_token_groups(batch, [(1, edit) for edit in edits])
        return torch.stack([g[:, 0] for g in groups])

    @torch.inference_mode()
    def last_token_groups(
        self, batch: PromptBatch, edits: Sequence[tuple[int, Callable[[], AbstractContextManager]]]
    ) -> list[torch.Tensor]:
        """Label log-probs of the batch under edits that touch only the last token: one [B, g, C] per edit.

        The prefix (all but the last column) is encoded once into a KV cache; each edit then runs
        only the last token over it, with every row repeated g times (row b * g + j), so one forward
        can try g variants (e.g. one head each). Equal to full forwards when the edits cannot
        reach earlier positions, which is what makes a per-layer or per-head search affordable.
        """
        cut = batch.input_ids.shape[1] - 1
        prefix = self.lm.model(
            input_ids=batch.input_ids[:, :cut],
            attention_mask=batch.attention_mask[:, :cut],
            position_ids=batch.position_ids[:, :cut],
            use_cache=True,
            **({"logits_to_keep": 1} if self._keep_last else {}),
        )
        base = self.cache_of(prefix)
        caches: dict[int, object] = {}
        out = []
        for g, edit in edits:
            if g not in caches:
                caches[g] = self._repeated_cache(base, g)
            with edit():
                step = self.lm.model(
                    input_ids=batch.input_ids[:, cut:].repeat_interleave(g, 0),
                    attention_mask=batch.attention_mask.repeat_interleave(g, 0),
                    position_ids=batch.position_ids[:, cut:].repeat_interleave(g, 0),
                    use_cache=True,
                    **{self._cache_kwarg: caches[g]},
                )
            caches[g].crop(-1)  # negative = tokens to remove: the next edit starts from the bare prefix
            out.append(self._label_logprobs(step.logits[:, -1]).view(batch.input_ids.shape[0], g, -1))
        return out

    def _repeated_cache(self, base, g: int):
        """The prefix cache with each row repeated g times and one free slot (see `repeated_with_room`):
        each last-token forward writes its token there instead of copying the prefix, which on long
        prompts cost more than the forward itself. Caches that cannot be preallocated keep the copy."""
        cache = repeated_with_room(base, g) if self.preallocate else None
        if cache is None:
            cache = copy.deepcopy(base)
            if g > 1:
                cache.batch_repeat_interleave(g)
        return cache

    def _label_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, V] next-token logits -> [N, C] float32 log-probabilities of each label's first token."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return logprobs[:, self.label_ids.to(logprobs.device)]

    @staticmethod
    def cache_of(out):
        """The cache a forward returned (the output field was renamed in transformers 5.2x)."""
        return getattr(out, "cache", None) or out.past_key_values

    @torch.inference_mode()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, past=None):
        """One forward with a cache: (next-token logits at the last column [B, V], the cache).

        `mask` covers the past and `ids` ([B, T_past + T]); `past` (a transformers Cache) is
        extended in place.
        """
        kwargs = {"logits_to_keep": 1} if self._keep_last else {}
        if past is not None:
            kwargs[self._cache_kwarg] = past
        out = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.logits[:, -1], self.cache_of(out)

    def score_after(
        self,
        past,
        past_mask: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        batch: PromptBatch,
    ) -> torch.Tensor:
        """Answer scores [B, C] of the query `ids` [B, T] run over a prepared cache `past`."""
        full_mask = torch.cat([past_mask, mask], dim=1)
        logits, cache = self.encode(ids, full_mask, positions, past=past)
        return self._answer_scores(logits, cache, full_mask, positions[:, -1] + 1, batch)

    @torch.inference_mode()
    def _answer_scores(
        self, last_logits: torch.Tensor, cache, mask: torch.Tensor, next_pos: torch.Tensor, batch: PromptBatch
    ) -> torch.Tensor:
        """Classification: each label's first-token log-prob. Multiple choice: each option's summed
        continuation log-prob (-inf for a missing option), running the options over the prompt's cache
        so the prompt is encoded once however many options there are."""
        if batch.option_ids is None:
            return self._label_logprobs(last_logits)
        opt, lens = batch.option_ids, batch.option_lens  # [B, C, Lo], [B, C]
        b, c, width = opt.shape
        first = torch.log_softmax(last_logits.float(), dim=-1).gather(1, opt[:, :, 0])  # [B, C]
        total = first
        if width > 1:
            cache.batch_repeat_interleave(c)
            steps = opt[:, :, :-1].reshape(b * c, width - 1)  # tokens fed; each predicts the next one
            step_mask = (torch.arange(width - 1, device=opt.device) < (lens.reshape(-1, 1) - 1)).long()
            out = self.lm.model(
                input_ids=steps,
                attention_mask=torch.cat([mask.repeat_interleave(c, 0), step_mask], 1),
                position_ids=next_pos.repeat_interleave(c)[:, None] + torch.arange(width - 1, device=opt.device),
                use_cache=True,
                **{self._cache_kwarg: cache},
            )
            logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # [B*C, Lo-1, V]
            rest = logprobs.gather(2, opt[:, :, 1:].reshape(b * c, width - 1, 1)).squeeze(2)
            total = total + (rest * step_mask).sum(dim=1).view(b, c)
        return total.masked_fill(lens == 0, float("-inf"))

    def label_scores(self, batch: PromptBatch) -> torch.Tensor:
        """[B, C] float32 answer scores: label first-token log-probs, or option log-probs (multiple choice)."""
        if batch.option_ids is None:
            return self._label_logprobs(self.forward(batch))
        logits, cache = self.encode(batch.input_ids, batch.attention_mask, batch.position_ids)
        return self._answer_scores(logits, cache, batch.attention_mask, batch.position_ids[:, -1] + 1, batch)

    def shrink_after_oom(self, desc: str) -> int:
        """After an out-of-memory error: halve the batch size and return it (--batch-size auto), or stop
        with a one-line error naming the size that did not fit."""
        if not self.shrink_on_oom or self.batch_size == 1:
            raise UsageError(
                f"{desc}: out of memory at batch size {self.batch_size}; "
                "accepted: a smaller --batch-size, or --batch-size auto"
            ) from None
        if self.lm.device.type == "cuda":
            torch.cuda.empty_cache()
        self.batch_size = max(1, self.batch_size // 2)
        return self.batch_size

    def _shrink(self, pending: list[list[int]], prompts: list[EncodedPrompt], desc: str) -> list[list[int]]:
        """Halve the batch size after an out-of-memory error and re-plan the batches not yet run."""
        size = self.shrink_after_oom(desc)
        rest = sorted((i for idx in pending for i in idx), key=lambda i: len(prompts[i].ids))
        return [rest[i : i + size] for i in range(0, len(rest), size)]

    def _nonfinite_report(self, batch: PromptBatch, fn: Callable[[PromptBatch], torch.Tensor], desc: str) -> str:
        """Re-run the failing batch watching every block's output, to name the first layer that overflowed."""
        first: list[int] = []
        mask = batch.attention_mask.bool()

        def watch(layer: int):
            def hook(module, inputs, output):
                hidden = output[0] if isinstance(output, tuple) else output
                real = hidden[mask] if hidden.shape[:2] == mask.shape else hidden  # pads may hold anything
                if not first and not torch.isfinite(real).all():
                    first.append(layer)

            return hook

        handles = [block.register_forward_hook(watch(i)) for i, block in enumerate(self.layout.blocks)]
        try:
            fn(batch)
        finally:
            for h in handles:
                h.remove()
        where = f"first at layer {first[0]}" if first else "in the output head"
        return (
            f"{desc}: non-finite values (inf/NaN) in the activations, {where}; "
            "run with --no-half or lower the strengths"
        )

    @staticmethod
    def predictions(scores: torch.Tensor, prompts: list[EncodedPrompt]) -> np.ndarray:
        """Chosen answer per row of [N, C] scores; multiple-choice options are compared per token
        (length-normalised), so a long option is not penalised for its length."""
        if prompts and prompts[0].options is not None:
            return (scores / option_lengths(prompts).clamp(min=1)).argmax(dim=-1).numpy()
        return scores.argmax(dim=-1).numpy()

    def progress(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=self.quiet, unit="ep", dynamic_ncols=True)

    def run_batched(
        self, prompts: list[EncodedPrompt], fn: Callable[[PromptBatch], torch.Tensor], desc: str
    ) -> torch.Tensor:
        """Apply `fn` ([B] rows -> [B, ...]) to length-sorted batches; rows come back in input order."""
        out: torch.Tensor | None = None
        with self.progress(len(prompts), desc) as bar:
            pending = length_sorted_batches(prompts, self.batch_size)
            while pending:
                idx = pending.pop(0)
                batch = self.batch([prompts[i] for i in idx])
                try:
                    result = fn(batch).cpu()
                except torch.OutOfMemoryError:
                    del batch
                    pending = self._shrink([idx, *pending], prompts, desc)
                    continue
                if torch.isnan(result).any():  # never score an overflow silently
                    raise UsageError(self._nonfinite_report(batch, fn, desc))
                if out is None:
                    out = torch.empty((len(prompts), *result.shape[1:]), dtype=result.dtype)
                out[torch.tensor(idx)] = result
                bar.update(len(idx))
        assert out is not None
        return out
