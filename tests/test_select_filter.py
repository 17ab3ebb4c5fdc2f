"""`select --model/--task` and scripts.sh's test step limited to the sweep's MODELS and TASKS: two sweeps
sharing one results file (one per model, side by side) each test their own choices only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ivlib import analyze

REPO = Path(__file__).resolve().parent.parent
CELLS = [("tiny-gpt2", "review_sentiment"), ("tiny-gpt2", "other_task"), ("tiny-llama", "review_sentiment")]


def _results(path: Path) -> Path:
    lines = []
    for model, task in CELLS:
        command = ["python", "iv.py", "-c", "config/tiny.yaml", "-m", model, "-t", task, "--method", "icl"]
        record = {
            "method": "icl",
            "model": model,
            "task": task,
            "split": "validation",
            "hyperparameters": {"shot": 1},
            "metrics": {"macro": {"value": 0.6, "ci_low": 0.5, "ci_high": 0.7}},
            "command": command,
        }
        lines.append(json.dumps(record) + "\n")
    path.write_text("".join(lines))
    return path


def _commands(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("python iv.py")]


def test_select_prints_only_the_models_and_tasks_asked_for(tmp_path, capsys):
    results = str(_results(tmp_path / "runs.jsonl"))
    assert analyze.main(["select", "--results", results, "--commands"]) == 0
    assert len(_commands(capsys.readouterr().out)) == 3
    assert analyze.main(["select", "--results", results, "--commands", "--model", "tiny-gpt2"]) == 0
    out = capsys.readouterr().out
    assert len(_commands(out)) == 2 and "tiny-llama" not in out
    args = ["select", "--results", results, "--commands", "--model", "tiny-gpt2", "tiny-llama", "--task", "other_task"]
    assert analyze.main(args) == 0
    (only,) = _commands(capsys.readouterr().out)
    assert "-m tiny-gpt2 -t other_task" in only


def test_select_of_a_model_with_no_records_says_which_in_one_line(tmp_path, capsys):
    results = str(_results(tmp_path / "runs.jsonl"))
    assert analyze.main(["select", "--results", results, "--model", "gpt-j-6b"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model gpt-j-6b" in err and "accepted:" in err


def _test_step(tmp_path: Path, **env: str) -> list[list[str]]:
    """The words of every iv.py command scripts.sh's test step launched (a recording launcher)."""
    tmp_path.mkdir()
    log = tmp_path / "words.txt"
    launcher = tmp_path / "record.sh"
    launcher.write_text(f"#!/usr/bin/env bash\nprintf '%s\\n' \"$*\" >> {log}\n")
    launcher.chmod(0o755)
    full = {k: v for k, v in os.environ.items() if k not in ("MODELS", "TASKS", "SEEDS")} | env
    full |= {"PY": sys.executable, "LAUNCH": str(launcher), "RESULTS": str(_results(tmp_path / "runs.jsonl"))}
    done = subprocess.run(["bash", "scripts.sh", "test"], cwd=REPO, env=full, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def _cells(launched: list[list[str]]) -> set[tuple[str, str]]:
    return {(words[words.index("-m") + 1], words[words.index("-t") + 1]) for words in launched}


def test_the_test_step_tests_only_the_sweeps_models_and_tasks(tmp_path):
    assert _cells(_test_step(tmp_path / "a", MODELS="tiny-llama")) == {("tiny-llama", "review_sentiment")}
    got = _cells(_test_step(tmp_path / "b", MODELS="tiny-gpt2 tiny-llama", TASKS="review_sentiment"))
    assert got == {("tiny-gpt2", "review_sentiment"), ("tiny-llama", "review_sentiment")}
    assert _cells(_test_step(tmp_path / "c")) == set(CELLS)  # neither given: every choice, as before
