"""Paper presets: a record made with --preset carries its release's settings; a flag that overrides
one is announced in one line and recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_open_vocabulary import _pairs

from ivlib.cli import main
from ivlib.presets import PRESETS, apply, values
from ivlib.templates import named

REPO = Path(__file__).resolve().parent.parent
CLASSIFICATION = {"iv", "dt", "i2cl", "staicc"}


@pytest.fixture()
def config(tmp_path, monkeypatch) -> str:
    monkeypatch.chdir(REPO)
    data = tmp_path / "antonym.json"
    data.write_text(json.dumps(_pairs()))
    path = tmp_path / "p.yaml"
    path.write_text(
        "models:\n  tiny-gpt2: {builtin: tiny-gpt2}\ntasks:\n"
        "  reviews: {builtin: review_sentiment, label_words: [bad, good], template_task: sst2}\n"
        f"  antonym: {{data_files: {data}, open_vocabulary: {{}}}}\n"
    )
    return str(path)


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_presets_record_carries_its_releases_protocol(tmp_path, config, capsys, name):
    preset = PRESETS[name]
    task = "reviews" if name in CLASSIFICATION else "antonym"
    out = tmp_path / "r.jsonl"
    shot = ["--shot", "1"] if preset.values.get("shot", 1) > 1 else []  # small prompts for the test
    args = ["-c", config, "-m", "tiny-gpt2", "-t", task, "--quiet", "-n", "4", "--method", "icl", *shot]
    assert main([*args, "--preset", name, "--results", str(out)]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    hp, given = record["hyperparameters"], values(preset, "icl")
    template = named(given["template"], task, {"template_task": "sst2"} if task == "reviews" else {})
    assert hp.get("template", "iv") == template.key
    kind_default = "first-token" if task == "reviews" else "vocab"
    assert hp.get("scoring", kind_default) == given["score"]
    assert hp.get("demos", "episodic") == given.get("demos", "episodic") or hp["shot"] == 0
    assert record["seed"] == preset.seeds[0]
    assert record["preset"]["name"] == name and record["preset"]["seeds"] == list(preset.seeds)
    overridden = {"eval_episodes": 4} if "eval_episodes" in given else {}
    if shot:
        overridden["shot"] = 1
    assert record["preset"].get("overridden", {}) == overridden
    err = capsys.readouterr().err
    assert ("overrides preset" in err) == bool(overridden)
    if "eval_episodes" in given:
        assert f"--eval-episodes 4 overrides preset {name}'s {given['eval_episodes']}" in err


def test_a_presets_method_settings_apply_to_its_own_method_only(tmp_path, config, capsys):
    out = tmp_path / "r.jsonl"
    args = ["-c", config, "-m", "tiny-gpt2", "-t", "reviews", "--quiet", "-n", "4", "--select-episodes", "4"]
    assert main([*args, "--preset", "dt", "--method", "dt", "--dt-steps", "2", "--results", str(out)]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["hyperparameters"]["dt_steps"] == 2 and record["hyperparameters"]["dt_eta"] == 0.01
    assert record["preset"]["overridden"] == {"dt_steps": 2}  # dt's preset leaves --select-episodes alone
    assert "--dt-steps 2 overrides preset dt's 15" in capsys.readouterr().err
    assert record["hyperparameters"]["template"] == "dt/sst2" and record["hyperparameters"]["scoring"] == "full"
    assert record["hyperparameters"]["demos"] == "fixed"


def test_apply_keeps_given_values_and_names_the_overrides():
    merged, overridden = apply(PRESETS["fv"], "fv", {"shot": 10, "ie_episodes": 5})
    assert merged["ie_episodes"] == 5 and merged["n_top_heads"] == 10 and merged["template"] == "fv"
    assert overridden == {"ie_episodes": 5}  # the same value as the preset's is no override
    merged, _ = apply(PRESETS["fv"], "icl", {})
    assert "ie_episodes" not in merged  # another method takes the protocol only


def test_an_unknown_preset_is_refused(tmp_path, config, capsys):
    args = ["-c", config, "-m", "tiny-gpt2", "-t", "reviews", "--preset", "nope", "--results", str(tmp_path / "r")]
    assert main(args) == 2
    assert "--preset" in capsys.readouterr().err
