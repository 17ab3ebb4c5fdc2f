"""How evaluation episodes are drawn: --demo-draw any (shot in all, whatever the classes), --demo-source
train and --queries each, StaICC's protocol (its preset), against the IV paper's default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ivlib.episodes import PAPER, Drawing, check_shots, sample_episodes
from ivlib.errors import UsageError
from ivlib.protocol import Protocol

REPO = Path(__file__).resolve().parent.parent
STAICC = Drawing(per_class=False, from_train=True, each_query=True)


def test_each_query_takes_every_row_in_turn_then_starts_over(task):
    split = task.splits["test"]
    n = len(split.texts)
    eps = sample_episodes(split, 2, 0, 2 * n + 3, seed=5, stream="test/eval", drawing=Drawing(each_query=True))
    rows = [e.query.index for e in eps]
    assert rows == [*range(n), *range(n), 0, 1, 2]
    other_seed = sample_episodes(split, 2, 0, n, seed=6, stream="test/eval", drawing=Drawing(each_query=True))
    assert [e.query.index for e in other_seed] == rows[:n]  # the seed draws demonstrations, not queries


def test_any_draws_shot_in_all_regardless_of_class(task):
    split = task.splits["validation"]
    eps = sample_episodes(split, 2, 4, 300, seed=1, stream="validation/eval", drawing=Drawing(per_class=False))
    assert all(len(e.demos) == 4 for e in eps)
    assert all(e.query.text not in {d.text for d in e.demos} for e in eps)
    counts = {sum(d.label for d in e.demos) for e in eps}  # positives among the 4: not always 2
    assert {0, 4} & counts and 2 in counts
    per_class = sample_episodes(split, 2, 2, 300, seed=1, stream="validation/eval")
    assert [e.query for e in eps] == [e.query for e in per_class]  # the same queries either way


def test_demonstrations_from_train_answer_the_evaluated_splits_queries(task):
    train, test = task.splits["train"], task.splits["test"]
    eps = sample_episodes(test, 2, 4, 100, seed=2, stream="test/eval", drawing=STAICC, train=train)
    train_texts, test_texts = set(train.texts), set(test.texts)
    assert all(e.query.text in test_texts for e in eps)
    assert all(d.text in train_texts and d.text != e.query.text for e in eps for d in e.demos)
    assert all(d.text == train.texts[d.index] for e in eps for d in e.demos)  # the index is train's row
    balanced = Drawing(per_class=True, from_train=True)
    for e in sample_episodes(test, 2, 2, 50, seed=2, stream="test/eval", drawing=balanced, train=train):
        assert sorted(d.label for d in e.demos) == [0, 0, 1, 1]


def test_the_default_draw_is_unchanged(task):
    split = task.splits["validation"]
    default = sample_episodes(split, 2, 2, 40, seed=9, stream="validation/eval")
    assert default == sample_episodes(split, 2, 2, 40, seed=9, stream="validation/eval", drawing=PAPER)


def test_shot_in_all_needs_shot_plus_one_examples_not_per_class(task):
    split = task.splits["validation"]
    smallest, total = int(split.class_counts(2).min()), len(split.texts)
    check_shots(split, "validation", 2, smallest + 1, task.label_words, "--shot", per_class=False)
    with pytest.raises(UsageError, match=f"at most {total - 1}"):
        check_shots(split, "validation", 2, total, task.label_words, "--shot", per_class=False)


def test_fixed_demonstrations_refuse_the_episodic_draw_options():
    with pytest.raises(UsageError, match="--demo-draw any applies to episodic demonstrations") as caught:
        Protocol.build(shot=1, demos="fixed", demo_draw="any")._check_drawing()
    assert "accepted: --demo-draw per-class" in str(caught.value)
    with pytest.raises(UsageError, match="'sideways'"):
        Protocol.build(queries="sideways")


def _run(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    results = tmp_path / "runs.jsonl"
    argv = [sys.executable, "iv.py", "-c", "config/tiny.yaml", "-m", "tiny-gpt2", "-t", "review_sentiment"]
    argv += ["--results", str(results), "--quiet", "--log-samples", *flags]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    return done, records


def test_the_staicc_preset_draws_four_from_train_and_each_test_query_twice(tmp_path):
    preset = ["--preset", "staicc", "--template", "iv"]  # its template has forms for StaICC tasks only
    done, records = _run(tmp_path, "--method", "icl", *preset, "--run-test", "-n", "40")
    assert done.returncode == 0, done.stderr
    (record,) = records
    hp = record["hyperparameters"]
    assert hp["shot"] == 4 and (hp["demo_draw"], hp["demo_source"], hp["queries"]) == ("any", "train", "each")
    assert record["budget"]["demonstrations_per_query"] == 4
    log = [json.loads(line) for line in (tmp_path / record["samples"]["path"]).read_text().splitlines()]
    rows = [line["query_row"] for line in log]
    assert rows == list(range(len(rows)))  # test rows 0, 1, ... in turn (the tiny test split has 40 or more)


def test_select_keeps_another_draw_apart_as_a_method_of_its_own(tmp_path):
    for flags in ([], ["--demo-draw", "any", "--demo-source", "train", "--queries", "each"]):
        done, _ = _run(tmp_path, "--method", "icl", "-n", "12", *flags)
        assert done.returncode == 0, done.stderr
    listed = subprocess.run(
        [sys.executable, "iv.py", "select", "--results", str(tmp_path / "runs.jsonl")],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout
    methods = sorted(line.split(" | ")[2] for line in listed.splitlines() if " | " in line)
    assert methods == ["icl", "icl@any@train@each"]


def test_the_options_are_recorded_only_when_not_the_default_and_resume_tells_them_apart(tmp_path):
    done, records = _run(tmp_path, "--method", "icl", "-n", "12", "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert not {"demo_draw", "demo_source", "queries"} & set(records[0]["hyperparameters"])
    done, records = _run(tmp_path, "--method", "icl", "-n", "12", "--seed", "3", "--queries", "each", "--resume")
    assert done.returncode == 0 and len(records) == 2, done.stderr  # another protocol: run, not skipped
    assert records[1]["hyperparameters"]["queries"] == "each"
    zero, records = _run(tmp_path, "--method", "zero-shot", "-n", "12", "--seed", "3", "--demo-draw", "any")
    assert zero.returncode == 0 and "demo_draw" not in records[-1]["hyperparameters"]  # no demonstrations to draw
