"""Bad input: exit code 2, one line naming the problem, and the results file left as it was."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ivlib.cli import main

REPO = Path(__file__).resolve().parent.parent
GOOD = ["-c", "config/tiny.yaml", "-m", "tiny-gpt2", "-t", "review_sentiment", "-e", "4", "-n", "8", "--quiet"]


def _replace(args, flag, value):
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def _yaml(tmp, text):
    path = tmp / "cfg.yaml"
    path.write_text(text)
    return str(path)


def _no_label_parquet(tmp):
    path = tmp / "nolabel.parquet"
    pd.DataFrame({"text": ["a", "b", "c"]}).to_parquet(path)
    return _yaml(tmp, f"models:\n  tiny-gpt2: {{builtin: tiny-gpt2}}\ntasks:\n  nolabel: {{data_files: {path}}}\n")


def _parquet_task(tmp, frame, files="train"):
    path = tmp / "data.parquet"
    frame.to_parquet(path)
    return _yaml(
        tmp, f"models:\n  tiny-gpt2: {{builtin: tiny-gpt2}}\ntasks:\n  t: {{data_files: {{{files}: {path}}}}}\n"
    )


def _labelled(texts):
    return pd.DataFrame(
        {
            "text": texts,
            "label": [i % 2 for i in range(len(texts))],
            "label_text": [["neg", "pos"][i % 2] for i in range(len(texts))],
        }
    )


def _vectors_for_another_task(tmp):
    cfg = _yaml(
        tmp,
        "models:\n  tiny-gpt2: {builtin: tiny-gpt2}\ntasks:\n  other_reviews: {builtin: review_sentiment, label_words: [bad, good]}\n",
    )
    vec = tmp / "other.safetensors"
    argv = _replace(_replace(GOOD, "-c", cfg), "-t", "other_reviews")
    assert main(argv + ["-s", "1", "--save-vectors", str(vec), "--results", str(tmp / "other.jsonl")]) == 0
    return _replace(GOOD, "-c", cfg) + ["-s", "1", "--load-vectors", str(vec)]


def _vectors_fitted_otherwise(tmp):
    vec = tmp / "a1.safetensors"
    assert (
        main(GOOD + ["-s", "1", "--ext-strength", "0.7", "--save-vectors", str(vec), "--results", str(tmp / "f.jsonl")])
        == 0
    )
    return GOOD + ["-s", "1", "--ext-strength", "0.5", "--load-vectors", str(vec)]


def _not_jsonl(tmp):
    path = tmp / "table.csv"
    path.write_text("method,score\niv,0.5\n")
    return GOOD + ["--results", str(path)]


CASES = {
    "unknown model": (lambda _t: _replace(GOOD, "-m", "nope"), "'nope'"),
    "unknown task": (lambda _t: _replace(GOOD, "-t", "nope_task"), "'nope_task'"),
    "missing config": (lambda t: _replace(GOOD, "-c", str(t / "absent.yaml")), "absent.yaml"),
    "malformed yaml": (lambda t: _replace(GOOD, "-c", _yaml(t, "models: [unclosed\n")), "not valid YAML"),
    "unknown model key": (
        lambda t: _replace(GOOD, "-c", _yaml(t, "models:\n  x: {path: a, foo: 1}\n")),
        "models.x.foo",
    ),
    "unknown top key": (lambda t: _replace(GOOD, "-c", _yaml(t, "modles: {}\n")), "'modles'"),
    "missing model path": (
        lambda t: _replace(_replace(GOOD, "-c", _yaml(t, "models:\n  ghost: /nonexistent/dir\n")), "-m", "ghost"),
        "/nonexistent/dir",
    ),
    "ext-shot too large": (lambda _t: GOOD + ["-s", "100000"], "--ext-shot 100000"),
    "shot too large": (lambda _t: GOOD + ["--shot", "100000"], "--shot 100000"),
    "zero episodes": (lambda _t: _replace(GOOD, "-e", "0"), "--episodes 0"),
    "negative eval episodes": (lambda _t: _replace(GOOD, "-n", "-5"), "--eval-episodes -5"),
    "strength not a number": (lambda _t: GOOD + ["--strength", "abc"], "'abc'"),
    "strength nan": (lambda _t: GOOD + ["--strength", "nan"], "--strength nan"),
    "unknown method": (lambda _t: GOOD + ["--method", "bogus"], "'bogus'"),
    "unknown flag": (lambda _t: GOOD + ["--bogus-flag"], "--bogus-flag"),
    "colliding labels": (
        lambda t: _replace(
            GOOD,
            "-c",
            _yaml(
                t,
                "models:\n  tiny-gpt2: {builtin: tiny-gpt2}\ntasks:\n  review_sentiment: "
                "{builtin: review_sentiment, label_words: [goodish, good]}\n",
            ),
        ),
        "'good'",
    ),
    "missing vectors file": (lambda t: GOOD + ["--load-vectors", str(t / "none.safetensors")], "none.safetensors"),
    "vectors for a stateless method": (
        lambda t: GOOD + ["--method", "icl", "--save-vectors", str(t / "v.st")],
        "'icl'",
    ),
    "results under a file": (
        lambda t: _replace(GOOD + ["--results", "x"], "--results", str(t / "runs.jsonl" / "x.jsonl")),
        "runs.jsonl",
    ),
    "no such gpu": (lambda _t: GOOD + ["-g", "99"], "-g 99"),
    "device map on cpu": (lambda _t: GOOD + ["--device-map", "balanced"], "--device-map"),
    "task without label column": (
        lambda t: _replace(_replace(GOOD, "-c", _no_label_parquet(t)), "-t", "nolabel"),
        "'label'",
    ),
    "yaml entry of the wrong type": (lambda t: _replace(GOOD, "-c", _yaml(t, "models:\n  x: 5\n")), "models.x"),
    "yaml label_words of the wrong length": (
        lambda t: _replace(
            GOOD,
            "-c",
            _yaml(
                t,
                "models:\n  tiny-gpt2: {builtin: tiny-gpt2}\ntasks:\n  review_sentiment: "
                "{builtin: review_sentiment, label_words: [bad]}\n",
            ),
        ),
        "label_words",
    ),
    "dataset without a train split": (
        lambda t: _replace(
            _replace(GOOD, "-c", _parquet_task(t, _labelled([f"row {i}" for i in range(20)]), files="validation")),
            "-t",
            "t",
        ),
        "'train'",
    ),
    "empty text field": (
        lambda t: _replace(
            _replace(GOOD, "-c", _parquet_task(t, _labelled([f"row {i}" if i != 5 else "  " for i in range(40)]))),
            "-t",
            "t",
        ),
        "empty text",
    ),
    "vectors from another task": (_vectors_for_another_task, "task='other_reviews'"),
    "results file that is not JSONL": (_not_jsonl, "table.csv"),
    "non-writable results directory": (lambda _t: GOOD + ["--results", "/proc/1/runs.jsonl"], "not writable"),
    "dt with too few steps": (lambda _t: GOOD + ["--method", "dt", "--dt-steps", "0"], "--dt-steps 0"),
    "vectors path under a file": (
        lambda t: GOOD + ["--save-vectors", str(t / "runs.jsonl" / "v.safetensors")],
        "is a file, not a directory",
    ),
    "vectors path is a directory": (lambda t: GOOD + ["--save-vectors", str(t)], "is a directory"),
    "loaded vectors fitted with another a1": (_vectors_fitted_otherwise, "--ext-strength 0.7; this command gives 0.5"),
    "dt shifted past the position table": (
        lambda _t: GOOD + ["--method", "dt", "--shot", "14", "--dt-steps", "2", "--select-episodes", "2"],
        "--dt-positions pinned",
    ),
    "unknown builtin model": (
        lambda t: _replace(_replace(GOOD, "-c", _yaml(t, "models:\n  m: {builtin: tiny-rwkv}\n")), "-m", "m"),
        "tiny-rwkv",
    ),
}


def _entry(kind, body, flag):
    """A config (merged over config/tiny.yaml) whose one entry `x` is `body`, run with it."""

    def build(tmp):
        cfg = _yaml(tmp, f"{kind}:\n  x: {body}\n")
        return GOOD[:2] + ["-c", cfg] + _replace(GOOD[2:], flag, "x")

    return build


# class 1 of issue 14: registry values of the wrong type or range, refused by the schema when the file
# is read; the message names the file, the entry, the key and the value
REGISTRY_CASES = {
    "data_files a number": (_entry("tasks", "{data_files: 5}", "-t"), "tasks.x.data_files 5 is not accepted"),
    "text_fields a number": (
        _entry("tasks", "{builtin: review_sentiment, text_fields: 7}", "-t"),
        "tasks.x.text_fields 7",
    ),
    "fv_heads a string": (_entry("models", "{builtin: tiny-gpt2, fv_heads: many}", "-m"), "models.x.fv_heads 'many'"),
    "fv_heads infinite": (_entry("models", "{builtin: tiny-gpt2, fv_heads: .inf}", "-m"), "models.x.fv_heads inf"),
    "fv_heads nan": (_entry("models", "{builtin: tiny-gpt2, fv_heads: .nan}", "-m"), "models.x.fv_heads nan"),
    "fv_heads zero": (_entry("models", "{builtin: tiny-gpt2, fv_heads: 0}", "-m"), "an integer >= 1"),
    "answer_base a word": (
        _entry(
            "tasks", "{builtin: review_sentiment, multiple_choice: {options: a, answer: b, answer_base: one}}", "-t"
        ),
        "tasks.x.multiple_choice.answer_base 'one'",
    ),
    "label_words yes/no unquoted": (
        _entry("tasks", "{builtin: review_sentiment, label_words: [no, yes]}", "-t"),
        "label_words [False, True]",
    ),
    "dtype unknown": (_entry("models", "{builtin: tiny-gpt2, dtype: fp8}", "-m"), "float32, float16 or bfloat16"),
    "bos a word": (_entry("models", "{builtin: tiny-gpt2, bos: maybe}", "-m"), "models.x.bos 'maybe'"),
    "trust_remote_code a string": (
        _entry("models", "{path: gpt2, trust_remote_code: 'yes'}", "-m"),
        "models.x.trust_remote_code 'yes'",
    ),
    "layout key unknown": (
        _entry("models", "{builtin: tiny-gpt2, layout: {blokcs: h}}", "-m"),
        "unknown key 'models.x.layout.blokcs'",
    ),
    "splits role unknown": (_entry("tasks", "{builtin: review_sentiment, splits: {dev: x}}", "-t"), "tasks.x.splits"),
    "task without a source": (_entry("tasks", "{label_field: y}", "-t"), "tasks.x has none of dataset"),
    "model without a source": (_entry("models", "{dtype: float32}", "-m"), "models.x has none of path"),
    "assemble not module:function": (_entry("models", "{assemble: justamodule}", "-m"), "models.x.assemble"),
    "duplicate entry": (
        lambda t: (
            GOOD[:2]
            + ["-c", _yaml(t, "models:\n  x: {builtin: tiny-gpt2}\n  x: {builtin: tiny-llama}\n")]
            + _replace(GOOD[2:], "-m", "x")
        ),
        "key 'x' is given twice (lines 2 and 3)",
    ),
    "duplicate key in an entry": (
        _entry("models", "{builtin: tiny-gpt2, builtin: tiny-llama}", "-m"),
        "key 'builtin' is given twice",
    ),
    "config not utf-8": (
        lambda t: _replace(GOOD, "-c", str(_write_bytes(t / "latin1.yaml", b"models: {caf\xe9: gpt2}\n"))),
        "not UTF-8",
    ),
}
CASES.update(REGISTRY_CASES)

# class 3: flags that conflict or are out of range, refused before the model loads
FLAG_CASES = {
    "run-clean with another method": (lambda _t: GOOD + ["--run-clean", "--method", "fv"], "--run-clean means"),
    "load and save vectors together": (
        lambda t: GOOD + ["--load-vectors", str(t / "a.st"), "--save-vectors", str(t / "b.st")],
        "--load-vectors and --save-vectors together",
    ),
    "load vectors from a directory": (lambda t: GOOD + ["--load-vectors", str(t)], "is not a file (a directory"),
    "empty vectors path": (lambda _t: GOOD + ["--save-vectors", ""], "--save-vectors '' is empty"),
    "negative seed": (lambda _t: GOOD + ["--seed", "-1"], "--seed -1 is out of range"),
    "eval episodes beyond the cap": (lambda _t: _replace(GOOD, "-n", "1000000000000"), "<= 1,000,000"),
    "extraction episodes beyond the cap": (lambda _t: _replace(GOOD, "-e", "1000001"), "--episodes 1000001"),
    "select episodes beyond the cap": (lambda _t: GOOD + ["--select-episodes", "10000000"], "--select-episodes"),
    "strength minus infinity": (lambda _t: GOOD + ["--strength", "-inf"], "--strength -inf is not a finite number"),
    "strength minus nan among others": (lambda _t: GOOD + ["--strength", "0.5", "-nan"], "--strength -nan"),
    "mem-limit not a size": (lambda _t: GOOD + ["-g", "0", "--device-map", "auto", "--mem-limit", "lots"], "'lots'"),
}
CASES.update(FLAG_CASES)


def _data(edit, names=True, suffix="parquet"):
    """A task over one local file: 100 labelled rows, edited; label_names given unless names=False."""

    def build(tmp):
        frame = pd.DataFrame({"text": [f"row {i}" for i in range(100)], "label": [i % 2 for i in range(100)]})
        frame = edit(frame)
        path = tmp / f"data.{suffix}"
        if suffix == "parquet":
            frame.to_parquet(path)
        else:
            frame.to_csv(path, index=False)
        extra = ", label_names: [neg, pos]" if names else ""
        cfg = _yaml(tmp, f"tasks:\n  x: {{data_files: {{train: '{path}'}}{extra}}}\n")
        return GOOD[:2] + ["-c", cfg] + _replace(GOOD[2:], "-t", "x")

    return build


def _file_task(make):
    def build(tmp):
        path = make(tmp)
        cfg = _yaml(tmp, f"tasks:\n  x: {{data_files: {{train: '{path}'}}, label_names: [neg, pos]}}\n")
        return GOOD[:2] + ["-c", cfg] + _replace(GOOD[2:], "-t", "x")

    return build


def _set(column, rows, value, dtype=None):
    def edit(frame):
        if dtype is not None:
            frame[column] = frame[column].astype(dtype)
        frame.loc[rows, column] = value
        return frame

    return edit


def _touch(tmp, name, text=""):
    (tmp / name).write_text(text)
    return tmp / name


def _folder(tmp):
    (tmp / "folder.parquet").mkdir()
    return tmp / "folder.parquet"


# class 2: data that is not what the task says
DATA_CASES = {
    "empty data file": (_file_task(lambda t: _touch(t, "empty.parquet")), "is empty (0 bytes)"),
    "directory as a data file": (_file_task(_folder), "is a directory"),
    "data file that is not parquet": (
        _file_task(lambda t: _touch(t, "junk.parquet", "junk")),
        "cannot be read as parquet",
    ),
    "csv with a header only": (_file_task(lambda t: _touch(t, "h.csv", "text,label\n")), "cannot be read as csv"),
    "text labels with label_names": (
        _data(lambda f: f.assign(label=[["neg", "pos"][i % 2] for i in range(100)])),
        "holds 100 text label(s), first at row 0: 'neg'",
    ),
    "a NaN label": (_data(_set("label", 3, np.nan, float)), "holds 1 missing label(s) (None/NaN), first at row 3"),
    "a fractional label": (_data(_set("label", 4, 0.5, float)), "first at row 4: 0.5"),
    "labels outside label_names": (_data(_set("label", slice(0, 49), 5)), "has 50 label(s) outside label_names"),
    "labels below -1": (_data(_set("label", 9, -3)), "first at row 9: -3"),
    "a missing text": (_data(_set("text", 7, None)), "1 missing text(s) (None/NaN) in column 'text', first at row 7"),
    "a NaN text in a csv": (
        _data(_set("text", 11, np.nan, object), suffix="csv"),
        "missing text(s) (None/NaN) in column 'text', first at row 11",
    ),
    "only unlabelled rows": (
        _data(lambda f: f.assign(label=-1)),
        "split 'train' is empty (its 100 rows have no label)",
    ),
}
CASES.update(DATA_CASES)


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    results = tmp_path / "runs.jsonl"
    results.write_text('{"earlier": "record"}\n')
    before = results.read_bytes()
    build, needle = CASES[case]
    argv = build(tmp_path)
    if "--results" not in argv:
        argv = argv + ["--results", str(results)]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert results.read_bytes() == before


def test_real_process_exit_code_and_clean_stderr(tmp_path):
    proc = subprocess.run(
        [sys.executable, "iv.py", *_replace(GOOD, "-m", "nope"), "--results", str(tmp_path / "r")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("iv.py: error: unknown model 'nope'")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_prompt_longer_than_the_context_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    results = tmp_path / "runs.jsonl"
    code = main(GOOD + ["-s", "40", "--results", str(results)])  # 80 demos x ~20 tokens > 1024
    err = capsys.readouterr().err.strip()
    assert code == 2 and "exceeds the context of model 'tiny-gpt2' (1024)" in err
    assert len(err.splitlines()) == 1 and not results.exists()


def test_overflowing_activations_are_reported_with_their_layer(tmp_path, monkeypatch, capsys):
    """An IV strength large enough to overflow stands in for fp16 overflow: the run stops, names
    the layer, and writes no record with NaN scores."""
    monkeypatch.chdir(REPO)
    results = tmp_path / "runs.jsonl"
    code = main(GOOD + ["-s", "1", "--strength", "1e38", "--results", str(results)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "non-finite values" in err and "first at layer 0" in err, err
    assert not results.exists()


def test_unsavable_vectors_path_is_refused_before_the_fit(tmp_path, monkeypatch, capsys):
    from ivlib.methods.iv import IterativeVectors

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(IterativeVectors, "fit", lambda *a, **k: pytest.fail("fitted before checking --save-vectors"))
    code = main(GOOD + ["--save-vectors", str(tmp_path), "--results", str(tmp_path / "runs.jsonl")])
    assert code == 2 and "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("given", [["-inf"], ["-1e3", "0.5"], ["-.5", "-2"], ["-Infinity"], ["-1E-2"], ["-nan"]])
def test_negative_numbers_are_values_in_a_list_flag(given):
    from ivlib.cli import build_parser

    args = build_parser().parse_args(["-m", "m", "-t", "t", "--strength", *given])
    assert args.strength == given


def test_flag_errors_come_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import ivlib.experiment as experiment

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(experiment, "load_model", lambda *a, **k: pytest.fail("the model loaded before the flag check"))
    for build, _ in FLAG_CASES.values():
        code = main(build(tmp_path) + ["--results", str(tmp_path / "r.jsonl")])
        assert code == 2, capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_unlabelled_rows_are_dropped_counted_and_recorded(tmp_path, monkeypatch, capsys):
    """-1 (a hub test split's hidden label) is the one label dropped, never silently: the record's
    task_provenance and the summary line give the count."""
    import json

    monkeypatch.chdir(REPO)
    argv = _data(_set("label", slice(0, 5), -1))(tmp_path)
    results = tmp_path / "runs.jsonl"
    assert main(argv + ["--method", "icl", "--results", str(results)]) == 0
    record = json.loads(results.read_text())
    assert record["task_provenance"]["dropped_unlabelled"] == {"train": 6}
    assert "rows without a label dropped: 6 train (task_provenance)" in capsys.readouterr().out
