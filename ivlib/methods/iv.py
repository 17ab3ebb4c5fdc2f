"""Iterative Vectors (Liu & Deng, ICML 2025): in-context gradient steering without backpropagation.

Vectors live at every layer's attention output projection, one per class plus one for the query:
`vectors` is [n_layers, n_classes + 1, d_model]. Extraction compares each training episode's
few-shot prompt (steered by the current vectors) with its zero-shot prompt at the separators,
and averages the differences; the average is refreshed every `ext_batch` episodes, which is the
"iteration". Evaluation adds `strength` x the vectors at the separators of the evaluation prompt.

Unlike the reference release, both prompts are read at the separator token itself (the
reference reads the zero-shot prompt one token early), and extraction uses training data only.
The query's answer is not appended to either prompt: every read is at or before the query's
separator, so under causal attention the answer tokens could not change what is read.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import distributed as dist
from ..episodes import Episode
from ..hooks import Edit, edit_outputs, stack_reads
from ..layout import ModelLayout
from ..models import LoadedModel
from ..prompts import PromptBatch, PromptEncoder
from ..scoring import Prefix, Scorer
from ..settings import EVAL, Setting
from ..state import TensorSpec
from .base import Method, register


def refresh_windows(n_episodes: int, ext_batch: int) -> list[list[int]]:
    """Episode groups that share one vector state: [0], [1..b], [b+1..2b], ...; b = 0 is one group."""
    if ext_batch <= 0:
        return [list(range(n_episodes))]
    windows = [[0]]
    for start in range(1, n_episodes, ext_batch):
        windows.append(list(range(start, min(start + ext_batch, n_episodes))))
    return windows


@register
class IterativeVectors(Method):
    name = "iv"
    needs_fit = True
    has_state = True
    caches_fixed_prefix = True  # `prefix` adds the class vectors at the demonstrations' separators
    settings = (
        Setting(
            "strength",
            float,
            0.5,
            "evaluation strength a2 of the vectors; several values share one extraction, one record each",
            role=EVAL,
            symbol="a2",
            scales=True,
        ),
        Setting("ext_strength", float, 0.3, "extraction strength a1 of the current vectors", symbol="a1", scales=True),
        Setting(
            "ext_batch",
            int,
            10,
            "episodes between refreshes of the vectors; 0 = one pass, no iteration",
            low=0,
            symbol="b",
        ),
    )
    grid_axes = ("strength", "ext_strength", "ext_shot")  # the paper's grid: a2 x a1, one panel per ext-shot

    strength: float
    ext_strength: float
    ext_batch: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vectors: torch.Tensor | None = None  # [L, C + 1, D] float32
        self._device_vectors: dict[tuple, torch.Tensor] = {}

    # ---- extraction -------------------------------------------------------------------------
    def _read_separators(self, scorer: Scorer, batch: PromptBatch, add: torch.Tensor | None) -> torch.Tensor:
        """o_proj outputs at every separator of the batch, after `add`: [L, N, D] float32."""
        with edit_outputs(scorer.layout.attn_out, batch.sep_rows, batch.sep_cols, add, read=True) as sites:
            scorer.forward(batch)
        return stack_reads(sites)

    def fit(
        self, scorer: Scorer, encoder: PromptEncoder, episodes: list[Episode], validation: list[Episode] | None = None
    ) -> None:
        layout = scorer.layout
        n_layers, n_slots, dim = layout.n_layers, encoder.n_classes + 1, layout.d_model
        device = scorer.lm.device
        # The zero-shot side never sees the vectors, so all of it runs first, batched freely.
        neg_prompts = [encoder.encode(e.query_only()) for e in episodes]
        neg = scorer.runner.map(  # [E, L, D]: each episode's query separator, unsteered
            neg_prompts, lambda b: self._read_separators(scorer, b, None).transpose(0, 1), "IV extract: zero-shot"
        ).to(device)
        pos_prompts = [encoder.encode(e) for e in episodes]
        total = torch.zeros(n_layers, n_slots, dim, device=device)  # sum of per-episode samples
        count = 0
        desc = "IV extract: few-shot"
        windows = refresh_windows(len(episodes), self.ext_batch)
        split = dist.active()  # several processes: each takes a part of every window
        with scorer.runner.progress(sum(len(dist.shard_rows(w)) for w in windows), desc) as bar:
            for window in windows:
                current = total / count if count else None  # fixed within the window
                part = torch.zeros_like(total) if split else total  # this process's sum over its part
                done = 0

                def run(idx: list[int]) -> None:  # adds nothing until its batch has fitted: the runner may redo it
                    nonlocal done
                    part.add_(self._window_batch(scorer, [pos_prompts[i] for i in idx], idx, neg, current, n_slots))
                    done += len(idx)
                    bar.update(len(idx))

                def work() -> tuple[torch.Tensor | None, int]:
                    # out of memory: halved (--batch-size auto) and redone
                    scorer.runner.each(dist.shard_rows(window), run, desc)
                    return (part.cpu() if split else None), done

                # the window's samples and counts summed over the processes (rank order) before the refresh
                for summed, n in scorer.runner.shared(work, desc):
                    if summed is not None:
                        total.add_(summed.to(device))
                    count += n
        self.vectors = (total / count).cpu()
        self._device_vectors.clear()

    def _window_batch(
        self,
        scorer: Scorer,
        prompts: list,
        idx: list[int],
        neg: torch.Tensor,
        current: torch.Tensor | None,
        n_slots: int,
    ) -> torch.Tensor:
        """[L, n_slots, D]: the summed samples of these episodes, steered by the window's `current`."""
        batch = scorer.batch(prompts)
        add = None
        if current is not None:
            add = (self.ext_strength * current)[:, batch.sep_class].to(scorer.lm.dtype)
        reads = self._read_separators(scorer, batch, add)  # [L, N, D]
        delta = reads - neg[torch.tensor(idx, device=neg.device)[batch.sep_rows]].transpose(0, 1)
        return self._episode_means(delta, batch, n_slots).sum(dim=1)

    @staticmethod
    def _episode_means(delta: torch.Tensor, batch: PromptBatch, n_slots: int) -> torch.Tensor:
        """Per episode, the mean delta over the separators of each class (query: its own slot).

        delta: [L, N, D] -> [L, B, n_slots, D]
        """
        n_layers, _, dim = delta.shape
        rows = batch.input_ids.shape[0]
        group = (batch.sep_rows * n_slots + batch.sep_class).to(delta.device)  # [N]
        sums = torch.zeros(n_layers, rows * n_slots, dim, device=delta.device).index_add_(1, group, delta)
        counts = torch.bincount(group, minlength=rows * n_slots).clamp(min=1).to(delta.dtype)
        return (sums / counts[None, :, None]).view(n_layers, rows, n_slots, dim)

    # ---- evaluation -------------------------------------------------------------------------
    def _scaled(self, scale: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (scale, device, dtype)
        if key not in self._device_vectors:
            assert self.vectors is not None, "fit or load the vectors first"
            self._device_vectors[key] = (scale * self.vectors).to(device=device, dtype=dtype)
        return self._device_vectors[key]

    def edit(self, lm: LoadedModel, batch: PromptBatch) -> Edit:
        """strength x the vectors at every separator of the batch; steady: the query slot's, every layer."""
        scaled = self._scaled(self.strength, lm.device, lm.dtype)  # [L, C + 1, D]
        return Edit(
            lm.layout.attn_out,
            batch.sep_rows,
            batch.sep_cols,
            add=scaled[:, batch.sep_class],
            steady=list(scaled[:, -1]),
        )

    def predict(self, scorer: Scorer, batch: PromptBatch) -> torch.Tensor:
        with self.edit(scorer.lm, batch).apply():
            return scorer.label_scores(batch)

    def prefix(self, scorer: Scorer, batch: PromptBatch) -> Prefix:
        """The fixed demonstrations encoded once with their class vectors added at their separators;
        `predict` then adds the query slot's at each query's separator, over this cache."""
        with self.edit(scorer.lm, batch).apply():
            return scorer.encode_prefix(batch)

    def state(self) -> dict[str, torch.Tensor]:
        assert self.vectors is not None
        return {"vectors": self.vectors.contiguous()}

    @classmethod
    def state_spec(cls, layout: ModelLayout, n_classes: int) -> dict[str, TensorSpec]:
        return {"vectors": TensorSpec((layout.n_layers, n_classes + 1, layout.d_model))}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.vectors = tensors["vectors"].float()
        self._device_vectors.clear()
