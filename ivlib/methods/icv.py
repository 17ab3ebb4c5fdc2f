"""In-Context Vectors (ICV; Liu, Ye, Xing, Zou, ICML 2024): the demonstrations as one latent shift.

Extraction. Each demonstration is a pair (x, y), run as two separate prompts; the residual stream
(every decoder block's output) is read at each prompt's last token, all layers concatenated. The
differences h(y) - h(x) over the demonstrations are stacked and the vector is, as the release computes
it, their top principal direction (unit norm, from the centred differences, its sign fixed so that the
demonstration projecting furthest from the mean projects positively) plus their mean; with a single
demonstration (no variance) it is the mean alone. Cut back into layers: `vector` [n_layers, d_model].
The mean usually outweighs the unit direction by far, so the vector points close to the mean shift.

Injection, as the release's layer does it: at every layer, on the MLP's output (`layout.mlp_out`), at
every position of every forward (the query alone: zero-shot cost),
    x <- normalize(normalize(x) + lam * (1 + max(0, cos(x, -v))) * normalize(v)) * |x|,
a step of size `icv_strength` (lam) towards the layer's direction v, larger where x points away from
it, that keeps each position's norm (the release's norm-preserving rescale).

Classification. The release targets generation (detoxification, style): x is a sentence and y its
rewrite, each its own prompt. Of the classification-style papers that compare with ICV, the one whose
code we could read, LIVE (Peng et al., NeurIPS 2024, VQA; its non-learnable ICV baseline), keeps that
pairing literally: x is the question prompt, y the answer text alone, each run on its own. I2CL names
ICV among its sources but its code has no ICV run, and its paper's ICV protocol could not be read here.
So `icv_pair separate` (the default) follows LIVE and the release: x is the demonstration's input as
a query (BOS, input, separator: the very prompt evaluation scores) and y its label word alone (BOS,
label); `icv_pair joined` reads y as x followed by the label word, so that both sides share the input
text (as the release's sentence and rewrite share their content) and the difference is the answer's
effect alone. Each prompt is read at its last token.

The demonstrations are the distinct ones of the first `icv_sets` training episodes (`-s` per class
each; one set by default, as the release uses one set of k demonstrations). Differences from the
release: it strips punctuation from its demonstrations and reads in half precision (here the reads are
float32 copies and the edit is computed in float32, then cast back); like it, the embedding layer's
output is not part of the vector (it reads it, then drops it).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from .. import budget
from ..episodes import Episode, Example
from ..errors import UsageError
from ..hooks import Edit, edit_outputs, stack_reads
from ..layout import ModelLayout
from ..models import LoadedModel
from ..prompts import EncodedPrompt, PromptBatch, PromptEncoder
from ..scoring import Scorer
from ..settings import EVAL, Setting
from ..state import TensorSpec
from .base import Method, fitted, register

PAIRS = ("separate", "joined")


def demonstrations(episodes: list[Episode]) -> list[Example]:
    """The distinct demonstrations of the episodes, in order of first appearance."""
    return list(dict.fromkeys(d for e in episodes for d in e.demos))


def output_prompt(encoder: PromptEncoder, demo: Example, pair: str) -> EncodedPrompt:
    """y: the demonstration's label word alone (`separate`: BOS, label) or its zero-shot prompt followed
    by it in the run's template (`joined`: BOS, input, answer context, label); read at its last token,
    the label's."""
    answer = encoder.answer_text(demo)
    text = answer if pair == "separate" else encoder.query_context(demo) + encoder.answer_space + answer
    ids = encoder.bos + list(encoder.tok(text, add_special_tokens=False)["input_ids"])
    return EncodedPrompt(ids, [len(ids) - 1], [encoder.n_classes], demo.label, len(ids))


def principal_direction(deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(unit top principal direction [F], mean [F], its share of the variance) of `deltas` [N, F].

    The direction is the first right singular vector of the centred rows; its sign makes the row with
    the largest |projection| project positively (the release's `svd_flip`). No variance (one row, or
    identical rows): a zero direction and share 0."""
    rows = deltas.double()
    mean = rows.mean(dim=0)
    centred = rows - mean
    if rows.shape[0] < 2:
        return torch.zeros_like(mean).float(), mean.float(), 0.0
    u, s, vh = torch.linalg.svd(centred, full_matrices=False)  # s descending
    total = float((s**2).sum())
    if total <= 0 or float(s[0]) <= 1e-12 * max(1.0, float(rows.abs().max())):
        return torch.zeros_like(mean).float(), mean.float(), 0.0
    sign = torch.sign(u[u[:, 0].abs().argmax(), 0])
    return (sign * vh[0]).float(), mean.float(), float(s[0] ** 2) / total


def icv_shift(hidden: torch.Tensor, direction: torch.Tensor, strength: float) -> torch.Tensor:
    """The release's injection at every position of `hidden` [..., D], towards `direction` [D]:
    a step of `strength` (more where the activation points away from it), its norm kept."""
    x = hidden.float()
    unit = F.normalize(direction.to(x.device, torch.float32), dim=-1)
    norm = x.norm(dim=-1, keepdim=True)
    away = F.cosine_similarity(x, -unit.expand_as(x), dim=-1).clamp(min=0)[..., None]  # [..., 1]
    out = F.normalize(F.normalize(x, dim=-1) + strength * (1 + away) * unit, dim=-1) * norm
    return out.to(hidden.dtype)


@register
class InContextVectors(Method):
    name = "icv"
    needs_fit = True
    has_state = True
    fixed_eval_shot = 0  # the vector stands in for the demonstrations: queries run alone
    settings = (
        Setting(
            "icv_strength",
            float,
            0.1,
            "step lam towards the in-context vector at every layer and position (the release's example: "
            "0.1); several values share one extraction",
            role=EVAL,
            low=0.0,
            symbol="lam",
            scales=True,
        ),
        Setting(
            "icv_pair",
            str,
            "separate",
            "each demonstration's output y: its label word alone (separate: the release's and LIVE's pairing) "
            "or its input followed by the label word (joined)",
            choices=PAIRS,
        ),
        Setting(
            "icv_sets",
            int,
            1,
            "training episodes (from the first, at most -e) whose demonstrations give the vector: the "
            "release uses one set of k demonstrations",
            low=1,
            symbol="sets",
        ),
    )

    icv_strength: float
    icv_pair: str
    icv_sets: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.principal: torch.Tensor | None = None  # [L, D] float32, the unit direction cut into layers
        self.mean: torch.Tensor | None = None  # [L, D] float32, the mean difference
        self.explained = 0.0  # the direction's share of the differences' variance
        self.n_demos = 0

    @property
    def vector(self) -> torch.Tensor:
        """[L, D]: the in-context vector, the release's principal direction plus mean."""
        return fitted(self.principal, self.name) + fitted(self.mean, self.name)

    def fit(
        self, scorer: Scorer, encoder: PromptEncoder, episodes: list[Episode], validation: list[Episode] | None = None
    ) -> None:
        demos = demonstrations(episodes[: self.icv_sets])
        if not demos:
            raise UsageError("icv needs demonstrations in its training episodes; accepted: -s 1 or more")
        blocks = scorer.layout.blocks

        def read(batch: PromptBatch) -> torch.Tensor:  # [B, L, D] block outputs at each row's last token
            with scorer.at_last_token(batch, partial(edit_outputs, blocks, read=True)) as sites:
                scorer.forward(batch)
            return stack_reads(sites).transpose(0, 1)

        inputs = [encoder.encode(Episode((), d)) for d in demos]
        outputs = [output_prompt(encoder, d, self.icv_pair) for d in demos]
        states = scorer.runner.map(inputs + outputs, read, "ICV extract")  # [2N, L, D]
        n = len(demos)
        deltas = (states[n:] - states[:n]).reshape(n, -1)  # [N, L * D]: h(y) - h(x)
        principal, mean, self.explained = principal_direction(deltas)
        self.principal, self.mean = principal.view(states.shape[1:]), mean.view(states.shape[1:])
        self.n_demos = n

    def labeled_examples(self, train: list[Episode], validation: list[Episode] | None) -> dict[str, int]:
        """The demonstrations of the first --icv-sets training episodes."""
        return {"fit": budget.distinct(budget.demonstrations(train[: self.icv_sets])), "selection": 0}

    def fit_summary(self) -> dict[str, Any]:
        return {
            "demonstrations": self.n_demos,
            "explained_variance_ratio": round(self.explained, 4),
            "mean_difference_norm": round(float(fitted(self.mean, self.name).norm()), 4),
        }

    def edit(self, lm: LoadedModel, batch: PromptBatch) -> Edit:
        """The norm-preserving shift of every MLP output at every position (a `transform`: it depends on
        each activation); no indexed edits and no fixed vector to add (`steady` zeros, so a caller's
        `every_position` steering applies the shift too)."""
        vector = self.vector.to(lm.device)  # [L, D]
        none = torch.empty(0, dtype=torch.long, device=lm.device)
        return Edit(
            lm.layout.mlp_out,
            none,
            none,
            steady=[torch.zeros_like(v, dtype=lm.dtype) for v in vector],
            transform=lambda layer, hidden: icv_shift(hidden, vector[layer], self.icv_strength),
        )

    def predict(self, scorer: Scorer, batch: PromptBatch) -> torch.Tensor:
        with self.edit(scorer.lm, batch).apply():
            return scorer.label_scores(batch)

    @classmethod
    def state_spec(cls, layout: ModelLayout, n_classes: int) -> dict[str, TensorSpec]:
        shape = (layout.n_layers, layout.d_model)
        return {
            "principal": TensorSpec(shape),
            "mean": TensorSpec(shape),
            "explained_variance_ratio": TensorSpec(()),
            "demonstrations": TensorSpec((), "int"),
        }

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "principal": fitted(self.principal, self.name).contiguous(),
            "mean": fitted(self.mean, self.name).contiguous(),
            "explained_variance_ratio": torch.tensor(self.explained, dtype=torch.float64),
            "demonstrations": torch.tensor(self.n_demos),
        }

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.principal, self.mean = tensors["principal"].float(), tensors["mean"].float()
        self.explained = float(tensors["explained_variance_ratio"])
        self.n_demos = int(tensors["demonstrations"])
