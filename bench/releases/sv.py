"""State Vector's own evaluation (HITsz-TMG/ICL-State-Vector, `state_vector_optimize.py`) on ivlib's model.

Runs the release's `state_vector_optimize.py` as its `script/*_optimization.sh` do (`--max_files 1
--rand_seed 233`, its `→` template, 10 fixed demonstrations per data file), on one task it ships
(default antonym: `data/antonym/0.json`, a partition of the Function Vectors file that
`/work/shared/data/fv/abstractive/antonym.json` holds, which `--fv-file` checks), with these
replaced from outside:

  model      `TVframework.Evaluator.load` returns ivlib's SmolLM2-135M (float32, eval) and its
             tokenizer with the release's settings (left truncation and padding). The release picks
             module names and its per-task layer table by 'llama' in --model_path; SmolLM2 is a
             Llama, so the run is named `smollm2-135m-llama` (the o_proj / block names are Llama's;
             the layer counts in its table were set for Llama-2-7B's 32 layers, SmolLM2 has 30)
  data       none by default: the release's own file. `--export DIR` writes the very split it
             evaluated (demonstrations, validation, the first -n test items) as JSONL of
             {input, output}, which bench/releases/sv-antonym.yaml reads as the ivlib task
             `antonym-sv` (ivlib's side on the release's data; `harness.py compare` then pairs
             ivlib's draws item by item with the release's answers); `--data-root DIR` points the
             release at another folder of files in its format

Reductions: `--max_test_num` is `-n` (default 200; the release's scripts say 10). The release
reports top-1 accuracy over the whole vocabulary (the first answer token) for zero-shot
("Regular"), 10-shot ICL ("ICL baseline") and, zero-shot (zs) and few-shot (fs), its state vector
after each inner optimiser (none, fixed, fix-one-step: the paper's inner and momentum
optimisation); per query it returns the rank of the answer token (`top_k_metric`), recorded here
and checked against the accuracies it saves; the interval is ivlib's bootstrap over the queries.
Extra packages (peft, baukit, seaborn: `pip install --no-deps --target DIR peft==0.8.2
seaborn==0.13.0 ./baukit-checkout`) come from `--deps`, never from ivlib's environment; of baukit
only its nethook module is loaded (`baukit_tracedict`: its package __init__ wants torchvision).

    python bench/releases/sv.py --release /tmp/releases/ICL-State-Vector --deps /tmp/releases/deps
    python bench/releases/sv.py --release PATH --deps DIR --task country-capital -n 300 --export results/releases/sv-split
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import harness
import numpy as np
from harness import UsageError

from ivlib.metrics import bootstrap_accuracy

MODEL_PATH = "smollm2-135m-llama"
FV_DATA = Path("/work/shared/data/fv/abstractive")


def release_args(task: str, data_root: str, save: str, n: int, seed: int) -> list[str]:
    """The command line of the release's script/*_optimization.sh for one task, -n test items."""
    return [
        "state_vector_optimize.py",
        *("--target_tasks", task, "--data_root", data_root, "--save_path", save),
        *("--model_path", MODEL_PATH, "--device", "0", "--max_files", "1"),
        *("--max_test_num", str(n), "--rand_seed", str(seed)),
    ]


def label_calls(saved: dict[str, float], calls: list[tuple[list[float], list[int]]]) -> dict[str, list[int]]:
    """Name each recorded top_k_metric call by the result it saved (the release saves them in call order)."""
    if len(saved) != len(calls):
        raise ValueError(f"the release saved {len(saved)} results but scored {len(calls)} times")
    named = {}
    for (name, value), (accuracy, ranks) in zip(saved.items(), calls):
        if abs(accuracy[0] - value) > 1e-12:
            raise ValueError(f"result '{name}' = {value} is not the recorded call's accuracy {accuracy[0]}")
        named[name] = ranks
    return named


def hits_summary(ranks: list[int], seed: int) -> dict[str, Any]:
    """Top-1 accuracy (the answer token ranked first) with the bootstrap interval an ivlib record of an
    open-vocabulary task holds for the same answers (seeded, as ivlib seeds it, with the run's seed)."""
    hits = (np.asarray(ranks) == 0).astype(int)
    return {"n": len(hits), "accuracy": bootstrap_accuracy(np.ones_like(hits), hits, seed=seed)}


def partition_check(data: dict[str, Any], fv_file: Path) -> dict[str, Any]:
    """How many of the file's items are rows of the Function Vectors file the task is cut from."""
    pairs = {(r["input"], r["output"]) for r in json.loads(fv_file.read_text())}
    items = [*data["demon"], *data["test"], *data["valid"]]
    found = sum((r["input"], r["output"]) in pairs for r in items)
    return {"fv_file": str(fv_file), "items": len(items), "found": found, "fv_rows": len(pairs)}


def export_split(out: Path, data: dict[str, Any], n: int) -> None:
    """The split the release evaluated, as {input, output} JSONL an ivlib open-vocabulary task can read."""
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", data["demon"]), ("validation", data["valid"]), ("test", data["test"][:n])):
        lines = [json.dumps({"input": r["input"], "output": r["output"]}, ensure_ascii=False) for r in rows]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def baukit_tracedict(deps: Path | None) -> None:
    """Expose baukit's TraceDict (nethook.py) without its package __init__, which imports its image
    tools and through them torchvision, which the release never uses and which has no build for
    this CPU torch. The module itself is baukit's own, loaded from `deps`."""
    import importlib.util
    import types

    if "baukit" in sys.modules or deps is None or not (deps / "baukit" / "nethook.py").is_file():
        return
    package = types.ModuleType("baukit")
    package.__path__ = [str(deps / "baukit")]
    sys.modules["baukit"] = package
    spec = importlib.util.spec_from_file_location("baukit.nethook", deps / "baukit" / "nethook.py")
    assert spec is not None and spec.loader is not None, "a .py file has a loader"
    nethook = importlib.util.module_from_spec(spec)
    sys.modules["baukit.nethook"] = nethook
    spec.loader.exec_module(nethook)
    package.TraceDict = nethook.TraceDict  # type: ignore[attr-defined]


def run_release(root: Path, args: argparse.Namespace, lm: Any, data_root: Path) -> dict[str, Any]:
    calls: list[tuple[list[float], list[int]]] = []
    lm.tokenizer.truncation_side, lm.tokenizer.padding_side = "left", "left"

    def load(*a: Any, **k: Any) -> Any:
        return (
            lm.model.eval(),
            lm.tokenizer,
            lambda x: f"model.layers.{x}.self_attn.o_proj",
            lambda x: f"model.layers.{x}",
        )

    with harness.release_on_path(root), ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        os.chdir(root)
        import TVeval
        import TVframework

        original = TVeval.top_k_metric

        def top_k_metric(config: Any, logits: Any, answer_ids: Any) -> Any:
            result, ranks = original(config, logits, answer_ids)
            calls.append((list(result), [int(r) for r in ranks]))
            return result, ranks

        stack.enter_context(harness.patched(TVframework.Evaluator, "load", staticmethod(load)))
        stack.enter_context(harness.patched(TVeval, "top_k_metric", top_k_metric))
        argv = release_args(args.task, str(data_root), tmp, args.queries, args.seed)
        stack.enter_context(harness.patched(sys, "argv", argv))
        runpy.run_path(str(root / "state_vector_optimize.py"), run_name="__main__")
        saved = json.loads(Path(tmp, args.task, "total.json").read_text())
    return {"saved": saved, "calls": calls, "argv": argv}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--release", required=True, help="path of a checkout of the release")
    ap.add_argument("-c", "--config", action="append", help="ivlib registries (default: the harness's)")
    ap.add_argument("-m", "--model", default="smollm2-135m", help="ivlib registry model (default smollm2-135m)")
    ap.add_argument("--task", default="antonym", help="the release's task folder under data/ (default antonym)")
    ap.add_argument("-n", "--queries", type=int, default=200, help="--max_test_num: first test items (default 200)")
    ap.add_argument("--seed", type=int, default=233, help="--rand_seed (default 233, the release's)")
    ap.add_argument("--data-root", help="folder of task files in the release's format (default: its data/)")
    ap.add_argument(
        "--fv-file", help="the FV file the task is cut from (default /work/shared/data/fv/abstractive/TASK.json)"
    )
    ap.add_argument("--export", help="write the evaluated split as JSONL here, for the ivlib side")
    ap.add_argument("--deps", help="folder holding the release's extra packages, appended to sys.path")
    ap.add_argument("--out", help="JSON summary (default results/releases/sv-TASK-seedS.json)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(harness.positive("--threads", args.threads))
    root = harness.checkout(args.release, "state_vector_optimize.py", "HITsz-TMG/ICL-State-Vector")
    harness.positive("-n", args.queries)
    if args.deps:
        sys.path.append(str(Path(args.deps).resolve()))
    baukit_tracedict(Path(args.deps).resolve() if args.deps else None)
    data_root = Path(args.data_root).resolve() if args.data_root else root / "data"
    file = data_root / args.task / "0.json"
    if not file.is_file():
        raise UsageError(
            f"--task '{args.task}': {file} does not exist; accepted: a folder of {data_root} holding 0.json"
        )
    data = json.loads(file.read_text())
    fv_file = Path(args.fv_file) if args.fv_file else FV_DATA / f"{args.task}.json"
    check = partition_check(data, fv_file) if fv_file.is_file() else None
    if args.export:
        export_split(Path(args.export), data, args.queries)
    context = harness.run_context()
    out = run_release(root, args, harness.load_lm(args.model, args.config), data_root)
    named = label_calls(out["saved"]["0.json"], out["calls"])
    summaries = {name: hits_summary(ranks, args.seed) for name, ranks in named.items()}
    summary = {
        "release": "state-vector",
        "task": args.task,
        "seed": args.seed,
        "summaries": summaries,
        "ranks": named,
        "partition_check": check,
        "release_argv": out["argv"],
        "context": {**context, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "model": args.model,
        "release_path": str(root),
    }
    path = harness.write_summary(args.out, f"sv-{args.task}-seed{args.seed}", summary)
    for name, s in summaries.items():
        print(f"state-vector {name}: top-1 accuracy {harness.pct(s['accuracy'])}, n={s['n']}")
    if check:
        print(f"{check['found']} of the file's {check['items']} items are rows of {check['fv_file']}")
    print(f"per-query ranks: {path}")


if __name__ == "__main__":
    harness.guarded(main, "sv.py")
