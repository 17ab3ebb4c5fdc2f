"""A trained probe: L2-regularised logistic regression on the model's last hidden state.

The reference a steering method's labeled-data budget is read against: an ordinary supervised read-out
trained on exactly the labeled examples the fit is allowed. Those are the distinct training examples of
the `-e` training episodes (`-s` per class each), demonstrations and queries alike, in order of first
appearance (each episode's demonstrations in prompt order, then its query), duplicates counted once:
the examples IV's extraction reads. `--probe-examples N` keeps the first N of them, to match another
budget. Each example is encoded as a zero-shot prompt (BOS, input, separator) and its feature is the
last hidden state at the separator (the final layer after the final norm, what the unembedding reads:
`readout`, as Hidden Calibration reads it); evaluation reads the query alone the same way (zero-shot).

Features are standardised with the training examples' mean and standard deviation; the regression is
scikit-learn's `LogisticRegression` (lbfgs, multinomial, L2, to a tight tolerance). Its C (inverse regularisation strength)
is chosen by macro-F1 on the `--select-episodes` validation queries (zero-shot) from a log grid,
1e-4 to 1e4, ties to the smaller C (stronger regularisation); `--probe-c` gives it instead. The fitted
regression is kept as tensors (weight, bias, standardisation), so predicting needs no scikit-learn.

With several processes the features are split like any read, and the regressions run on the main
process only; every process adopts its result.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from typing_extensions import override

from .. import budget
from .. import distributed as dist
from ..episodes import Episode, Example
from ..errors import UsageError
from ..layout import ModelLayout
from ..prompts import PromptBatch, PromptEncoder
from ..readout import last_hidden, last_hiddens
from ..scoring import Scorer
from ..settings import MethodSettings, setting_field
from ..state import TensorSpec
from .base import Method, fitted, register

C_GRID = tuple(10.0**k for k in range(-4, 5))  # 1e-4 .. 1e4
# lbfgs to a tight tolerance: each C's fit is then its unique optimum (the objective is strictly convex), not
# an early stopping point that float noise in the features (another batch size) moves; with few separable
# examples a large C is ill-conditioned and sklearn's default tolerance (1e-4) let such noise flip the choice
TOL = 1e-8
MAX_ITER = 10_000  # a fit that stops here is recorded as not converged


def distinct_examples(episodes: list[Episode]) -> list[Example]:
    """Every demonstration and query of the episodes once, in order of first appearance."""
    return list(dict.fromkeys(x for e in episodes for x in (*e.demos, e.query)))


def standardiser(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], scale [D]) of the training features; a constant feature keeps scale 1."""
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    return mean, np.where(scale > 0, scale, 1.0)


def logistic_regression(x: np.ndarray, y: np.ndarray, c: float, n_classes: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(weight [C, D], bias [C], converged) of a fitted L2 logistic regression, as softmax logits:
    log_softmax(x @ weight.T + bias) is its `predict_log_proba`, binary tasks included."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # recorded instead of printed
        model = LogisticRegression(C=c, tol=TOL, max_iter=MAX_ITER).fit(x, y)
    coef, intercept = model.coef_, model.intercept_
    if n_classes == 2:  # one logit z for class 1: sigmoid(z) = softmax([-z/2, z/2])[1]
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    return coef, intercept, bool(np.all(model.n_iter_ < MAX_ITER))


@dataclass(frozen=True)
class ProbeSettings(MethodSettings):
    probe_c: float | None = setting_field(
        None,
        "inverse L2 strength C of the logistic regression (default: chosen on the validation queries "
        "from 1e-4, 1e-3, ..., 1e4)",
        low=1e-6,
        symbol="C",
    )
    probe_examples: int | None = setting_field(
        None,
        "train on the first N distinct examples of the training episodes (default: all of them, "
        "demonstrations and queries)",
        low=1,
        symbol="N",
    )


@register
class Probe(Method[ProbeSettings]):
    name = "probe"
    position = 120
    needs_fit = True
    needs_validation = True  # chooses C on validation (unless --probe-c gives it)
    has_state = True
    # it classifies the model's last hidden state itself (a logistic regression on the last hidden state): no reading of the
    # vocabulary's output applies but the default, which it stands for
    scoring_rules = ("first-token",)
    scoring_note = "it classifies the last hidden state itself"
    fixed_eval_shot = 0  # a read-out of the query's own hidden state: no demonstrations

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mean: torch.Tensor | None = None  # [D] standardisation
        self.scale: torch.Tensor | None = None  # [D]
        self.weight: torch.Tensor | None = None  # [C, D] on standardised features
        self.bias: torch.Tensor | None = None  # [C]
        self.c: float | None = self.settings.probe_c  # the C used
        self.c_scores: list[float] = []  # validation macro-F1 per C of C_GRID (empty when given)
        self.counts: list[int] = []  # training examples per class
        self.converged = True

    # ---- fitting --------------------------------------------------------------------------------
    def training_examples(self, episodes: list[Episode], label_words: list[str]) -> list[Example]:
        """The examples the fit may use (see the module doc); every class must be among them."""
        examples = distinct_examples(episodes)[: self.settings.probe_examples]
        present = {x.label for x in examples}
        missing = [w for c, w in enumerate(label_words) if c not in present]
        if missing:
            raise UsageError(
                f"probe: the {len(examples)} training examples have no example of class '{missing[0]}'; "
                "accepted: more examples (-s, -e or --probe-examples) so that every class has one"
            )
        return examples

    def fit(
        self, scorer: Scorer, encoder: PromptEncoder, episodes: list[Episode], validation: list[Episode] | None = None
    ) -> None:
        examples = self.training_examples(episodes, encoder.label_words)
        prompts = [encoder.encode(Episode((), x)) for x in examples]
        x = last_hiddens(scorer, prompts, "probe features").double().numpy()  # [N, D]
        y = np.array([p.label for p in prompts])
        self.counts = np.bincount(y, minlength=encoder.n_classes).tolist()
        val_x, val_y = None, None
        if self.settings.probe_c is None:
            if not validation:
                raise ValueError("the probe chooses its C on validation episodes")
            val_prompts = [encoder.encode(e.query_only()) for e in validation]
            val_x = last_hiddens(scorer, val_prompts, "probe validation").double().numpy()
            val_y = np.array([p.label for p in val_prompts])
        result = dist.share(
            lambda: (
                self._regress(x, y, val_x, val_y, encoder.n_classes, scorer.selection_score) if dist.is_main() else None
            ),
            "probe fit",
        )[0]
        assert result is not None  # the main process's
        mean, scale, weight, bias, self.c, self.c_scores, self.converged = result
        self.mean, self.scale = torch.from_numpy(mean).float(), torch.from_numpy(scale).float()
        self.weight, self.bias = torch.from_numpy(weight).float(), torch.from_numpy(bias).float()

    def _regress(
        self,
        x: np.ndarray,
        y: np.ndarray,
        val_x: np.ndarray | None,
        val_y: np.ndarray | None,
        n_classes: int,
        judge: Callable[[np.ndarray, np.ndarray, int], float],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, list[float], bool]:
        """Standardise, fit at the given C or at each C of the grid (keeping the best on validation by
        `judge`, the protocol's headline metric: macro-F1 unless --metric accuracy)."""
        mean, scale = standardiser(x)
        z = (x - mean) / scale
        if val_x is None or val_y is None:
            c = float(fitted(self.settings.probe_c, self.name))
            weight, bias, converged = logistic_regression(z, y, c, n_classes)
            return mean, scale, weight, bias, c, [], converged
        val_z = (val_x - mean) / scale
        fits, scores = [], []
        for c in C_GRID:
            weight, bias, converged = logistic_regression(z, y, c, n_classes)
            preds = (val_z @ weight.T + bias).argmax(axis=1)
            scores.append(float(judge(val_y, preds, n_classes)))
            fits.append((weight, bias, converged))
        best = int(np.argmax(scores))  # ties: the smaller C
        weight, bias, converged = fits[best]
        return mean, scale, weight, bias, C_GRID[best], scores, converged

    def labeled_examples(self, train: list[Episode], validation: list[Episode] | None) -> dict[str, int]:
        """Its training examples (see `training_examples`); the validation queries when C is chosen."""
        chosen = budget.distinct(budget.queries(validation or [])) if self.settings.probe_c is None else 0
        return {"fit": len(distinct_examples(train)[: self.settings.probe_examples]), "selection": chosen}

    def fit_summary(self) -> dict[str, Any]:
        return {
            "examples": sum(self.counts),
            "per_class": self.counts,
            "c": self.c,
            "c_chosen_by": "user" if self.settings.probe_c is not None else "validation",
            "c_scores": [[c, round(s, 4)] for c, s in zip(C_GRID, self.c_scores)],
            "converged": self.converged,
        }

    # ---- evaluation -----------------------------------------------------------------------------
    def predict(self, scorer: Scorer, batch: PromptBatch) -> torch.Tensor:
        weight = fitted(self.weight, self.name)
        hidden = last_hidden(scorer, batch)  # [B, D]
        if hidden.shape[-1] != weight.shape[-1]:
            raise UsageError(
                f"probe: the regression is {weight.shape[-1]} wide, the model's last hidden state "
                f"{hidden.shape[-1]}; accepted: a state fitted on this model"
            )
        device = hidden.device
        z = (hidden - fitted(self.mean, self.name).to(device)) / fitted(self.scale, self.name).to(device)
        logits = z @ weight.to(device).T + fitted(self.bias, self.name).to(device)  # [B, C]
        return torch.log_softmax(logits, dim=-1)

    @classmethod
    @override
    def state_spec(cls, layout: ModelLayout, n_classes: int) -> dict[str, TensorSpec]:
        # the last hidden state's width is d_model except where a model projects it (OPT-350m): not fixed here
        return {
            "mean": TensorSpec((None,)),
            "scale": TensorSpec((None,)),
            "weight": TensorSpec((n_classes, None)),
            "bias": TensorSpec((n_classes,)),
            "c": TensorSpec(()),
            "c_scores": TensorSpec((None,)),  # one per C of the grid (none when --probe-c gave it)
            "counts": TensorSpec((n_classes,), "int"),
            "converged": TensorSpec((), "int", below=(2,)),
        }

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "mean": fitted(self.mean, self.name).contiguous(),
            "scale": fitted(self.scale, self.name).contiguous(),
            "weight": fitted(self.weight, self.name).contiguous(),
            "bias": fitted(self.bias, self.name).contiguous(),
            "c": torch.tensor(fitted(self.c, self.name), dtype=torch.float64),
            "c_scores": torch.tensor(self.c_scores, dtype=torch.float64),
            "counts": torch.tensor(self.counts, dtype=torch.long),
            "converged": torch.tensor(int(self.converged)),
        }

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        widths = {tensors[k].shape[-1] for k in ("mean", "scale", "weight")}
        if len(widths) != 1:
            raise ValueError(f"mean, scale and weight differ in width ({sorted(widths)})")
        if not bool((tensors["scale"] > 0).all()):
            raise ValueError("scale holds a value that is not positive")
        self.mean, self.scale = tensors["mean"].float(), tensors["scale"].float()
        self.weight, self.bias = tensors["weight"].float(), tensors["bias"].float()
        self.c = float(tensors["c"])
        self.c_scores = tensors["c_scores"].tolist()
        self.counts = tensors["counts"].tolist()
        self.converged = bool(int(tensors["converged"]))
