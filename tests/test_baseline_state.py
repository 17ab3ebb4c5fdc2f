"""scripts.sh baselines save the fit of a method with a fitted state, and the test step loads it
instead of fitting again (`iv.py methods --with-state` says which methods have one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ivlib.cli import main
from ivlib.methods import METHODS

REPO = Path(__file__).resolve().parent.parent


def test_methods_with_state_lists_those_that_save_one(capsys):
    assert main(["methods", "--with-state"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == [name for name, cls in METHODS.items() if cls.has_state]
    assert "tv" in listed and "icl" not in listed and "zero-shot" not in listed
    assert main(["methods", "--stateful"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'--stateful'" in err and "accepted: nothing, or --with-state" in err


def test_the_test_step_loads_the_state_the_baseline_saved(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MODELS", "TASKS", "SEEDS", "EXTRA")}
    env |= {
        "PY": sys.executable,
        "CONFIG": "config/tiny.yaml",
        "MODELS": "tiny-gpt2",
        "TASKS": "review_sentiment",
        "BASELINES": "icl tv",
        "EPISODES": "6",
        "TEST_EPISODES": "6",
        "SEEDS": "3",
        "RESULTS": str(tmp_path / "runs.jsonl"),
        "VECTORS": str(tmp_path / "vectors"),
    }
    for step in ("baselines", "test"):
        done = subprocess.run(["bash", "scripts.sh", step], cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    (saved,) = sorted((tmp_path / "vectors").iterdir())  # tv's fit; icl has none
    assert saved.name == "tiny-gpt2__review_sentiment__tv_e6_seed3.safetensors"
    records = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    test = {r["method"]: r for r in records if r["split"] == "test"}
    assert set(test) == {"icl", "tv"}
    assert test["tv"]["fit"]["loaded_from"] == str(saved)  # loaded, not fitted again
    validation = next(r for r in records if r["method"] == "tv" and r["split"] == "validation")
    assert test["tv"]["hyperparameters"] == validation["hyperparameters"]
