"""The runner as a library object: its steps called one by one, without the CLI."""

import json
from pathlib import Path

import pytest

from ivlib.errors import UsageError
from ivlib.experiment import Experiment, RunSpec
from ivlib.settings import Setting

REPO = Path(__file__).resolve().parent.parent


def _spec(tmp_path, **kw):
    base = dict(
        model="tiny-gpt2",
        task="review_sentiment",
        config=str(REPO / "config/tiny.yaml"),
        ext_shot=1,
        episodes=6,
        eval_episodes=12,
        quiet=True,
        results=str(tmp_path / "runs.jsonl"),
    )
    return RunSpec(**{**base, **kw})


def test_steps_alone_give_one_record_per_evaluation_setting_and_report_progress(tmp_path):
    exp = Experiment(_spec(tmp_path, method="iv", settings={"strength": [0.1, 0.9], "ext_batch": 2}))
    pending = exp.prepare()
    assert [c["strength"] for c in pending] == [0.1, 0.9] and all(c["ext_batch"] == 2 for c in pending)
    assert exp.progress.records == 0
    assert exp.prepared is not None and exp.prepared.spec is not exp.given  # checked into a new value
    loaded = exp.load()
    sampled = exp.sample()
    assert len(sampled.prompts) == 12 and exp.sampled is sampled
    fitted = exp.fit()
    assert fitted.methods[1].vectors is not None and fitted.info["shared_by_strengths"] == [0.1, 0.9]
    assert fitted.methods == exp.prepared.methods and loaded.task.name == "review_sentiment"
    records = exp.evaluate_all()
    assert exp.progress.records == 2 and [r["hyperparameters"]["strength"] for r in records] == [0.1, 0.9]
    on_disk = [json.loads(line) for line in Path(exp.spec.results).read_text().splitlines()]
    assert [r["metrics"] for r in on_disk] == [r["metrics"] for r in records]
    assert exp.label(records[0]) == "iv a2=0.1"

    again = Experiment(_spec(tmp_path, method="iv", settings={"strength": [0.1, 0.9], "ext_batch": 2}, resume=True))
    assert again.run() == [] and again.pending == []  # --resume: both recorded, nothing loads


def test_spec_values_are_checked_by_the_declarations(tmp_path):
    with pytest.raises(UsageError, match="--ext-batch -1 is out of range"):
        Experiment(_spec(tmp_path, settings={"ext_batch": -1})).prepare()
    with pytest.raises(UsageError, match="--episodes 0 is out of range"):
        Experiment(_spec(tmp_path, episodes=0)).prepare()
    with pytest.raises(UsageError, match="--method 'nope' is unknown"):
        Experiment(_spec(tmp_path, method="nope"))
    with pytest.raises(UsageError, match="setting 'nope' is unknown"):
        Experiment(_spec(tmp_path, settings={"nope": 1})).prepare()
    assert not Path(tmp_path / "runs.jsonl").exists()


def test_a_setting_checks_type_range_and_choices():
    s = Setting("x", float, 0.5, "help", low=0.0, high=1.0)
    assert s.check("0.25") == 0.25 and s.check(1) == 1.0
    for bad, needle in (("2", "out of range"), ("nan", "not a finite number"), ("abc", "'abc'"), (True, "True")):
        with pytest.raises(UsageError, match=needle):
            s.check(bad)
    c = Setting("mode", str, "a", "help", choices=("a", "b"))
    with pytest.raises(UsageError, match="accepted: a, b"):
        c.check("z")


def test_a_step_called_before_the_one_it_takes_says_which_to_call_and_the_given_spec_is_unchanged(tmp_path):
    given = _spec(tmp_path, method="iv", settings={"strength": "0.5"}, batch_size="8")
    exp = Experiment(given)
    with pytest.raises(RuntimeError, match=r"call prepare\(\) first"):
        exp.load()
    exp.prepare()
    with pytest.raises(RuntimeError, match=r"call load\(\) first"):
        exp.sample()
    with pytest.raises(RuntimeError, match=r"call fit\(\) first"):
        exp.evaluate_all()
    assert exp.prepared is not None and exp.prepared.values["strength"] == 0.5  # checked: a number
    assert exp.spec.batch_size == 8 and given.batch_size == "8"  # the checked spec is a new value
    assert given.settings == {"strength": "0.5"} and exp.given is given
