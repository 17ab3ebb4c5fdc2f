"""Sweeps: several strengths from one extraction, --resume, and scripts.sh surviving a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ivlib.cli import main

REPO = Path(__file__).resolve().parent.parent
BASE = [
    "-c",
    "config/tiny.yaml",
    "-m",
    "tiny-gpt2",
    "-t",
    "review_sentiment",
    "-s",
    "1",
    "-e",
    "6",
    "-n",
    "12",
    "--ext-strength",
    "0.3",
    "--batch-size",
    "4",
    "--quiet",
]


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_strengths_sharing_one_extraction_equal_separate_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    shared, alone = tmp_path / "shared.jsonl", tmp_path / "alone.jsonl"
    assert main(BASE + ["--strength", "0", "40", "--results", str(shared)]) == 0
    for a2 in ("0", "40"):
        assert main(BASE + ["--strength", a2, "--results", str(alone)]) == 0
    together, separate = _records(shared), _records(alone)
    assert [r["hyperparameters"]["strength"] for r in together] == [0.0, 40.0]
    for a, b in zip(together, separate):
        assert a["metrics"] == b["metrics"] and a["hyperparameters"] == b["hyperparameters"]
        assert a["predicted_fraction"] == b["predicted_fraction"]
    assert together[0]["fit"]["shared_by_strengths"] == [0.0, 40.0]
    assert together[0]["metrics"] != together[1]["metrics"]  # the strengths did differ


def test_resume_skips_recorded_settings_only(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "runs.jsonl"
    assert main(BASE + ["--strength", "0.1", "--results", str(out)]) == 0
    assert main(BASE + ["--strength", "0.1", "0.5", "--resume", "--results", str(out)]) == 0
    assert [r["hyperparameters"]["strength"] for r in _records(out)] == [0.1, 0.5]
    before = out.read_bytes()
    capsys.readouterr()
    assert main(BASE + ["--strength", "0.1", "0.5", "--resume", "--results", str(out)]) == 0
    assert "skipped (--resume)" in capsys.readouterr().out
    assert out.read_bytes() == before
    # a different setting is not mistaken for a recorded one
    assert main(BASE + ["--strength", "0.5", "--shot", "2", "--resume", "--results", str(out)]) == 0
    assert len(_records(out)) == 3


def test_several_strengths_refused_for_a_method_without_strength(tmp_path, capsys):
    rc = main(
        [
            "-c",
            "config/tiny.yaml",
            "-m",
            "tiny-gpt2",
            "-t",
            "review_sentiment",
            "--method",
            "icl",
            "--strength",
            "0.1",
            "0.5",
            "--results",
            str(tmp_path / "r.jsonl"),
        ]
    )
    assert rc == 2 and "--strength" in capsys.readouterr().err


def _grid_env(tmp_path):
    return {
        **os.environ,
        "PY": sys.executable,
        "CONFIG": "config/tiny.yaml",
        "MODELS": "tiny-gpt2",
        "TASKS": "review_sentiment",
        "EXT_SHOTS": "1 2",
        "EXT_STRENGTHS": "0.1 0.5",
        "STRENGTHS": "0.3 0.7",
        "EPISODES": "6",
        "EXT_BATCH": "2",
        "RESULTS": str(tmp_path / "grid.jsonl"),
        "VECTORS": str(tmp_path / "vectors"),
        "EXTRA": "--batch-size 4",
    }


def test_grid_killed_midway_resumes_to_one_record_per_setting(tmp_path):
    env = _grid_env(tmp_path)
    results = Path(env["RESULTS"])
    proc = subprocess.Popen(
        ["bash", "scripts.sh", "iv-grid"],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the grid finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    done_before = len(_records(results))
    assert 3 <= done_before < 8
    rerun = subprocess.run(
        ["bash", "scripts.sh", "iv-grid"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr
    records = _records(results)  # every line parses: the kill left no partial line
    settings = [
        (r["hyperparameters"]["ext_shot"], r["hyperparameters"]["ext_strength"], r["hyperparameters"]["strength"])
        for r in records
    ]
    assert sorted(settings) == sorted({(s, a1, a2) for s in (1, 2) for a1 in (0.1, 0.5) for a2 in (0.3, 0.7)})
    assert rerun.stdout.count("skipped (--resume)") >= 1
    vectors = sorted(p.name for p in Path(env["VECTORS"]).iterdir())  # EXTRA's checksum keeps other flags' fits apart
    assert len(vectors) == 4 and all(name.endswith(".safetensors") and "_x" in name for name in vectors)

    # the test step re-runs the best validation setting on test; the report step reads it all back
    env["TEST_EPISODES"] = "8"
    env["REPORT"] = str(tmp_path / "report")
    tested = subprocess.run(
        ["bash", "scripts.sh", "test"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert tested.returncode == 0, tested.stderr
    test_records = [r for r in _records(results) if r["split"] == "test"]
    val = [r for r in records if r["split"] == "validation"]
    top = max((r["metrics"]["macro"]["value"], r["metrics"]["macro"]["ci_low"]) for r in val)
    assert len(test_records) == 1 and test_records[0]["n_eval_episodes"] == 8
    hp = test_records[0]["hyperparameters"]
    chosen = [r for r in val if all(r["hyperparameters"][k] == hp[k] for k in ("ext_shot", "ext_strength", "strength"))]
    assert len(chosen) == 1  # one strength on test, not the whole row the extraction served
    assert (chosen[0]["metrics"]["macro"]["value"], chosen[0]["metrics"]["macro"]["ci_low"]) == top
    reported = subprocess.run(
        ["bash", "scripts.sh", "report"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert reported.returncode == 0, reported.stderr
    table = (tmp_path / "report" / "table.md").read_text()
    assert "review_sentiment" in table and "**" in table
    assert (tmp_path / "report" / "heatmap_tiny-gpt2_review_sentiment_iv.png").stat().st_size > 5000
