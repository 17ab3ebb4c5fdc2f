"""The protocol as one value through the CLI: templates and scoring rules recorded, kept apart and
matched; what cannot run refused in one line before anything is written; the fixed set built once."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ivlib import experiment
from ivlib.cli import main
from ivlib.protocol import Protocol
from ivlib.selection import load_records, select_best

REPO = Path(__file__).resolve().parent.parent
BASE = ["-c", "config/tiny.yaml", "-m", "tiny-gpt2", "-t", "review_sentiment", "--quiet", "-n", "12"]
# two label words the tiny tokenizer spells letter by letter from the same first letter
COLLIDING = ["camera", "camera_with_flash", "sun"]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _run(tmp: Path, *args: str, results: str = "runs.jsonl") -> int:
    return main([*BASE, *args, "--results", str(tmp / results)])


@pytest.fixture()
def here(monkeypatch):
    monkeypatch.chdir(REPO)


def _colliding_config(tmp: Path) -> str:
    texts = [f"photo {i} of the {w} today" for i in range(40) for w in ("lens", "flash", "sky")]
    frame = pd.DataFrame({"text": texts, "label": [i % 3 for i in range(len(texts))]})
    frame.to_parquet(tmp / "c.parquet")
    path = tmp / "c.yaml"
    path.write_text(
        "models:\n  tiny-gpt2: {builtin: tiny-gpt2}\ntasks:\n"
        f"  shots: {{data_files: {tmp / 'c.parquet'}, label_names: [a, b, c], label_words: {COLLIDING}}}\n"
    )
    return str(path)


def test_colliding_labels_are_refused_by_first_tokens_and_scored_whole(tmp_path, here, capsys):
    cfg = _colliding_config(tmp_path)
    args = ["-c", cfg, "-m", "tiny-gpt2", "-t", "shots", "--quiet", "-n", "9", "--method", "icl"]
    assert main([*args, "--results", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "share their first token" in err and "--score full" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r.jsonl").exists()
    assert main([*args, "--score", "full", "--results", str(tmp_path / "r.jsonl")]) == 0
    (record,) = _records(tmp_path / "r.jsonl")
    assert record["hyperparameters"]["scoring"] == "full"
    assert {"macro", "micro", "macro_mean", "micro_mean"} <= set(record["metrics"])  # sum headline, mean beside


def test_the_emoji_task_is_registered_with_colliding_label_words():
    from ivlib.config import load_config

    entry = load_config(None).tasks["tweet_eval/emoji"]
    words = entry["label_words"]
    assert len(words) == 20 == len(entry["label_names"]) and "camera" in words and "camera_with_flash" in words


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--template", "nope"], "--template 'nope' is unknown"),
        (["--template", "dt"], "--template dt has no form for task 'review_sentiment'"),
        (["--method", "i2cl", "--score", "generate"], "--score generate does not apply to --method i2cl"),
        (["--score", "best"], "--score 'best' is not accepted"),
        (["--metric", "f2"], "--metric 'f2' is not accepted"),
    ],
)
def test_protocol_values_that_cannot_run_are_refused_before_anything(tmp_path, here, capsys, extra, says):
    assert _run(tmp_path, "--method", "icl", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs.jsonl").exists()


def test_a_template_file_without_the_input_field_is_refused(tmp_path, here, capsys):
    bad = tmp_path / "t.yaml"
    bad.write_text('input: "Review: {review}\\nSentiment:"\n')
    assert _run(tmp_path, "--method", "icl", "--template", str(bad)) == 2
    err = capsys.readouterr().err.strip()
    assert "{text} exactly once" in err and len(err.splitlines()) == 1


def test_a_multiple_choice_task_is_never_judged_by_a_label_rule(tmp_path, here, capsys):
    rows = [{"question": f"q{i}", "choices": ["red", "green"], "answer": i % 2} for i in range(60)]
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = tmp_path / "mc.yaml"
    cfg.write_text(
        "models:\n  tiny-gpt2: {builtin: tiny-gpt2}\ntasks:\n"
        f"  mc: {{data_files: {data}, multiple_choice: {{options: choices, answer: answer}}}}\n"
    )
    args = ["-c", str(cfg), "-m", "tiny-gpt2", "-t", "mc", "--quiet", "-n", "4", "--method", "icl"]
    assert main([*args, "--score", "vocab", "--results", str(tmp_path / "r.jsonl")]) == 2
    assert "does not apply to a multiple-choice task" in capsys.readouterr().err
    assert main([*args, "--score", "full", "--results", str(tmp_path / "r.jsonl")]) == 0
    (record,) = _records(tmp_path / "r.jsonl")
    assert record["hyperparameters"]["scoring"] == "full" and {"accuracy", "accuracy_mean"} <= set(record["metrics"])


def test_templates_and_rules_are_recorded_kept_apart_and_resumed(tmp_path, here, capsys):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(
        "models:\n  tiny-gpt2: {builtin: tiny-gpt2}\ntasks:\n"
        "  reviews: {builtin: review_sentiment, label_words: [bad, good], template_task: sst2}\n"
    )
    common = ["-c", str(cfg), "-m", "tiny-gpt2", "-t", "reviews", "--quiet", "-n", "10", "--method", "icl"]
    out = str(tmp_path / "r.jsonl")
    assert main([*common, "--results", out]) == 0
    assert main([*common, "--template", "dt", "--results", out]) == 0
    assert main([*common, "--template", "dt", "--score", "vocab", "--results", out]) == 0
    records = _records(Path(out))
    plain, dt, vocab = records
    assert "template" not in plain["hyperparameters"] and "template" not in plain  # the default: as before
    assert dt["hyperparameters"]["template"] == "dt/sst2" and dt["template"]["input"] == "Review: {text}\nSentiment:"
    assert vocab["hyperparameters"]["scoring"] == "vocab" and "(none)" in vocab["predicted_fraction"]
    methods = sorted(c.best.method for c in select_best(load_records(out)))
    assert methods == ["icl", "icl@dt/sst2", "icl@dt/sst2@vocab"]
    capsys.readouterr()
    assert main([*common, "--template", "dt", "--resume", "--results", out]) == 0
    assert "skipped (--resume)" in capsys.readouterr().out and len(_records(Path(out))) == 3


def test_vectors_fitted_under_one_template_are_refused_under_another(tmp_path, here, capsys):
    vec = str(tmp_path / "tv.safetensors")
    fit = ["--method", "tv", "-s", "1", "-e", "4", "--select-episodes", "4", "--template", "fv"]
    assert _run(tmp_path, *fit, "--save-vectors", vec) == 0
    assert _run(tmp_path, "--method", "tv", "--load-vectors", vec) == 2
    err = capsys.readouterr().err.strip()
    assert "was fitted with --template fv" in err and "accepted: --template fv" in err
    assert _run(tmp_path, "--method", "tv", "--template", "fv", "--load-vectors", vec) == 0


def test_the_fixed_set_is_built_once_per_run(tmp_path, here, monkeypatch):
    calls = []
    original = experiment.fixed_demos

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(experiment, "fixed_demos", counted)
    args = ["--method", "tv", "-s", "1", "-e", "4", "--select-episodes", "4", "--demos", "fixed", "--shot", "1"]
    assert _run(tmp_path, *args) == 0
    assert len(calls) == 1  # evaluation and the layer search share it


def test_select_and_report_rank_by_accuracy(tmp_path, here, capsys):
    assert _run(tmp_path, "--method", "icl") == 0
    assert _run(tmp_path, "--method", "zero-shot") == 0
    out = str(tmp_path / "runs.jsonl")
    capsys.readouterr()
    assert main(["select", "--results", out, "--metric", "accuracy"]) == 0
    printed = capsys.readouterr().out
    micro = {r["method"]: r["metrics"]["micro"]["value"] for r in _records(Path(out))}
    assert f"accuracy {100 * micro['icl']:.1f}" in printed
    assert main(["report", "--results", out, "--out", str(tmp_path / "rep"), "--metric", "accuracy"]) == 0
    assert "Test accuracy (%)" in (tmp_path / "rep" / "table.md").read_text()


def test_the_protocol_refuses_what_a_method_cannot_run():
    from ivlib.errors import UsageError
    from ivlib.methods import METHODS

    with pytest.raises(UsageError, match="--shot 0 is too few for --method dt"):
        Protocol.build(shot=0).check(METHODS["dt"], "classification", METHODS)
    with pytest.raises(UsageError, match="--demo-order class needs classes"):
        Protocol.build(demo_order="class").check(METHODS["icl"], "open_vocabulary", METHODS)
    protocol = Protocol.build(shot=2, demos="fixed", template="fv", score="vocab", metric="accuracy")
    assert protocol.fields(METHODS["tv"], "classification") == {
        "shot": 2,
        "demos": "fixed",
        "template": "fv",
        "scoring": "vocab",
        "metric": "accuracy",
    }
    assert protocol.fields(METHODS["zero-shot"], "classification") == {"shot": 0, "template": "fv", "scoring": "vocab"}
