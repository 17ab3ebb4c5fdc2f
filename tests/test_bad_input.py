"""Bad input: exit code 2, one line naming the problem, and the results file left as it was."""
import subprocess
import sys
from pathlib import Path

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


CASES = {
    "unknown model": (lambda t: _replace(GOOD, "-m", "nope"), "'nope'"),
    "unknown task": (lambda t: _replace(GOOD, "-t", "nope_task"), "'nope_task'"),
    "missing config": (lambda t: _replace(GOOD, "-c", str(t / "absent.yaml")), "absent.yaml"),
    "malformed yaml": (lambda t: _replace(GOOD, "-c", _yaml(t, "models: [unclosed\n")), "not valid YAML"),
    "unknown model key": (lambda t: _replace(GOOD, "-c", _yaml(t, "models:\n  x: {path: a, foo: 1}\n")), "models.x.foo"),
    "unknown top key": (lambda t: _replace(GOOD, "-c", _yaml(t, "modles: {}\n")), "'modles'"),
    "missing model path": (lambda t: _replace(_replace(GOOD, "-c", _yaml(t, "models:\n  ghost: /nonexistent/dir\n")),
                                              "-m", "ghost"), "/nonexistent/dir"),
    "ext-shot too large": (lambda t: GOOD + ["-s", "100000"], "--ext-shot 100000"),
    "shot too large": (lambda t: GOOD + ["--shot", "100000"], "--shot 100000"),
    "zero episodes": (lambda t: _replace(GOOD, "-e", "0"), "--episodes 0"),
    "negative eval episodes": (lambda t: _replace(GOOD, "-n", "-5"), "--eval-episodes -5"),
    "strength not a number": (lambda t: GOOD + ["--strength", "abc"], "'abc'"),
    "strength nan": (lambda t: GOOD + ["--strength", "nan"], "--strength nan"),
    "unknown method": (lambda t: GOOD + ["--method", "bogus"], "'bogus'"),
    "unknown flag": (lambda t: GOOD + ["--bogus-flag"], "--bogus-flag"),
    "colliding labels": (lambda t: _replace(GOOD, "-c", _yaml(
        t, "models:\n  tiny-gpt2: {builtin: tiny-gpt2}\ntasks:\n  review_sentiment: "
           "{builtin: review_sentiment, label_words: [goodish, good]}\n")), "'good'"),
    "missing vectors file": (lambda t: GOOD + ["--load-vectors", str(t / "none.safetensors")], "none.safetensors"),
    "vectors for a stateless method": (lambda t: GOOD + ["--method", "icl", "--save-vectors", str(t / "v.st")], "'icl'"),
    "results under a file": (lambda t: _replace(GOOD + ["--results", "x"], "--results", str(t / "runs.jsonl" / "x.jsonl")),
                             "runs.jsonl"),
    "no such gpu": (lambda t: GOOD + ["-g", "99"], "-g 99"),
    "device map on cpu": (lambda t: GOOD + ["--device-map", "balanced"], "--device-map"),
    "task without label column": (lambda t: _replace(_replace(GOOD, "-c", _no_label_parquet(t)), "-t", "nolabel"),
                                  "'label'"),
    "unknown builtin model": (lambda t: _replace(_replace(GOOD, "-c", _yaml(t, "models:\n  m: {builtin: tiny-rwkv}\n")),
                                                 "-m", "m"), "tiny-rwkv"),
}


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
    proc = subprocess.run([sys.executable, "iv.py", *_replace(GOOD, "-m", "nope"), "--results", str(tmp_path / "r")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
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
