"""Data-parallel runs (torchrun, CPU, gloo): the same command with 1 and 2 processes writes the same
record (every method, IV's extraction included), only the main process writes and prints, a bad flag
is reported once, and a failure in one process stops the run with one line and nothing written.

The 2-process runs are real torchrun launches as subprocesses; to keep to one launch for all the
methods, tests/dp_driver.py runs several commands through `ivlib.cli.main` (what iv.py runs) in one
launch. The 1-process references run in this process, on one thread as torchrun's workers do.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dp_driver import how_far

from ivlib import distributed as dist
from ivlib.cli import main

REPO = Path(__file__).resolve().parent.parent
VARYING = {"time", "timing_s", "eval_episodes_per_s", "versions", "git_commit", "command", "n_processes"}
COMMON = ["-c", "config/tiny.yaml", "-m", "tiny-gpt2", "-t", "review_sentiment", "--quiet", "-n", "30"]
FIT = ["-s", "1", "-e", "8", "--batch-size", "4"]
CASES = {
    "zero-shot": COMMON + ["--method", "zero-shot", "--batch-size", "4"],
    "icl": COMMON + ["--method", "icl", "--batch-size", "4"],
    # windows [0], [1..3], [4..6], [7]: each split over the processes, then reduced, before each refresh
    "iv": COMMON + FIT + ["--method", "iv", "--ext-batch", "3", "--strength", "0.5", "0.9"],
    "tv": COMMON + FIT + ["--method", "tv", "--select-episodes", "10"],
    "fv": COMMON + FIT + ["--method", "fv", "--ie-episodes", "6"],
    # the calibration runs whole on every process; the context vectors are split like any extraction
    "i2cl": COMMON + FIT + ["--method", "i2cl", "--i2cl-epochs", "3"],
    "dt": COMMON + ["--method", "dt", "--select-episodes", "10", "--dt-steps", "3", "--batch-size", "4"],
    # the whole optimisation on every process, the main one's logits adopted at each checkpoint
    "site": COMMON
    + FIT
    + ["--method", "site", "--select-episodes", "10", "--site-steps", "4", "--site-val-every", "2"],
}
BAD_FLAG = COMMON + ["--method", "iv", "--strength", "x"]
LEAK = "warning: task 'review_sentiment' has texts in two splits: "  # tasks.cross_split_duplicates


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], env: dict[str, str] | None = None, n: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n)]
    command += ["--master-port", str(_free_port()), *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=150)


def _records(path: Path) -> list[dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [{k: v for k, v in json.loads(line).items() if k not in VARYING} for line in lines]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, list[dict]]:
    """Each case's records with one process (in this process, one thread)."""
    out = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        for name, argv in CASES.items():
            assert main(argv + ["--results", str(out / f"{name}.jsonl")]) == 0
    finally:
        torch.set_num_threads(threads)
        os.chdir(cwd)
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())  # one process: no group
    return {name: _records(out / f"{name}.jsonl") for name in CASES}


# ---- the shards -------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_the_single_process_batches_and_cover_every_row_once(monkeypatch, world):
    order = [5, 0, 9, 2, 7, 1, 8, 3, 6, 4, 10]
    batches = [order[i : i + 4] for i in range(0, len(order), 4)]
    seen_batches, seen_rows = [], []
    for r in range(world):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", str(r))
        mine = dist.shard_batches(order, 4)
        seen_batches += [mine[i : i + 4] for i in range(0, len(mine), 4)]  # how BatchRunner.each cuts it
        part = dist.shard_rows(order)
        assert part == order[len(seen_rows) : len(seen_rows) + len(part)]  # contiguous, in order
        seen_rows += part
    assert sorted(seen_batches) == sorted(batches)
    assert seen_rows == order


def test_rows_come_back_at_their_index():
    parts = [[([2, 0], torch.tensor([[2.0], [0.0]]))], [], [([1], torch.tensor([[1.0]]))]]
    assert dist.rows_in_order(parts, 3).tolist() == [[0.0], [1.0], [2.0]]


def test_one_process_needs_no_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not dist.active() and dist.is_main() and dist.share(lambda: 7, "x") == [7]
    assert dist.together(lambda: 3) == 3 and dist.main_first(lambda: 4) == 4 and dist.gpu_index(-1) == -1


def test_a_launched_process_leaves_with_its_code_and_its_output_flushed():
    """`leave` skips the interpreter's exit (where gloo has aborted finished runs): what was printed
    still arrives, and the exit code is the command's."""
    code = "from ivlib import distributed as d; print('printed', end=''); d.leave(3)"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "RANK": "1"}  # no group was joined
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (3, "printed")


@pytest.mark.parametrize("argv, returns", [(None, False), (["methods"], True)])
def test_the_entry_point_ends_a_launched_process_only_as_its_own_command(argv, returns):
    """iv.py (argv None) ends there; code running several commands through it gets control back."""
    code = (
        "import sys; from ivlib.entry import main; sys.argv = ['iv.py', 'methods']; "
        f"rc = main({argv!r}); print('returned', end=''); sys.exit(rc)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "RANK": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "iv" in done.stdout.split(), done.stdout  # the command ran
    assert done.stdout.endswith("returned") == returns, done.stdout


# ---- two processes ----------------------------------------------------------------------------------


def test_two_processes_write_the_records_of_one(tmp_path, one_process):
    cases = {name: argv + ["--results", str(tmp_path / f"{name}.jsonl")] for name, argv in CASES.items()}
    cases["bad-flag"] = BAD_FLAG + ["--results", str(tmp_path / "bad.jsonl")]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    done = _torchrun(["tests/dp_driver.py", str(tmp_path / "cases.json"), str(tmp_path)])
    assert done.returncode == 0, how_far(tmp_path, done.stderr)
    for name in CASES:
        assert (tmp_path / f"{name}.0.rc").read_text() == "0" == (tmp_path / f"{name}.1.rc").read_text()
        raw = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert [r["n_processes"] for r in raw] == [2] * len(one_process[name])  # rank 0 alone wrote
        assert _records(tmp_path / f"{name}.jsonl") == one_process[name], name
        summaries = (tmp_path / f"{name}.0.out").read_text().splitlines()
        assert len(summaries) == len(raw) and all(line.startswith(f"{name} ") for line in summaries)
        assert (tmp_path / f"{name}.1.out").read_text() == ""  # the other process prints nothing
        # the main process alone warns, once, that the tiny task repeats texts across its splits
        warned = (tmp_path / f"{name}.0.err").read_text().splitlines()
        assert len(warned) == 1 and warned[0].startswith(LEAK), warned
        assert (tmp_path / f"{name}.1.err").read_text() == ""
    # a bad flag: one line, from the main process; every process exits 2; nothing written
    assert (tmp_path / "bad-flag.0.rc").read_text() == "2" == (tmp_path / "bad-flag.1.rc").read_text()
    error = (tmp_path / "bad-flag.0.err").read_text().splitlines()
    assert len(error) == 1 and error[0].startswith("iv.py: error: --strength 'x'"), error
    assert (tmp_path / "bad-flag.1.err").read_text() == ""
    assert not (tmp_path / "bad.jsonl").exists()


def test_a_failing_process_stops_the_run_with_one_line_and_nothing_written(tmp_path, one_process, monkeypatch):
    results, vectors = tmp_path / "runs.jsonl", tmp_path / "iv.safetensors"
    argv = CASES["iv"] + ["--results", str(results), "--save-vectors", str(vectors)]
    done = _torchrun(["iv.py", *argv], env={dist.TEST_FAIL_ENV: "1:IV extract: few-shot"})
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("iv.py:")]
    assert len(ours) == 1, done.stderr[-3000:]
    assert "process 1 of 2 failed: RuntimeError: failure injected" in ours[0]
    assert ours[0].endswith("nothing of this run written")
    assert "ivlib/" not in done.stderr and done.stdout == ""  # no traceback of ours, no summary line
    assert not results.exists() and not vectors.exists()
    assert not list(tmp_path.glob("*.partial"))
    # --resume (here with one process) finishes the job: the same record as an uninterrupted run
    monkeypatch.chdir(REPO)
    assert main(argv + ["--resume"]) == 0
    assert _records(results) == one_process["iv"] and vectors.exists()


def _rank_pid(launcher: subprocess.Popen, wanted: int, timeout: float = 60.0) -> int | None:
    """The pid of the worker whose environment says RANK=wanted (the launcher has no RANK)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and launcher.poll() is None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(entry.name) != launcher.pid and f"RANK={wanted}".encode() in env and b"IVLIB_KILL_TEST=1" in env:
                return int(entry.name)
        time.sleep(0.2)
    return None


def test_a_killed_process_stops_the_run_with_one_line_and_nothing_written(tmp_path):
    """SIGKILL to rank 1 during the evaluation (no Python handler runs there): rank 0's next exchange
    fails, it says so in one line, and nothing is written. (A rank killed during start-up, before the
    first exchange, is ended by torchrun's own timeout instead: see README "Scaling out".)"""
    import signal
    import time

    results, log = tmp_path / "runs.jsonl", tmp_path / "stderr.txt"
    common = [a for a in COMMON if a != "--quiet"][:-2]  # rank 0's progress bar says when evaluation runs
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "iv.py",
        *common,
        "-n",
        "20000",
        "--method",
        "icl",
        "--batch-size",
        "4",
        "--results",
        str(results),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "IVLIB_KILL_TEST": "1"}
    with open(log, "w") as err_file:
        launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True)
        try:
            pid = _rank_pid(launcher, 1)
            assert pid is not None, "rank 1 never started"
            deadline = time.monotonic() + 90
            while "icl eval (validation)" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            os.kill(pid, signal.SIGKILL)
            out, _ = launcher.communicate(timeout=120)
        finally:
            if launcher.poll() is None:
                launcher.kill()
    err = log.read_text()
    ours = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("iv.py:")]
    assert launcher.returncode != 0
    # rank 0 either meets the dead peer in its next exchange, or is sent SIGTERM by torchrun first
    said = ("nothing of this run written", "another process of this run died")
    assert len(ours) == 1 and any(s in ours[0] for s in said), err[-3000:]
    assert "nothing of this run written" in ours[0] or "0 record(s) of this run written" in ours[0]
    assert not results.exists() and "episodes |" not in out
