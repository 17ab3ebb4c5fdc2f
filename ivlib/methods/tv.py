"""Task Vectors (Hendel et al. 2023), as the IV paper compares them.

One vector per layer: the decoder block's output (the residual stream) at the query separator of
few-shot training prompts, averaged over the extraction episodes; `theta` is [n_layers, d_model].
At evaluation, that position's hidden state at one layer is *replaced* by theta. The layer is the
one with the best macro-F1 on validation episodes; the search encodes each prompt's prefix once
and re-runs only the last token per layer, since the edit touches nothing before it.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch

from ..episodes import Episode
from ..hooks import Edit, edit_outputs, stack_reads, vector_edit
from ..layout import ModelLayout
from ..models import LoadedModel
from ..prompts import PromptBatch, PromptEncoder
from ..scoring import LastTokenEdit, Scorer
from ..state import TensorSpec
from .base import Method, fitted, register


@register
class TaskVectors(Method):
    name = "tv"
    supports_open_vocabulary = True
    needs_fit = True
    needs_validation = True
    has_state = True
    caches_fixed_prefix = True  # edits the query separator alone

    def __init__(self) -> None:
        super().__init__()
        self.theta: torch.Tensor | None = None  # [L, D] float32
        self.layer: int | None = None
        self.layer_scores: list[float] = []  # validation headline metric (macro-F1 by default) per layer

    def fit_summary(self) -> dict[str, Any]:
        return {"layer": self.layer, "layer_scores": [round(s, 4) for s in self.layer_scores]}

    def _edit(self, scorer: Scorer, layer: int) -> LastTokenEdit:
        """theta[layer] written over block `layer`'s output at the last token: tried per layer by the
        search, then run at the chosen layer by `predict`."""
        theta = fitted(self.theta, self.name)[layer].to(scorer.lm.device, scorer.lm.dtype)  # [D]
        return vector_edit(scorer.layout.blocks[layer], theta, replace=True)

    def fit(
        self, scorer: Scorer, encoder: PromptEncoder, episodes: list[Episode], validation: list[Episode] | None = None
    ) -> None:
        blocks = scorer.layout.blocks
        prompts = [encoder.encode(e) for e in episodes]

        def read(batch: PromptBatch) -> torch.Tensor:  # [B, L, D] block outputs at the query separator
            with scorer.at_last_token(batch, partial(edit_outputs, blocks, read=True)) as sites:
                scorer.forward(batch)
            return stack_reads(sites).transpose(0, 1)

        self.theta = scorer.runner.map(prompts, read, "TV extract").mean(dim=0)
        if not validation:
            raise ValueError("TV chooses its layer on validation episodes")
        val_prompts = [encoder.encode(e) for e in validation]

        def per_layer(batch: PromptBatch) -> torch.Tensor:  # [B, L, W]
            edits = [self._edit(scorer, layer) for layer in range(len(blocks))]
            return scorer.last_token_variants(batch, edits).transpose(0, 1)

        scores = scorer.runner.map(val_prompts, per_layer, "TV layer search")  # [N, L, W]
        labels = np.array([p.label for p in val_prompts])
        self.layer_scores = [
            scorer.selection_score(labels, scorer.selection_choices(scores[:, l]), encoder.n_classes)
            for l in range(len(blocks))
        ]
        self.layer = int(np.argmax(self.layer_scores))  # ties: the earliest layer

    def edit(self, lm: LoadedModel, batch: PromptBatch) -> Edit:
        """theta replaces the chosen layer's output at each row's query separator (no steady vector)."""
        rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
        layer = fitted(self.layer, self.name)
        value = fitted(self.theta, self.name)[layer].to(lm.device, lm.dtype).expand(len(rows), -1)  # [B, D]
        return Edit([lm.layout.blocks[layer]], rows, batch.query_cols, replace=[value])

    def predict(self, scorer: Scorer, batch: PromptBatch) -> torch.Tensor:
        with self.edit(scorer.lm, batch).apply():
            return scorer.label_scores(batch)

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "theta": fitted(self.theta, self.name).contiguous(),
            "layer": torch.tensor(self.layer),
            "layer_scores": torch.tensor(self.layer_scores),
        }

    @classmethod
    def state_spec(cls, layout: ModelLayout, n_classes: int) -> dict[str, TensorSpec]:
        n = layout.n_layers
        return {
            "theta": TensorSpec((n, layout.d_model)),
            "layer": TensorSpec((), "int", below=(n,)),
            "layer_scores": TensorSpec((n,)),
        }

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.theta = tensors["theta"].float()
        self.layer = int(tensors["layer"])
        self.layer_scores = tensors["layer_scores"].tolist()
