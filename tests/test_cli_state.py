"""Runs of the CLI in-process: records, and reusing a saved extraction."""
import json
from pathlib import Path

from ivlib.cli import main

REPO = Path(__file__).resolve().parent.parent

BASE = ["-c", "config/tiny.yaml", "-t", "review_sentiment", "-s", "1", "-e", "6", "-n", "30", "--quiet",
        "--batch-size", "8"]


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
