"""Issue 29 item 6: `--threads N` sets torch's CPU threads for the run, is range-checked like every
flag (before anything is written), and is recorded only when given, so records without it (the golden
ones) stay as they were."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ivlib.cli import main
from ivlib.errors import UsageError
from ivlib.experiment import Experiment, RunSpec

REPO = Path(__file__).resolve().parent.parent
ARGV = ["-c", "config/tiny.yaml", "-m", "tiny-gpt2", "-t", "review_sentiment", "--method", "zero-shot", "-n", "4"]
ARGV += ["--quiet"]


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _run(tmp_path: Path, monkeypatch, *extra: str) -> tuple[int, Path]:
    monkeypatch.chdir(REPO)
    results = tmp_path / "runs.jsonl"
    return main([*ARGV, *extra, "--results", str(results)]), results


def test_threads_are_set_and_recorded(tmp_path, monkeypatch):
    torch.set_num_threads(2)
    code, results = _run(tmp_path, monkeypatch, "--threads", "1")
    assert code == 0 and torch.get_num_threads() == 1
    record = json.loads(results.read_text())
    assert record["threads"] == 1 and "threads" not in record["hyperparameters"]


def test_without_the_flag_torch_keeps_its_threads_and_the_record_says_nothing(tmp_path, monkeypatch):
    torch.set_num_threads(2)
    code, results = _run(tmp_path, monkeypatch)
    assert code == 0 and torch.get_num_threads() == 2
    assert "threads" not in json.loads(results.read_text())


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "many", "inf"])
def test_bad_thread_counts_are_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys, value):
    capsys.readouterr()
    code, results = _run(tmp_path, monkeypatch, "--threads", value)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"--threads {value}" in err.replace("'", "") and "accepted: an integer >= 1" in err
    assert not results.exists()


def test_a_spec_from_python_is_checked_alike(tmp_path):
    spec = RunSpec(model="tiny-gpt2", task="review_sentiment", method="zero-shot", config="config/tiny.yaml")
    spec.threads = 0
    spec.results = str(tmp_path / "runs.jsonl")
    with pytest.raises(UsageError, match=r"--threads 0 is out of range; accepted: an integer >= 1"):
        Experiment(spec).prepare()
