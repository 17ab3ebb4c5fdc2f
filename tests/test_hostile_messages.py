"""Messages that said something false (issue 29, item 5), each made true: a pipe as a data file is
not "empty (0 bytes)", a save under /proc is not on a "full" file system, and an overflow names the
method's own settings instead of "the strengths" (DT has none). `-c /dev/zero` ("does not exist"):
see test_hostile_readers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import ivlib.experiment
import ivlib.results
from ivlib.batching import NonFinite
from ivlib.cli import main
from ivlib.methods import METHODS

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "config" / "tiny.yaml")
GOOD = ["-c", TINY, "-m", "tiny-gpt2", "-t", "review_sentiment", "-e", "4", "-n", "4", "--quiet"]


def _refused(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_a_pipe_as_a_data_file_says_it_is_a_pipe(tmp_path, capsys):
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"tasks:\n  piped: {{data_files: {{train: {fifo}}}, label_names: [a, b]}}\n")
    err = _refused(
        ["-c", TINY, "-c", str(cfg), "-m", "tiny-gpt2", "-t", "piped", "--results", str(tmp_path / "r")], capsys
    )
    assert f"data file '{fifo}' is a named pipe (FIFO), not a file" in err and "empty" not in err


@pytest.fixture()
def no_model(monkeypatch):
    monkeypatch.setattr(ivlib.experiment, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))


def test_a_save_under_proc_is_not_called_full(tmp_path, capsys, no_model):
    err = _refused(
        [*GOOD, "--save-vectors", "/proc/ivlib-test/iv.safetensors", "--results", str(tmp_path / "r")], capsys
    )
    assert "is full" not in err
    assert "virtual file system with no storage" in err or "is not writable" in err  # root may write /proc's bits


def test_a_file_system_without_storage_is_named_as_such(tmp_path, capsys, monkeypatch, no_model):
    real = os.statvfs

    class Virtual:
        def __init__(self, result: os.statvfs_result):
            self.f_frsize, self.f_bavail, self.f_blocks = result.f_frsize, 0, 0

    monkeypatch.setattr(ivlib.results.os, "statvfs", lambda p: Virtual(real(p)))
    err = _refused([*GOOD, "--results", str(tmp_path / "r.jsonl")], capsys)
    assert f"'{tmp_path}' is on a virtual file system with no storage (such as /proc or /sys)" in err


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--method", "dt", "--dt-eta", "1e30", "--select-episodes", "4", "--dt-steps", "2"], "a smaller --dt-eta"),
        (["--method", "iv", "-s", "1", "--strength", "1e30"], "a smaller --strength or --ext-strength"),
    ],
    ids=["dt", "iv"],
)
def test_an_overflow_names_the_methods_own_setting(tmp_path, capsys, flags, named):
    err = _refused([*GOOD, *flags, "--results", str(tmp_path / "r.jsonl")], capsys)
    assert "non-finite values (inf/NaN) in the activations" in err and named in err, err
    assert "strengths" not in err and "--no-half" not in err  # float32 on CPU: --no-half would change nothing


def test_the_advice_follows_the_method_and_the_precision():
    plain = NonFinite("x", torch.float32)
    assert str(plain) == "x; accepted: smaller values of the settings that scale the method's edits"
    assert str(plain.advised(METHODS["dt"].scaling_flags())) == "x; accepted: a smaller --dt-eta"
    assert str(plain.advised(METHODS["icv"].scaling_flags())) == "x; accepted: a smaller --icv-strength"
    icl = plain.advised(METHODS["icl"].scaling_flags())
    assert str(icl) == "x; the model itself overflows on these prompts in float32"
    half = NonFinite("x", torch.bfloat16).advised(METHODS["icl"].scaling_flags())
    assert str(half) == "x; accepted: --no-half (the model runs in bfloat16)"
    both = NonFinite("x", torch.float16).advised(METHODS["sv"].scaling_flags())
    assert str(both) == "x; accepted: a smaller --sv-lr, or --no-half (the model runs in float16)"
