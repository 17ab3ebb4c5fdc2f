"""F1 scores over episodes (one query each) and their bootstrap 95% intervals."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

Labels = Sequence[int] | npt.NDArray[np.integer]  # one class (or option) index per episode

AVERAGES = ("micro", "macro", "weighted")


def _f1_from_counts(tp: np.ndarray, pred: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    """Counts are [..., C]; returns each average over the last axis.

    A class never predicted and never present gets F1 0 in no average: it is left out of macro
    (sklearn's convention for labels absent from both) by weighting with presence.
    """
    denom = pred + true
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    present = (denom > 0).astype(float)
    support = true.astype(float)
    n = true.sum(-1)
    return {
        "micro": tp.sum(-1) / np.maximum(n, 1),
        "macro": (f1 * present).sum(-1) / np.maximum(present.sum(-1), 1),
        "weighted": (f1 * support).sum(-1) / np.maximum(support.sum(-1), 1),
    }


def _counts(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tp, predicted and true counts per class; `weights` [R, N] gives R bootstrap replicates.

    A prediction of `n_classes` is none of the classes (--score vocab or generate: another token or
    text): a miss for the true class, predicted for no class, so it lowers recall and accuracy only."""
    if weights is None:
        tp = np.bincount(y_true[y_true == y_pred], minlength=n_classes)
        pred = np.bincount(y_pred, minlength=n_classes + 1)[:n_classes]
        return tp, pred, np.bincount(y_true, minlength=n_classes)
    hit = (y_true == y_pred).astype(float)
    onehot_t = np.eye(n_classes)[y_true]  # [N, C]
    onehot_p = np.eye(n_classes + 1)[y_pred][:, :n_classes]  # "none" rows are all zero
    return weights @ (onehot_t * hit[:, None]), weights @ onehot_p, weights @ onehot_t


def f1_scores(y_true: Labels, y_pred: Labels, n_classes: int) -> dict[str, float]:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return {k: float(v) for k, v in _f1_from_counts(*_counts(y_true, y_pred, n_classes)).items()}


def draw_weights(rng: np.random.Generator, r: int, n: int, clusters: Labels | None = None) -> np.ndarray:
    """[r, n]: how often each of n episodes is drawn in each of r bootstrap replicates. Episodes are
    drawn with replacement; with `clusters` (an id per episode: its query's row) whole clusters are,
    every episode of one query together, since queries drawn with replacement recur (500 episodes
    of a 512-row split hold about 320 distinct queries) and a recurring query is one piece of evidence
    about new queries, not several. Ids all distinct and ascending draw exactly as no clusters do."""
    if clusters is not None and (len(clusters) != n or any(c is None for c in clusters)):
        raise ValueError(f"clusters: one id per episode ({n}), none missing; got {len(clusters)}")
    index = np.arange(n) if clusters is None else np.unique(np.asarray(clusters), return_inverse=True)[1].ravel()
    k = int(index.max()) + 1 if n else 0  # units drawn from: episodes, or distinct queries
    draws = rng.integers(0, k, size=(r, k))
    flat = (np.arange(r)[:, None] * k + draws).ravel()
    counts = np.bincount(flat, minlength=r * k).reshape(r, k)  # [r, K] draws of each unit
    return counts[:, index].astype(float)


def bootstrap_f1(
    y_true: Labels,
    y_pred: Labels,
    n_classes: int,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    clusters: Labels | None = None,
) -> dict[str, dict[str, float]]:
    """Point value and percentile interval per average, resampling episodes with replacement (or
    whole queries: `clusters`, see `draw_weights`)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n = len(y_true)
    rng = np.random.default_rng(seed)
    point = f1_scores(y_true, y_pred, n_classes)
    out = {}
    chunk = max(1, 2_000_000 // max(n, 1))  # bound the [R, N] weight matrix
    reps: dict[str, list[np.ndarray]] = {k: [] for k in AVERAGES}
    for start in range(0, resamples, chunk):
        weights = draw_weights(rng, min(chunk, resamples - start), n, clusters)  # [r, N]
        for k, v in _f1_from_counts(*_counts(y_true, y_pred, n_classes, weights)).items():
            reps[k].append(v)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    for k in AVERAGES:
        values = np.concatenate(reps[k])
        out[k] = {
            "value": point[k],
            "ci_low": float(np.percentile(values, lo)),
            "ci_high": float(np.percentile(values, hi)),
        }
    return out


def selection_score(y_true: Labels, y_pred: Labels, n_classes: int, accuracy: bool) -> float:
    """What a method maximises on validation: macro-F1, or accuracy (the protocol's headline; multiple
    choice always, since option positions are not classes and their F1 has no meaning)."""
    if accuracy:
        return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))
    return f1_scores(y_true, y_pred, n_classes)["macro"]


def bootstrap_accuracy(
    y_true: Labels, y_pred: Labels, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Accuracy and its percentile interval over episodes resampled with replacement."""
    hit = (np.asarray(y_true) == np.asarray(y_pred)).astype(float)
    rng = np.random.default_rng(seed)
    means = hit[rng.integers(0, len(hit), size=(resamples, len(hit)))].mean(axis=1)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {
        "value": float(hit.mean()),
        "ci_low": float(np.percentile(means, lo)),
        "ci_high": float(np.percentile(means, hi)),
    }
