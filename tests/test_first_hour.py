"""A newcomer's first hour (issue 15), the CLI's output: a collapsed prediction distribution is
flagged on the run's line; numbers are percent; every flag has a help text and its default; the
record's command can be pasted. (Loading: tests/test_offline_and_data_dir.py.)"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from ivlib.cli import build_parser, collapse_warning, main

REPO = Path(__file__).resolve().parent.parent


# ---- a collapsed prediction distribution is flagged --------------------------------------------


def test_collapse_warning_on_balanced_truth_only():
    balanced = [0] * 50 + [1] * 50
    warning = collapse_warning({"negative": 0.18, "positive": 0.82}, balanced)
    assert warning is not None and warning.startswith("warning: 82.0% of predictions 'positive'")
    assert collapse_warning({"negative": 0.3, "positive": 0.7}, balanced) is None  # not above 80%
    # the truth itself is skewed (90% positive, above 1.5x its share): predicting it mostly is fine
    assert collapse_warning({"negative": 0.1, "positive": 0.9}, [0] * 10 + [1] * 90) is None
    # three classes, balanced within 1.5x of a third each
    assert collapse_warning({"a": 0.85, "b": 0.1, "c": 0.05}, [0] * 40 + [1] * 30 + [2] * 30) is not None


def test_summary_line_warns_on_the_same_line(tmp_path, monkeypatch, capsys):
    """An IV strength far too large pushes the tiny model onto one label: the run line says so."""
    monkeypatch.chdir(REPO)
    from ivlib import cli

    calls = []
    real = cli.collapse_warning

    def spy(predicted, labels):
        calls.append((predicted, labels))
        return real({"bad": 0.0, "good": 1.0}, labels)  # the crafted case: every prediction 'good'

    monkeypatch.setattr(cli, "collapse_warning", spy)
    argv = ["-c", "config/tiny.yaml", "-m", "tiny-gpt2", "-t", "review_sentiment", "--method", "zero-shot"]
    assert main([*argv, "-n", "20", "--quiet", "--results", str(tmp_path / "r.jsonl")]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.endswith("| warning: 100.0% of predictions 'good', true classes balanced (README: Troubleshooting)")
    predicted, labels = calls[0]
    record = json.loads((tmp_path / "r.jsonl").read_text())
    assert predicted == record["predicted_fraction"] and len(labels) == 20


# ---- one scale for numbers -----------------------------------------------------------------------


def test_run_line_prints_percent_with_one_decimal(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    argv = ["-c", "config/tiny.yaml", "-m", "tiny-gpt2", "-t", "review_sentiment", "--method", "zero-shot"]
    assert main([*argv, "-n", "20", "--quiet", "--results", str(tmp_path / "r.jsonl")]) == 0
    line = capsys.readouterr().out
    macro = json.loads((tmp_path / "r.jsonl").read_text())["metrics"]["macro"]
    assert f"macro-F1 {100 * macro['value']:.1f} [{100 * macro['ci_low']:.1f}, {100 * macro['ci_high']:.1f}]" in line


# ---- --help ---------------------------------------------------------------------------------------


def test_every_option_has_a_help_text():
    parser = build_parser()
    missing = [a.option_strings for a in parser._actions if a.option_strings and not (a.help or "").strip()]
    assert missing == []
    from ivlib.analyze import build_parser as analysis_parser

    for sub in analysis_parser()._subparsers._group_actions[0].choices.values():  # select, report
        assert sub.description
        options = {a.option_strings[-1]: a.help or "" for a in sub._actions if a.option_strings}
        options.pop("--help")
        assert [f for f, h in options.items() if "default" not in h and "required" not in h] == []


def test_every_option_states_its_default():
    helps = {
        a.option_strings[-1]: a.help for a in build_parser()._actions if a.option_strings and a.help != "==SUPPRESS=="
    }
    helps.pop("--help")
    assert [f for f, h in helps.items() if "default" not in h and "required" not in h] == []


def test_help_lists_subcommands_and_defaults(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps at the terminal's width
    for sub in ("select", "report", "methods"):
        assert f"iv.py {sub}" in text
    for default in ("(default: 4)", "(default: 0.3)", "(default: results/runs.jsonl)", "(default: 42)"):
        assert default in text


# ---- the record's command can be pasted -----------------------------------------------------------


def test_record_command_starts_with_the_program(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["-c", "config/tiny.yaml", "-m", "tiny-gpt2", "-t", "review_sentiment", "--method", "zero-shot", "-n", "8"]
    argv += ["--quiet", "--results", str(tmp_path / "r.jsonl")]
    assert main(argv) == 0
    command = json.loads((tmp_path / "r.jsonl").read_text())["command"]
    assert command == ["python", "iv.py", *argv]
    assert shlex.split(shlex.join(command))[2:] == argv
