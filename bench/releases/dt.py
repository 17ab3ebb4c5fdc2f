"""Deep-Thinking's own evaluation (AlibabaResearch/DAMO-ConvAI, folder deep-thinking/) on ivlib's model and data.

Runs the release's `task_logprob_main.py` as its scripts do (`--exemplar_method stratified
--num_k_shots K --kv_iter 15 --step_size 0.01 --momentum 0.9 --batch_size 32`, prompt version
`default`), with only these replaced from outside:

  model      `models.build_model` / `models.build_tokenizer` return ivlib's SmolLM2-135M and its
             tokenizer (the release's tokenizer settings kept: right padding, pad = eos for the GPT
             families; `--model_type gpt2` is the family whose code path a Llama-layout cache takes)
  data       `BaseProbInference.do_download` returns ivlib's split instead of the hub's: the
             release's "sample" split (its demonstration pool) is ivlib's train split of the task,
             its "result" split is the `-n` test queries an ivlib run with the same `--seed` answers,
             dumped and read back by the release's own code (into a temporary folder, not the checkout)

and four adapters that change no number: the model takes and returns the (key, value) cache as
transformers 4.x did (`harness.legacy_cache`), `Tensor.cuda()` returns the tensor (CPU), the
terminal width the release prints its demonstrations with has a default when there is no terminal,
and `random.sample` in its tasks/base.py takes a set as Python <= 3.10 did (`harness.Py310Random`;
the stratified draw passes the set of remaining rows, with 0 to draw when the shots divide evenly).
The release evaluates every tuning step on the result split and logs the best step by the
summed log-prob rule (`lm_log_p`): that is its headline, chosen on the test queries themselves.
This prints step 1 (plain ICL with the fixed demonstrations), the release's best step and the last
step, each with accuracy and ivlib's bootstrap 95% interval over the queries, and writes them per query.

    python bench/releases/dt.py --release /tmp/releases/deep-thinking                    # sst2-local, 500 queries
    python bench/releases/dt.py --release PATH -t rotten_tomatoes-local -n 300 --seed 43
    python bench/releases/harness.py compare results/releases/dt-sst2-local-seed42.json results/runs.jsonl --method dt
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import harness
from harness import UsageError

# The release's task keys, the HF dataset each reads, and its text field (tasks/<key>.py).
RELEASE_TASKS = {"sst2": "sentence", "mr": "text"}


def release_args(args: argparse.Namespace, key: str) -> list[str]:
    """The command line of the release's scripts/run_main_<task>.sh, with this run's seed, shots and steps."""
    return [
        "task_logprob_main.py",
        *("--dataset", key, "--prompt_version", "default"),
        *("--exemplar_method", "stratified", "--num_k_shots", str(args.shot)),
        *("--model_type", "gpt2", "--model_size", args.model),
        *("--kv_iter", str(args.kv_iter), "--step_size", "0.01", "--momentum", "0.9"),
        *("--batch_size", str(args.batch_size), "--gpus", "0", "--in_8bit", "false", "--seed", str(args.seed)),
    ]


def release_key(task: Any, given: str | None) -> str:
    """Which of the release's tasks the ivlib task is (its registry's template_task, e.g. sst2-local is sst2)."""
    key = given or task.prompt.get("template_task") or task.name
    if key not in RELEASE_TASKS:
        raise UsageError(f"--release-task '{key}' is not one this harness maps; accepted: {', '.join(RELEASE_TASKS)}")
    return key


def best_step(log: list[tuple[float, int]]) -> int:
    """The step the release reports: the last entry of its AdvantageLogger (ties go to the later step)."""
    if not log:
        raise ValueError("the release logged no step")
    return int(log[-1][1])


@contextmanager
def cpu_and_terminal() -> Iterator[None]:
    """`Tensor.cuda()` as the identity and a terminal width without a terminal: the release assumes both."""
    import torch

    real = os.get_terminal_size

    def size(*fd: Any) -> os.terminal_size:
        try:
            return real(*fd)
        except (OSError, ValueError):
            return os.terminal_size((120, 40))

    with (
        harness.patched(torch.Tensor, "cuda", lambda self, *a, **k: self),
        harness.patched(os, "get_terminal_size", size),
    ):
        yield


def run_release(
    root: Path, args: argparse.Namespace, lm: Any, key: str, data: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """Execute task_logprob_main.py as __main__ with model and data replaced; its globals plus every step's answers."""
    import datasets

    steps: list[list[dict[str, Any]]] = []
    model = harness.legacy_cache(lm.model)
    with harness.release_on_path(root), ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        import anchor
        import models
        import tasks.base as base

        # The stand-ins keep the release's signatures (it may pass any argument by keyword).
        def build_tokenizer(
            model_type: str,
            model_size: str,
            padding_side: str = "left",
            use_fast: bool = False,
        ) -> Any:
            tok = lm.tokenizer
            tok.padding_side = padding_side
            if model_type in ["gpt2", "e-gpt"]:  # as the release's build_tokenizer does
                tok.pad_token = tok.eos_token
            return tok

        def do_download(dataset_name: str, subset: str | None, split: str, cache_dir: str) -> Any:
            return datasets.Dataset.from_list(data[split])

        original = base.BaseProbInference.post_process

        def post_process(self: Any, generated_info: Any, metric_output: bool = True) -> Any:
            full_info, metric = original(self, generated_info, metric_output)
            steps.append(full_info)
            return full_info, metric

        for target, name, value in (
            (models, "build_model", lambda *a, **k: model.eval()),
            (models, "build_tokenizer", build_tokenizer),
            (base.BaseProbInference, "do_download", staticmethod(do_download)),
            (base.BaseProbInference, "post_process", post_process),
            (base, "hf_datasets_root", Path(tmp) / "datasets"),
            (base, "random", harness.Py310Random()),
            (anchor, "logger_root", Path(tmp) / "logger"),
            (sys, "argv", release_args(args, key)),
        ):
            stack.enter_context(harness.patched(target, name, value))
        stack.enter_context(cpu_and_terminal())
        os.chdir(root)
        found = runpy.run_path(str(root / "task_logprob_main.py"), run_name="__main__")
    return {"log": list(found["trace_logger"].log), "exemplars": found["exemplar_str"], "steps": steps}


def report(args: argparse.Namespace, task: Any, rows: list[int], out: dict[str, Any]) -> dict[str, Any]:
    gold = [int(task.splits["test"].labels[r]) for r in rows]
    steps = out["steps"]
    if len(steps) != args.kv_iter or any(len(s) != len(rows) for s in steps):
        raise SystemExit(
            f"dt.py: the release answered {[len(s) for s in steps]} queries per step; expected {args.kv_iter} x {len(rows)}"
        )
    if any(info["answer_idx"] != g for info, g in zip(steps[0], gold)):
        raise SystemExit("dt.py: the release's gold labels are not ivlib's: the data did not go through as given")

    def answers(step: int, rule: str = "lm_log_p") -> list[int]:
        return [info["predicted"][rule] for info in steps[step - 1]]

    best = best_step(out["log"])
    chosen = {"icl": 1, "headline": best, "final": args.kv_iter}
    summaries = {k: harness.summary(gold, answers(s), task.n_classes, args.seed) for k, s in chosen.items()}
    curve = {
        rule: [
            float(sum(p == g for p, g in zip(answers(s, rule), gold)) / len(gold)) for s in range(1, args.kv_iter + 1)
        ]
        for rule in ("lm_log_p", "norm_lm_log_p")
    }
    return {
        "release": "deep-thinking",
        "task": args.task,
        "n_classes": task.n_classes,
        "steps_chosen": chosen,
        "summaries": summaries,
        "accuracy_per_step": curve,
        "exemplars": out["exemplars"],
        "answers": {k: harness.sample_lines(rows, gold, answers(s)) for k, s in chosen.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common(ap, "sst2-local", 500)
    ap.add_argument("--release-task", help="the release's task key (default: the ivlib task's template_task)")
    ap.add_argument("--shot", type=int, default=1, help="--num_k_shots: demonstrations per class (default 1)")
    ap.add_argument("--kv-iter", type=int, default=15, help="tuning steps, each evaluated (default 15, the scripts')")
    ap.add_argument("--batch-size", type=int, default=32, help="the scripts' 32")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(harness.positive("--threads", args.threads))
    root = harness.checkout(args.release, "task_logprob_main.py", "DAMO-ConvAI's deep-thinking/ folder")
    for flag, value in (("--shot", args.shot), ("--kv-iter", args.kv_iter), ("--batch-size", args.batch_size)):
        harness.positive(flag, value)
    task = harness.load_ivlib_task(args.task, args.config)
    key = release_key(task, args.release_task)
    rows = harness.query_rows(task, "test", args.queries, args.seed)
    field = RELEASE_TASKS[key]
    data = {
        "train": harness.rows_as_records(task, "train", range(len(task.splits["train"].texts)), field, "label"),
        "validation": harness.rows_as_records(task, "test", rows, field, "label"),
    }
    context = harness.run_context()
    lm = harness.load_lm(args.model, args.config)
    summary = report(args, task, rows, run_release(root, args, lm, key, data))
    summary.update(
        context=context, seed=args.seed, model=args.model, release_path=str(root), release_argv=release_args(args, key)
    )
    summary["context"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    path = harness.write_summary(args.out, f"dt-{args.task}-seed{args.seed}", summary)
    for name, s in summary["summaries"].items():
        step = summary["steps_chosen"][name]
        print(
            f"deep-thinking {name} (step {step}): accuracy {harness.pct(s['accuracy'])}, macro-F1 {harness.pct(s['macro'])}, n={s['n']}"
        )
    print(f"per-query answers: {path}")


if __name__ == "__main__":
    harness.guarded(main, "dt.py")
