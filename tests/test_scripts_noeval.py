"""scripts.sh without `eval` (issue 29, item 4): EXTRA, LAUNCH, select's test commands and a cells
file's lines become words by one splitter (shlex.split: quotes group, nothing is expanded or run), and
the words travel as arrays. A value with spaces or quotes arrives whole; `--quiet; touch x` arrives as
the words `--quiet;` `touch` `x`, which iv.py refuses; no value is globbed."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOSTILE = "--label 'very good' it\\'s \"a b\" $(touch made-by-dollar) `touch made-by-tick` * ; touch made-by-semicolon"
HOSTILE_WORDS = ["--label", "very good", "it's", "a b", "$(touch", "made-by-dollar)", "`touch", "made-by-tick`", "*"]
HOSTILE_WORDS += [";", "touch", "made-by-semicolon"]


def _record(results: Path) -> None:
    """One validation record, so `select --commands` prints one test command."""
    command = ["python", "iv.py", "-c", "config/tiny.yaml", "-m", "tiny-gpt2", "-t", "review_sentiment"]
    record = {
        "method": "icl",
        "model": "tiny-gpt2",
        "task": "review_sentiment",
        "split": "validation",
        "hyperparameters": {"shot": 1},
        "metrics": {"macro": {"value": 0.6, "ci_low": 0.5, "ci_high": 0.7}},
        "command": [*command, "--method", "icl"],
    }
    results.write_text(json.dumps(record) + "\n")


def _recorder(tmp: Path) -> tuple[str, Path]:
    """A launcher (in a folder whose name has a space) that writes the words it was given, NUL-separated."""
    folder = tmp / "a launcher"
    folder.mkdir()
    script, log = folder / "record.sh", tmp / "words.bin"
    script.write_text(f"#!/usr/bin/env bash\nprintf '%s\\0' \"$@\" >> {shlex.quote(str(log))}\n")
    script.chmod(0o755)
    return shlex.quote(str(script)), log


def _words(log: Path) -> list[str]:
    return log.read_bytes().decode().split("\0")[:-1]


def _scripts(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"PY": sys.executable} | env
    return subprocess.run(
        ["bash", str(REPO / "scripts.sh"), *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=120
    )


def _nothing_made(*folders: Path) -> None:
    for folder in folders:
        assert not [p for p in folder.iterdir() if p.name.startswith("made-by") or p.name == "x"], list(
            folder.iterdir()
        )


def test_extra_with_a_command_in_it_runs_nothing_and_iv_refuses_the_words(tmp_path):
    results = tmp_path / "runs.jsonl"
    _record(results)
    done = _scripts(["test"], tmp_path, EXTRA="--quiet; touch x", RESULTS=str(results))
    _nothing_made(REPO, tmp_path)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "iv.py: error: unrecognized arguments: --quiet; touch x" in errors[0], done.stderr


def test_the_test_step_passes_every_word_of_extra_whole(tmp_path):
    results = tmp_path / "runs.jsonl"
    _record(results)
    launch, log = _recorder(tmp_path)
    done = _scripts(["test"], tmp_path, EXTRA=HOSTILE, RESULTS=str(results), LAUNCH=launch, TEST_EPISODES="7")
    assert done.returncode == 0, done.stderr
    _nothing_made(REPO, tmp_path)
    words = _words(log)
    assert words[:8] == ["iv.py", "-c", "config/tiny.yaml", "-m", "tiny-gpt2", "-t", "review_sentiment", "--method"]
    assert words[-len(HOSTILE_WORDS) - 4 :] == ["-g", "-1", "--resume", "--quiet", *HOSTILE_WORDS]
    assert words[words.index("-n") + 1] == "7" and words[words.index("--results") + 1] == str(results)


def test_array_cells_carry_quoted_words_and_cell_runs_them_whole(tmp_path):
    launch, log = _recorder(tmp_path)
    env = {
        "LAUNCH": launch,
        "EXTRA": HOSTILE,
        "MODELS": "*",  # never globbed
        "TASKS": "review_sentiment",
        "EXT_SHOTS": "1",
        "EXT_STRENGTHS": "0.1",
        "STRENGTHS": "0.1",
        "BASELINES": "icl",
        "RESULTS": str(tmp_path / "r s.jsonl"),
        "VECTORS": str(tmp_path / "vectors"),
    }
    made = _scripts(["array", "slurm"], tmp_path, **env)
    assert made.returncode == 0, made.stderr
    cells = (tmp_path / "slurm" / "cells.txt").read_text().splitlines()
    assert len(cells) == 2 and all(len(shlex.split(c)) > 10 for c in cells)
    for i in range(2):
        assert _scripts(["cell", "slurm/cells.txt", str(i)], tmp_path, **env).returncode == 0
    _nothing_made(REPO, tmp_path)
    runs = "\0".join(_words(log)).split("iv.py\0")[1:]
    assert len(runs) == 2
    for run in runs:
        words = run.split("\0")
        start = words.index("--quiet") + 1
        assert words[start : start + len(HOSTILE_WORDS)] == HOSTILE_WORDS
        assert words[words.index("-m") + 1] == "*" and words[words.index("-t") + 1] == "review_sentiment"
        assert words[words.index("--results") + 1] == str(tmp_path / "r s.jsonl")


def test_array_refuses_a_value_with_a_newline(tmp_path):
    made = _scripts(["array", "slurm"], tmp_path, EXTRA="'--label' 'two\nlines'", BASELINES="icl", EXT_SHOTS="")
    assert (
        made.returncode == 2
        and made.stderr == "array: the value $'two\\nlines' holds a newline; accepted: values on one line\n"
    )


def test_array_dir_that_is_a_file_is_one_line_exit_2(tmp_path):
    (tmp_path / "taken").write_text("a file\n")
    made = _scripts(["array", "taken"], tmp_path)
    assert made.returncode == 2 and made.stderr.splitlines() == [
        f"array: '{tmp_path / 'taken'}' is a file, not a folder; accepted: a new or existing folder for the job files"
    ]
    under = _scripts(["array", "taken/slurm"], tmp_path)
    assert under.returncode == 2 and len(under.stderr.splitlines()) == 1 and "cannot create the folder" in under.stderr


def test_an_unclosed_quote_is_one_line_exit_2(tmp_path):
    done = _scripts(["iv-grid"], tmp_path, EXTRA='--label "unclosed')
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert "scripts.sh: EXTRA '--label \"unclosed' cannot be split into words (No closing quotation)" in done.stderr
