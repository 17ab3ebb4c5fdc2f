"""I2CL's own evaluation (LzVv123456/I2CL, `run_i2cl.py` with `configs/config_i2cl.py`) on ivlib's model and data.

Calls the release's `run_i2cl.main` for one (model, dataset) pair as its launcher does, with the
release's config except the run count (`--runs`, default 1 of its 5: CPU), the test size (the `-n`
queries given, all kept) and the output folder (a temporary one). Replaced from outside:

  model      `utils.load_model_tokenizer` returns ivlib's SmolLM2-135M (float32, eval, hidden states
             on, as the release asks from_pretrained) and its tokenizer with the release's settings
             (pad = eos, right padding); `utils.set_device` returns the CPU (the release calls
             torch.cuda.set_device). The release picks its model wrapper by name ('llama' in it:
             module paths model.layers.N.self_attn / .mlp); SmolLM2 is a Llama, so the run is named
             `smollm2-135m-llama`. Its answer token is ' ' + label when the tokenizer's class name
             contains 'gpt', else the bare label: from the hub SmolLM2's tokenizer is
             GPT2TokenizerFast, so ivlib's tokenizer gets that class name (`--tokenizer-class`,
             '' keeps TokenizersBackend, the name a GGUF load gives; see harness.hub_tokenizer_class)
  data       `my_datasets.<task>.load_dataset` returns ivlib's split instead of the hub's: the
             release's train (and its 32-example holdout, unused with random demonstrations) come
             from ivlib's train split, its test from the `-n` test queries an ivlib run with the same
             `--seed` answers; the release's own sampling then runs on them

and one adapter that changes no number: the model takes and returns the (key, value) cache as
transformers 4.x did (`harness.legacy_cache`). `peft` (imported by the release's wrapper.py, used
only by its soft-prompt baseline) comes from `--deps` (e.g. `pip install --no-deps --target DIR
peft==0.8.2`, the release's pin), never from ivlib's environment.

The release reports accuracy (`acc`) of zero-shot, few-shot (its 5 per class, one fixed set per
run, demonstrations cached) and I2CL; the per-query answers are read where its evaluator takes the
softmax over the label tokens (a recording proxy of `torch.nn.functional` in its evaluator module,
checked against the accuracy it returns), and the interval is ivlib's bootstrap over the queries.

    python bench/releases/i2cl.py --release /tmp/releases/I2CL --deps /tmp/releases/deps        # sst2-local, 500 queries
    python bench/releases/i2cl.py --release PATH --deps DIR -t rotten_tomatoes-local --seed 43
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import harness
from harness import UsageError

# The release's dataset keys (my_datasets/__init__.py): the module that loads each, its text field,
# and for each HF split it reads, what ivlib gives in its place ("queries": the -n test queries).
# SST2 reads train for its train and holdout and validation for its test; MR reads all three.
RELEASE_TASKS = {
    "sst2": ("sst2", "sentence", {"train": "train", "validation": "queries"}),
    "mr": ("rotten_tomatoes", "text", {"train": "train", "validation": "validation", "test": "queries"}),
}
MODEL_NAME = "smollm2-135m-llama"


class SoftmaxSpy:
    """`torch.nn.functional` with `softmax` recording each call's argmax: the evaluator's predictions."""

    def __init__(self, functional: Any) -> None:
        self._functional = functional
        self.calls: list[list[int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._functional, name)

    def softmax(self, *args: Any, **kwargs: Any) -> Any:
        out = self._functional.softmax(*args, **kwargs)
        self.calls.append(out.argmax(dim=-1).tolist())
        return out


def call_names(runs: int, baseline: bool = True) -> list[str]:
    """The test evaluations run_i2cl.main makes, in order: zero-shot once (run 0), then per run few-shot and I2CL."""
    names = ["zero-shot"] if baseline else []
    for run in range(runs):
        names += ([f"icl/run{run}"] if baseline else []) + [f"i2cl/run{run}"]
    return names


def release_key(task: Any, given: str | None) -> str:
    key = given or task.prompt.get("template_task") or task.name
    if key not in RELEASE_TASKS:
        raise UsageError(f"--release-task '{key}' is not one this harness maps; accepted: {', '.join(RELEASE_TASKS)}")
    return key


def release_config(root: Path, args: argparse.Namespace, out: str) -> dict[str, Any]:
    """The release's config_i2cl.py, with only the run count, test size, output folder and (for smoke runs) epochs changed."""
    import utils

    config = utils.load_config(str(root / "configs" / "config_i2cl.py"))
    config.update(run_num=args.runs, test_data_num=args.queries, exp_name=out)
    if args.epochs is not None:
        config["epochs"] = args.epochs
    return config


def run_release(
    root: Path, args: argparse.Namespace, lm: Any, key: str, data: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    import datasets
    import torch

    model = harness.legacy_cache(lm.model)
    model.config.output_hidden_states = True
    tokenizer = harness.hub_tokenizer_class(lm.tokenizer, args.tokenizer_class)
    evaluations: list[tuple[dict[str, Any], list[int]]] = []
    with harness.release_on_path(root), ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        os.chdir(root)
        import evaluator
        import my_datasets
        import run_i2cl
        import utils

        module = getattr(my_datasets, RELEASE_TASKS[key][0])
        spy = SoftmaxSpy(evaluator.F)
        original = evaluator.Evaluator.evaluate

        def evaluate(self: Any, *a: Any, **k: Any) -> Any:
            first = len(spy.calls)
            result = original(self, *a, **k)
            evaluations.append((result, [p for call in spy.calls[first:] for p in call]))
            return result

        # The stand-ins keep the release's signatures (it may pass any argument by keyword).
        def load_model_tokenizer(
            model_name: str,
            device: Any,
            output_hidden_states: bool = True,
            load_in_8bit: bool = False,
        ) -> Any:
            tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "right"
            return model.eval(), tokenizer, model.config

        def load_dataset(*a: Any, split: str, **k: Any) -> Any:
            return datasets.Dataset.from_list(data[split])

        for target, name, value in (
            (utils, "load_model_tokenizer", load_model_tokenizer),
            (utils, "set_device", lambda gpu: torch.device("cpu")),
            (module, "load_dataset", load_dataset),
            (evaluator, "F", spy),
            (evaluator.Evaluator, "evaluate", evaluate),
        ):
            stack.enter_context(harness.patched(target, name, value))
        config = release_config(root, args, tmp)
        run_i2cl.main(argparse.Namespace(model_name=MODEL_NAME, dataset_name=key, gpu="0", config=config))
        saved = Path(tmp, MODEL_NAME, key, "result_dict.json").read_text()
    return {"evaluations": evaluations, "result_dict": saved, "config": config}


def report(args: argparse.Namespace, task: Any, rows: list[int], out: dict[str, Any]) -> dict[str, Any]:
    import json

    gold = [int(task.splits["test"].labels[r]) for r in rows]
    names = call_names(args.runs)
    evaluations = out["evaluations"]
    if len(evaluations) != len(names):
        raise SystemExit(
            f"i2cl.py: the release evaluated {len(evaluations)} times; expected {len(names)} ({', '.join(names)})"
        )
    answers, summaries = {}, {}
    for name, (result, pred) in zip(names, evaluations):
        hits = sum(p == g for p, g in zip(pred, gold))
        if len(pred) != len(gold) or abs(hits / len(gold) - result["acc"]) > 1e-9:
            raise SystemExit(
                f"i2cl.py: the recorded answers of {name} do not give the release's accuracy {result['acc']}"
            )
        answers[name] = harness.sample_lines(rows, gold, pred)
        summaries[name] = {**harness.summary(gold, pred, task.n_classes, args.seed), "release": result}
    if args.runs == 1:  # one run: its I2CL and few-shot answers are the ones to pair with ivlib's
        answers["headline"], answers["icl"] = answers["i2cl/run0"], answers["icl/run0"]
    return {
        "release": "i2cl",
        "task": args.task,
        "n_classes": task.n_classes,
        "summaries": summaries,
        "answers": answers,
        "result_dict": json.loads(out["result_dict"]),
        "config": {k: v for k, v in out["config"].items() if isinstance(v, (int, float, str, bool, list))},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common(ap, "sst2-local", 500)
    ap.add_argument("--release-task", help="the release's dataset key (default: the ivlib task's template_task)")
    ap.add_argument("--runs", type=int, default=1, help="the release's run_num (default 1; its config says 5)")
    ap.add_argument("--epochs", type=int, help="calibration epochs (default: the release's 100; fewer for a smoke run)")
    ap.add_argument(
        "--tokenizer-class", default="GPT2TokenizerFast", help="class name the release sees ('' keeps the loaded one)"
    )
    ap.add_argument("--deps", help="folder holding the release's extra packages (peft), appended to sys.path")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(harness.positive("--threads", args.threads))
    root = harness.checkout(args.release, "run_i2cl.py", "LzVv123456/I2CL")
    harness.positive("--runs", args.runs)
    if args.epochs is not None:
        harness.positive("--epochs", args.epochs)
    if args.deps:
        sys.path.append(str(Path(args.deps).resolve()))
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UsageError(
            "peft is not importable; accepted: --deps DIR after `pip install --no-deps --target DIR peft==0.8.2`"
        ) from None
    task = harness.load_ivlib_task(args.task, args.config)
    key = release_key(task, args.release_task)
    _, field, reads = RELEASE_TASKS[key]
    rows = harness.query_rows(task, "test", args.queries, args.seed)

    def records(source: str) -> list[dict[str, Any]]:
        split, chosen = ("test", rows) if source == "queries" else (source, range(len(task.splits[source].texts)))
        return harness.rows_as_records(task, split, chosen, field, "label")

    data = {split: records(source) for split, source in reads.items()}
    context = harness.run_context()
    lm = harness.load_lm(args.model, args.config)
    summary = report(args, task, rows, run_release(root, args, lm, key, data))
    summary.update(
        context=context, seed=args.seed, model=args.model, release_path=str(root), tokenizer_class=args.tokenizer_class
    )
    summary["context"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    path = harness.write_summary(args.out, f"i2cl-{args.task}-seed{args.seed}", summary)
    for name, s in summary["summaries"].items():
        print(f"i2cl {name}: accuracy {harness.pct(s['accuracy'])}, macro-F1 {harness.pct(s['macro'])}, n={s['n']}")
    print(f"per-query answers: {path}")


if __name__ == "__main__":
    harness.guarded(main, "i2cl.py")
