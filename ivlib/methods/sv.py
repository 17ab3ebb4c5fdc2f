"""ICL State Vector with inner and momentum optimization (Li et al., NeurIPS 2024).

The state is each layer's attention output (the output projection's output, before the residual
add) at the separators of a few-shot training prompt: s_1..s_N at the demonstrations' separators,
in prompt order, and s_q at the query's, which plays the paper's dummy query. Per layer:
- inner optimization: the uniform mean of the last `sv_window` demonstration states and s_q;
- momentum optimization: the successive demonstration states are read as optimisation steps,
  d_i = s_i - s_{i-1} within the window, and their momentum, weights beta^(age) normalised to sum 1
  (the newest step weighs most), is added: SV = inner + sv_lr * sum_i w_i d_i.
Each training episode gives one SV; the fit keeps their mean (the aggregation is linear, so this is
also the aggregation of the mean states). At evaluation the attention output of the first L
layers at the query separator is *replaced* by SV (the release's default intervention; its
"add" mode with weights 0 and 1). L is chosen by macro-F1 on validation episodes; the edit touches
only the last token, so each validation prompt's prefix is encoded once and only the last token
re-runs per L.

The reference reads the output projection's input and multiplies it by the projection's weight
when writing; with coefficients that sum to one (the mean) and to zero (the steps), that is this
module's output-side state exactly, bias included. It extracts from one set of ten
demonstrations; ivlib averages over the `-e` training episodes of `-s` shots per class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..episodes import Episode
from ..errors import UsageError
from ..hooks import Edit, edit_outputs, stack_reads
from ..layout import ModelLayout
from ..models import LoadedModel
from ..prompts import EncodedPrompt, PromptBatch, PromptEncoder
from ..scoring import LastTokenEdit, Scorer
from ..settings import Setting
from ..state import TensorSpec
from .base import Method, fitted, register


def aggregate(states: torch.Tensor, window: int, beta: float, lr: float) -> torch.Tensor:
    """[B, N + 1, ...] states (N demonstrations' separators in order, then the query's) -> [B, ...]:
    inner mean of the last `window` demonstration states and the query's, plus `lr` times the
    beta-weighted momentum of the successive demonstration steps inside the window."""
    k = min(window, states.shape[1] - 1)
    recent = states[:, -k - 1 : -1]  # [B, k, ...]
    inner = states[:, -k - 1 :].mean(dim=1)
    if k < 2:
        return inner
    steps = recent[:, 1:] - recent[:, :-1]  # [B, k - 1, ...], oldest first
    weights = beta ** torch.arange(k - 2, -1, -1, dtype=states.dtype, device=states.device)
    weights = (weights / weights.sum()).view(1, -1, *[1] * (states.dim() - 2))
    return inner + lr * (steps * weights).sum(dim=1)


@register
class StateVector(Method):
    name = "sv"
    supports_open_vocabulary = True
    needs_fit = True
    needs_validation = True  # chooses L, the number of first layers edited
    has_state = True
    caches_fixed_prefix = True  # edits the query separator alone
    settings = (
        Setting(
            "sv_window",
            int,
            6,
            "last demonstrations whose separator states are averaged (with the query's) and give the "
            "momentum steps (at most the training prompts' demonstrations)",
            low=1,
            symbol="window",
        ),
        Setting(
            "sv_beta",
            float,
            0.5,
            "momentum decay: each older step weighs beta x the next",
            low=0,
            high=1,
            symbol="beta",
        ),
        Setting("sv_lr", float, 1.0, "step size of the momentum added to the inner mean", symbol="lr", scales=True),
        Setting(
            "sv_layers",
            int,
            None,
            "edit the first L layers instead of choosing L on validation",
            low=1,
            optional=True,
            symbol="L",
        ),
    )

    sv_window: int
    sv_beta: float
    sv_lr: float
    sv_layers: int | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vector: torch.Tensor | None = None  # [n_layers, D] float32
        self.layers = self.sv_layers  # L used at evaluation; None until chosen on validation
        self.layer_scores: list[float] = []  # validation macro-F1 for L = 1..n_layers
        self.window: int | None = None  # the window used (sv_window, at most the demonstrations)

    def labeled_examples(self, train: list[Episode], validation: list[Episode] | None) -> dict[str, int]:
        """The training demonstrations; validation only when L is selected (not given by --sv-layers)."""
        own = super().labeled_examples(train, validation)
        return {**own, "selection": 0 if self.sv_layers is not None else own["selection"]}

    def fit_summary(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "layers_chosen_by": "user" if self.sv_layers is not None else "validation",
            "layer_scores": [round(s, 4) for s in self.layer_scores],
            "window_used": self.window,
        }

    def check_prompts(self, scorer: Scorer, prompts: list[EncodedPrompt]) -> None:
        n = scorer.layout.n_layers
        if self.sv_layers is not None and self.sv_layers > n:
            raise UsageError(f"--sv-layers {self.sv_layers} exceeds the model's {n} layers; accepted: 1 to {n}")

    def states(self, scorer: Scorer, batch: PromptBatch) -> torch.Tensor:
        """[B, S, n_layers, D] float32: attention outputs at every separator (S per row, the query's last)."""
        modules = scorer.layout.attn_out
        with edit_outputs(modules, batch.sep_rows, batch.sep_cols, read=True) as sites:
            scorer.forward(batch)
        reads = stack_reads(sites)  # [n_layers, B * S, D]
        rows = batch.input_ids.shape[0]
        return reads.view(len(modules), rows, -1, reads.shape[-1]).permute(1, 2, 0, 3)

    def _edit(self, scorer: Scorer, layers: int) -> LastTokenEdit:
        """SV written over the first `layers` attention outputs at the last token: tried per L by the
        search, the same edit `predict` runs at the chosen L."""
        vector = fitted(self.vector, self.name)[:layers].to(scorer.lm.device, scorer.lm.dtype)  # [L, D]
        modules = scorer.layout.attn_out[:layers]

        def edit(rows: torch.Tensor, cols: torch.Tensor):
            return edit_outputs(modules, rows, cols, replace=[v.expand(len(rows), -1) for v in vector])

        return edit

    def fit(
        self, scorer: Scorer, encoder: PromptEncoder, episodes: list[Episode], validation: list[Episode] | None = None
    ) -> None:
        prompts = [encoder.encode(e) for e in episodes]
        counts = {len(p.sep_pos) - 1 for p in prompts}  # demonstrations per prompt: n_classes x shot, one count
        if len(counts) != 1:
            raise ValueError("sv: the training prompts must have equally many demonstrations")
        n_demos = counts.pop()
        if n_demos < 1:
            raise UsageError("sv reads every training demonstration's separator; accepted: -s 1 or more")
        self.window = min(self.sv_window, n_demos)

        def per_episode(batch: PromptBatch) -> torch.Tensor:  # [B, n_layers, D]
            return aggregate(self.states(scorer, batch), self.sv_window, self.sv_beta, self.sv_lr)

        self.vector = scorer.runner.map(prompts, per_episode, "SV extract").mean(dim=0)
        if self.sv_layers is not None:
            return
        if not validation:
            raise ValueError("SV chooses its number of layers on validation episodes")
        self._search(scorer, encoder, validation)

    def _search(self, scorer: Scorer, encoder: PromptEncoder, validation: list[Episode]) -> None:
        n_layers = scorer.layout.n_layers
        val = [encoder.encode(e) for e in validation]

        def per_l(batch: PromptBatch) -> torch.Tensor:  # [B, n_layers, W]: L = 1..n_layers
            edits = [self._edit(scorer, layers) for layers in range(1, n_layers + 1)]
            return scorer.last_token_variants(batch, edits).transpose(0, 1)

        scores = scorer.runner.map(val, per_l, "SV layer search")  # [N, n_layers, W]
        labels = np.array([p.label for p in val])
        self.layer_scores = [
            scorer.selection_score(labels, scorer.selection_choices(scores[:, i]), encoder.n_classes)
            for i in range(n_layers)
        ]
        self.layers = int(np.argmax(self.layer_scores)) + 1  # ties: the fewest layers

    def edit(self, lm: LoadedModel, batch: PromptBatch) -> Edit:
        """SV replaces the first L attention outputs at each row's query separator (no steady vector)."""
        layers = fitted(self.layers, self.name)
        rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
        vector = fitted(self.vector, self.name)[:layers].to(lm.device, lm.dtype)  # [L, D]
        return Edit(
            lm.layout.attn_out[:layers], rows, batch.query_cols, replace=[v.expand(len(rows), -1) for v in vector]
        )

    def predict(self, scorer: Scorer, batch: PromptBatch) -> torch.Tensor:
        with self.edit(scorer.lm, batch).apply():
            return scorer.label_scores(batch)

    @classmethod
    def state_spec(cls, layout: ModelLayout, n_classes: int) -> dict[str, TensorSpec]:
        n = layout.n_layers
        return {
            "vector": TensorSpec((n, layout.d_model)),
            "layers": TensorSpec((), "int", below=(n + 1,)),  # the first L layers, 1 <= L <= n
            "layer_scores": TensorSpec((None,)),  # one per L tried (none when --sv-layers gave it)
            "window_used": TensorSpec((), "int"),
        }

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "vector": fitted(self.vector, self.name).contiguous(),
            "layers": torch.tensor(fitted(self.layers, self.name)),
            "layer_scores": torch.tensor(self.layer_scores, dtype=torch.float64),
            "window_used": torch.tensor(fitted(self.window, self.name)),
        }

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.vector = tensors["vector"].float()
        self.layers = int(tensors["layers"])
        self.layer_scores = tensors["layer_scores"].tolist()
        self.window = int(tensors["window_used"])
