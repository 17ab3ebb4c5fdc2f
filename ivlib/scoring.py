"""Forward passes that end in label scores: the answer column, the prefix-cache last-token search,
options scored over a cache. The loop over many prompts is `batching.BatchRunner`, reached as
`scorer.runner`, so a method gets both from the one object it is handed."""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from .batching import BatchRunner
from .errors import UsageError
from .hooks import edit_inputs, prompt_edits_paused, stack_reads
from .kvcache import expand_rows, repeated_with_room, rewindable
from .layout import ModelLayout
from .metrics import selection_score
from .models import LoadedModel
from .prompts import EncodedPrompt, PromptBatch, collate, option_lengths
from .rules import Answers, Rule, with_label_options

LastTokenEdit = Callable[[torch.Tensor, torch.Tensor], AbstractContextManager[Any]]
"""An edit of each row's last token, given where that token sits in the forward about to run:
(rows [N], cols [N]) -> a context manager that installs it. The same edit serves the prefix-cache
search (`Scorer.last_token_groups`: the token alone, column 0, rows repeated) and full forwards
(`Scorer.at_last_token`: the query separator), so neither TV nor FV builds positions itself."""


def no_edit(_rows: torch.Tensor, _cols: torch.Tensor) -> AbstractContextManager[None]:
    """The unedited baseline among a search's edits."""
    return contextlib.nullcontext()


@dataclass
class Prefix:
    """A shared prompt prefix (BOS + fixed demonstrations) encoded once: its one-row cache and length.

    Under `Scorer.over(prefix)` every forward of the scorer runs a batch of query-only prompts after
    it, so a method's `predict` scores those queries as it would score the whole prompts.
    """

    cache: Any  # a transformers Cache with one row; never extended (each batch gets an expanded view)
    length: int  # tokens in the prefix


def head_means(scorer: Scorer, prompts: list[EncodedPrompt], desc: str) -> torch.Tensor:
    """[L, H, head_dim] float32: each head's output (the output projection's input) at each prompt's
    last token, averaged over the prompts: FV's mean activations and SITE's task embedding. A normal
    tensor, not an inference one, so it can take part in a differentiated forward (SITE's fit)."""
    layout = scorer.layout

    def read(batch: PromptBatch) -> torch.Tensor:  # [B, L, H * head_dim]
        with scorer.at_last_token(batch, partial(edit_inputs, layout.attn_out, read=True)) as sites:
            scorer.forward(batch)
        return stack_reads(sites).transpose(0, 1)

    mean = scorer.runner.map(prompts, read, desc).mean(dim=0)  # [L, F]
    with torch.inference_mode(False):
        return mean.view(layout.n_layers, layout.n_heads, -1).clone()


def gold_first(batch: PromptBatch) -> torch.Tensor | None:
    """[B] an open-vocabulary batch's answers' first tokens (each row's one label), else None."""
    return None if batch.answer_ids is None else batch.answer_ids[:, 0]


class Scorer:
    """Runs a model on prompt batches and turns the answer position into per-label log-probs.

    Only the last column's logits are computed where the model allows it: the LM head over
    every position is a large share of a small model's compute and is never needed here.
    """

    def __init__(
        self,
        lm: LoadedModel,
        label_ids: list[int],
        batch_size: int,
        quiet: bool = False,
        shrink_on_oom: bool = False,
        rule: Rule | None = None,
    ):
        self.lm = lm
        self.label_ids = torch.tensor(label_ids, dtype=torch.long, device=lm.device)  # indexed every batch: moved once
        # how the answer position becomes scores (--score); a bare scorer compares label first tokens
        self.rule = rule or Rule("first-token", Answers((), tuple(label_ids)))
        self.metric = "macro"  # what a method selecting on validation maximises (the protocol's headline)
        # the batched loop (progress, batch size, out-of-memory halving): policy, kept out of the forwards
        self.runner = BatchRunner(lm, self.batch, batch_size, quiet=quiet, shrink_on_oom=shrink_on_oom)
        self._keep_last = "logits_to_keep" in inspect.signature(lm.model.forward).parameters
        self._context = lm.context_length
        params = inspect.signature(lm.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x
        self._trainable = False  # inside `trainable()`: what `differentiable_scores` asks for
        self.preallocate = True  # last-token searches write into a preallocated prefix cache (False: growing copy)
        self.prefix: Prefix | None = None  # inside `over`: the cached prefix every batch runs after
        # the ids the run's prompts begin with (make_scorer sets its encoder's: --bos tokenizer may differ
        # from the model's); a method building prompts of its own from a batch puts them first
        self.bos: list[int] = (
            [lm.tokenizer.bos_token_id] if lm.add_bos and lm.tokenizer.bos_token_id is not None else []
        )

    @property
    def layout(self) -> ModelLayout:
        return self.lm.layout

    def batch(self, prompts: list[EncodedPrompt]) -> PromptBatch:
        self.check_context(max(len(p.ids) for p in prompts))
        return collate(prompts, self.lm.tokenizer.pad_token_id).to(self.lm.device)

    def check_context(self, longest: int) -> None:
        """Refuse a prompt of `longest` tokens beyond the model's context (query parts run over a shared
        prefix are checked whole, by the caller, since their batches do not hold the prefix)."""
        if self._context is not None and longest > self._context:
            raise UsageError(
                f"a prompt of {longest} tokens exceeds the context of model '{self.lm.name}' "
                f"({self._context}); lower --shot/--ext-shot or --max-example-tokens"
            )

    @torch.inference_mode()
    def forward(self, batch: PromptBatch) -> torch.Tensor:
        """Next-token logits at each row's answer position: [B, V]."""
        return self._last_logits(batch)

    def differentiable_scores(self, batch: PromptBatch) -> torch.Tensor:
        """[B, C] label log-probs that carry gradients back to whatever the installed hooks mix in.

        For fits that learn a few parameters against the frozen model (a calibration, mixing weights):
        the forward is `label_scores`' own, so what the fit optimises is what evaluation scores. Call it
        inside `trainable()`; classification only (an option's continuation is not differentiated).
        """
        if batch.option_ids is not None:
            raise UsageError("a fit with gradients scores classification tasks only, not multiple choice")
        if not self._trainable or not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            raise RuntimeError("differentiable_scores needs autograd: call it inside `with scorer.trainable():`")
        return self.label_logprobs(self._last_logits(batch), gold_first(batch))

    @contextlib.contextmanager
    def trainable(self) -> Iterator[None]:
        """Autograd on, the model's own weights frozen: inference mode is the scorer's default for
        evaluation, not a law, and a fit that needs gradients (I2CL, Soft Injection) runs inside this.
        Weights get no `.grad` (nor its memory); their `requires_grad` flags are restored on exit.
        Tensors made under inference mode (e.g. vectors read by `runner.map`) must be cloned before
        they take part in a differentiated forward."""
        params = list(self.lm.model.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        outer, self._trainable = self._trainable, True
        try:
            with torch.inference_mode(False), torch.enable_grad():
                yield
        finally:
            self._trainable = outer
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)

    def _last_logits(self, batch: PromptBatch) -> torch.Tensor:
        if self.prefix is not None:
            return self._after_prefix(batch)[0]
        kwargs = {"logits_to_keep": 1} if self._keep_last else {}
        out = self.lm.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
            **kwargs,
        )
        last: torch.Tensor = out.logits[:, -1]
        return last

    # ---- a shared prefix encoded once (--demos fixed) ------------------------------------------------
    @torch.inference_mode()
    def encode_prefix(self, batch: PromptBatch) -> Prefix:
        """Run a one-row batch of BOS + demonstrations (no padding) into a cache, with whatever
        hooks the caller installed (IV's edits at the demonstrations' separators)."""
        if batch.input_ids.shape[0] != 1:
            raise ValueError("a shared prefix is one row")
        _, cache = self.encode(batch.input_ids, batch.attention_mask, batch.position_ids)
        return Prefix(cache, batch.input_ids.shape[1])

    @contextlib.contextmanager
    def over(self, prefix: Prefix) -> Iterator[None]:
        """Inside the block every forward of the scorer (`forward`, `label_scores`, hence a method's
        `predict`) runs its batch of query-only prompts after `prefix`, expanded to the batch's rows:
        positions continue after the prefix and the queries' left padding sits between the two,
        masked out, so scores equal those of the whole prompts."""
        outer, self.prefix = self.prefix, prefix
        try:
            yield
        finally:
            self.prefix = outer

    def _after_prefix(self, batch: PromptBatch) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """(last-column logits [B, V], the cache after the queries, mask [B, P + T], positions [B, T])."""
        prefix = self.prefix
        assert prefix is not None
        rows = batch.input_ids.shape[0]
        past_mask = batch.attention_mask.new_ones(rows, prefix.length)
        mask = torch.cat([past_mask, batch.attention_mask], dim=1)
        positions = batch.position_ids + prefix.length
        keep = self._continues(batch)  # answers run over the cache afterwards; first tokens need nothing kept
        logits, cache = self.encode(batch.input_ids, mask, positions, past=expand_rows(prefix.cache, rows, keep))
        return logits, cache, mask, positions

    def at_last_token(self, batch: PromptBatch, edit: LastTokenEdit) -> AbstractContextManager[Any]:
        """`edit` installed at every row's last token (the query separator) for full forwards of `batch`:
        the same edit a last-token search tried, so what it chose is what evaluation runs."""
        rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
        return edit(rows, batch.query_cols)

    def last_token_variants(self, batch: PromptBatch, edits: Sequence[LastTokenEdit]) -> torch.Tensor:
        """[V, B, W] answer rows of the same batch under V edits that touch only the last token."""
        groups = self.last_token_groups(batch, [(1, edit) for edit in edits])
        return torch.stack([g[:, 0] for g in groups])

    @torch.inference_mode()
    def last_token_groups(self, batch: PromptBatch, edits: Sequence[tuple[int, LastTokenEdit]]) -> list[torch.Tensor]:
        """Label log-probs of the batch under edits that touch only the last token: one [B, g, C] per edit.

        The prefix (all but the last column) is encoded once into a KV cache; each edit then runs
        only the last token over it, with every row repeated g times (row b * g + j), so one forward
        can try g variants (e.g. one head each). Equal to full forwards when the edits cannot
        reach earlier positions, which is what makes a per-layer or per-head search affordable.
        Each edit is called with that forward's positions: rows 0..B*g-1, column 0.
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
        caches: dict[int, Any] = {}  # transformers Cache objects, one per repeat count
        out = []
        for g, edit in edits:
            if g not in caches:
                caches[g] = self._repeated_cache(base, g)
            rows = torch.arange(batch.input_ids.shape[0] * g, device=batch.input_ids.device)
            with edit(rows, torch.zeros_like(rows)):
                step = self.lm.model(
                    input_ids=batch.input_ids[:, cut:].repeat_interleave(g, 0),
                    attention_mask=batch.attention_mask.repeat_interleave(g, 0),
                    position_ids=batch.position_ids[:, cut:].repeat_interleave(g, 0),
                    use_cache=True,
                    **{self._cache_kwarg: caches[g]},
                )
            caches[g].crop(-1)  # negative = tokens to remove: the next edit starts from the bare prefix
            gold = gold_first(batch)
            gold = None if gold is None else gold.repeat_interleave(g)
            out.append(self._search_scores(step.logits[:, -1], gold).view(batch.input_ids.shape[0], g, -1))
        return out

    def _repeated_cache(self, base: Any, g: int) -> Any:
        """The prefix cache with each row repeated g times and one free slot (see `repeated_with_room`):
        each last-token forward writes its token there instead of copying the prefix, which on long
        prompts cost more than the forward itself. Caches that cannot be preallocated keep the copy."""
        cache = repeated_with_room(base, g) if self.preallocate else None
        if cache is None:
            cache = rewindable(copy.deepcopy(base))
            if g > 1:
                cache.batch_repeat_interleave(g)
        return cache

    def _search_scores(self, logits: torch.Tensor, gold: torch.Tensor | None = None) -> torch.Tensor:
        """A last-token search's rows: the rule's where the answer position decides it (first-token,
        vocab), else the labels' first-token log-probs (their first C columns are those either way)."""
        if self.rule.last_token:
            return self.rule.from_logits(logits, gold)
        return self.label_logprobs(logits, gold)

    def label_logprobs(self, logits: torch.Tensor, gold: torch.Tensor | None = None) -> torch.Tensor:
        """[N, V] next-token logits -> [N, C] float32 log-probabilities of each label's first token
        (`gold` [N]: an open-vocabulary task's own answer's first token per row, C = 1)."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if gold is not None:
            return logprobs.gather(1, gold.to(logprobs.device)[:, None])
        return logprobs[:, self.label_ids.to(logprobs.device)]

    @staticmethod
    def cache_of(out: Any) -> Any:
        """The cache a forward returned (the output field was renamed in transformers 5.2x)."""
        return getattr(out, "cache", None) or out.past_key_values

    @torch.inference_mode()
    def encode(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, past: Any = None
    ) -> tuple[torch.Tensor, Any]:
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
        past: Any,
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
        self, last_logits: torch.Tensor, cache: Any, mask: torch.Tensor, next_pos: torch.Tensor, batch: PromptBatch
    ) -> torch.Tensor:
        """[B, W] rows of the scoring rule from the answer position's logits and the prompt's cache:
        the rule's own row where the logits decide; otherwise each answer's (an option's, or a label's
        under `full`) summed continuation log-prob, -inf for a missing option; or a greedy decoding."""
        if self.rule.name == "generate" and batch.option_ids is None:
            gold = None
            if batch.answer_ids is not None and batch.answer_lens is not None:
                gold = self.rule.gold_texts(batch.answer_ids, batch.answer_lens)
            return self._generate(last_logits, cache, mask, next_pos, gold)
        if not self._continues(batch):
            return self.rule.from_logits(last_logits, gold_first(batch))
        opt, lens = with_label_options(batch, self.rule.answers)  # [B, C, Lo], [B, C]
        b, c, width = opt.shape
        first = torch.log_softmax(last_logits.float(), dim=-1).gather(1, opt[:, :, 0])  # [B, C]
        total = first
        if width > 1:  # the answers run over the prompt's cache, the prompt encoded once for all of them
            cache.batch_repeat_interleave(c)
            steps = opt[:, :, :-1].reshape(b * c, width - 1)  # tokens fed; each predicts the next one
            step_mask = (torch.arange(width - 1, device=opt.device) < (lens.reshape(-1, 1) - 1)).long()
            with prompt_edits_paused():  # the prompt's edits are done; these are answer positions
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

    @torch.inference_mode()
    def _generate(
        self, last_logits: torch.Tensor, cache: Any, mask: torch.Tensor, next_pos: torch.Tensor, gold: list[str] | None
    ) -> torch.Tensor:
        """Greedy decoding over the prompt's cache, every row at once (left-padded, so each row's next
        token is its last column): [B, C + 1 + N], the rule's match columns then the decoded ids (-1
        after a row stopped). Stops early once every row has ended its answer."""
        n = self.rule.max_new_tokens
        rows = last_logits.shape[0]
        tokens = torch.full((rows, n), -1, dtype=torch.long)
        token = last_logits.argmax(dim=-1)  # [B]
        kwargs = {"logits_to_keep": 1} if self._keep_last else {}
        with prompt_edits_paused():  # the prompt's edits are done; decoding steps are answer positions
            for step in range(n):
                tokens[:, step] = token.cpu()
                if step == n - 1 or all(self.rule.ended(row[: step + 1]) for row in tokens):
                    break
                mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
                out = self.lm.model(
                    input_ids=token[:, None],
                    attention_mask=mask,
                    position_ids=(next_pos + step)[:, None],
                    use_cache=True,
                    **{self._cache_kwarg: cache},
                    **kwargs,
                )
                cache = self.cache_of(out)
                token = out.logits[:, -1].argmax(dim=-1)
        return torch.cat([self.rule.matches(tokens, gold), tokens.float()], dim=1).to(last_logits.device)

    def label_scores(self, batch: PromptBatch) -> torch.Tensor:
        """[B, W] float32 answer scores under the scoring rule (`rules`): label first-token log-probs
        by default; whole-label or option log-probs, vocabulary or generation rows otherwise."""
        if not self._continues(batch):
            return self.rule.from_logits(self.forward(batch), gold_first(batch))
        if self.prefix is not None:  # the answers run over the prefix + query cache, as over a whole prompt's
            logits, cache, mask, positions = self._after_prefix(batch)
            return self._answer_scores(logits, cache, mask, positions[:, -1] + 1, batch)
        logits, cache = self.encode(batch.input_ids, batch.attention_mask, batch.position_ids)
        return self._answer_scores(logits, cache, batch.attention_mask, batch.position_ids[:, -1] + 1, batch)

    def _continues(self, batch: PromptBatch) -> bool:
        """Whether scoring runs past the answer position: options, whole labels, decoding."""
        return batch.option_ids is not None or self.rule.needs_cache

    def predictions(self, scores: torch.Tensor, prompts: list[EncodedPrompt]) -> np.ndarray:
        """Chosen answer per row of [N, W] scores (N: none of them, under vocab and generate).
        Multiple-choice options are compared per token (length-normalised) unless the rule is `full`,
        so a long option is not penalised for its length; `full-mean` does the same for labels."""
        if prompts and prompts[0].options is not None:
            per_option = option_lengths(prompts).clamp(min=1).to(scores.dtype)
            head = scores if self.rule.name == "full" else scores / per_option
            return head.argmax(dim=-1).numpy()
        tokens = self.rule.answers.tokens
        return self.rule.choices(scores, torch.tensor([len(t) for t in tokens]) if tokens else None)

    def selection_score(self, y_true: Any, y_pred: Any, n_classes: int, multiple_choice: bool = False) -> float:
        """What a method selecting on validation maximises (TV's layer, SV's L, DT's steps): the
        protocol's headline metric, macro-F1 or accuracy (multiple choice: accuracy)."""
        return selection_score(y_true, y_pred, n_classes, accuracy=multiple_choice or self.metric == "accuracy")

    def selection_choices(self, scores: torch.Tensor) -> np.ndarray:
        """[N, W] scores of a last-token search (`last_token_groups`) -> predictions: by the rule where
        the answer position decides it (first-token, vocab), else by the labels' first tokens."""
        return self.rule.choices(scores) if self.rule.last_token else scores.argmax(dim=-1).numpy()
