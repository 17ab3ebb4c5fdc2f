"""Paired comparisons of two methods scored on the very same episodes (their samples logs).

Every method answers the same seeded queries, so two runs' episode i is one question answered
twice: the difference of their scores is estimated far more tightly by resampling episode indices
jointly (one draw serves both methods) than by comparing the two runs' own intervals. Beside the
bootstrap: win/tie/loss counts on correctness and an exact McNemar test, the two-sided binomial
test on the discordant episodes (one method right, the other wrong), via scipy.stats.binomtest, or,
where episodes name their queries, the same test with each query's episodes kept together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .metrics import Labels, _counts, _f1_from_counts, draw_weights


@dataclass(frozen=True)
class Interval:
    value: float
    ci_low: float
    ci_high: float

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0


@dataclass(frozen=True)
class Paired:
    """Method A minus method B on the same episodes."""

    n: int
    macro: Interval | None  # None for multiple choice (option positions are not classes)
    accuracy: Interval
    wins: int  # A right, B wrong
    ties: int  # both right or both wrong
    losses: int  # A wrong, B right
    mcnemar_p: float  # whole queries when `compare` was given them


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p on b and c discordant pairs (1.0 when there are none)."""
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def mcnemar_by_query(wins: np.ndarray, losses: np.ndarray, clusters: Labels) -> float:
    """Two-sided exact p of McNemar's test with each query's episodes kept together. A query drawn
    several times is one piece of evidence, as in the intervals (`draw_weights`); counting its
    episodes one by one makes the p too small. Under the null hypothesis the two methods are
    exchangeable on every query, so the sign of each query's net discordance d (episodes only A got
    right minus those only B got right) is a fair coin, and p = P(|sum of the signed d| >= |observed|).
    The null distribution is exact (a sum of scaled binomials, one per distinct |d|), not sampled;
    with every query once it is the exact McNemar p."""
    from scipy.stats import binom

    index = np.unique(np.asarray(clusters), return_inverse=True)[1].ravel()
    net = np.bincount(index, weights=wins.astype(float) - losses.astype(float)).round().astype(int)  # [queries]
    sizes, counts = np.unique(np.abs(net[net != 0]), return_counts=True)
    if not len(sizes):
        return 1.0
    null = np.ones(1)  # P(sum = s) for s = -total..total, built up one distinct |d| at a time
    for size, m in zip(sizes.tolist(), counts.tolist()):
        heads = np.arange(m + 1)  # how many of the m queries with |d| = size count for A
        part = np.zeros(2 * size * m + 1)
        part[2 * size * heads] = binom.pmf(heads, m, 0.5)  # their sum size * (2 heads - m), shifted by size * m
        null = np.convolve(null, part)
    total = int(np.abs(net).sum())
    sums = np.arange(-total, total + 1)
    return float(min(1.0, null[np.abs(sums) >= abs(int(net.sum()))].sum()))


def paired_bootstrap(
    y_true: Labels,
    pred_a: Labels,
    pred_b: Labels,
    n_classes: int | None,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    clusters: Labels | None = None,
) -> dict[str, Interval]:
    """Percentile intervals of A - B for accuracy and (with `n_classes`) macro-F1; each replicate
    draws one multiset of episode indices (or of whole queries: `clusters`, see `draw_weights`) and
    scores both methods on it."""
    y, a, b = np.asarray(y_true), np.asarray(pred_a), np.asarray(pred_b)
    n = len(y)
    if n == 0 or len(a) != n or len(b) != n:
        raise ValueError(f"paired vectors must be non-empty and of one length (got {n}, {len(a)}, {len(b)})")
    rng = np.random.default_rng(seed)
    hit_a, hit_b = (a == y).astype(float), (b == y).astype(float)
    chunk = max(1, 2_000_000 // n)
    acc: list[np.ndarray] = []
    macro: list[np.ndarray] = []
    for start in range(0, resamples, chunk):
        weights = draw_weights(rng, min(chunk, resamples - start), n, clusters)  # [r, N]
        acc.append(weights @ (hit_a - hit_b) / weights.sum(1))
        if n_classes is not None:
            fa = _f1_from_counts(*_counts(y, a, n_classes, weights))["macro"]
            fb = _f1_from_counts(*_counts(y, b, n_classes, weights))["macro"]
            macro.append(fa - fb)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100

    def interval(point: float, reps: list[np.ndarray]) -> Interval:
        values = np.concatenate(reps)
        return Interval(point, float(np.percentile(values, lo)), float(np.percentile(values, hi)))

    out = {"accuracy": interval(float(hit_a.mean() - hit_b.mean()), acc)}
    if n_classes is not None:
        fa0 = _f1_from_counts(*_counts(y, a, n_classes))["macro"]
        fb0 = _f1_from_counts(*_counts(y, b, n_classes))["macro"]
        out["macro"] = interval(float(fa0 - fb0), macro)
    return out


def compare(
    y_true: Labels,
    pred_a: Labels,
    pred_b: Labels,
    n_classes: int | None,
    seed: int = 0,
    resamples: int = 1000,
    clusters: Labels | None = None,
) -> Paired:
    """Everything the report shows for one pair of runs (`clusters`: each episode's query, resampled whole)."""
    y, a, b = np.asarray(y_true), np.asarray(pred_a), np.asarray(pred_b)
    boot = paired_bootstrap(y, a, b, n_classes, resamples=resamples, seed=seed, clusters=clusters)
    right_a, right_b = a == y, b == y
    wins, losses = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    return Paired(
        n=len(y),
        macro=boot.get("macro"),
        accuracy=boot["accuracy"],
        wins=wins,
        ties=len(y) - wins - losses,
        losses=losses,
        mcnemar_p=mcnemar_exact(wins, losses)
        if clusters is None
        else mcnemar_by_query(right_a & ~right_b, ~right_a & right_b, clusters),
    )


def aligned(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Whether two samples logs hold the same queries, episode by episode (rows and gold labels)."""
    if len(a) != len(b):
        return False
    return all(
        x.get("query_row") == y.get("query_row") and x.get("gold") == y.get("gold") and x.get("query_row") is not None
        for x, y in zip(a, b)
    )


def confusion(gold: Labels, pred: Labels, n_classes: int) -> np.ndarray:
    """[true, predicted] counts."""
    m = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(m, (np.asarray(gold), np.asarray(pred)), 1)
    return m


def per_class_f1(matrix: np.ndarray) -> list[float]:
    """F1 of each class from a confusion matrix (0 for a class never predicted nor present)."""
    tp = np.diag(matrix).astype(float)
    denom = matrix.sum(0) + matrix.sum(1)
    return [float(2 * t / d) if d else 0.0 for t, d in zip(tp, denom)]
