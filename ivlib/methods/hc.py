"""Hidden Calibration (Cho et al., NAACL 2025): a nearest-centroid classifier on the last hidden state.

The label tokens' probabilities are not used. Each class has a centroid: the mean of the model's last
hidden state (the final layer after the final norm, what the unembedding reads: `readout`) at the
answer position, the query's separator, over calibration prompts whose query belongs to that class.
A prompt is predicted as the class of the nearest centroid; its scores are the negative distances.

As the paper builds them, the calibration prompts are ICL prompts from the training split, each a few
demonstrations and a query whose label is known: here the `-e` training episodes, drawn as the
evaluated prompts are (`fits_at_eval_shot`: `--shot` demonstrations, per class or in all as
`--demo-draw` says, and a query each; under `--demos fixed` the run's one set, in the `--demo-order`
given: `experiment.as_evaluated`; their queries' labels give the classes, so every class must have
at least one query). The paper calibrates with as many demonstrations as it tests with (k = 4 in
all), since the hidden state of a 4-shot prompt is not that of a 1-shot one: `-s` does not apply, and
the record's `ext_shot` is the `--shot` used (with 16 queries per class in the paper, give enough
episodes for every class). The distance is the Euclidean one (`hc_distance
l2`, the authors' later reference implementation); `cosine` is the other criterion their experiment
code computes. Both read the same centroids, so several values share one fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from typing_extensions import override

from .. import budget
from ..episodes import Episode
from ..errors import UsageError
from ..layout import ModelLayout
from ..prompts import PromptBatch, PromptEncoder
from ..readout import last_hidden, last_hiddens
from ..scoring import Scorer
from ..settings import EVAL, MethodSettings, setting_field
from ..state import TensorSpec
from .base import Method, fitted, register

DISTANCES = ("l2", "cosine")


def class_means(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([C, D] mean feature per class, [C] counts) of `features` [N, D] with `labels` [N]."""
    counts = torch.bincount(labels, minlength=n_classes)
    sums = torch.zeros(n_classes, features.shape[1], dtype=torch.float64).index_add_(0, labels, features.double())
    return (sums / counts.clamp(min=1)[:, None]).float(), counts


def centroid_scores(hidden: torch.Tensor, centroids: torch.Tensor, distance: str) -> torch.Tensor:
    """[B, C] negative distances of `hidden` [B, D] to each centroid [C, D] (higher: nearer)."""
    if distance == "l2":
        distances: torch.Tensor = torch.linalg.vector_norm(hidden[:, None, :] - centroids[None], dim=-1)
        return -distances
    cosine = torch.nn.functional.cosine_similarity(hidden[:, None, :], centroids[None], dim=-1)
    return cosine - 1  # minus the cosine distance


@dataclass(frozen=True)
class HCSettings(MethodSettings):
    hc_distance: str = setting_field(
        "l2",
        "distance to the class centroids: l2 (Euclidean, the reference's) or cosine; several share one fit",
        role=EVAL,
        choices=DISTANCES,
    )


@register
class HiddenCalibration(Method[HCSettings]):
    name = "hc"
    position = 110
    needs_fit = True
    fits_at_eval_shot = True  # its calibration prompts have the demonstrations its evaluated prompts have
    has_state = True
    # it classifies the model's last hidden state itself (nearest class centroid of the last hidden state): no reading of the
    # vocabulary's output applies but the default, which it stands for
    scoring_rules = ("first-token",)
    scoring_note = "it classifies the last hidden state itself"
    caches_fixed_prefix = True  # edits nothing and reads the query's last position only

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.centroids: torch.Tensor | None = None  # [C, D] float32
        self.counts: torch.Tensor | None = None  # [C] calibration prompts per class

    @override
    def fit(
        self, scorer: Scorer, encoder: PromptEncoder, episodes: list[Episode], validation: list[Episode] | None = None
    ) -> None:
        present = {e.query.label for e in episodes}
        missing = [w for c, w in enumerate(encoder.label_words) if c not in present]
        if missing:  # refused before any compute
            raise UsageError(
                f"hc: no calibration query of class '{missing[0]}' among the {len(episodes)} training episodes; "
                "accepted: more episodes (-e) so that every class has a query"
            )
        prompts = [encoder.encode(e) for e in episodes]
        hidden = last_hiddens(scorer, prompts, "HC calibration")  # [E, D]
        labels = torch.tensor([p.label for p in prompts])
        self.centroids, self.counts = class_means(hidden, labels, encoder.n_classes)

    @override
    def labeled_examples(self, train: list[Episode], validation: list[Episode] | None) -> dict[str, int]:
        """The calibration prompts' demonstrations and their queries, whose labels give the classes."""
        return {"fit": budget.distinct(budget.demonstrations(train) + budget.queries(train)), "selection": 0}

    def fit_summary(self) -> dict[str, Any]:
        counts = fitted(self.counts, self.name)
        return {"calibration_prompts": int(counts.sum()), "per_class": [int(c) for c in counts]}

    def predict(self, scorer: Scorer, batch: PromptBatch) -> torch.Tensor:
        centroids = fitted(self.centroids, self.name)
        hidden = last_hidden(scorer, batch)  # [B, D]
        if hidden.shape[-1] != centroids.shape[-1]:
            raise UsageError(
                f"hc: the centroids are {centroids.shape[-1]} wide, the model's last hidden state "
                f"{hidden.shape[-1]}; accepted: a state fitted on this model"
            )
        return centroid_scores(hidden, centroids.to(hidden.device), self.settings.hc_distance)

    @classmethod
    @override
    def state_spec(cls, layout: ModelLayout, n_classes: int) -> dict[str, TensorSpec]:
        # the last hidden state's width is d_model except where a model projects it (OPT-350m): not fixed here
        return {"centroids": TensorSpec((n_classes, None)), "counts": TensorSpec((n_classes,), "int")}

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "centroids": fitted(self.centroids, self.name).contiguous(),
            "counts": fitted(self.counts, self.name).contiguous(),
        }

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.centroids = tensors["centroids"].float()
        self.counts = tensors["counts"].long()
