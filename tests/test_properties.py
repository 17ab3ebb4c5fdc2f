"""Property-based tests of the bad-input contract (issue 14): whatever registry entry, data file or
flag values a user gives, a run either succeeds (exit 0, its records appended whole) or refuses
(exit 2, one line on stderr, no traceback, the results file byte-identical). Never a traceback,
never a partial file.

hypothesis generates the inputs, derandomized (the same cases on every run, so CI is deterministic),
with small example counts: each case is a real in-process run on the tiny model (about 0.5 s) or
a refusal before the model loads. The flag property stops every accepted run where the model
would load: what it checks is that the checks before that point refuse, in one line, all the
values they should, and pass the rest.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import ivlib.experiment
from ivlib.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "config" / "tiny.yaml")
EARLIER = b'{"earlier": "record"}\n'
FAST = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _contract(argv: list[str], folder: Path) -> tuple[int, str]:
    """Run the CLI in-process; assert the contract; (exit code, stderr)."""
    results = folder / "runs.jsonl"
    results.write_bytes(EARLIER)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([*argv, "--quiet", "--results", str(results)])
    message = err.getvalue().strip()
    after = results.read_bytes()
    event(
        f"exit {code}: "
        + (re.sub(r"'[^']*'|\d+", "_", message.removeprefix("iv.py: error: "))[:60] if code else "a record")
    )
    if code == 0:
        assert after.startswith(EARLIER), "an earlier record changed"
        new = after[len(EARLIER) :].splitlines()
        assert new and all(isinstance(json.loads(line), dict) for line in new), "a record is not whole"
    else:
        assert code == 2, message
        assert len(message.splitlines()) == 1 and "Traceback" not in message, message
        assert message.startswith("iv.py: error: "), message
        assert after == EARLIER, "a refused run changed the results file"
    return code, message


def _config(folder: Path, data: dict) -> str:
    path = folder / "generated.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return str(path)


# ---- registry entries ----------------------------------------------------------------------------
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 10),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "bad", "good", "auto", "float32", "bfloat16", "text", "label", "train", "h", "0"]),
    st.text(max_size=8),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(
        st.sampled_from(["train", "test", "validation", "blocks", "options", "answer"]), SCALARS, max_size=2
    ),
)
TASK_VALUES = {
    "label_words": st.one_of(st.just(["bad", "good"]), st.just(["good", "bad"]), VALUES),
    "label_names": VALUES,
    "text_fields": st.one_of(st.just("text"), st.just(["text"]), VALUES),
    "label_field": st.one_of(st.just("label"), VALUES),
    "splits": st.one_of(st.just({"train": "train", "test": "test"}), VALUES),
    "subset": VALUES,
    "multiple_choice": VALUES,
    "unknown_key": VALUES,
}
MODEL_VALUES = {
    "dtype": st.one_of(st.sampled_from(["float32", "float16", "bfloat16"]), VALUES),
    "bos": st.one_of(st.sampled_from(["auto", True, False]), VALUES),
    "fv_heads": st.one_of(st.integers(1, 8), VALUES),
    "trust_remote_code": st.one_of(st.booleans(), VALUES),
    "layout": st.one_of(st.just({"blocks": "transformer.h"}), st.just({"attn_out": "attn.c_proj"}), VALUES),
    "builtin": st.one_of(st.sampled_from(["tiny-gpt2", "tiny-llama", "tiny-rwkv"]), VALUES),
}


def _entry(base: dict, values: dict) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({}, optional=values).map(lambda extra: {**base, **extra})


@FAST
@given(task=_entry({"builtin": "review_sentiment"}, TASK_VALUES), model=_entry({"builtin": "tiny-gpt2"}, MODEL_VALUES))
def test_any_registry_entry_runs_or_is_refused_in_one_line(task, model):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cfg = _config(folder, {"models": {"m": model}, "tasks": {"t": task}})
        argv = ["-c", TINY, "-c", cfg, "-m", "m", "-t", "t", "--method", "icl", "-n", "4"]
        _contract(argv, folder)


# ---- data files ---------------------------------------------------------------------------------
LABELS = st.one_of(
    st.integers(-2, 2),
    st.sampled_from([0, 1, 1, 0, 0.0, 1.0, 0.5, math.nan, None, "neg", "pos", -1]),
)
TEXTS = st.one_of(
    st.sampled_from(["a fine film", "dull", "great", "awful plot", "x"]),
    st.sampled_from([None, "", "  ", math.nan]),
    st.text(min_size=1, max_size=12),
)


@st.composite
def _frames(draw):
    n = draw(st.integers(0, 60))
    base = [i % 2 for i in range(n)]
    labels = draw(st.one_of(st.just(base), st.lists(LABELS, min_size=n, max_size=n)))
    texts = [
        f"row {i} {t}" if t is not None and t == t else t
        for i, t in enumerate(draw(st.lists(TEXTS, min_size=n, max_size=n)))
    ]
    if draw(st.booleans()):  # mostly clean texts: a row that is missing should be the exception
        texts = [f"review number {i}" for i in range(n)]
    return pd.DataFrame({"text": pd.Series(texts, dtype=object), "label": pd.Series(labels, dtype=object)})


@FAST
@given(frame=_frames(), suffix=st.sampled_from(["parquet", "csv", "jsonl"]), names=st.booleans())
def test_any_data_file_runs_or_is_refused_in_one_line(frame, suffix, names):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / f"data.{suffix}"
        try:
            if suffix == "parquet":
                frame.to_parquet(path)
            elif suffix == "csv":
                frame.to_csv(path, index=False)
            else:
                frame.to_json(path, orient="records", lines=True)
        except (TypeError, ValueError, ArithmeticError):  # a mix pyarrow itself cannot store: no file to test
            return
        task = {"data_files": {"train": str(path)}, **({"label_names": ["neg", "pos"]} if names else {})}
        cfg = _config(folder, {"tasks": {"t": task}})
        argv = ["-c", TINY, "-c", cfg, "-m", "tiny-gpt2", "-t", "t", "--method", "icl", "-n", "4"]
        _contract(argv, folder)


# ---- flag values ---------------------------------------------------------------------------------
class _ModelWouldLoad(Exception):
    """Every check before the model passed."""


NUMBERS = st.one_of(
    st.integers(-3, 3),
    st.integers(-(2**70), 2**70),
    st.sampled_from(["0", "1", "-1", "1000001", "1e3", "abc", "", "inf", "-inf", "nan", "-nan", "2.5", "auto"]),
)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(["-inf", "inf", "nan", "-nan", "1e400", "-1e3", "abc", "0", "-0.5"]),
)
FLAGS = {
    "--seed": NUMBERS,
    "-n": NUMBERS,
    "-e": NUMBERS,
    "-s": NUMBERS,
    "--shot": NUMBERS,
    "--select-episodes": NUMBERS,
    "--batch-size": NUMBERS,
    "--max-example-tokens": NUMBERS,
    "--strength": st.lists(FLOATS, min_size=1, max_size=3),
    "--ext-strength": FLOATS,
    "--method": st.sampled_from(["iv", "icl", "tv", "fv", "dt", "zero-shot", "bogus"]),
    "--run-clean": st.just(None),
    "--load-vectors": st.just("missing.safetensors"),
    "--save-vectors": st.sampled_from(["v.safetensors", "/dev/full", "sub/", "runs.jsonl/v.st"]),
}


def _flag_argv(given: dict, folder: Path) -> list[str]:
    argv = []
    for flag, value in given.items():
        argv.append(flag)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            text = str(v)
            if flag.endswith("-vectors") and not text.startswith("/"):
                text = str(folder / text)
            argv.append(text if not text.startswith("-") or flag != "--method" else "bogus")
    return argv


@settings(FAST, max_examples=60)
@given(flags=st.fixed_dictionaries({}, optional=FLAGS))
def test_any_flag_values_are_refused_in_one_line_or_pass_every_check(flags):
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        folder = Path(tmp)

        def stop(_self):
            raise _ModelWouldLoad

        mp.setattr(ivlib.experiment.Experiment, "load", stop)
        argv = ["-c", TINY, "-m", "tiny-gpt2", "-t", "review_sentiment", *_flag_argv(flags, folder)]
        try:
            _contract(argv, folder)
        except _ModelWouldLoad:
            event("every check passed: the model would load")
            assert (folder / "runs.jsonl").read_bytes() == EARLIER


# ---- names used as paths -------------------------------------------------------------------------
@settings(FAST, max_examples=200)
@given(name=st.text(max_size=60))
def test_no_registry_name_leaves_the_conversion_cache(name):
    from ivlib import models

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setenv("IVLIB_CACHE", tmp)
        folder = models.checkpoint_dir(name, {"path": "/m.gguf", "size": 1, "mtime_ns": 1})
        assert folder.parent == Path(tmp) / "models" and folder.name not in ("", ".", "..")
        assert "/" not in folder.name and "\x00" not in folder.name


def test_the_shipped_registries_fit_the_schema():
    from ivlib.config import load_config

    cfg = load_config([TINY, str(REPO / "config" / "local.yaml")])
    assert {"tiny-gpt2", "tiny-llama", "smollm2-135m"} <= set(cfg.models)
    assert {"review_sentiment", "sst2-local", "commonsense_qa"} <= set(cfg.tasks)
