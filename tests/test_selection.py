"""Selection on validation from a crafted results file: ties, re-runs, bad lines, test commands."""

from __future__ import annotations

import json
import shlex

import pytest

from ivlib import analyze
from ivlib.errors import UsageError
from ivlib.results import canonical, has_record
from ivlib.selection import load_records, make_test_command, select_best, strip_eval_flags

MODEL, TASK = "smollm2-135m", "rotten_tomatoes-local"


def iv_hp(strength: float, ext_strength: float = 0.3) -> dict:
    return {
        "strength": strength,
        "ext_strength": ext_strength,
        "ext_batch": 10,
        "shot": 1,
        "ext_shot": 4,
        "episodes": 200,
        "max_example_tokens": 256,
    }


def rec(
    method: str,
    hp: dict,
    value: float,
    ci_low: float,
    split: str = "validation",
    time: str = "2026-11-24T17:00:00+00:00",
    task: str = TASK,
    metrics: dict | None = None,
) -> dict:
    command = [
        "-c",
        "config/local.yaml",
        "-m",
        MODEL,
        "-t",
        task,
        "--method",
        method,
        "-s",
        "4",
        "--strength",
        str(hp.get("strength", 0.5)),
        "-n",
        "200",
        "--quiet",
        "--results",
        "old/runs.jsonl",
        "--load-vectors",
        "vec.safetensors",
    ]
    return {
        "method": method,
        "model": MODEL,
        "task": task,
        "split": split,
        "hyperparameters": hp,
        "seed": 42,
        "n_eval_episodes": 200,
        "metrics": metrics
        or {
            "macro": {"value": value, "ci_low": ci_low, "ci_high": value + 0.05},
            "micro": {"value": value + 0.01, "ci_low": ci_low, "ci_high": value + 0.06},
        },
        "command": command,
        "time": time,
    }


def crafted_lines() -> list[str]:
    """Line numbers matter: the corrupt line is 4 and the record without metrics is 6."""
    icl_hp = {"shot": 1, "ext_shot": None, "episodes": None, "max_example_tokens": 256}
    no_metrics = rec("iv", iv_hp(0.1), 0.99, 0.9)
    del no_metrics["metrics"]
    records = [
        rec("iv", iv_hp(0.5), 0.60, 0.50),  # 1: tie on value ...
        rec("iv", iv_hp(0.3), 0.60, 0.55),  # 2: ... won by ci_low
        rec("iv", iv_hp(0.7), 0.90, 0.85, time="2026-11-24T10:00:00+00:00"),  # 3: superseded by line 7
        None,  # 4: corrupt
        rec("iv", iv_hp(0.9), 0.99, 0.98, split="test"),  # 5: test: never selected
        no_metrics,  # 6: skipped with warning
        rec("iv", iv_hp(0.7), 0.40, 0.35, time="2026-11-24T12:00:00+00:00"),  # 7: the re-run wins
        rec("icl", icl_hp, 0.55, 0.45),  # 8
        rec("icl", {**icl_hp, "shot": 2}, 0.58, 0.40),  # 9: best icl
        rec("tv", {"layer": 3, "shot": 1}, 0.50, 0.40),  # 10: exact tie with 11 ...
        rec("tv", {"layer": 2, "shot": 1}, 0.50, 0.40),  # 11: ... alphabetically first wins
        rec(
            "icl", icl_hp, 0.0, 0.0, task="mc-task", metrics={"accuracy": {"value": 0.7, "ci_low": 0.6, "ci_high": 0.8}}
        ),  # 12: accuracy fallback
    ]
    return ['{"method": "iv", "model": "cut off' if r is None else json.dumps(r) for r in records]


@pytest.fixture()
def results(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(crafted_lines()) + "\n")
    return path


def best_by_method(path) -> dict:
    return {c.key: c for c in select_best(load_records(path))}


def test_select_picks_the_known_best(results, capsys):
    best = best_by_method(results)
    err = capsys.readouterr().err
    assert f"{results} line 4: not a JSON object; skipped" in err
    assert f"{results} line 6: no 'metrics'; skipped" in err
    iv = best[MODEL, TASK, "iv"]
    assert iv.best.hyperparameters["strength"] == 0.3  # tie on 0.60 broken by ci_low 0.55 > 0.50
    assert iv.n_settings == 3  # 0.5, 0.3 and 0.7 (its two runs are one setting); the test record is not one
    assert best[MODEL, TASK, "icl"].best.hyperparameters["shot"] == 2
    assert best[MODEL, TASK, "tv"].best.hyperparameters["layer"] == 2


def test_the_latest_rerun_replaces_the_earlier_one(results):
    records = load_records(results)
    assert select_best(records)[0].best.value != 0.90
    # with the re-run removed, the superseded high score would have won: the test is not vacuous
    without_rerun = [
        r
        for r in records
        if not (r["hyperparameters"].get("strength") == 0.7 and r["metrics"]["macro"]["value"] == 0.40)
    ]
    assert {c.key: c for c in select_best(without_rerun)}[MODEL, TASK, "iv"].best.value == 0.90


def test_a_test_split_record_is_never_selected(results):
    assert all(c.best.split == "validation" for c in select_best(load_records(results)))


def test_missing_metric_falls_back_to_accuracy(results):
    mc = best_by_method(results)[MODEL, "mc-task", "icl"]
    assert mc.best.metric == "accuracy" and mc.best.value == 0.7


def test_metric_changes_the_ranking_source(results):
    best = {c.key: c for c in select_best(load_records(results), metric="micro")}
    assert best[MODEL, TASK, "iv"].best.metric == "micro"
    assert best[MODEL, TASK, "iv"].best.value == pytest.approx(0.61)


def test_records_without_either_metric_are_skipped_with_a_warning(capsys):
    r = rec("iv", iv_hp(0.5), 0.6, 0.5, metrics={"other": {"value": 1.0}})
    assert select_best([r, rec("iv", iv_hp(0.3), 0.5, 0.4)])[0].best.value == 0.5
    assert "no 'macro' or 'accuracy' metric; skipped" in capsys.readouterr().err


def test_test_command_reruns_on_test_without_loaded_vectors(results):
    choice = best_by_method(results)[MODEL, TASK, "iv"]
    line = make_test_command(choice.best.record, "out/test.jsonl", eval_episodes=500)
    assert line.startswith("python iv.py ")
    args = shlex.split(line)
    assert "--run-test" in args and "--load-vectors" not in args and "vec.safetensors" not in args
    assert "--quiet" not in args and "old/runs.jsonl" not in args
    assert args[args.index("--results") + 1] == "out/test.jsonl"
    assert args.count("-n") == 1 and args[args.index("-n") + 1] == "500"
    assert args[args.index("--strength") + 1] == "0.3"


def test_strip_eval_flags_handles_equals_and_glued_forms():
    assert strip_eval_flags(
        ["-m", "x", "--results=a.jsonl", "-n5", "--eval-episodes", "9", "--run-test", "--save-vectors=v", "--shot", "2"]
    ) == ["-m", "x", "--shot", "2"]


def test_has_record_compares_canonical_settings(results):
    records = load_records(results)
    hp = dict(reversed(list(iv_hp(0.3).items())))  # same setting, other key order
    assert canonical(hp) == canonical(iv_hp(0.3))
    assert has_record(records, MODEL, TASK, "iv", "validation", hp, 42, 200)
    assert not has_record(records, MODEL, TASK, "iv", "test", hp, 42, 200)
    assert not has_record(records, MODEL, TASK, "iv", "validation", hp, 7, 200)
    assert not has_record(records, MODEL, TASK, "iv", "validation", iv_hp(0.4), 42, 200)


def test_cli_select_prints_best_and_commands(results, capsys):
    assert analyze.main(["select", "--results", str(results), "--commands", "--results-out", "t.jsonl"]) == 0
    out = capsys.readouterr().out
    assert f"{MODEL} | {TASK} | iv | macro 60.0 [55.0, 65.0] | best of 3 setting(s)" in out
    commands = [line for line in out.splitlines() if line.startswith("python iv.py")]
    assert len(commands) == 4 and all("--run-test" in c and "--load-vectors" not in c for c in commands)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["select", "--results", "{missing}"], "does not exist"),
        (["select", "--results", "{results}", "--metric", "f2"], "--metric 'f2' is unknown; accepted: macro"),
        (["report", "--results", "{empty}"], "holds no valid run records"),
        (["select"], "the following arguments are required: --results; accepted:"),
        (["frobnicate"], "unknown subcommand 'frobnicate'; accepted: select, report"),
    ],
)
def test_cli_user_errors_are_one_line_and_exit_2(argv, expected, results, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("not json\n")
    argv_template = " ".join(argv)
    argv = [a.format(missing=tmp_path / "nope.jsonl", results=results, empty=empty) for a in argv]
    assert analyze.main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == (1 if "{empty}" in argv_template else 0)  # the empty file's bad line 1
    err_lines = [line for line in lines if line not in warnings]
    assert len(err_lines) == 1 and err_lines[0].startswith("iv.py: error: ") and expected in err_lines[0]
    assert "; accepted: " in err_lines[0]


def test_load_records_rejects_a_directory(tmp_path):
    with pytest.raises(UsageError, match="not a file"):
        load_records(tmp_path)


# ---- the test command loads the state the validation run saved -----------------------------------


def _state_record(command_state: list[str], hp: dict | None = None, fit_flags: bool = True) -> dict:
    record = rec("iv", hp or iv_hp(0.5, 0.7), 0.6, 0.55)
    fitting = ["-s", "4", "-e", "200", "--ext-strength", "0.7", "--ext-batch", "10"] if fit_flags else []
    record["command"] = ["python", "iv.py", "-m", MODEL, "-t", TASK, *fitting, "--strength", "0.1", "0.5"]
    record["command"] += ["-n", "200", "--quiet", "--results", "r.jsonl", *command_state]
    return record


def _save(path, hp: dict, model: str = MODEL) -> None:
    import torch

    from ivlib.state import save_state

    fit = {k: hp[k] for k in ("ext_shot", "episodes", "max_example_tokens", "ext_strength", "ext_batch")}
    save_state(str(path), {"vectors": torch.zeros(2, 3)}, {"method": "iv", "model": model, "task": TASK, "fit": fit})


@pytest.mark.parametrize("flag", ["--save-vectors", "--load-vectors"])
def test_test_command_loads_the_saved_state_without_its_fitting_flags(tmp_path, flag):
    vec = tmp_path / "iv.safetensors"
    _save(vec, iv_hp(0.5, 0.7))
    record = _state_record([flag, str(vec)], fit_flags=flag == "--save-vectors")
    args = shlex.split(make_test_command(record, "t.jsonl", eval_episodes=50))
    assert args[:2] == ["python", "iv.py"]
    assert args[args.index("--load-vectors") + 1] == str(vec) and "--save-vectors" not in args
    for fitting in ("-s", "-e", "--ext-strength", "--ext-batch"):
        assert fitting not in args  # the file provides them (--load-vectors adopts its own)
    assert args[args.index("--strength") + 1] == "0.5" and args.count("--strength") == 1
    assert "--run-test" in args and args[args.index("-n") + 1] == "50"


def test_test_command_refits_when_the_state_is_gone_or_was_refitted(tmp_path):
    vec = tmp_path / "iv.safetensors"
    # gone: a record made WITH --load-vectors has no fitting flags; the refit takes the record's, not defaults
    args = shlex.split(make_test_command(_state_record(["--load-vectors", str(vec)], fit_flags=False), "t.jsonl"))
    assert "--load-vectors" not in args
    assert args[args.index("--ext-shot") + 1] == "4" and args[args.index("--ext-strength") + 1] == "0.7"
    assert args[args.index("--ext-batch") + 1] == "10" and args[args.index("--episodes") + 1] == "200"
    # overwritten since by a fit with another a1, or for another model: not this record's state
    for hp, model in ((iv_hp(0.5, 0.3), MODEL), (iv_hp(0.5, 0.7), "other-model")):
        _save(vec, hp, model)
        args = shlex.split(make_test_command(_state_record(["--save-vectors", str(vec)]), "t.jsonl"))
        assert "--load-vectors" not in args and "--save-vectors" not in args
        assert args[args.index("--ext-strength") + 1] == "0.7" and args.count("-s") == 1


def test_old_records_without_the_program_name_still_give_commands():
    record = rec("iv", iv_hp(0.5), 0.6, 0.55)
    assert record["command"][0] == "-c"  # as written before the command named its program
    args = shlex.split(make_test_command(record, "t.jsonl"))
    assert args[:4] == ["python", "iv.py", "-c", "config/local.yaml"]
