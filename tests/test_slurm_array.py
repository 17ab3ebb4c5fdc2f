"""scripts.sh on a cluster: `array` writes a SLURM job array whose cells, all run at once, write what a
sequential iv-grid + baselines writes (no SLURM needed: each cell is run with SLURM_ARRAY_TASK_ID set)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# what differs between two runs of the same setting: when, how fast, which code, the command line's paths
VOLATILE = ("time", "timing_s", "eval_episodes_per_s", "versions", "git_commit", "command")


def _env(base: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {
        **env,
        "PY": sys.executable,
        "CONFIG": "config/tiny.yaml",
        "MODELS": "tiny-gpt2",
        "TASKS": "review_sentiment",
        "EXT_SHOTS": "1",
        "EXT_STRENGTHS": "0.1 0.5",
        "STRENGTHS": "0.1 0.5",
        "EPISODES": "4",
        "EXT_BATCH": "2",
        "BASELINES": "icl zero-shot",
        "EXTRA": "--batch-size 4",
        "RESULTS": str(base / "runs.jsonl"),
        "VECTORS": str(base / "vectors"),
        "REPORT": str(base / "report"),
    }


def _records(path: Path) -> list[str]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(json.dumps({k: v for k, v in r.items() if k not in VOLATILE}, sort_keys=True) for r in records)


def test_array_cells_run_at_once_write_the_sequential_sweeps_records(tmp_path):
    seq, arr = tmp_path / "sequential", tmp_path / "array"
    seq.mkdir()
    arr.mkdir()
    made = subprocess.run(
        ["bash", "scripts.sh", "array", str(arr / "slurm")],
        cwd=REPO,
        env=_env(arr),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    out = arr / "slurm"
    cells = (out / "cells.txt").read_text().splitlines()
    assert len(cells) == 4  # 1 ext-shot x 2 ext-strengths (each serving both strengths) + 2 baselines
    assert all(" iv.py " in c and " --resume " in c and str(arr / "runs.jsonl") in c for c in cells)
    vectors = [re.search(r"--save-vectors (\S+)", c) for c in cells]
    saved = [m.group(1) for m in vectors if m]
    assert len(saved) == 2 and len(set(saved)) == 2  # no two cells write the same vectors file
    grid, test = (out / "grid.sbatch").read_text(), (out / "test.sbatch").read_text()
    assert "#SBATCH --array=0-3\n" in grid and "SLURM_ARRAY_TASK_ID" in grid
    assert "scripts.sh test" in test and "scripts.sh report" in test
    assert "--dependency=afterok:" in (out / "submit.sh").read_text()
    assert "sbatch --dependency=afterok:$GRID_JOB" in made.stdout and "submit.sh" in made.stdout
    for script in ("grid.sbatch", "test.sbatch", "submit.sh"):
        assert subprocess.run(["bash", "-n", str(out / script)]).returncode == 0

    # every array task at once (from another directory, as SLURM starts them), and the sequential sweep
    # beside them into its own files
    cell_env = _env(arr)
    procs = [
        subprocess.Popen(
            ["bash", str(out / "grid.sbatch")],
            cwd=tmp_path,
            env={**cell_env, "SLURM_ARRAY_TASK_ID": str(i)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(len(cells))
    ]
    sequential = subprocess.run(
        ["bash", "-c", "bash scripts.sh iv-grid && bash scripts.sh baselines"],
        cwd=REPO,
        env=_env(seq),
        capture_output=True,
        text=True,
        timeout=300,
    )
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert sequential.returncode == 0, sequential.stderr

    array_records, sequential_records = _records(arr / "runs.jsonl"), _records(seq / "runs.jsonl")
    assert len(array_records) == 6  # 2 extractions x 2 strengths + icl + zero-shot
    assert array_records == sequential_records
    assert sorted(p.name for p in (arr / "vectors").iterdir()) == sorted(p.name for p in (seq / "vectors").iterdir())


def test_cell_loads_the_vectors_an_earlier_attempt_saved(tmp_path):
    """A resubmitted cell makes iv-grid's choice when it runs: --load-vectors once its file exists."""
    done, missing = tmp_path / "done.safetensors", tmp_path / "missing.safetensors"
    done.write_bytes(b"")
    cells = tmp_path / "cells.txt"
    cells.write_text(f"echo --save-vectors {done} -n 4\necho --load-vectors {missing}\n")
    env = {**os.environ, "PY": sys.executable, "BASELINES": "icl"}

    def cell(i: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "scripts.sh", "cell", str(cells), i], cwd=REPO, env=env, capture_output=True, text=True
        )

    assert cell("0").stdout == f"--load-vectors {done} -n 4\n"
    assert cell("1").stdout == f"--save-vectors {missing}\n"
    assert cell("2").returncode == 2 and "no line 3" in cell("2").stderr
    assert cell("x").returncode == 2
