"""Function Vectors (Todd et al. 2024).

1. Mean activation of every attention head at the query's last token (the input of the attention
   output projection, sliced per head) over few-shot training prompts: `mean_act` [L, H, head_dim].
2. Indirect effect of each head: on prompts whose demonstration labels are shuffled, overwrite
   that head's slice at the last token only with its mean and measure the gain in probability of
   the correct label's first token. Only the last token changes, so each prompt's prefix is
   encoded once (KV cache) and every head's patch re-runs just that token.
3. FV = sum over the top heads of the output projection of the zero-padded mean activation
   (so a projection's bias counts once per head), added to the residual stream at the query
   separator at layer n_layers // 3.
Unlike the original code, the vector is added whether a block returns a tensor or a tuple (the
hooks handle both), and unlike the IV release, the patch touches the last token only.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch

from .. import budget
from ..episodes import Episode, Example
from ..errors import UsageError
from ..hooks import Edit, edit_inputs, head_patch
from ..layout import ModelLayout
from ..models import LoadedModel
from ..prompts import EncodedPrompt, PromptBatch, PromptEncoder
from ..scoring import Scorer, head_means, no_edit
from ..settings import Setting
from ..state import TensorSpec
from .base import Method, fitted, register


def default_top_heads(n_layers: int, n_heads: int) -> int:
    """About 2% of all heads: 9 for GPT-J (paper: 10), 20 for Llama-2-7B (paper: 20)."""
    return max(1, round(n_layers * n_heads / 50))


def shuffle_labels(episodes: list[Episode], seed: int) -> list[Episode]:
    """The same demonstrations with their labels (open vocabulary: their answers) permuted among
    them; the query keeps its own."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for ep in episodes:
        order = rng.permutation(len(ep.demos))
        demos = tuple(Example(d.text, ep.demos[j].label, answer=ep.demos[j].answer) for d, j in zip(ep.demos, order))
        out.append(Episode(demos, ep.query))
    return out


@register
class FunctionVectors(Method):
    name = "fv"
    supports_open_vocabulary = True
    needs_fit = True
    has_state = True
    caches_fixed_prefix = True  # edits the query separator alone
    settings = (
        Setting(
            "n_top_heads",
            int,
            None,
            "heads summed into the vector (default: the model entry's fv_heads, else about 2% of all heads)",
            low=1,
            optional=True,
            model_default="fv_heads",
        ),
        Setting("ie_episodes", int, 200, "shuffled-label trials for the indirect effects (at most -e)", low=1),
    )
    rows_per_forward = 128  # batch rows x heads tried in one last-token forward (each needs a cache copy)

    n_top_heads: int | None
    ie_episodes: int

    def __init__(self, *args: Any, seed: int = 42, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed  # the run's: which labels the indirect-effect trials shuffle
        self.mean_act: torch.Tensor | None = None  # [L, H, head_dim] float32
        self.effects: torch.Tensor | None = None  # [L, H] mean probability gain
        self.heads: list[tuple[int, int]] = []
        self.vector: torch.Tensor | None = None  # [D] float32
        self.layer: int | None = None

    @classmethod
    def from_settings(cls, values: dict[str, Any], seed: int) -> FunctionVectors:
        return cls(**values, seed=seed)

    def check_prompts(self, scorer: Scorer, prompts: list[EncodedPrompt]) -> None:
        total = scorer.layout.n_layers * scorer.layout.n_heads
        if self.n_top_heads is not None and self.n_top_heads > total:
            raise UsageError(f"--n-top-heads {self.n_top_heads} exceeds the model's {total} heads")

    def labeled_examples(self, train: list[Episode], validation: list[Episode] | None) -> dict[str, int]:
        """The training demonstrations, and the queries of the --ie-episodes trials: an indirect effect
        is the gain in the correct label's probability."""
        trials = budget.queries(train[: self.ie_episodes])
        return {"fit": budget.distinct(budget.demonstrations(train) + trials), "selection": 0}

    def fit_summary(self) -> dict[str, Any]:
        assert self.effects is not None
        return {
            "layer": self.layer,
            "top_heads": [[l, h, round(float(self.effects[l, h]), 6)] for l, h in self.heads],
            "ie_rows_per_forward": self.rows_per_forward,
        }

    def _patch_heads(self, scorer: Scorer, layer: int, heads: list[int], rows: torch.Tensor, cols: torch.Tensor):
        """A last-token edit (see `LastTokenEdit`) for rows repeated len(heads) times, as
        `last_token_groups` lays them out: row b * len(heads) + j gets head heads[j] overwritten by its mean."""
        keep, value = head_patch(fitted(self.mean_act, self.name), layer, heads)  # [g, F] each
        n_rows = len(rows) // len(heads)
        return edit_inputs(
            [scorer.layout.attn_out[layer]], rows, cols, patch=[(keep.repeat(n_rows, 1), value.repeat(n_rows, 1))]
        )

    def _fewer_rows(self, n_rows: int) -> bool:
        """The head search's out-of-memory fallback: halve the rows per forward (the repeated prefix
        cache grows with them), keeping the batch of `n_rows`. False once each forward tries one head:
        then the runner shrinks the batch itself (--batch-size auto) or stops with a clear error."""
        if self.rows_per_forward <= n_rows:
            return False
        self.rows_per_forward = max(n_rows, self.rows_per_forward // 2)
        return True

    def _head_chunks(self, n_rows: int, n_heads: int) -> list[list[int]]:
        n_chunks = -(-n_heads * n_rows // self.rows_per_forward)
        size = -(-n_heads // max(1, n_chunks))
        return [list(range(h, min(h + size, n_heads))) for h in range(0, n_heads, size)]

    def mean_activations(self, scorer: Scorer, prompts: list[EncodedPrompt]) -> torch.Tensor:
        """[L, H, head_dim]: each head's output at the query separator, averaged over the prompts."""
        return head_means(scorer, prompts, "FV mean activations")

    def indirect_effects(
        self, scorer: Scorer, trials: list[EncodedPrompt], layers: list[int] | None = None
    ) -> torch.Tensor:
        """[len(layers), H]: mean gain in P(correct label) when one head takes its mean at the last token."""
        layers = list(range(scorer.layout.n_layers)) if layers is None else layers
        n_heads = scorer.layout.n_heads

        def gains(batch: PromptBatch) -> torch.Tensor:  # [B, len(layers) * H]
            b = batch.input_ids.shape[0]
            edits = [(1, no_edit)]  # the unpatched shuffled prompt
            for layer in layers:
                for heads in self._head_chunks(b, n_heads):
                    edits.append((len(heads), partial(self._patch_heads, scorer, layer, heads)))
            groups = scorer.last_token_groups(batch, edits)  # [B, 1, C], then [B, g, C] per chunk
            logprobs = torch.cat(groups, dim=1)  # [B, 1 + len(layers) * H, C], (layer, head) order
            rows = torch.arange(b, device=logprobs.device)
            p_correct = logprobs.exp()[rows, :, batch.labels.to(logprobs.device)]  # [B, 1 + len(layers) * H]
            return p_correct[:, 1:] - p_correct[:, :1]

        # out of memory: fewer rows per forward first, the batch only once each forward tries one head
        effects = scorer.runner.map(trials, gains, "FV indirect effects", fallback=self._fewer_rows)
        return effects.mean(dim=0).view(len(layers), n_heads)

    def fit(
        self, scorer: Scorer, encoder: PromptEncoder, episodes: list[Episode], validation: list[Episode] | None = None
    ) -> None:
        layout = scorer.layout
        n_layers, n_heads = layout.n_layers, layout.n_heads

        self.mean_act = self.mean_activations(scorer, [encoder.encode(e) for e in episodes])

        trials = [encoder.encode(e) for e in shuffle_labels(episodes[: self.ie_episodes], self.seed)]
        self.effects = self.indirect_effects(scorer, trials)
        k = self.n_top_heads or default_top_heads(n_layers, n_heads)  # the record keeps what was asked (None: the rule)
        top = torch.topk(self.effects.flatten(), k).indices.tolist()
        self.heads = [(i // n_heads, i % n_heads) for i in top]
        self.vector = self._build_vector(scorer)
        self.layer = n_layers // 3

    @torch.inference_mode()
    def _build_vector(self, scorer: Scorer) -> torch.Tensor:
        mean_act = fitted(self.mean_act, self.name)  # [L, H, head_dim]
        hd = mean_act.shape[-1]
        total = torch.zeros(scorer.layout.d_model)
        for layer, head in self.heads:
            proj = scorer.layout.attn_out[layer]
            weight = next(proj.parameters())
            padded = torch.zeros(1, 1, mean_act.shape[1] * hd, device=weight.device, dtype=weight.dtype)
            padded[0, 0, head * hd : (head + 1) * hd] = mean_act[layer, head].to(weight.device, weight.dtype)
            total += proj(padded).float().view(-1).cpu()
        return total

    def edit(self, lm: LoadedModel, batch: PromptBatch) -> Edit:
        """The vector added to layer `layer`'s output at each row's query separator; steady: the same vector."""
        rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
        vector = fitted(self.vector, self.name).to(lm.device, lm.dtype)
        return Edit(
            [lm.layout.blocks[fitted(self.layer, self.name)]],
            rows,
            batch.query_cols,
            add=[vector.expand(len(rows), -1)],
            steady=[vector],
        )

    def predict(self, scorer: Scorer, batch: PromptBatch) -> torch.Tensor:
        with self.edit(scorer.lm, batch).apply():
            return scorer.label_scores(batch)

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "vector": fitted(self.vector, self.name),
            "layer": torch.tensor(self.layer),
            "heads": torch.tensor(self.heads),
            "effects": fitted(self.effects, self.name),
            "mean_act": fitted(self.mean_act, self.name),
        }

    @classmethod
    def state_spec(cls, layout: ModelLayout, n_classes: int) -> dict[str, TensorSpec]:
        n, h = layout.n_layers, layout.n_heads
        return {
            "vector": TensorSpec((layout.d_model,)),
            "layer": TensorSpec((), "int", below=(n,)),
            "heads": TensorSpec((None, 2), "int", below=(n, h)),  # (layer, head) pairs
            "effects": TensorSpec((n, h)),
            "mean_act": TensorSpec((n, h, layout.head_dim)),  # [L, H, head_dim]
        }

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.vector = tensors["vector"].float()
        self.layer = int(tensors["layer"])
        self.heads = [tuple(h) for h in tensors["heads"].tolist()]
        self.effects = tensors["effects"].float()
        self.mean_act = tensors["mean_act"].float()
