"""Several seeds: selection by the mean over seeds, select --seed, the report's spread, scripts.sh SEEDS."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from ivlib import analyze
from ivlib.report import write_report
from ivlib.selection import select_best

REPO = Path(__file__).resolve().parent.parent
MODEL, TASK = "smollm2-135m", "ag_news-local"


def hp(shot: int) -> dict:
    return {"shot": shot, "ext_shot": None, "episodes": None, "max_example_tokens": 256}


def rec(split: str, shot: int, seed: int, value: float, method: str = "icl") -> dict:
    return {
        "method": method,
        "model": MODEL,
        "task": TASK,
        "split": split,
        "hyperparameters": hp(shot),
        "seed": seed,
        "n_eval_episodes": 100,
        "label_words": ["World", "Sports"],
        "time": f"2026-11-24T17:00:{seed:02d}+00:00",
        "metrics": {"macro": {"value": value, "ci_low": value - 0.05, "ci_high": value + 0.05}},
        "command": ["python", "iv.py", "-m", MODEL, "-t", TASK, "--method", method, "--shot", str(shot)]
        + ["--seed", str(seed), "-n", "100", "--results", "r.jsonl"],
    }


# shot 1 has the single best seed (0.9), shot 2 the better mean (0.7 vs 0.6)
VALIDATION = [rec("validation", 1, s, v) for s, v in ((1, 0.9), (2, 0.5), (3, 0.4))] + [
    rec("validation", 2, s, v) for s, v in ((1, 0.7), (2, 0.72), (3, 0.68))
]
TEST_VALUES = {1: 0.61, 2: 0.66, 3: 0.58}
TEST = [rec("test", 2, s, v) for s, v in TEST_VALUES.items()]


def test_a_setting_is_chosen_by_its_mean_over_seeds():
    (choice,) = select_best(VALIDATION)
    assert choice.best.hyperparameters["shot"] == 2
    assert choice.best.value == pytest.approx((0.7 + 0.72 + 0.68) / 3)
    assert [r.record["seed"] for r in choice.runs] == [1, 2, 3] and choice.n_seeds == 3
    one_seed = [r for r in VALIDATION if r["seed"] == 1]  # one seed: the best single value, as before
    assert select_best(one_seed)[0].best.hyperparameters["shot"] == 1


def test_select_seed_prints_that_seeds_command(tmp_path, capsys):
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in VALIDATION))
    assert analyze.main(["select", "--results", str(path), "--commands", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "(mean of 3 seeds)" in out
    (command,) = [line for line in out.splitlines() if line.startswith("python iv.py")]
    assert "--seed 2" in command and "--shot 2" in command and "--run-test" in command


def _log(tmp_path: Path, record: dict, gold: list[int], pred: list[int]) -> dict:
    name = f"seed{record['seed']}.samples.jsonl"
    lines = [json.dumps({"episode": i, "gold": g, "pred": p}) for i, (g, p) in enumerate(zip(gold, pred))]
    data = ("\n".join(lines) + "\n").encode()
    (tmp_path / name).write_bytes(data)
    return {**record, "samples": {"path": name, "sha256": hashlib.sha256(data).hexdigest()}}


def test_the_report_shows_mean_sd_and_the_pooled_interval(tmp_path):
    out = tmp_path / "report"
    write_report(VALIDATION + TEST, out, base=tmp_path)
    table = (out / "table.md").read_text()
    mean, sd = statistics.mean(TEST_VALUES.values()), statistics.stdev(TEST_VALUES.values())
    row = next(line for line in table.splitlines() if line.startswith(f"| {TASK} | icl | 3 (1, 2, 3)"))
    assert f"| 61.0, 66.0, 58.0 | {100 * mean:.1f} ± {100 * sd:.1f} | – |" in row
    assert "needs every seed's run made with --log-samples" in table

    # with logs: the pooled macro-F1 of all seeds' episodes, here known by hand. Pooled gold and pred:
    # class 0: 2 right, 1 missed, 1 false alarm -> F1 2/3; class 1 the same -> macro-F1 2/3
    logged = [
        _log(tmp_path, TEST[0], [0, 0, 1, 1], [0, 0, 1, 1]),
        _log(tmp_path, TEST[1], [0], [1]),
        _log(tmp_path, TEST[2], [1], [0]),
    ]
    write_report(VALIDATION + logged, out, base=tmp_path)
    row = next(line for line in (out / "table.md").read_text().splitlines() if "| 3 (1, 2, 3)" in line)
    assert row.endswith(f"| {100 * 2 / 3:.1f} [" + row.split("[")[-1])  # the pooled value, then its interval
    low, high = (float(x) for x in row.split("[")[-1].rstrip(" |]").split(","))
    assert low <= 100 * 2 / 3 <= high
    # the main table shows that pooled value and interval too, not the last seed's 58.0
    table = (out / "table.md").read_text().splitlines()
    (cell,) = [line for line in table if line.startswith(f"| {TASK} | **")]
    assert cell == f"| {TASK} | **{100 * 2 / 3:.1f}** [{low:.1f}, {high:.1f}] |"


def test_one_seed_leaves_the_report_as_it_was(tmp_path):
    only = [r for r in VALIDATION + TEST if r["seed"] == 1]
    write_report(only, tmp_path / "report", base=tmp_path)
    table = (tmp_path / "report" / "table.md").read_text()
    assert "Over seeds" not in table and "± " not in table


def _array(tmp_path: Path, seeds: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "SEEDS"}
    env.update(
        PY=sys.executable,
        CONFIG="config/tiny.yaml",
        MODELS="tiny-gpt2",
        TASKS="review_sentiment",
        EXT_SHOTS="1",
        EXT_STRENGTHS="0.1",
        STRENGTHS="0.1",
        EPISODES="4",
        BASELINES="icl",
        RESULTS=str(tmp_path / "runs.jsonl"),
        VECTORS=str(tmp_path / "vectors"),
    )
    if seeds is not None:
        env["SEEDS"] = seeds
    made = subprocess.run(
        ["bash", "scripts.sh", "array", str(tmp_path / "slurm")], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    return (tmp_path / "slurm" / "cells.txt").read_text().splitlines()


def test_scripts_sh_runs_every_cell_once_per_seed(tmp_path):
    plain = _array(tmp_path / "plain", None)
    assert len(plain) == 2 and not any("--seed" in c for c in plain)  # no SEEDS: the commands of before
    seeded = _array(tmp_path / "seeded", "1 7")
    assert len(seeded) == 4
    assert [c.endswith(f"--seed {s}") for c, s in zip(seeded, (1, 7, 1, 7))] == [True] * 4
    vectors = [c.split("--save-vectors ")[1].split()[0] for c in seeded if "--save-vectors" in c]
    assert [Path(v).name.endswith(f"_seed{s}.safetensors") for v, s in zip(vectors, (1, 7))] == [True, True]
    assert "export SEEDS=1\\ 7" in (tmp_path / "seeded" / "slurm" / "test.sbatch").read_text()
