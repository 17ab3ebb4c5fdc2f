"""Issue 29 item 5: bad input that one process of a data-parallel run sees alone is named in rank 0's one
line, whichever process saw it and wherever it was met: before the process group exists (its config),
after it (a check between two exchanges), or where rank 0 had no exchange left (--resume found
everything recorded). Before, the other process waited at a collective until the launcher killed it.

One torchrun launch of tests/dp_driver.py runs every case; each case gives the two processes different
argv (another -c file for one of them), as two machines with different files would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from dp_driver import how_far

from ivlib.cli import main

REPO = Path(__file__).resolve().parent.parent
BASE = ["-m", "tiny-gpt2", "-t", "review_sentiment", "--method", "icl", "-n", "8", "--batch-size", "4", "--quiet"]
GOOD = "models:\n  tiny-gpt2: {builtin: tiny-gpt2}\n"
BAD_ENTRY = "models:\n  tiny-gpt2: {builtin: tiny-gpt2, fv_heads: 0}\n"  # refused when the file is read
COLLIDING = GOOD + "tasks:\n  review_sentiment: {builtin: review_sentiment, label_words: [good, goodness]}\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _file(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def _out(tmp: Path, case: str, rank: int, kind: str) -> str:
    return (tmp / f"{case}.{rank}.{kind}").read_text()


def test_one_process_bad_input_is_named_in_rank_0_line(tmp_path, monkeypatch):
    good, bad = _file(tmp_path, "good.yaml", GOOD), _file(tmp_path, "bad.yaml", BAD_ENTRY)
    colliding = _file(tmp_path, "colliding.yaml", COLLIDING)
    recorded = tmp_path / "recorded.jsonl"
    monkeypatch.chdir(REPO)
    assert main(["-c", good, *BASE, "--results", str(recorded)]) == 0  # for the --resume case
    before = recorded.read_bytes()

    def case(name: str, rank0: str, rank1: str, *extra: str, results: Path | None = None) -> dict[str, list[str]]:
        out = ["--results", str(results or tmp_path / f"{name}.jsonl"), *extra]
        return {"0": ["-c", rank0, *BASE, *out], "1": ["-c", rank1, *BASE, *out]}

    cases = {
        "rank1-config": case("rank1-config", good, bad),  # met before the process group exists
        "rank0-config": case("rank0-config", bad, good),
        "rank1-labels": case("rank1-labels", good, colliding),  # met after it, between two exchanges
        "rank1-resume": case("rank1-resume", good, bad, "--resume", results=recorded),  # rank 0 has nothing to do
    }
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port"]
    command += [str(_free_port()), "tests/dp_driver.py", str(tmp_path / "cases.json"), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, how_far(tmp_path, done.stderr)

    expected = {
        "rank1-config": (1, "config '", "fv_heads 0 is not accepted"),
        "rank0-config": (0, "config '", "fv_heads 0 is not accepted"),
        "rank1-labels": (1, "label", "good"),
        "rank1-resume": (1, "config '", "fv_heads 0 is not accepted"),
    }
    for name, (culprit, *words) in expected.items():
        assert _out(tmp_path, name, 0, "rc") == "2" == _out(tmp_path, name, 1, "rc"), name
        lines = _out(tmp_path, name, 0, "err").splitlines()
        assert len(lines) == 1, (name, lines)
        assert lines[0].startswith(f"iv.py: error: process {culprit} of 2 failed: "), (name, lines)
        assert all(w in lines[0] for w in words) and lines[0].endswith("nothing of this run written"), lines
        assert _out(tmp_path, name, 1, "err") == "", name  # the other process says nothing
    for name in ("rank1-config", "rank0-config", "rank1-labels"):
        assert not (tmp_path / f"{name}.jsonl").exists(), name
    assert recorded.read_bytes() == before
    assert "skipped (--resume)" in _out(tmp_path, "rank1-resume", 0, "out")
