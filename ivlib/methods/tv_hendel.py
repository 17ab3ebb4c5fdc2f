"""Task Vectors as Hendel et al. (2023) defined them ("In-Context Learning Creates Task Vectors").

Per query, not averaged: the decoder block output at layer L at the query separator of the few-shot
prompt (its demonstrations and the query) is the task vector; it *replaces* the same layer's output
at the last position of the zero-shot prompt of the query (BOS and the query alone), which the model
then answers; judged by any scoring rule, the paper's being top-1 over the whole vocabulary
(`--score vocab`). L is chosen on validation episodes: each prompt's few-shot forward reads every
layer's vector once, and the zero-shot prompt's prefix is encoded once with only its last token
re-run per layer (the patch touches nothing before it).

The zero-shot prompt is the few-shot prompt's own query tokens after BOS (the same tokens, cut where
the query begins), so the two forwards see one tokenization. Hendel et al. read the vector from the
demonstrations followed by a *dummy* query (another input); here it is read at the evaluated query's
own separator, as the issue that asked for it states the method. The IV paper's variant (one vector
averaged over training episodes, written into the few-shot prompt) is `tv`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from typing_extensions import override

from ..episodes import Episode
from ..errors import UsageError
from ..hooks import edit_outputs, stack_reads
from ..layout import ModelLayout
from ..prompts import EncodedPrompt, PromptBatch, PromptEncoder, split_demos
from ..scoring import LastTokenEdit, Scorer
from ..state import TensorSpec
from .base import Method, fitted, register


def zero_shot(batch: PromptBatch, bos: list[int]) -> PromptBatch:
    """The batch's queries alone, after the prompts' own first ids `bos` (the run's BOS, if any):
    left-padded like any batch, its last column each query's separator. Built from the few-shot rows'
    own query tokens (the pads sit between BOS and the query, masked out, with positions counting on
    from BOS as in a prompt of its own)."""
    *_, query_ids, query_mask, _ = split_demos(batch)  # [B, Lq] each
    if bos:
        first = torch.tensor(bos, dtype=query_ids.dtype, device=query_ids.device).expand(query_ids.shape[0], -1)
        query_ids = torch.cat([first, query_ids], 1)
        query_mask = torch.cat([torch.ones_like(first, dtype=query_mask.dtype), query_mask], 1)
    rows, width = query_ids.shape
    positions = (query_mask.cumsum(-1) - 1).clamp(min=0)
    last = torch.full((rows,), width - 1, dtype=torch.long, device=query_ids.device)
    return PromptBatch(
        input_ids=query_ids,
        attention_mask=query_mask,
        position_ids=positions,
        sep_rows=torch.arange(rows, device=query_ids.device),
        sep_cols=last,
        sep_class=batch.sep_class[batch.sep_cols == batch.query_cols[batch.sep_rows]],
        query_cols=last,
        query_starts=last.new_full((rows,), len(bos)),
        labels=batch.labels,
        answer_ids=batch.answer_ids,
        answer_lens=batch.answer_lens,
    )


@register
class HendelTaskVectors(Method):
    name = "tv-hendel"
    position = 40
    supports_open_vocabulary = True
    needs_validation = True  # chooses L
    has_state = True
    min_shot = 1  # the vector is read from each query's demonstrations

    def __init__(self) -> None:
        super().__init__()
        self.layer: int | None = None
        self.layer_scores: list[float] = []  # validation headline metric per layer

    def fit_summary(self) -> dict[str, Any]:
        return {"layer": self.layer, "layer_scores": [round(s, 4) for s in self.layer_scores]}

    @override
    def labeled_examples(self, train: list[Episode], validation: list[Episode] | None) -> dict[str, int]:
        return {"fit": 0, "selection": super().labeled_examples([], validation)["selection"]}

    @staticmethod
    def vectors(scorer: Scorer, batch: PromptBatch, layers: list[int]) -> torch.Tensor:
        """[B, len(layers), D]: the blocks' outputs at each few-shot row's query separator."""
        modules = [scorer.layout.blocks[layer] for layer in layers]
        with scorer.at_last_token(batch, partial(edit_outputs, modules, read=True)) as sites:
            scorer.forward(batch)
        return stack_reads(sites).transpose(0, 1)

    @override
    def fit(
        self, scorer: Scorer, encoder: PromptEncoder, episodes: list[Episode], validation: list[Episode] | None = None
    ) -> None:
        if not validation:
            raise ValueError("tv-hendel chooses its layer on validation episodes")
        blocks = scorer.layout.blocks
        layers = list(range(len(blocks)))
        prompts = [encoder.encode(e) for e in validation]

        def per_layer(batch: PromptBatch) -> torch.Tensor:  # [B, L, W]
            theta = self.vectors(scorer, batch, layers).to(scorer.lm.dtype)  # [B, L, D]
            alone = zero_shot(batch, scorer.bos)

            def patch(layer: int) -> LastTokenEdit:
                return lambda rows, cols: edit_outputs([blocks[layer]], rows, cols, replace=[theta[rows, layer]])

            return scorer.last_token_variants(alone, [patch(layer) for layer in layers]).transpose(0, 1)

        scores = scorer.runner.map(prompts, per_layer, "TV (Hendel) layer search")  # [N, L, W]
        labels = np.array([p.label for p in prompts])
        n = max(encoder.n_classes, 1)
        self.layer_scores = [scorer.selection_score(labels, scorer.selection_choices(scores[:, l]), n) for l in layers]
        self.layer = int(np.argmax(self.layer_scores))  # ties: the earliest layer

    def predict(self, scorer: Scorer, batch: PromptBatch) -> torch.Tensor:
        layer = fitted(self.layer, self.name)
        theta = self.vectors(scorer, batch, [layer])[:, 0].to(scorer.lm.dtype)  # [B, D]
        alone = zero_shot(batch, scorer.bos)
        rows = torch.arange(alone.input_ids.shape[0], device=alone.input_ids.device)
        with edit_outputs([scorer.layout.blocks[layer]], rows, alone.query_cols, replace=[theta]):
            return scorer.label_scores(alone)

    def check_prompts(self, scorer: Scorer, prompts: list[EncodedPrompt]) -> None:
        if any(p.query_start <= len(scorer.bos) for p in prompts):
            raise UsageError("tv-hendel reads its vector from each query's demonstrations; accepted: --shot 1 or more")

    def state(self) -> dict[str, torch.Tensor]:
        return {"layer": torch.tensor(fitted(self.layer, self.name)), "layer_scores": torch.tensor(self.layer_scores)}

    @classmethod
    @override
    def state_spec(cls, layout: ModelLayout, n_classes: int) -> dict[str, TensorSpec]:
        return {
            "layer": TensorSpec((), "int", below=(layout.n_layers,)),
            "layer_scores": TensorSpec((layout.n_layers,)),
        }

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.layer = int(tensors["layer"])
        self.layer_scores = tensors["layer_scores"].tolist()
