"""Paired statistics against direct computations on hand-made vectors, samples logs, and the report
end to end: two tiny CLI runs with --log-samples, then the paired table and confusion PNGs."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom

from ivlib.cli import main
from ivlib.episodes import sample_episodes
from ivlib.metrics import f1_scores
from ivlib.paired import (
    aligned,
    compare,
    confusion,
    mcnemar_by_query,
    mcnemar_exact,
    paired_bootstrap,
    per_class_f1,
)


def test_mcnemar_known_answer():
    assert mcnemar_exact(1, 9) == pytest.approx(2 * binom.cdf(1, 10, 0.5))
    assert mcnemar_exact(9, 1) == pytest.approx(2 * binom.cdf(1, 10, 0.5))
    assert mcnemar_exact(5, 5) == pytest.approx(1.0)
    assert mcnemar_exact(0, 0) == 1.0


def test_compare_counts_and_mcnemar():
    # b = 1 episode only A gets right, c = 9 only B gets right, 5 both right, 5 both wrong
    y = np.zeros(20, dtype=int)
    a = np.array([0] * 1 + [1] * 9 + [0] * 5 + [1] * 5)
    b = np.array([1] * 1 + [0] * 9 + [0] * 5 + [1] * 5)
    r = compare(y, a, b, n_classes=2)
    assert (r.wins, r.ties, r.losses) == (1, 10, 9)
    assert r.mcnemar_p == pytest.approx(2 * binom.cdf(1, 10, 0.5))
    assert r.accuracy.value == pytest.approx((6 - 14) / 20)


def _discordant(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    right_a, right_b = rng.random(n) < 0.5, rng.random(n) < 0.5
    return right_a & ~right_b, ~right_a & right_b


@pytest.mark.parametrize("seed", range(6))
def test_the_test_by_query_is_exact_mcnemar_when_no_query_recurs(seed):
    rng = np.random.default_rng(seed)
    wins, losses = _discordant(rng, int(rng.integers(5, 60)))
    by_query = mcnemar_by_query(wins, losses, rng.permutation(len(wins)))  # ids distinct, any order
    assert by_query == pytest.approx(mcnemar_exact(int(wins.sum()), int(losses.sum())), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_the_test_by_query_is_every_sign_flip_of_whole_queries(seed):
    rng = np.random.default_rng(seed)
    queries = rng.integers(0, 9, size=30)
    wins, losses = _discordant(rng, 30)
    net = np.bincount(queries, weights=wins.astype(int) - losses.astype(int), minlength=9)
    flips = np.array(list(itertools.product([1, -1], repeat=9)))  # [512, 9]
    enumerated = np.mean(np.abs(flips @ net) >= abs(net.sum()))
    assert mcnemar_by_query(wins, losses, queries) == pytest.approx(enumerated, abs=1e-12)


def test_a_query_answered_twice_is_not_twice_the_evidence():
    wins, losses = _discordant(np.random.default_rng(7), 40)
    queries = np.arange(40)
    once = mcnemar_by_query(wins, losses, queries)
    twice = mcnemar_by_query(np.tile(wins, 2), np.tile(losses, 2), np.tile(queries, 2))
    assert once == pytest.approx(twice, abs=1e-12)
    assert mcnemar_exact(2 * int(wins.sum()), 2 * int(losses.sum())) < once  # counted by episode: smaller
    y = np.zeros(80, dtype=int)
    a, b = np.tile(np.where(wins, 0, 1), 2), np.tile(np.where(losses, 0, 1), 2)
    assert compare(y, a, b, 2, clusters=np.tile(queries, 2)).mcnemar_p == pytest.approx(once, abs=1e-12)


def test_paired_bootstrap_matches_direct_resampling():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 40)
    a = np.where(rng.random(40) < 0.7, y, rng.integers(0, 3, 40))
    b = np.where(rng.random(40) < 0.5, y, rng.integers(0, 3, 40))
    out = paired_bootstrap(y, a, b, 3, resamples=200, seed=7)
    # the same draws, one replicate at a time
    draws = np.random.default_rng(7).integers(0, 40, size=(200, 40))
    acc = [np.mean(a[d] == y[d]) - np.mean(b[d] == y[d]) for d in draws]
    macro = [f1_scores(y[d], a[d], 3)["macro"] - f1_scores(y[d], b[d], 3)["macro"] for d in draws]
    assert out["accuracy"].value == pytest.approx(np.mean(a == y) - np.mean(b == y))
    assert out["macro"].value == pytest.approx(f1_scores(y, a, 3)["macro"] - f1_scores(y, b, 3)["macro"])
    assert out["accuracy"].ci_low == pytest.approx(np.percentile(acc, 2.5))
    assert out["accuracy"].ci_high == pytest.approx(np.percentile(acc, 97.5))
    assert out["macro"].ci_low == pytest.approx(np.percentile(macro, 2.5))
    assert out["macro"].ci_high == pytest.approx(np.percentile(macro, 97.5))


def test_clustered_bootstrap_draws_whole_queries():
    """Episodes sharing a query are resampled together: a plain loop drawing queries (clusters) with
    replacement and taking all their episodes gives the same interval."""
    rng = np.random.default_rng(5)
    query = rng.integers(0, 25, 60)  # 60 episodes of 25-odd queries, as queries drawn with replacement recur
    y = query % 3
    a = np.where(rng.random(60) < 0.7, y, rng.integers(0, 3, 60))
    b = np.where(rng.random(60) < 0.5, y, rng.integers(0, 3, 60))
    out = paired_bootstrap(y, a, b, 3, resamples=200, seed=7, clusters=query)
    ids = np.unique(query)
    members = [np.flatnonzero(query == q) for q in ids]
    draws = np.random.default_rng(7).integers(0, len(ids), size=(200, len(ids)))
    picked = [np.concatenate([members[k] for k in d]) for d in draws]
    acc = [np.mean(a[i] == y[i]) - np.mean(b[i] == y[i]) for i in picked]
    macro = [f1_scores(y[i], a[i], 3)["macro"] - f1_scores(y[i], b[i], 3)["macro"] for i in picked]
    assert out["accuracy"].ci_low == pytest.approx(np.percentile(acc, 2.5))
    assert out["accuracy"].ci_high == pytest.approx(np.percentile(acc, 97.5))
    assert out["macro"].ci_low == pytest.approx(np.percentile(macro, 2.5))
    assert out["macro"].ci_high == pytest.approx(np.percentile(macro, 97.5))
    assert out["macro"].value == pytest.approx(f1_scores(y, a, 3)["macro"] - f1_scores(y, b, 3)["macro"])


def test_a_query_answered_twice_is_one_piece_of_evidence():
    """Each query's episode repeated: resampling whole queries gives the interval of the queries once
    each, not the narrower one of twice the episodes; distinct queries draw as episodes do."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 50)
    a = np.where(rng.random(50) < 0.8, y, 1 - y)
    b = np.where(rng.random(50) < 0.6, y, 1 - y)
    once = paired_bootstrap(y, a, b, 2, seed=1)
    twice = paired_bootstrap(*(np.repeat(v, 2) for v in (y, a, b)), 2, seed=1, clusters=np.repeat(np.arange(50), 2))
    naive = paired_bootstrap(*(np.repeat(v, 2) for v in (y, a, b)), 2, seed=1)
    assert twice == once
    assert naive["macro"].ci_high - naive["macro"].ci_low < once["macro"].ci_high - once["macro"].ci_low
    assert paired_bootstrap(y, a, b, 2, seed=1, clusters=np.arange(50)) == once
    with pytest.raises(ValueError, match="one id per episode"):
        paired_bootstrap(y, a, b, 2, clusters=np.arange(49))


def test_identical_predictions_zero_width():
    y = np.array([0, 1, 1, 0, 2, 2, 1])
    p = np.array([0, 1, 0, 0, 2, 1, 1])
    r = compare(y, p, p.copy(), n_classes=3)
    for iv in (r.accuracy, r.macro):
        assert iv is not None
        assert (iv.value, iv.ci_low, iv.ci_high) == (0.0, 0.0, 0.0)
        assert not iv.excludes_zero
    assert (r.wins, r.losses, r.mcnemar_p) == (0, 0, 1.0)


def test_multiple_choice_has_no_macro():
    r = compare([0, 1, 2], [0, 1, 1], [0, 0, 0], n_classes=None)
    assert r.macro is None and r.accuracy.value == pytest.approx(1 / 3)


def test_confusion_and_per_class_f1():
    gold, pred = [0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 0, 2]
    m = confusion(gold, pred, 3)
    assert m.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    assert per_class_f1(m) == pytest.approx([0.5, 2 / 3, 1.0])
    assert np.mean(per_class_f1(m)) == pytest.approx(f1_scores(gold, pred, 3)["macro"])


def test_aligned():
    a = [{"query_row": 3, "gold": 1}, {"query_row": 5, "gold": 0}]
    assert aligned(a, [dict(x, pred=0) for x in a])
    assert not aligned(a, a[:1])
    assert not aligned(a, [a[0], {"query_row": 6, "gold": 0}])


def test_episode_rows_do_not_change_the_draws(task):
    split = task.splits["validation"]
    for shot in (0, 1):
        episodes = sample_episodes(split, task.n_classes, shot, 30, 5, "validation/eval")
        for e in episodes:
            assert e.query.index is not None and split.texts[e.query.index] == e.query.text
            assert all(split.texts[d.index] == d.text and d.index != e.query.index for d in e.demos)


COMMON = ["-c", "config/tiny.yaml", "-m", "tiny-gpt2", "-t", "review_sentiment", "--quiet", "-n", "30"]


def test_log_samples_and_report_end_to_end(tmp_path: Path, capsys):
    results = tmp_path / "runs.jsonl"
    base = [*COMMON, "--run-test", "--results", str(results)]
    assert main([*base, "--method", "icl", "--log-samples"]) == 0
    assert main([*base, "--method", "iv", "-s", "1", "-e", "8", "--log-samples"]) == 0
    assert main([*base, "--method", "zero-shot"]) == 0  # no log: compared by intervals only
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert "samples" not in records[2]
    for r in records[:2]:
        log = tmp_path / r["samples"]["path"]
        assert hashlib.sha256(log.read_bytes()).hexdigest() == r["samples"]["sha256"]
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        assert len(lines) == r["samples"]["n"] == 30
        assert set(lines[0]) == {"episode", "query_row", "demo_rows", "gold", "pred", "correct", "scores"}
        assert len(lines[0]["scores"]) == 2 and len(lines[0]["demo_rows"]) == 2
    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["report", "--results", str(results), "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert "Paired differences, each method minus icl" in table
    assert "paired, n = 30" in table
    assert "unpaired (no samples log for zero-shot)" in table
    pngs = sorted(p.name for p in out.glob("confusion_*.png"))
    assert pngs == ["confusion_tiny-gpt2_review_sentiment_icl.png", "confusion_tiny-gpt2_review_sentiment_iv.png"]
    assert all((out / p).stat().st_size > 1000 for p in pngs)
    with open(out / "table.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert rows["icl"]["per_class_f1"].startswith("bad=") and rows["zero-shot"]["per_class_f1"] == ""
    with open(out / "paired.csv", newline="") as f:
        paired = list(csv.DictReader(f))
    assert {(r["method"], r["baseline"]) for r in paired} == {("iv", "icl"), ("icl", "iv")}


def test_tampered_log_is_refused(tmp_path: Path, capsys):
    results = tmp_path / "runs.jsonl"
    base = [*COMMON, "--run-test", "--results", str(results), "--method", "icl", "--log-samples"]
    assert main(base) == 0
    record = json.loads(results.read_text())
    log = tmp_path / record["samples"]["path"]
    log.write_text(log.read_text().replace('"pred":0', '"pred":1'))
    capsys.readouterr()
    assert main(["report", "--results", str(results), "--out", str(tmp_path / "r")]) == 0
    assert "does not match the record's sha256" in capsys.readouterr().err
    assert not list((tmp_path / "r").glob("confusion_*.png"))
