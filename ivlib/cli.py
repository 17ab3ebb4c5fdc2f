"""The command line: flags -> a `RunSpec`, the `Experiment` runs it, the CLI prints.

The method flags are not written here: every registered method's declared settings become flags
(grouped per method), and the protocol's settings likewise, so a new method file gets its flags,
checks and help without an edit here. Every user error is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import distributed as dist
from . import presets
from .batching import NonFinite
from .errors import Parser, Terminated, UsageError, program, terminate
from .experiment import Experiment
from .methods import METHODS
from .presets import PRESETS
from .runspec import PROTOCOL, RunSpec
from .settings import Setting
from .threads import THREADS

if TYPE_CHECKING:
    import torch

ANALYSIS = ("select", "report")  # read results files; no model involved
SUBCOMMANDS = (*ANALYSIS, "methods")
EPILOG = """subcommands (no model is loaded):
  iv.py select --results FILE [--metric macro] [--commands -n N]   best validation setting per method
  iv.py report --results FILE --out DIR                            tables and plots
  iv.py methods                                                    the registered methods, one per line
"""


def _help(setting: Setting) -> str:
    default = (
        ("" if "default" in setting.help else " (default: none)")
        if setting.default is None
        else f" (default: {setting.default:,})"
        if isinstance(setting.default, int)
        else f" (default: {setting.default})"
    )
    accepted = f"; one of {', '.join(setting.choices)}" if setting.choices else ""
    return (setting.help + accepted + default).replace("%", "%%")


def _add_setting(group: Any, setting: Setting) -> None:
    """A flag whose value the setting itself checks (so the CLI and the Python API refuse alike);
    default None means "not given", which --load-vectors needs to tell a conflict from a default."""
    names = [setting.short, setting.flag] if setting.short else [setting.flag]
    group.add_argument(
        *names,
        dest=setting.name,
        default=None,
        metavar=setting.name.upper(),
        help=_help(setting),
        nargs="+" if setting.many else None,
    )


def invocation() -> list[str]:
    """How this run was started, as the record's `command` begins, so the command can be pasted:
    `ivlib` (console script) or `python iv.py` (the script as given, else `iv.py`)."""
    if program() == "ivlib":
        return ["ivlib"]
    script = sys.argv[0] if sys.argv and Path(sys.argv[0]).name == "iv.py" else "iv.py"
    return ["python", script]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=program(),
        description="Iterative Vectors and the in-context learning methods it is compared with, "
        "on the same seeded episodes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-c",
        "--config",
        action="append",
        help="YAML registry merged over the built-in one, ivlib/base.yaml; repeat it to merge several in order, "
        "later files replacing earlier entries of the same name (default: none, the built-in one alone)",
    )
    p.add_argument("-g", "--gpu", type=int, default=-1, help="GPU index; -1 (default) runs on CPU")
    p.add_argument("-m", "--model", required=True, help="model name from the registry (required)")
    p.add_argument(
        "-t", "--task", required=True, help="task name from the registry, e.g. ag_news, tweet_eval/emotion (required)"
    )
    p.add_argument("--method", choices=list(METHODS), help="method to run (default: iv)")
    p.add_argument(
        "--run-clean", action="store_true", help="same as --method icl, the reference code's name (default: off)"
    )
    p.add_argument("--run-test", action="store_true", help="evaluate on test (default: validation)")
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="a release's own protocol (template, scoring rule, demonstrations, test size, seed, its method's "
        "settings); flags given win, each override said in one line (default: none)",
    )
    protocol = p.add_argument_group("protocol (every method)")
    for setting in PROTOCOL:
        _add_setting(protocol, setting)
    _add_method_settings(p)
    _add_files(p.add_argument_group("model, device and files"))
    return p


def _add_method_settings(p: argparse.ArgumentParser) -> None:
    """One group per method, in the registry's order: the settings it declares first (a setting
    several methods share is listed under the first)."""
    seen: set[str] = set()
    for name, cls in METHODS.items():
        own = [s for s in cls.declared_settings() if s.name not in seen]
        if own:
            group = p.add_argument_group(f"{name} settings")
            for setting in own:
                _add_setting(group, setting)
                seen.add(setting.name)


def _add_files(run: argparse._ArgumentGroup) -> None:
    run.add_argument(
        "--no-half",
        action="store_true",
        help="float32 on GPU (default: off, i.e. bf16 there, or fp16 without bf16 support)",
    )
    run.add_argument(
        "--device-map",
        choices=["auto", "balanced", "balanced_low_0", "sequential"],
        help="spread the model over GPUs with accelerate (default: none, one device)",
    )
    run.add_argument("--mem-limit", help="per-GPU memory cap with --device-map, e.g. 20GiB (default: none)")
    run.add_argument("--flash-attention", action="store_true", help="use flash_attention_2 (default: off)")
    _add_setting(run, THREADS)
    run.add_argument(
        "--results",
        default="results/runs.jsonl",
        help="JSONL file the run's records are appended to (default: results/runs.jsonl)",
    )
    run.add_argument("--save-vectors", metavar="PATH", help="save the fitted state as safetensors (default: none)")
    run.add_argument(
        "--load-vectors",
        metavar="PATH",
        help="load a fitted state instead of fitting; its fitting settings are adopted (default: none)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="skip settings whose record is already in --results, so an interrupted sweep picks up (default: off)",
    )
    run.add_argument(
        "--log-samples",
        action="store_true",
        help="also write one JSONL line per evaluation episode (query and demonstration rows, gold, prediction, "
        "every label's score) beside --results (runs.jsonl -> runs.samples/); the record holds its path and "
        "sha256 (default: off)",
    )
    run.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars or library messages; the summary line and the one-time model conversion notice still print (default: off)",
    )


def spec_from_args(args: argparse.Namespace, argv: list[str]) -> RunSpec:
    """Only what was given goes into the spec; the rest takes the spec's and the method's defaults."""
    method = args.method or "iv"
    if args.run_clean:
        if args.method not in (None, "icl"):
            raise UsageError(
                f"--run-clean means --method icl; this command also gives --method {args.method}; "
                "accepted: one of the two"
            )
        method = "icl"
    protocol = {s.name: s.check(getattr(args, s.name)) for s in PROTOCOL if getattr(args, s.name) is not None}
    names = {s.name for cls in METHODS.values() for s in cls.declared_settings()}
    settings = {n: getattr(args, n) for n in sorted(names) if getattr(args, n) is not None}
    preset = None
    if args.preset:
        protocol, settings, preset = with_preset(args.preset, method, protocol, settings)
    return RunSpec(
        model=args.model,
        task=args.task,
        method=method,
        settings=settings,
        config=args.config,
        split="test" if args.run_test else "validation",
        **protocol,
        gpu=args.gpu,
        no_half=args.no_half,
        device_map=args.device_map,
        mem_limit=args.mem_limit,
        flash_attention=args.flash_attention,
        threads=THREADS.check(args.threads),
        results=args.results,
        save_vectors=args.save_vectors,
        load_vectors=args.load_vectors,
        resume=args.resume,
        quiet=args.quiet,
        log_samples=args.log_samples,
        command=[*invocation(), *argv],
        preset=preset,
    )


def with_preset(
    name: str, method: str, protocol: dict[str, Any], settings: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The preset's values under the flags given; each given value that overrides it said in one line
    (main process) and recorded: (protocol values, method settings, the record's `preset`)."""
    preset = presets.get(name)
    own = presets.values(preset, method)
    merged, overridden = presets.apply(preset, method, {**protocol, **_checked(settings)})
    if dist.is_main():
        for key, value in overridden.items():
            flag = "--" + key.replace("_", "-")
            print(f"{program()}: note: {flag} {value} overrides preset {name}'s {own[key]}", file=sys.stderr)
    record = {"name": name, "seeds": list(preset.seeds), **({"overridden": overridden} if overridden else {})}
    run_names = {s.name for s in PROTOCOL}
    return (
        {k: v for k, v in merged.items() if k in run_names},
        {k: v for k, v in merged.items() if k not in run_names},
        record,
    )


def _checked(settings: dict[str, Any]) -> dict[str, Any]:
    """Method settings as their declarations read them ('3' -> 3; one value of several -> that value),
    so a flag equal to a preset's value is not called an override."""
    declared = {s.name: s for cls in METHODS.values() for s in cls.declared_settings()}
    out = {}
    for name, value in settings.items():
        values = value if isinstance(value, list) else [value]
        checked = [declared[name].check(v) for v in values] if name in declared else values
        out[name] = checked[0] if len(checked) == 1 and not isinstance(value, list) else checked
    return out


def summary_line(experiment: Experiment, record: dict[str, Any]) -> str:
    """One line per record; numbers shown to people are percent with one decimal (records keep fractions)."""
    spec, loaded, sampled = experiment.spec, experiment.loaded, experiment.sampled
    shown = loaded is not None and sampled is not None and not loaded.task.multiple_choice
    labels = [p.label for p in sampled.prompts] if shown and sampled is not None else []
    fit_s = experiment.fitted.seconds if experiment.fitted is not None else 0.0
    warning = collapse_warning(record.get("predicted_fraction") or {}, labels)
    dropped = (record.get("task_provenance") or {}).get("dropped_unlabelled") or {}
    if dropped:  # rows the data gave no label (-1, a hidden test answer): the run is on fewer rows than the file
        note = ", ".join(f"{n} {role}" for role, n in dropped.items())
        warning = "; ".join(w for w in (warning, f"rows without a label dropped: {note} (task_provenance)") if w)
    return (
        f"{experiment.label(record)} | {spec.model} | {spec.task} | {spec.split} | {spec.eval_episodes} episodes | "
        f"{_metric_summary(record['metrics'])} | fit {fit_s:.1f}s | "
        f"eval {record['timing_s']['eval']:.1f}s | -> {spec.results}" + (f" | {warning}" if warning else "")
    )


COLLAPSE_SHARE = 0.8  # one answer taking more than this share of the predictions...
BALANCED_RATIO = 1.5  # ...while no true class exceeds this multiple of its even share


def collapse_warning(predicted_fraction: dict[str, float], true_labels: list[int]) -> str | None:
    """A warning when one class takes most predictions although the true classes are balanced: a
    setting (e.g. an IV strength tuned for another task) that pushes everything onto one label scores
    near chance with no error; the record's `predicted_fraction` shows it, this line says it."""
    n = len(predicted_fraction)
    if n < 2 or not true_labels:
        return None
    counts = [0] * n
    for y in true_labels:
        if 0 <= y < n:
            counts[y] += 1
    if max(counts) > BALANCED_RATIO * sum(counts) / n:
        return None  # unbalanced truth: a dominant prediction may be right
    name, share = max(predicted_fraction.items(), key=lambda kv: kv[1])
    if share <= COLLAPSE_SHARE:
        return None
    return f"warning: {100 * share:.1f}% of predictions '{name}', true classes balanced (README: Troubleshooting)"


def leak_warning(task: str, record: dict[str, Any]) -> str | None:
    """One line when the task's splits share texts (`task_provenance.cross_split_duplicates`): an
    evaluation example also seen in training measures memory, not in-context learning."""
    found = (record.get("task_provenance") or {}).get("cross_split_duplicates") or {}
    if not found:
        return None
    pairs = ", ".join(f"{n} {pair.split('/')[1]} row(s) also in {pair.split('/')[0]}" for pair, n in found.items())
    return f"warning: task '{task}' has texts in two splits: {pairs} (task_provenance.cross_split_duplicates)"


def _metric_summary(metrics: dict[str, dict[str, float]]) -> str:
    name = "macro" if "macro" in metrics else next(iter(metrics))
    m = metrics[name]
    rest = [(k, v) for k, v in metrics.items() if k != name]
    label = "macro-F1" if name == "macro" else name
    return " | ".join(
        [f"{label} {pct(m['value'])} [{pct(m['ci_low'])}, {pct(m['ci_high'])}]"]
        + [f"{k} {pct(v['value'])}" for k, v in rest]
    )


def pct(fraction: float) -> str:
    """The one scale of human-facing numbers: percent, one decimal (0.7127 -> 71.3)."""
    return f"{100 * fraction:.1f}"


def run(spec: RunSpec, experiment: Experiment | None = None) -> list[dict[str, Any]]:
    """Run a spec, printing one summary line per record as it lands (even with --quiet, which
    silences progress bars only)."""
    experiment = experiment or Experiment(spec)
    warned: list[str] = []

    def report(record: dict[str, Any]) -> None:
        if dist.is_main():  # several processes: the main one speaks for the run
            leak = leak_warning(spec.task, record)
            if leak and not warned:  # a property of the task: said once per run, not per record
                warned.append(leak)
                print(leak, file=sys.stderr, flush=True)
            print(summary_line(experiment, record), flush=True)

    records = experiment.run(on_record=report)
    if not experiment.pending and dist.is_main():
        print(
            f"{spec.method} | {spec.model} | {spec.task} | {spec.split} | already in {spec.results}; skipped (--resume)"
        )
    return records


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ANALYSIS:
        from .analyze import main as analyze_main

        return analyze_main(argv)
    if argv and argv[0] == "methods":
        return list_methods(argv[1:])
    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (embedded use): leave signals alone
        previous = None
    try:
        return _run_command(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def list_methods(args: list[str]) -> int:
    """`iv.py methods`: every registered method, one a line; `--with-state`: those with a fitted state to
    save (what scripts.sh gives --save-vectors, so its test step loads the fit instead of refitting)."""
    if args not in ([], ["--with-state"]):
        print(f"iv.py: error: methods takes {' '.join(args)!r}; accepted: nothing, or --with-state", file=sys.stderr)
        return 2
    print("\n".join(name for name, cls in METHODS.items() if cls.has_state or not args))
    return 0


def _run_command(argv: list[str]) -> int:
    """A run from its flags; every way it can end as its exit code (a crash alone raises)."""
    experiment: Experiment | None = None
    try:
        spec = spec_from_args(build_parser().parse_args(argv), argv)
        experiment = Experiment(spec)
        run(spec, experiment)
        dist.finish(lambda: _process_device(experiment))
    except UsageError as exc:
        return _usage_failed(exc, experiment)
    except dist.RunFailed as exc:  # several processes, one of them failed: every process raises it together
        return _run_failed(exc, experiment)
    except (KeyboardInterrupt, Terminated) as exc:
        if dist.is_main():
            print(_interrupted(experiment, isinstance(exc, Terminated)), file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:  # a crash: its traceback here, and with several processes its line from rank 0
        if experiment is None or not dist.active():
            raise
        return _crashed(exc, experiment)
    return 0


def _usage_failed(exc: UsageError, experiment: Experiment | None) -> int:
    """One process: one line; several: this process's error joins the others', one line from rank 0."""
    if isinstance(exc, NonFinite) and experiment is not None:  # the advice names this method's settings
        exc = exc.advised(experiment.method_cls.scaling_flags())
    if experiment is not None and dist.active():
        try:
            dist.fail_together(exc, lambda: _process_device(experiment))
        except dist.RunFailed as failed:
            return _run_failed(failed, experiment)
    if dist.is_main():  # the flags themselves (the same on every process): printed once
        print(f"{program()}: error: {exc}", file=sys.stderr)
    return 2


def _crashed(exc: Exception, experiment: Experiment) -> int:
    """A crash of one of several processes: its traceback, then every process's one line from rank 0."""
    traceback.print_exc()
    try:
        dist.fail_together(exc, lambda: _process_device(experiment))
    except dist.RunFailed as failed:
        return _run_failed(failed, experiment)
    raise exc


def _run_failed(exc: dist.RunFailed, experiment: Experiment | None) -> int:
    """Every process raised `RunFailed` from one exchange: the main one prints its line, all wait for it."""
    if dist.is_main():
        print(f"{program()}: error: {exc}; {_written(experiment)}", file=sys.stderr, flush=True)
    dist.settle()
    return 2 if exc.usage else 1


def _process_device(experiment: Experiment) -> torch.device:
    """This process's device (whose backend the process group uses), also before `load` chose it."""
    from .models import resolve_device

    if experiment.loaded is not None:
        return experiment.loaded.device
    return resolve_device(dist.gpu_index(experiment.spec.gpu))


def _written(experiment: Experiment | None) -> str:
    """What a failed data-parallel run left on disk: whole records and files only."""
    if experiment is None or not (experiment.progress.records or experiment.progress.vectors):
        return "nothing of this run written"
    spec, progress = experiment.spec, experiment.progress
    saved = f"; vectors saved to {progress.vectors}" if progress.vectors else ""
    return f"{progress.records} record(s) of this run written to {spec.results}{saved}; rerun with --resume to finish"


def _interrupted(experiment: Experiment | None, terminated: bool) -> str:
    """What is on disk, from the experiment's progress (nothing, if it was interrupted before it began)."""
    name = "SIGTERM" if terminated else "SIGINT"
    if terminated and dist.active():  # torchrun stops every process as soon as one of them dies
        name += ", from the launcher: another process of this run died, or the run was cancelled"
    if experiment is None:
        return f"iv.py: interrupted ({name}) before the run started; nothing written"
    spec, progress = experiment.spec, experiment.progress
    saved = (
        f"; vectors saved to {progress.vectors}"
        if progress.vectors
        else "; no vectors file written"
        if spec.save_vectors
        else ""
    )
    return (
        f"iv.py: interrupted ({name}); {progress.records} record(s) of this run written to {spec.results}{saved}; "
        "rerun with --resume to finish"
    )
