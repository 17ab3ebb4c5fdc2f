"""What one evaluation record holds: the metrics of its scores, what it predicted, and the run's
shared fields (model, task, protocol, fit, provenance), as `Experiment.evaluate` writes them. The
Python API computes its metrics here too, so its numbers are a record's."""

from __future__ import annotations

import platform
import subprocess
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import REPO_DIR
from .metrics import bootstrap_accuracy, bootstrap_f1
from .prompts import EncodedPrompt, option_lengths
from .scoring import Scorer
from .tasks import Task

NONE = "(none)"  # predicted_fraction's key for answers that are none of the labels (vocab, generate)
GOLD = "(the gold answer)"  # an open-vocabulary task's one "label": each query's own answer


def predicted_fraction(task: Task, scorer: Scorer, y_pred: np.ndarray) -> dict[str, float]:
    """The share of each answer among the predictions: a method that collapses onto one answer shows here."""
    answers = (
        [f"option_{i}" for i in range(task.n_classes)]
        if task.multiple_choice
        else [GOLD]
        if task.open_vocabulary
        else list(task.label_words)
    )
    if scorer.rule.can_say_none:
        answers.append(NONE)
    fractions = np.round(np.bincount(y_pred, minlength=len(answers)) / len(y_pred), 4).tolist()
    return dict(zip(answers, fractions))


def score_metrics(
    task: Task,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    scores: Any,
    seed: int,
    scorer: Scorer | None = None,
    prompts: list[EncodedPrompt] | None = None,
) -> dict[str, Any]:
    """The record's `metrics`: F1s (or for multiple choice accuracies) with bootstrap intervals; under
    a whole-answer rule also the other normalisation's (`_sum` or `_mean`: the sum and the per-token
    mean are both recorded, the headline by the rule)."""
    rule = scorer.rule.name if scorer is not None else None
    if task.open_vocabulary:  # right or not: accuracy, the headline of every paper on such tasks
        return {"accuracy": bootstrap_accuracy(y_true, y_pred, seed=seed)}
    if task.multiple_choice:  # length-normalised (per token) is the headline unless the rule is `full`
        other = y_pred_other = None
        if scorer is not None and prompts is not None:
            lengths = option_lengths(prompts).clamp(min=1).to(scores.dtype)
            by_mean = (scores / lengths).argmax(dim=-1).numpy()
            by_sum = scores.argmax(dim=-1).numpy()
            other, y_pred_other = ("accuracy_mean", by_mean) if rule == "full" else ("accuracy_sum", by_sum)
        else:
            other, y_pred_other = "accuracy_sum", scores.argmax(dim=-1).numpy()
        return {
            "accuracy": bootstrap_accuracy(y_true, y_pred, seed=seed),
            other: bootstrap_accuracy(y_true, y_pred_other, seed=seed),
        }
    metrics = bootstrap_f1(y_true, y_pred, task.n_classes, seed=seed)
    if rule in ("full", "full-mean") and scorer is not None:
        lengths = torch.tensor([len(t) for t in scorer.rule.answers.tokens], dtype=scores.dtype)
        by_mean, by_sum = (scores / lengths).argmax(dim=-1).numpy(), scores.argmax(dim=-1).numpy()
        suffix, other_pred = ("_mean", by_mean) if rule == "full" else ("_sum", by_sum)
        metrics.update({k + suffix: v for k, v in bootstrap_f1(y_true, other_pred, task.n_classes, seed=seed).items()})
    return metrics


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str]:
    import datasets
    import torch
    import transformers

    return {
        "ivlib": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "numpy": np.__version__,
    }
