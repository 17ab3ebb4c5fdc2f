"""Runs of the CLI in-process: records, and reusing a saved extraction."""

import json
from pathlib import Path

from ivlib.cli import main

REPO = Path(__file__).resolve().parent.parent

BASE = [
    "-c",
    "config/tiny.yaml",
    "-t",
    "review_sentiment",
    "-s",
    "1",
    "-e",
    "6",
    "-n",
    "30",
    "--quiet",
    "--batch-size",
    "8",
]


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_saved_vectors_reproduce_the_run_and_are_checked_on_load(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    results, vectors = tmp_path / "runs.jsonl", tmp_path / "iv.safetensors"
    assert main(BASE + ["-m", "tiny-gpt2", "--results", str(results), "--save-vectors", str(vectors)]) == 0
    assert main(BASE + ["-m", "tiny-gpt2", "--results", str(results), "--load-vectors", str(vectors)]) == 0
    fitted, loaded = _records(results)
    assert fitted["metrics"] == loaded["metrics"]
    assert fitted["n_fit_episodes"] == 6 and loaded["n_fit_episodes"] == 0
    assert loaded["fit"]["loaded_from"] == str(vectors)
    assert loaded["fit"]["fitted_with"]["ext_shot"] == 1
    for key in ("strength", "ext_strength", "ext_batch", "shot", "ext_shot", "episodes"):
        assert key in fitted["hyperparameters"]
    assert fitted["versions"]["torch"] and fitted["layout"]["n_layers"] == 2

    before = results.read_bytes()
    capsys.readouterr()
    assert main(BASE + ["-m", "tiny-llama", "--results", str(results), "--load-vectors", str(vectors)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model='tiny-gpt2'" in err and "tiny-llama" in err and len(err.splitlines()) == 1
    assert results.read_bytes() == before


def test_icl_and_zero_shot_records_carry_their_shot_counts(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    results = tmp_path / "runs.jsonl"
    for method in ("icl", "zero-shot"):
        assert main(BASE + ["-m", "tiny-gpt2", "--method", method, "--results", str(results)]) == 0
    icl, zero = _records(results)
    assert icl["hyperparameters"]["shot"] == 1 and zero["hyperparameters"]["shot"] == 0
    assert icl["n_eval_episodes"] == zero["n_eval_episodes"] == 30


def test_loaded_vectors_record_the_settings_they_were_fitted_with(tmp_path, monkeypatch):
    """--load-vectors without extraction flags: the record names the file's setting, not the defaults,
    so select, the report and --resume see the setting the vectors really came from."""
    monkeypatch.chdir(REPO)
    results, vectors = tmp_path / "runs.jsonl", tmp_path / "iv.safetensors"
    base = [a for a in BASE if a not in ("-s", "1")]
    fit_flags = ["-s", "1", "--ext-strength", "0.7", "--ext-batch", "2", "--max-example-tokens", "64"]
    assert main(base + ["-m", "tiny-gpt2", "--results", str(results), "--save-vectors", str(vectors)] + fit_flags) == 0
    assert main(base + ["-m", "tiny-gpt2", "--results", str(results), "--load-vectors", str(vectors)]) == 0
    fitted, loaded = _records(results)
    for key, value in (
        ("ext_shot", 1),
        ("ext_strength", 0.7),
        ("ext_batch", 2),
        ("episodes", 6),
        ("max_example_tokens", 64),
    ):
        assert fitted["hyperparameters"][key] == loaded["hyperparameters"][key] == value, key
    assert loaded["metrics"] == fitted["metrics"]
    assert main(base + ["-m", "tiny-gpt2", "--results", str(results), "--load-vectors", str(vectors), "--resume"]) == 0
    assert len(_records(results)) == 2  # the loaded setting is recognised as already recorded


def test_dt_records_no_training_episodes(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    results = tmp_path / "runs.jsonl"
    assert (
        main(
            BASE
            + [
                "-m",
                "tiny-gpt2",
                "--method",
                "dt",
                "--dt-steps",
                "2",
                "--select-episodes",
                "4",
                "-e",
                "7",
                "--results",
                str(results),
            ]
        )
        == 0
    )
    (record,) = _records(results)
    assert record["n_fit_episodes"] == 0 and record["hyperparameters"]["select_episodes"] == 4
