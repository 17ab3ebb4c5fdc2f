"""--demo-order: the IV release's class-ordered prompts as a protocol setting every method honours."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import ivlib
from ivlib.cli import main
from ivlib.episodes import in_order, sample_episodes
from ivlib.errors import UsageError
from ivlib.experiment import Experiment, RunSpec, fit_episodes
from ivlib.methods import get_method
from ivlib.protocol import Protocol
from ivlib.selection import select_best
from ivlib.tasks import Split, load_task

COMMON = ["-c", "config/tiny.yaml", "-m", "tiny-gpt2", "-t", "review_sentiment", "--quiet", "-n", "12"]


def four_class_split(n: int = 80) -> Split:
    return Split([f"text number {i}" for i in range(n)], np.arange(n, dtype=np.int64) % 4)


@pytest.mark.parametrize("shot", [1, 3])
def test_class_order_sorts_every_episode_and_keeps_the_draw(shot):
    drawn = sample_episodes(four_class_split(), 4, shot, 40, seed=5, stream="validation/eval")
    ordered = in_order(drawn, "class")
    for a, b in zip(drawn, ordered):
        labels = [d.label for d in b.demos]
        assert labels == sorted(labels) == [c for c in range(4) for _ in range(shot)]
        assert sorted(a.demos, key=lambda d: d.index) == sorted(b.demos, key=lambda d: d.index)  # same demos
        assert a.query == b.query
        # within a class the drawn order is kept (a stable sort)
        for c in range(4):
            assert [d for d in a.demos if d.label == c] == [d for d in b.demos if d.label == c]
    assert any(a.demos != b.demos for a, b in zip(drawn, ordered))  # shuffled is not class order
    assert in_order(drawn, "shuffled") == drawn


def test_an_unknown_order_is_refused():
    with pytest.raises(UsageError, match="--demo-order 'random' is not accepted; accepted: shuffled, class"):
        in_order([], "random")


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_record_holds_the_order_and_resume_keeps_the_orders_apart(tmp_path, capsys):
    results = tmp_path / "runs.jsonl"
    out = ["--method", "icl", "--results", str(results), "--resume"]
    assert main(COMMON + out) == 0
    assert main(COMMON + out + ["--demo-order", "class"]) == 0  # not the shuffled record: it runs
    assert main(COMMON + out + ["--demo-order", "class"]) == 0  # now recorded: skipped
    assert main(COMMON + out + ["--demo-order", "shuffled"]) == 0  # the default, recorded first: skipped
    records = _records(results)
    assert len(records) == 2
    assert "demo_order" not in records[0]["hyperparameters"]  # the default is left out: older records match
    assert records[1]["hyperparameters"]["demo_order"] == "class"
    assert capsys.readouterr().out.count("skipped (--resume)") == 2


def test_zero_shot_records_no_order():
    exp = Experiment(
        RunSpec("tiny-gpt2", "review_sentiment", "zero-shot", config="config/tiny.yaml", demo_order="class")
    )
    exp.prepare()
    assert "demo_order" not in exp.hyperparameters(exp.prepared.methods[0])


@pytest.mark.parametrize("method", ["icl", "iv", "tv", "fv", "dt"])
def test_every_method_evaluates_class_ordered_prompts(method):
    spec = RunSpec("tiny-gpt2", "review_sentiment", method, config="config/tiny.yaml", eval_episodes=30)
    spec.demo_order, spec.shot = "class", 2
    exp = Experiment(spec)
    exp.prepare()
    exp.load()
    sampled = exp.sample()
    for episode, prompt in zip(sampled.episodes, sampled.prompts):
        assert [d.label for d in episode.demos] == [0, 0, 1, 1]
        assert prompt.sep_class == [0, 0, 1, 1, 2]  # the encoded prompt follows the order
    assert exp.hyperparameters(exp.prepared.methods[0])["demo_order"] == "class"


def test_selection_prompts_take_the_order_and_training_episodes_do_not(task):
    cls = get_method("tv")
    train, select = fit_episodes(task, cls, Protocol.build(shot=2, demo_order="class"), 3, 30, 30, 42)
    assert select is not None
    assert all([d.label for d in e.demos] == [0, 0, 1, 1] for e in select)
    shuffled_train, shuffled_select = fit_episodes(task, cls, Protocol.build(shot=2), 3, 30, 30, 42)
    assert train == shuffled_train  # extraction stays shuffled
    assert shuffled_select != select


def test_a_state_selected_in_one_order_is_refused_in_the_other(tmp_path, capsys):
    vec, results = tmp_path / "tv.safetensors", str(tmp_path / "runs.jsonl")
    tv = ["--method", "tv", "-s", "1", "-e", "4", "--select-episodes", "4", "--results", results]
    assert main(COMMON + tv + ["--demo-order", "class", "--save-vectors", str(vec)]) == 0
    assert json.loads(Path(results).read_text().splitlines()[0])["fit"]["demo_order"] == "class"
    capsys.readouterr()
    assert main(COMMON + ["--method", "tv", "--load-vectors", str(vec), "--results", results]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was fitted with --demo-order class" in err
    assert (
        main(COMMON + ["--method", "tv", "--load-vectors", str(vec), "--demo-order", "class", "--results", results])
        == 0
    )


def test_multiple_choice_refuses_class_order(gpt2, tmp_path):
    from tests.test_multiple_choice import MC_SPEC, write_csqa

    mc = load_task("csqa", {"data_files": {"train": str(write_csqa(tmp_path / "t.jsonl"))}, **MC_SPEC})
    with pytest.raises(UsageError, match="--demo-order class needs classes"):
        ivlib.evaluate("icl", gpt2, mc, n=4, demo_order="class")


def test_select_keeps_the_orders_apart():
    def record(order: str | None, value: float) -> dict:
        hp = {"shot": 1, "ext_shot": None, "episodes": None, "max_example_tokens": 256}
        if order:
            hp["demo_order"] = order
        metrics = {"macro": {"value": value, "ci_low": value - 0.05, "ci_high": value + 0.05}}
        return {
            "method": "icl",
            "model": "m",
            "task": "t",
            "split": "validation",
            "hyperparameters": hp,
            "metrics": metrics,
        }

    choices = select_best([record(None, 0.4), record("class", 0.6)])
    assert {c.key[2]: c.best.value for c in choices} == {"icl": 0.4, "icl@class": 0.6}
