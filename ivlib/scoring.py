"""Forward passes that end in label scores, and the batched loop every method's evaluation uses."""
from __future__ import annotations

import copy
import inspect
from typing import Callable, ContextManager, Sequence

import torch
from tqdm.auto import tqdm

from .errors import UsageError
from .models import LoadedModel
from .prompts import EncodedPrompt, PromptBatch, collate, length_sorted_batches


class Scorer:
    """Runs a model on prompt batches and turns the answer position into per-label log-probs.

    Only the last column's logits are computed where the model allows it: the LM head over
    every position is a large share of a small model's compute and is never needed here.
    """

    def __init__(self, lm: LoadedModel, label_ids: list[int], batch_size: int, quiet: bool = False):
        self.lm = lm
        self.label_ids = torch.tensor(label_ids, dtype=torch.long)
        self.batch_size = batch_size
        self.quiet = quiet
        self._keep_last = "logits_to_keep" in inspect.signature(lm.model.forward).parameters
        self._context = lm.context_length
        params = inspect.signature(lm.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x

    @property
    def layout(self):
        return self.lm.layout

    def batch(self, prompts: list[EncodedPrompt]) -> PromptBatch:
        longest = max(len(p.ids) for p in prompts)
        if self._context is not None and longest > self._context:
            raise UsageError(f"a prompt of {longest} tokens exceeds the context of model '{self.lm.name}' "
                             f"({self._context}); lower --shot/--ext-shot or --max-example-tokens")
        return collate(prompts, self.lm.tokenizer.pad_token_id).to(self.lm.device)

    @torch.inference_mode()
    def forward(self, batch: PromptBatch) -> torch.Tensor:
        """Next-token logits at each row's answer position: [B, V]."""
        kwargs = {"logits_to_keep": 1} if self._keep_last else {}
        out = self.lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, use_cache=False, **kwargs)
        return out.logits[:, -1]

    def last_token_variants(self, batch: PromptBatch, edits: Sequence[Callable[[], ContextManager]]) -> torch.Tensor:
        """[V, B, C] label log-probs of the same batch under V edits that touch only the last token."""
        groups = self.last_token_groups(batch, [(1, edit) for edit in edits])
        return torch.stack([g[:, 0] for g in groups])

    @torch.inference_mode()
    def last_token_groups(self, batch: PromptBatch,
                          edits: Sequence[tuple[int, Callable[[], ContextManager]]]) -> list[torch.Tensor]:
        """Label log-probs of the batch under edits that touch only the last token: one [B, g, C] per edit.

        The prefix (all but the last column) is encoded once into a KV cache; each edit then runs
        only the last token over it, with every row repeated g times (row b * g + j), so one forward
        can try g variants (e.g. one head each). Equal to full forwards when the edits cannot
        reach earlier positions, which is what makes a per-layer or per-head search affordable.
        """
        cut = batch.input_ids.shape[1] - 1
        prefix = self.lm.model(input_ids=batch.input_ids[:, :cut], attention_mask=batch.attention_mask[:, :cut],
                               position_ids=batch.position_ids[:, :cut], use_cache=True,
                               **({"logits_to_keep": 1} if self._keep_last else {}))
        base = getattr(prefix, "cache", None) or prefix.past_key_values
        caches = {1: base}
        out = []
        for g, edit in edits:
            if g not in caches:
                caches[g] = copy.deepcopy(base)
                caches[g].batch_repeat_interleave(g)
            with edit():
                step = self.lm.model(input_ids=batch.input_ids[:, cut:].repeat_interleave(g, 0),
                                     attention_mask=batch.attention_mask.repeat_interleave(g, 0),
                                     position_ids=batch.position_ids[:, cut:].repeat_interleave(g, 0),
                                     use_cache=True, **{self._cache_kwarg: caches[g]})
            caches[g].crop(-1)  # negative = tokens to remove: the next edit starts from the bare prefix
            out.append(self._label_logprobs(step.logits[:, -1]).view(batch.input_ids.shape[0], g, -1))
        return out

    def _label_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, V] next-token logits -> [N, C] float32 log-probabilities of each label's first token."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return logprobs[:, self.label_ids.to(logprobs.device)]

    def label_scores(self, batch: PromptBatch) -> torch.Tensor:
        """[B, C] float32 log-probabilities of each label's first token."""
        return self._label_logprobs(self.forward(batch))

    def progress(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=self.quiet, unit="ep", dynamic_ncols=True)

    def run_batched(self, prompts: list[EncodedPrompt], fn: Callable[[PromptBatch], torch.Tensor],
                    desc: str) -> torch.Tensor:
        """Apply `fn` ([B] rows -> [B, ...]) to length-sorted batches; rows come back in input order."""
        out: torch.Tensor | None = None
        with self.progress(len(prompts), desc) as bar:
            for idx in length_sorted_batches(prompts, self.batch_size):
                result = fn(self.batch([prompts[i] for i in idx])).cpu()
                if out is None:
                    out = torch.empty((len(prompts), *result.shape[1:]), dtype=result.dtype)
                out[torch.tensor(idx)] = result
                bar.update(len(idx))
        assert out is not None
        return out
