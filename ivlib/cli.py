"""The command line: parse, validate everything cheap first, then run one method and record it.

This is the only module that knows the whole chain (config -> task -> episodes -> prompts ->
model -> method -> metrics -> results). Every user error becomes one line on stderr and exit 2,
raised before any record or vectors file is touched.
"""

from __future__ import annotations

import argparse
import math
import platform
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import REPO_DIR, load_config, lookup
from .episodes import check_shots, sample_episodes
from .errors import UsageError
from .methods import METHODS
from .metrics import bootstrap_accuracy, bootstrap_f1
from .models import load_model, resolve_device
from .prompts import PromptEncoder
from .results import append_record, check_writable, has_record, read_records, signals_held
from .scoring import Scorer
from .state import check_save_path, load_state, read_meta, save_state

AUTO_GPU_START = 256  # --batch-size auto on GPU: first try, halved on each out-of-memory error
AUTO_CPU = 16  # on CPU larger batches buy little and cost memory


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; accepted: a positive integer or 'auto'") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        print(f"iv.py: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="iv.py", description="Iterative Vectors and in-context learning baselines.")
    p.add_argument("-c", "--config", help="YAML registry merged over config/base.yaml")
    p.add_argument("-g", "--gpu", type=int, default=-1, help="GPU index; -1 (default) runs on CPU")
    p.add_argument("-m", "--model", required=True, help="model name from the registry")
    p.add_argument("-t", "--task", required=True, help="task name from the registry, e.g. ag_news, tweet_eval/emotion")
    p.add_argument("--method", choices=sorted(METHODS), default="iv", help="method to run (default: iv)")
    p.add_argument("--run-clean", action="store_true", help="same as --method icl (the reference code's name)")
    p.add_argument("--run-test", action="store_true", help="evaluate on test (default: validation)")
    p.add_argument("-s", "--ext-shot", type=int, default=4, help="extraction shots per class (default 4)")
    p.add_argument(
        "--strength",
        type=float,
        nargs="+",
        default=[0.5],
        help="evaluation strength a2 (default 0.5); several values share one extraction, one record each",
    )
    p.add_argument("--ext-strength", type=float, default=0.3, help="extraction strength a1 (default 0.3)")
    p.add_argument("--ext-batch", type=int, default=10, help="episodes between vector refreshes; 0 = no iteration")
    p.add_argument("-e", "--episodes", type=int, default=200, help="extraction episodes (default 200)")
    p.add_argument("--shot", type=int, default=1, help="evaluation shots per class (default 1)")
    p.add_argument("-n", "--eval-episodes", type=int, default=10_000, help="evaluation episodes (default 10000)")
    p.add_argument(
        "--select-episodes",
        type=int,
        default=200,
        help="validation episodes a method selects on (tv: its layer; default 200)",
    )
    p.add_argument(
        "--n-top-heads",
        type=int,
        help="fv: heads summed into the vector (default: the model entry's fv_heads, else about 2%% of all heads)",
    )
    p.add_argument("--ie-episodes", type=int, default=200, help="fv: shuffled-label trials for indirect effects")
    p.add_argument("--dt-steps", type=int, default=15, help="dt: most tuning steps T tried on validation (default 15)")
    p.add_argument("--dt-step", type=int, help="dt: use this T instead of choosing it on validation")
    p.add_argument("--dt-eta", type=float, default=0.01, help="dt: step size of the cache update (default 0.01)")
    p.add_argument("--dt-beta", type=float, default=0.9, help="dt: momentum (default 0.9)")
    p.add_argument(
        "--dt-positions",
        choices=["shifted", "pinned"],
        default="shifted",
        help="dt: positions of the re-encoded demonstrations: continue after them (shifted, "
        "the reference) or re-use theirs (pinned)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--batch-size",
        type=_batch_size,
        default=16,
        help="episodes per forward pass (default 16), or 'auto': on GPU start at "
        f"{AUTO_GPU_START} and halve on out-of-memory; on CPU {AUTO_CPU}",
    )
    p.add_argument("--max-example-tokens", type=int, default=256, help="truncate each example to this many tokens")
    p.add_argument("--no-half", action="store_true", help="float32 on GPU (default there: bf16/fp16)")
    p.add_argument(
        "--device-map",
        choices=["auto", "balanced", "balanced_low_0", "sequential"],
        help="spread the model over GPUs with accelerate",
    )
    p.add_argument("--mem-limit", help="per-GPU memory cap with --device-map, e.g. 20GiB")
    p.add_argument("--flash-attention", action="store_true", help="use flash_attention_2")
    p.add_argument("--results", default="results/runs.jsonl", help="JSONL file the run's record is appended to")
    p.add_argument("--save-vectors", metavar="PATH", help="save the fitted state (safetensors)")
    p.add_argument("--load-vectors", metavar="PATH", help="load a fitted state instead of fitting")
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip settings whose record is already in --results (an interrupted sweep picks up)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _validate(args: argparse.Namespace) -> None:
    for flag, value, low in (
        ("--episodes", args.episodes, 1),
        ("--eval-episodes", args.eval_episodes, 1),
        ("--select-episodes", args.select_episodes, 1),
        ("--ie-episodes", args.ie_episodes, 1),
        ("--n-top-heads", 1 if args.n_top_heads is None else args.n_top_heads, 1),
        ("--batch-size", 1 if args.batch_size == "auto" else args.batch_size, 1),
        ("--ext-batch", args.ext_batch, 0),
        ("--dt-steps", args.dt_steps, 1),
        ("--dt-step", 1 if args.dt_step is None else args.dt_step, 1),
        ("--shot", args.shot, 0),
        ("--max-example-tokens", args.max_example_tokens, 8),
    ):
        if value < low:
            raise UsageError(f"{flag} {value} is out of range; accepted: an integer >= {low}")
    if METHODS[args.method].needs_fit and args.ext_shot < 1:
        raise UsageError(f"--ext-shot {args.ext_shot} is out of range; accepted: an integer >= 1")
    if args.method == "dt" and args.shot < 1:
        raise UsageError(f"--shot {args.shot} leaves dt nothing to tune; accepted: --shot 1 or more with --method dt")
    for flag, value in (
        *(("--strength", a2) for a2 in args.strength),
        ("--ext-strength", args.ext_strength),
        ("--dt-eta", args.dt_eta),
        ("--dt-beta", args.dt_beta),
    ):
        if not math.isfinite(value):
            raise UsageError(f"{flag} {value} is not a finite number")
    if args.mem_limit and not args.device_map:
        raise UsageError("--mem-limit needs --device-map")
    if args.device_map and args.gpu < 0:
        raise UsageError("--device-map needs a GPU (-g 0 or higher)")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _versions() -> dict[str, str]:
    import datasets
    import torch
    import transformers

    return {
        "ivlib": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "numpy": np.__version__,
    }


def _silence_libraries() -> None:
    """--quiet: no progress bars or info chatter from datasets/transformers either."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _hyperparameters(args: argparse.Namespace, method, method_cls, eval_shot: int) -> dict[str, Any]:
    """Everything that defines a run's setting, known before any compute (what --resume matches)."""
    return {
        **method.hyperparameters(),
        "shot": eval_shot,
        "ext_shot": args.ext_shot if method_cls.needs_fit else None,
        "episodes": args.episodes if method_cls.needs_fit else None,
        **({"select_episodes": args.select_episodes} if method_cls.needs_validation else {}),
        "max_example_tokens": args.max_example_tokens,
    }


# Settings that define a fitted state: a loaded file's values are this run's, so that the record
# (and --resume, select, the report) names the setting the vectors were really fitted with.
FIT_FLAGS = {
    "ext_shot": "--ext-shot",
    "episodes": "--episodes",
    "ext_strength": "--ext-strength",
    "ext_batch": "--ext-batch",
    "n_top_heads": "--n-top-heads",
    "ie_episodes": "--ie-episodes",
    "select_episodes": "--select-episodes",
    "max_example_tokens": "--max-example-tokens",
}


def _adopt_fit_settings(args: argparse.Namespace) -> None:
    """Take the fitting settings of the --load-vectors file; refuse a flag given with another value."""
    meta = read_meta(args.load_vectors)
    if meta.get("method") != args.method:
        raise UsageError(
            f"--load-vectors '{args.load_vectors}' was fitted with method={meta.get('method')!r}; "
            f"this run has {args.method!r}"
        )
    fitted, defaults = meta.get("fit") or {}, build_parser()
    for key, flag in FIT_FLAGS.items():
        if key not in fitted or getattr(args, key) == fitted[key]:
            continue
        if getattr(args, key) != defaults.get_default(key):
            raise UsageError(
                f"--load-vectors '{args.load_vectors}' was fitted with {flag} {fitted[key]}; this command "
                f"gives {getattr(args, key)}; accepted: the same value, or leave {flag} out"
            )
        setattr(args, key, fitted[key])


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One fit, then one evaluation and one record per evaluation setting (several --strength values
    share one extraction). Returns the records written."""
    if args.quiet:
        _silence_libraries()
    if args.run_clean:
        args.method = "icl"
    _validate(args)
    config = load_config(args.config)
    model_entry = lookup(config.models, "model", args.model)
    task_entry = lookup(config.tasks, "task", args.task)
    check_writable(args.results)
    method_cls = METHODS[args.method]
    if len(args.strength) > 1 and not method_cls.uses_strength:
        users = ", ".join(name for name, cls in METHODS.items() if cls.uses_strength)
        raise UsageError(
            f"--strength takes several values only with a method that uses it ({users}); "
            f"method '{args.method}' got {len(args.strength)}"
        )
    for flag, value in (("--load-vectors", args.load_vectors), ("--save-vectors", args.save_vectors)):
        if value and not method_cls.needs_fit:
            fitted = ", ".join(name for name, cls in METHODS.items() if cls.needs_fit)
            raise UsageError(f"{flag}: method '{args.method}' has no fitted state; accepted with: {fitted}")
    if args.save_vectors:
        check_save_path(args.save_vectors)
    if args.load_vectors:
        _adopt_fit_settings(args)
    elif args.n_top_heads is None and "fv_heads" in model_entry:
        args.n_top_heads = int(model_entry["fv_heads"])
    eval_split = "test" if args.run_test else "validation"
    eval_shot = method_cls.fixed_eval_shot if method_cls.fixed_eval_shot is not None else args.shot
    methods = {a2: method_cls.from_args(argparse.Namespace(**{**vars(args), "strength": a2})) for a2 in args.strength}
    if args.resume:
        methods = _not_yet_recorded(args, methods, method_cls, eval_split, eval_shot)
        if not methods:
            print(
                f"{args.method} | {args.model} | {args.task} | {eval_split} | already in {args.results}; skipped (--resume)"
            )
            return []
    device = resolve_device(args.gpu)

    from .tasks import load_task

    task = load_task(args.task, task_entry)
    if task.multiple_choice and not method_cls.supports_multiple_choice:
        accepted = ", ".join(name for name, cls in METHODS.items() if cls.supports_multiple_choice)
        raise UsageError(
            f"--method {args.method} does not apply to multiple-choice task '{args.task}' "
            f"(it steers towards class labels); accepted: {accepted}"
        )
    check_shots(task.splits[eval_split], eval_split, task.n_classes, eval_shot, task.label_words, "--shot")
    fitting = (method_cls.needs_fit or method_cls.needs_validation) and not args.load_vectors
    if fitting:
        if method_cls.needs_fit:
            check_shots(task.splits["train"], "train", task.n_classes, args.ext_shot, task.label_words, "--ext-shot")
        if method_cls.needs_validation:
            check_shots(task.splits["validation"], "validation", task.n_classes, args.shot, task.label_words, "--shot")

    t0 = time.perf_counter()
    lm = load_model(
        args.model,
        model_entry,
        device,
        no_half=args.no_half,
        device_map=args.device_map,
        mem_limit=args.mem_limit,
        flash_attention=args.flash_attention,
        quiet=args.quiet,
    )
    load_s = time.perf_counter() - t0
    n_heads_total = lm.layout.n_layers * lm.layout.n_heads
    if args.n_top_heads is not None and args.n_top_heads > n_heads_total:
        raise UsageError(f"--n-top-heads {args.n_top_heads} exceeds the model's {n_heads_total} heads")
    encoder = PromptEncoder(lm.tokenizer, task.label_words, lm.add_bos, args.max_example_tokens)
    if not task.multiple_choice:
        encoder.check_label_collisions()
    auto = args.batch_size == "auto"
    start = (AUTO_GPU_START if device.type == "cuda" else AUTO_CPU) if auto else args.batch_size
    scorer = Scorer(lm, encoder.label_ids, start, args.quiet, shrink_on_oom=auto)
    identity = {
        "method": args.method,
        "model": args.model,
        "task": args.task,
        "label_words": task.label_words,
        "n_layers": lm.layout.n_layers,
        "d_model": lm.layout.d_model,
    }

    eval_episodes = sample_episodes(
        task.splits[eval_split], task.n_classes, eval_shot, args.eval_episodes, args.seed, f"{eval_split}/eval"
    )
    prompts = [encoder.encode(e) for e in eval_episodes]
    method = next(iter(methods.values()))  # fitted once; the others share its state
    method.check_prompts(scorer, prompts)  # before the fit: a run that cannot finish should not start
    fit_s, fit_info = 0.0, {}
    if args.load_vectors:
        tensors, meta = load_state(args.load_vectors, identity)
        method.load_state(tensors)
        fit_info = {"loaded_from": args.load_vectors, "fitted_with": meta.get("fit"), **method.fit_summary()}
    elif fitting:
        train_episodes = []
        if method_cls.needs_fit:
            train_episodes = sample_episodes(
                task.splits["train"], task.n_classes, args.ext_shot, args.episodes, args.seed, "train/extract"
            )
        select_episodes = None
        if method_cls.needs_validation:
            select_episodes = sample_episodes(
                task.splits["validation"],
                task.n_classes,
                args.shot,
                args.select_episodes,
                args.seed,
                "validation/select",
            )
        t0 = time.perf_counter()
        method.fit(scorer, encoder, train_episodes, select_episodes)
        fit_s = time.perf_counter() - t0
        fit_info = {
            **({"ext_shot": args.ext_shot, "episodes": args.episodes} if method_cls.needs_fit else {}),
            "seed": args.seed,
            "max_example_tokens": args.max_example_tokens,
            **{k: v for k, v in method.hyperparameters().items() if k != "strength"},
            **(
                {"select_episodes": args.select_episodes, "select_shot": args.shot}
                if method_cls.needs_validation
                else {}
            ),
            **method.fit_summary(),
        }
        if args.save_vectors:
            with signals_held():  # a small file: saved, and known to be saved, before an interrupt lands
                save_state(args.save_vectors, method.state(), {**identity, "fit": fit_info})
                args.progress["vectors"] = args.save_vectors
    if len(args.strength) > 1:
        fit_info["shared_by_strengths"] = sorted(methods)
    state = method.state() if len(methods) > 1 else {}
    for other in list(methods.values())[1:]:
        other.load_state(state)

    y_true = np.array([p.label for p in prompts])
    answer_names = [f"option_{i}" for i in range(task.n_classes)] if task.multiple_choice else task.label_words
    shared = {
        "model": args.model,
        "task": args.task,
        "split": eval_split,
        "method": args.method,
        "seed": args.seed,
        "n_eval_episodes": args.eval_episodes,
        "n_fit_episodes": args.episodes if fitting and method_cls.needs_fit else 0,  # DT fits on validation only
        "fit": fit_info,
        "batch_size_requested": args.batch_size,
        "device": str(device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device_map": args.device_map,
        "model_source": lm.source,
        "layout": lm.layout.describe(),
        "add_bos": lm.add_bos,
        "label_words": task.label_words,
        "task_kind": "multiple_choice" if task.multiple_choice else "classification",
        "task_provenance": task.provenance,
        "config_files": config.sources,
        "versions": _versions(),
        "git_commit": _git_commit(),
        "command": args.command,
    }
    records = []
    for each in methods.values():
        t0 = time.perf_counter()
        scores = scorer.runner.map(prompts, lambda b: each.predict(scorer, b), f"{args.method} eval ({eval_split})")
        eval_s = time.perf_counter() - t0
        y_pred = Scorer.predictions(scores, prompts)
        if task.multiple_choice:  # length-normalised (per token) is the headline; the raw sum beside it
            metrics = {
                "accuracy": bootstrap_accuracy(y_true, y_pred, seed=args.seed),
                "accuracy_sum": bootstrap_accuracy(y_true, scores.argmax(dim=-1).numpy(), seed=args.seed),
            }
        else:
            metrics = bootstrap_f1(y_true, y_pred, task.n_classes, seed=args.seed)
        record = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            **shared,
            "hyperparameters": _hyperparameters(args, each, method_cls, eval_shot),
            "metrics": metrics,
            # a method that collapses onto one answer shows here first
            "predicted_fraction": dict(
                zip(answer_names, np.round(np.bincount(y_pred, minlength=len(answer_names)) / len(y_pred), 4).tolist())
            ),
            "timing_s": {"load": round(load_s, 3), "fit": round(fit_s, 3), "eval": round(eval_s, 3)},
            "eval_episodes_per_s": round(args.eval_episodes / eval_s, 3) if eval_s > 0 else None,
            "batch_size": scorer.runner.batch_size,  # after any out-of-memory halving
        }
        with signals_held():  # the interrupt message counts exactly the records in the file
            append_record(args.results, record)  # each setting lands as soon as it is done
            args.progress["records"] += 1
        records.append(record)
        label = args.method + (f" a2={each.strength}" if len(args.strength) > 1 else "")
        # the summary line prints even with --quiet, which silences progress bars only
        print(
            f"{label} | {args.model} | {args.task} | {eval_split} | {args.eval_episodes} episodes | "
            f"{_metric_summary(metrics)} | fit {fit_s:.1f}s | eval {eval_s:.1f}s | -> {args.results}",
            flush=True,
        )
    return records


def _not_yet_recorded(args: argparse.Namespace, methods: dict, method_cls, split: str, eval_shot: int) -> dict:
    """The evaluation settings whose record is not in the results file yet."""
    if not Path(args.results).is_file():
        return methods
    records, _ = read_records(args.results)
    return {
        a2: m
        for a2, m in methods.items()
        if not has_record(
            records,
            args.model,
            args.task,
            args.method,
            split,
            _hyperparameters(args, m, method_cls, eval_shot),
            args.seed,
            args.eval_episodes,
        )
    }


def _metric_summary(metrics: dict[str, dict[str, float]]) -> str:
    name = "macro" if "macro" in metrics else next(iter(metrics))
    m = metrics[name]
    rest = [(k, v) for k, v in metrics.items() if k != name]
    label = "macro-F1" if name == "macro" else name
    return " | ".join(
        [f"{label} {m['value']:.4f} [{m['ci_low']:.4f}, {m['ci_high']:.4f}]"]
        + [f"{k} {v['value']:.4f}" for k, v in rest]
    )


SUBCOMMANDS = ("select", "report")  # read results files; no model involved


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        from .analyze import main as analyze_main

        return analyze_main(argv)
    args = build_parser().parse_args(argv)
    args.command = argv
    args.progress = {"records": 0, "vectors": None}  # what is safely on disk, for the interrupt message
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (embedded use): leave signals alone
        previous = None
    try:
        run(args)
    except UsageError as exc:
        print(f"iv.py: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        saved = (
            f"; vectors saved to {args.progress['vectors']}"
            if args.progress["vectors"]
            else "; no vectors file written"
            if args.save_vectors
            else ""
        )
        print(
            f"iv.py: interrupted ({'SIGTERM' if isinstance(exc, Terminated) else 'SIGINT'}); "
            f"{args.progress['records']} record(s) of this run written to {args.results}{saved}; "
            "rerun with --resume to finish",
            file=sys.stderr,
        )
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


class Terminated(Exception):
    """SIGTERM as an exception, so a killed sweep unwinds like Ctrl-C: files closed, message printed."""


def _terminate(signum, frame) -> None:
    raise Terminated()
