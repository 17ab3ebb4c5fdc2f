"""The README's seed command, as written, against a registry entry that points at the tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from ivlib.cli import main

REPO = Path(__file__).resolve().parent.parent
TOPICS = {
    0: "the president met the prime minister at the summit",
    1: "the team won the match in the final minute",
    2: "the company reported higher profits and shares rose",
    3: "the new chip doubles the speed of the phone",
}


@pytest.fixture()
def registry(tmp_path):
    """gpt-j-6b -> tiny GPT-2; ag_news -> local parquet files shaped like the hub's (label + label_text)."""
    names = ["World", "Sports", "Business", "Sci/Tech"]
    for split, n in (("train", 80), ("test", 40)):
        rows = [{"text": f"{TOPICS[i % 4]} {i}", "label": i % 4, "label_text": names[i % 4]} for i in range(n)]
        pd.DataFrame(rows).to_parquet(tmp_path / f"{split}.parquet")
    cfg = tmp_path / "yours.yaml"
    cfg.write_text(
        "models:\n  gpt-j-6b: {builtin: tiny-gpt2}\n"
        "tasks:\n  ag_news: {data_files: {train: train.parquet, test: test.parquet}}\n"
    )
    return cfg


def test_seed_command_runs_and_writes_one_record(registry, tmp_path):
    gpu = "0" if torch.cuda.is_available() else "-1"  # the seed command says -g 0; CI has no GPU
    results = tmp_path / "runs.jsonl"
    cmd = [
        sys.executable,
        "iv.py",
        "-c",
        str(registry),
        "-g",
        gpu,
        "-m",
        "gpt-j-6b",
        "-t",
        "ag_news",
        "-s",
        "4",
        "--strength",
        "0.5",
        "--ext-strength",
        "0.3",
        "--run-test",
        "-e",
        "12",
        "-n",
        "40",
        "--quiet",
        "--results",
        str(results),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "iv | gpt-j-6b | ag_news | test | 40 episodes | macro-F1" in proc.stdout
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["method"] == "iv" and record["split"] == "test" and record["task"] == "ag_news"
    assert record["hyperparameters"] == {
        "strength": 0.5,
        "ext_strength": 0.3,
        "ext_batch": 10,
        "shot": 1,
        "ext_shot": 4,
        "episodes": 12,
        "max_example_tokens": 256,
    }
    assert record["label_words"] == ["World", "Sports", "Business", "Sci/Tech"]
    assert record["task_provenance"]["carved"]["roles"] == ["validation"]
    assert 0.0 <= record["metrics"]["macro"]["value"] <= 1.0
    assert (
        record["metrics"]["macro"]["ci_low"]
        <= record["metrics"]["macro"]["value"]
        <= record["metrics"]["macro"]["ci_high"]
    )
    assert record["timing_s"]["fit"] > 0 and record["timing_s"]["eval"] > 0


@pytest.mark.parametrize(
    "flags,method,shot",
    [(["--method", "icl"], "icl", 1), (["--run-clean"], "icl", 1), (["--method", "zero-shot"], "zero-shot", 0)],
)
def test_baseline_methods_run_through_the_same_command(registry, tmp_path, monkeypatch, flags, method, shot):
    monkeypatch.chdir(REPO)
    results = tmp_path / "runs.jsonl"
    argv = [
        "-c",
        str(registry),
        "-m",
        "gpt-j-6b",
        "-t",
        "ag_news",
        "--run-test",
        "-n",
        "40",
        "--quiet",
        "--results",
        str(results),
        *flags,
    ]
    assert main(argv) == 0
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["method"] == method and record["hyperparameters"]["shot"] == shot
    assert record["n_fit_episodes"] == 0 and record["fit"] == {}
