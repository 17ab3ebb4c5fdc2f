"""Golden records: what the CLI writes today, pinned whole, so a refactor of ivlib/cli.py can show
it changed nothing.

A fixed sequence of in-process `ivlib.cli.main` calls (every method on the tiny models, a strength
sweep, --resume, --save-vectors/--load-vectors, then `select --commands`, the test runs it prints
and `report`) is compared with tests/golden/expected.json: each call's records (whole, after
normalising), its stdout summary lines, the metadata and tensor digests of the vectors files, and
select's stdout and the report's table.md / table.csv.

Normalised before comparing: the fields that legitimately vary from run to run are dropped
(DROPPED below); the tmp directory and the repository path in any string become <tmp> and <repo>;
the seconds in the stdout summary line become <s>. Everything else, floats included, is compared
exactly as JSON: CPU runs are deterministic (see test_reproducibility.py); no field needed a
tolerance. The calls run on one torch thread (see the test).

Regenerate the fixture after an intended change (and review the diff of expected.json):

    IVLIB_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch

from ivlib.cli import main

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "golden" / "expected.json"
REGEN = os.environ.get("IVLIB_REGEN_GOLDEN") == "1"

DROPPED = ("time", "versions", "git_commit", "timing_s", "eval_episodes_per_s")  # vary from run to run
SECONDS = re.compile(r"\| fit \d+(?:\.\d+)?s \| eval \d+(?:\.\d+)?s \|")

COMMON = ["-c", "config/tiny.yaml", "-t", "review_sentiment", "--quiet", "-n", "40", "--batch-size", "8"]
FIT = ["-s", "1", "-e", "8"]
TV = ["--method", "tv", "--select-episodes", "6"]
FV = ["--method", "fv", "--ie-episodes", "6"]
DT = ["--method", "dt", "--select-episodes", "6", "--dt-steps", "3"]
GPT2, LLAMA = ["-m", "tiny-gpt2"], ["-m", "tiny-llama"]


def _runs(tmp: Path) -> list[tuple[str, list[str]]]:
    """(case name, argv) of the run calls on the main results file, in order."""
    runs, vec = str(tmp / "runs.jsonl"), lambda name: str(tmp / f"{name}.safetensors")
    out = ["--results", runs]
    return [
        ("zero-shot/tiny-gpt2", COMMON + GPT2 + ["--method", "zero-shot", "--batch-size", "auto"] + out),
        ("icl/tiny-gpt2", COMMON + GPT2 + ["--method", "icl"] + out),
        ("iv/tiny-gpt2/save-vectors", COMMON + GPT2 + FIT + ["--method", "iv", "--save-vectors", vec("iv")] + out),
        ("iv/tiny-gpt2/load-vectors", COMMON + GPT2 + ["--method", "iv", "--load-vectors", vec("iv")] + out),
        ("iv/tiny-llama", COMMON + LLAMA + FIT + ["--ext-batch", "3", "--strength", "0.9"] + out),
        (
            "iv/tiny-gpt2/strengths-0.1-0.5-0.9",
            COMMON + GPT2 + FIT + ["--ext-strength", "0.6", "--strength", "0.1", "0.5", "0.9"] + out,
        ),
        ("tv/tiny-gpt2/save-vectors", COMMON + GPT2 + FIT + TV + ["--save-vectors", vec("tv")] + out),
        # with the fitting flags again (accepted: the file's own values). select's test command for tv comes
        # from this record and loads the saved state (the file exists and matches), leaving those flags out
        ("tv/tiny-gpt2/load-vectors", COMMON + GPT2 + FIT + TV + ["--load-vectors", vec("tv")] + out),
        ("fv/tiny-gpt2/save-vectors", COMMON + GPT2 + FIT + FV + ["--save-vectors", vec("fv")] + out),
        ("fv/tiny-gpt2/load-vectors", COMMON + GPT2 + ["--method", "fv", "--load-vectors", vec("fv")] + out),
        ("fv/tiny-gpt2/n-top-heads-2", COMMON + GPT2 + FIT + FV + ["--n-top-heads", "2"] + out),
        ("dt/tiny-gpt2", COMMON + GPT2 + DT + out),
        ("dt/tiny-gpt2/user-step-pinned", COMMON + GPT2 + DT + ["--dt-step", "1", "--dt-positions", "pinned"] + out),
    ]


def _resume_runs(tmp: Path) -> list[tuple[str, list[str]]]:
    base = COMMON + GPT2 + FIT + ["--results", str(tmp / "resume.jsonl")]
    return [
        ("resume/first-run", base + ["--strength", "0.1"]),
        ("resume/same-command-again", base + ["--strength", "0.1", "--resume"]),
        ("resume/strength-list-partly-recorded", base + ["--strength", "0.1", "0.5", "0.9", "--resume"]),
    ]


# ---- normalising ------------------------------------------------------------------------------


def _replace_paths(value: Any, tmp: Path) -> Any:
    if isinstance(value, str):
        for path, mark in sorted(((str(tmp), "<tmp>"), (str(REPO), "<repo>")), key=lambda pm: -len(pm[0])):
            value = value.replace(path, mark)
        return value
    if isinstance(value, list):
        return [_replace_paths(v, tmp) for v in value]
    if isinstance(value, dict):
        return {k: _replace_paths(v, tmp) for k, v in value.items()}
    return value


def _record(record: dict[str, Any], tmp: Path) -> dict[str, Any]:
    return _replace_paths({k: v for k, v in record.items() if k not in DROPPED}, tmp)


def _stdout(text: str, tmp: Path) -> str:
    return _replace_paths(SECONDS.sub("| fit <s>s | eval <s>s |", text), tmp)


def _new_lines(path: Path, seen: int) -> tuple[list[dict[str, Any]], int]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines[seen:]], len(lines)


TENSOR_SAMPLES = 16  # values pinned per tensor, evenly spaced through it
TENSOR_RTOL, TENSOR_ATOL = 1e-4, 1e-6  # float tolerance for tensor values only (see `_tensor_summary`)


def _tensor_summary(t: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype, sum, absolute sum and a few values of a saved tensor, compared with a tolerance.

    Not a digest of the bytes: the vectors are sums over thousands of activations, and the last bits
    of such sums depend on which CPU kernel ran (AVX-512 and AVX2 machines gave different sha256s
    for identical records). The records themselves stay compared exactly."""
    flat = t.reshape(-1).double()
    step = max(1, flat.numel() // TENSOR_SAMPLES)
    return {
        "shape": list(t.shape),
        "dtype": str(t.dtype).removeprefix("torch."),
        "sum": float(flat.sum()),
        "abs_sum": float(flat.abs().sum()),
        "values": [float(v) for v in flat[::step][:TENSOR_SAMPLES]],
    }


def _vectors_file(path: Path, tmp: Path) -> dict[str, Any]:
    """The saved state: its metadata and, per tensor, a summary of its values (`_tensor_summary`)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        tensors = {}
        for name in sorted(f.keys()):
            tensors[name] = _tensor_summary(f.get_tensor(name))
    # safetensors keeps metadata in a hash map: sorted, so a regenerated fixture does not reshuffle
    return {"metadata": _replace_paths(json.loads(json.dumps(meta, sort_keys=True)), tmp), "tensors": tensors}


# ---- running everything -----------------------------------------------------------------------


def _run_all(tmp: Path, capsys) -> dict[str, Any]:
    """Every call, in order: {case: {...}}; also checks the behaviour the cases are meant to show."""
    cases: dict[str, Any] = {}
    seen = {"runs.jsonl": 0, "resume.jsonl": 0}

    def call(name: str, argv: list[str], results: str) -> list[dict[str, Any]]:
        capsys.readouterr()
        rc = main(argv)
        out, err = capsys.readouterr()
        assert rc == 0, f"{name}: exit {rc}\n{err}"
        records, seen[results] = _new_lines(tmp / results, seen[results])
        cases[name] = {
            "argv": _replace_paths(shlex.join(argv), tmp),
            "stdout": _stdout(out, tmp),
            "records": [_record(r, tmp) for r in records],
        }
        return records

    written = {name: call(name, argv, "runs.jsonl") for name, argv in _runs(tmp)}
    for method in ("iv", "tv", "fv"):
        fitted, loaded = written[f"{method}/tiny-gpt2/save-vectors"], written[f"{method}/tiny-gpt2/load-vectors"]
        assert len(fitted) == len(loaded) == 1
        assert loaded[0]["metrics"] == fitted[0]["metrics"], f"{method}: loaded vectors changed the metrics"
        assert loaded[0]["hyperparameters"] == fitted[0]["hyperparameters"]
        assert loaded[0]["fit"]["loaded_from"] == str(tmp / f"{method}.safetensors")
        cases[f"{method}/tiny-gpt2/vectors-file"] = _vectors_file(tmp / f"{method}.safetensors", tmp)
    sweep = written["iv/tiny-gpt2/strengths-0.1-0.5-0.9"]
    assert [r["hyperparameters"]["strength"] for r in sweep] == [0.1, 0.5, 0.9]

    # --resume: a recorded command writes nothing; a partly recorded strength list only the missing values
    resume = tmp / "resume.jsonl"
    (first, first_argv), (again, again_argv), (partial, partial_argv) = _resume_runs(tmp)
    assert len(call(first, first_argv, "resume.jsonl")) == 1
    before = resume.read_bytes()
    assert call(again, again_argv, "resume.jsonl") == [] and resume.read_bytes() == before
    assert "skipped (--resume)" in cases[again]["stdout"]
    added = call(partial, partial_argv, "resume.jsonl")
    assert [r["hyperparameters"]["strength"] for r in added] == [0.5, 0.9]
    assert resume.read_bytes().startswith(before)

    _select_and_test(tmp, capsys, cases, call)
    cases["report"] = _report(tmp, capsys)
    return json.loads(json.dumps(cases))  # what the fixture holds: JSON types, floats as JSON reads them


def _select_and_test(tmp: Path, capsys, cases: dict[str, Any], call) -> None:
    """select: best validation setting per model/task/method, with the test commands it prints."""
    capsys.readouterr()
    assert main(["select", "--results", str(tmp / "runs.jsonl"), "--commands", "-n", "20"]) == 0
    out, err = capsys.readouterr()
    cases["select --commands -n 20"] = {"stdout": _stdout(out, tmp)}
    commands = [line for line in out.splitlines() if line.startswith("python iv.py ")]
    assert len(commands) == 7, out  # one per (model, method) above

    # the printed test commands, run as printed, except tiny-llama's: the report then has test cells
    # and a "not yet run on test" row
    for line in commands:
        argv = shlex.split(line)[2:]
        model = argv[argv.index("-m") + 1]
        if model != "tiny-llama":
            method = argv[argv.index("--method") + 1] if "--method" in argv else "iv"
            records = call(f"test-run/{method}/{model}", argv, "runs.jsonl")
            assert [r["split"] for r in records] == ["test"] and records[0]["n_eval_episodes"] == 20


def _report(tmp: Path, capsys) -> dict[str, Any]:
    """report: the tables pinned as text, the plots only checked to exist."""
    report = tmp / "report"
    capsys.readouterr()
    assert main(["report", "--results", str(tmp / "runs.jsonl"), "--out", str(report)]) == 0
    out, _ = capsys.readouterr()
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert pngs and all((report / p).stat().st_size > 1000 for p in pngs), pngs
    return {
        "stdout": _stdout(out, tmp),
        "png_files": pngs,
        "table.md": (report / "table.md").read_text(encoding="utf-8"),
        "table.csv": (report / "table.csv").read_text(encoding="utf-8"),
    }


# ---- comparing --------------------------------------------------------------------------------


def _first_difference(expected: Any, actual: Any, path: str = "") -> str | None:
    """'key.path: expected X, got Y' for the first place where the two differ, else None."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        return _dict_difference(expected, actual, path)
    if isinstance(expected, list) and isinstance(actual, list):
        return _list_difference(expected, actual, path)
    if isinstance(expected, str) and isinstance(actual, str) and expected != actual:
        return _text_difference(expected, actual, path)
    in_tensors = path.startswith("tensors.") or ".tensors." in path  # a vectors file's case: its top-level key
    if in_tensors and isinstance(expected, float) and isinstance(actual, float):
        close = math.isclose(expected, actual, rel_tol=TENSOR_RTOL, abs_tol=TENSOR_ATOL)
        return None if close else f"{path}: expected {expected!r}, got {actual!r} (tolerance {TENSOR_RTOL})"
    both_nan = isinstance(expected, float) and isinstance(actual, float) and math.isnan(expected) and math.isnan(actual)
    if (type(expected) is not type(actual) or expected != actual) and not both_nan:
        return f"{path}: expected {_short(expected)}, got {_short(actual)}"
    return None


def _dict_difference(expected: dict[str, Any], actual: dict[str, Any], path: str) -> str | None:
    for key in list(expected) + [k for k in actual if k not in expected]:
        where = f"{path}.{key}" if path else str(key)
        if key not in actual:
            return f"{where}: missing (expected {_short(expected[key])})"
        if key not in expected:
            return f"{where}: unexpected (got {_short(actual[key])})"
        found = _first_difference(expected[key], actual[key], where)
        if found:
            return found
    return None


def _list_difference(expected: list[Any], actual: list[Any], path: str) -> str | None:
    for i, (e, a) in enumerate(zip(expected, actual)):
        found = _first_difference(e, a, f"{path}[{i}]")
        if found:
            return found
    if len(expected) != len(actual):
        return f"{path}: expected {len(expected)} items, got {len(actual)}"
    return None


def _text_difference(expected: str, actual: str, path: str) -> str:
    e_lines, a_lines = expected.splitlines(), actual.splitlines()
    for n, (e, a) in enumerate(zip(e_lines, a_lines), start=1):
        if e != a:
            return f"{path}, line {n}:\n  expected {e!r}\n  got      {a!r}"
    return f"{path}: expected {len(e_lines)} lines, got {len(a_lines)}"


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


# Every field the CLI writes into a record (ivlib/cli.py, run()), and the fit contents of each
# method: the fixture must show each one somewhere, so a refactor that drops one is caught.
RECORD_FIELDS = {
    "model",
    "task",
    "split",
    "method",
    "seed",
    "n_eval_episodes",
    "n_fit_episodes",
    "fit",
    "batch_size_requested",
    "device",
    "dtype",
    "device_map",
    "model_source",
    "layout",
    "add_bos",
    "label_words",
    "task_kind",
    "task_provenance",
    "config_files",
    "command",
    "hyperparameters",
    "metrics",
    "predicted_fraction",
    "batch_size",
    "budget",
}
FIT_FIELDS = {
    "iv": {
        "ext_shot",
        "episodes",
        "seed",
        "max_example_tokens",
        "ext_strength",
        "ext_batch",
        "shared_by_strengths",
        "loaded_from",
        "fitted_with",
    },
    "tv": {"layer", "layer_scores", "select_episodes", "select_shot", "loaded_from", "fitted_with"},
    "fv": {"layer", "top_heads", "ie_rows_per_forward", "n_top_heads", "ie_episodes", "loaded_from"},
    "dt": {"step", "step_chosen_by", "curve", "dt_steps", "dt_eta", "dt_beta", "dt_positions", "dt_step"},
}


def _check_coverage(cases: dict[str, Any]) -> None:
    records = [r for case in cases.values() for r in case.get("records", [])]
    for r in records:
        assert set(r) == RECORD_FIELDS, f"{r['method']}: record fields changed: {sorted(set(r) ^ RECORD_FIELDS)}"
    for method, fields in FIT_FIELDS.items():
        present = set().union(*(r["fit"] for r in records if r["method"] == method))
        assert fields <= present, f"{method}: fit fields not pinned: {sorted(fields - present)}"
    assert {r["split"] for r in records} == {"validation", "test"}
    assert {r["batch_size_requested"] for r in records} >= {"auto", 8}
    assert {r["model"] for r in records} == {"tiny-gpt2", "tiny-llama"}
    assert {r["method"] for r in records} == {"zero-shot", "icl", "iv", "tv", "fv", "dt"}


def test_cli_records_and_outputs_match_the_golden_fixture(tmp_path, monkeypatch, capsys):
    if not REGEN and not FIXTURE.is_file():
        pytest.fail(
            f"golden fixture {FIXTURE.relative_to(REPO)} is missing; generate it with "
            "IVLIB_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py"
        )
    monkeypatch.chdir(REPO)
    # One torch thread: the records are bit-identical with 1 and 2 threads (checked when this was written),
    # the pinned bits then do not hang on the machine's core count, and on shared CPUs OpenMP's spin-waiting
    # made the file 4-6x slower with 2 threads (60-100 s instead of 15 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        actual = _run_all(tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)
    _check_coverage(actual)
    if REGEN:
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(json.dumps(actual, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    expected = json.loads(FIXTURE.read_text(encoding="utf-8"))
    problems = []
    for case in list(expected) + [c for c in actual if c not in expected]:
        if case not in actual:
            problems.append(f"case {case!r}: not produced by this run")
        elif case not in expected:
            problems.append(f"case {case!r}: new, not in the fixture")
        else:
            found = _first_difference(expected[case], actual[case])
            if found:
                problems.append(f"case {case!r}: {found}")
    if problems:
        pytest.fail(
            f"{len(problems)} case(s) differ from {FIXTURE.relative_to(REPO)} "
            "(IVLIB_REGEN_GOLDEN=1 rewrites it after an intended change):\n" + "\n".join(problems)
        )
