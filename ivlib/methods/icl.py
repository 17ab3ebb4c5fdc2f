"""In-context learning without edits: the few-shot baseline and, with no demonstrations, zero-shot."""

from __future__ import annotations

import torch

from ..prompts import PromptBatch
from ..scoring import Scorer
from .base import Method, register


@register
class ICL(Method):
    """The reference code's "clean" run: the same prompts IV edits, left unedited."""

    name = "icl"
    supports_open_vocabulary = True
    supports_multiple_choice = True
    caches_fixed_prefix = True  # no edits at all

    def predict(self, scorer: Scorer, batch: PromptBatch) -> torch.Tensor:
        return scorer.label_scores(batch)


@register
class ZeroShot(ICL):
    name = "zero-shot"
    fixed_eval_shot = 0
