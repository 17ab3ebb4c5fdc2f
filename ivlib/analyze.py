"""`iv.py select` and `iv.py report`: read a results file, never run a model.

User errors print one line, `iv.py: error: ...; accepted: ...`, and return 2, like the runner,
so a sweep script can tell a wrong command from a crash.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import Parser, UsageError
from .selection import METRICS, Choice, check_metric, load_records, make_test_command, select_best

SUBCOMMANDS = ("select", "report")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="iv.py", description="Analyse a results file written by iv.py runs.")
    sub = p.add_subparsers(dest="subcommand", metavar="{select,report}")
    metric_help = (
        f"metric to rank and report by: {', '.join(METRICS)} (default macro; records without it fall back to accuracy)"
    )

    s = sub.add_parser(
        "select",
        help="best validation setting per model/task/method",
        description="Print each (model, task, method)'s best validation setting (ties: the higher interval "
        "lower bound, then the setting's sorted JSON), and with --commands the command that re-runs it on test.",
    )
    s.add_argument("--results", required=True, metavar="PATH", help="JSONL results file to read (required)")
    s.add_argument("--metric", default="macro", metavar="NAME", help=metric_help)
    s.add_argument(
        "--commands", action="store_true", help="also print the test command of each best setting (default: off)"
    )
    s.add_argument(
        "--results-out", metavar="PATH", help="--results of the printed test commands (default: the input file)"
    )
    s.add_argument(
        "-n",
        "--eval-episodes",
        type=int,
        metavar="N",
        help="-n of the printed test commands (default: none, i.e. iv.py's own default)",
    )

    s.add_argument(
        "--model",
        nargs="+",
        metavar="NAME",
        help="only these models' choices (default: every model in the file); a sweep's test step passes its MODELS",
    )
    s.add_argument(
        "--task",
        nargs="+",
        metavar="NAME",
        help="only these tasks' choices (default: every task in the file); a sweep's test step passes its TASKS",
    )
    s.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="with --commands: each test command from seed S's run of the chosen setting (settings run with "
        "several seeds are chosen by their mean; default: the latest run's)",
    )

    r = sub.add_parser(
        "report",
        help="comparison table (markdown, CSV) and plots",
        description="Write the test values of each method's validation-chosen setting as table.md and table.csv, "
        "a heatmap of each validation grid and a bar chart per model, into --out.",
    )
    r.add_argument("--results", required=True, metavar="PATH", help="JSONL results file to read (required)")
    r.add_argument("--out", default="report", metavar="DIR", help="directory for the files (default: report/)")
    r.add_argument("--metric", default="macro", metavar="NAME", help=metric_help)
    return p


def _interval(choice: Choice) -> str:
    b = choice.best
    ci = f" [{100 * b.ci_low:.1f}, {100 * b.ci_high:.1f}]" if b.ci_low is not None and b.ci_high is not None else ""
    seeds = f" (mean of {choice.n_seeds} seeds)" if choice.n_seeds > 1 else ""
    return f"{b.metric} {100 * b.value:.1f}{ci}{seeds}"


def _wanted(choices: list[Choice], models: list[str] | None, tasks: list[str] | None) -> list[Choice]:
    """The choices of the models and tasks asked for: two sweeps sharing one results file (one per model,
    running side by side) each test only their own, never the other's choice made on half its grid."""
    return [
        c for c in choices if (models is None or c.best.model in models) and (tasks is None or c.best.task in tasks)
    ]


def run_select(args: argparse.Namespace) -> int:
    check_metric(args.metric)
    if args.eval_episodes is not None and args.eval_episodes < 1:
        raise UsageError(f"-n {args.eval_episodes} is out of range; accepted: an integer >= 1")
    records = load_records(args.results)
    choices = _wanted(select_best(records, args.metric), args.model, args.task)
    if not choices:
        wanted = "".join(f" {flag} {' '.join(v)}" for flag, v in (("--model", args.model), ("--task", args.task)) if v)
        raise UsageError(
            f"--results '{args.results}' has no validation records{wanted and ' of' + wanted} to select from; "
            "accepted: a file with runs made without --run-test" + (wanted and " of those models and tasks")
        )
    for c in choices:
        b = c.best
        print(f"{b.model} | {b.task} | {b.method} | {_interval(c)} | best of {c.n_settings} setting(s) | {b.setting}")
    if args.commands:
        print()
        target = args.results_out or args.results
        for c in choices:
            run = c.best if args.seed is None else c.run_for_seed(args.seed)
            if run is None:
                print(
                    f"warning: {c.best.model}/{c.best.task}/{c.best.method}: no validation run of the chosen "
                    f"setting with --seed {args.seed}; no test command",
                    file=sys.stderr,
                )
                continue
            line = make_test_command(run.record, target, args.eval_episodes)
            if line is None:
                print(
                    f"warning: {c.best.model}/{c.best.task}/{c.best.method}: the record has no 'command'; "
                    "no test command",
                    file=sys.stderr,
                )
            else:
                print(line)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from .report import write_report  # only here: it is the part that needs matplotlib

    check_metric(args.metric)
    records = load_records(args.results)
    for path in write_report(records, args.out, args.metric, base=Path(args.results).parent):
        print(path)
    return 0


def main(argv: list[str]) -> int:
    """argv[0] is the subcommand: `python iv.py select ...` passes sys.argv[1:] here."""
    try:
        if not argv or argv[0] not in SUBCOMMANDS + ("-h", "--help"):
            what = f"unknown subcommand '{argv[0]}'" if argv else "missing subcommand"
            raise UsageError(f"{what}; accepted: {', '.join(SUBCOMMANDS)}")
        args = build_parser().parse_args(argv)
        return run_select(args) if args.subcommand == "select" else run_report(args)
    except UsageError as exc:
        print(f"iv.py: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
