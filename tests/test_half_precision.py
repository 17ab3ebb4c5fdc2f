"""Issue 29 item 6: an explicit `dtype` in a model entry is honoured on a CPU too (with one line saying
so), so every method can be run in bfloat16 and float16 here: the CPU stand-in for the GPU's default
half precision. Each registered method runs end to end through the CLI on a tiny model, with tiny
settings; the run completes and every number in its record is finite."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from ivlib.cli import main
from ivlib.methods import METHODS
from ivlib.models import choose_dtype

REPO = Path(__file__).resolve().parent.parent
# one flag set for every method (a flag of another method is ignored): each fit a few steps long
TINY = ["-t", "review_sentiment", "-n", "8", "--batch-size", "4", "-s", "1", "-e", "8", "--select-episodes", "4"]
TINY += ["--ie-episodes", "2", "--dt-steps", "2", "--i2cl-epochs", "2", "--site-steps", "2", "--site-val-every", "1"]


def _non_finite(value: Any, where: str = "") -> list[str]:
    """Paths of every float in a record that is inf or NaN."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [where]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _non_finite(v, f"{where}[{i}]")]
    return []


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("half") / "half.yaml"
    entries = [
        f"  tiny-{arch}-{dtype}: {{builtin: tiny-{arch}, dtype: {dtype}}}"
        for arch in ("llama", "gpt2")
        for dtype in ("bfloat16", "float16")
    ]
    path.write_text("models:\n" + "\n".join(entries) + "\n")
    return str(path)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_in_half_precision_on_cpu(registry, tmp_path, monkeypatch, capsys, method, dtype):
    monkeypatch.chdir(REPO)
    results = tmp_path / "runs.jsonl"
    argv = ["-c", registry, "-m", f"tiny-llama-{dtype}", "--method", method, *TINY, "--quiet"]
    assert main(argv + ["--results", str(results)]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert records and all(r["dtype"] == dtype for r in records)
    for record in records:
        assert not _non_finite(record), _non_finite(record)


def test_the_registry_dtype_is_said_in_one_line_and_kept_in_the_record(registry, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    results = tmp_path / "runs.jsonl"
    argv = ["-c", registry, "-m", "tiny-gpt2-bfloat16", "--method", "zero-shot", *TINY, "--results", str(results)]
    capsys.readouterr()
    assert main(argv) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "dtype" in line]
    assert notes == ["[ivlib] model 'tiny-gpt2-bfloat16': dtype bfloat16 on CPU (from the registry entry)"]
    assert json.loads(results.read_text())["dtype"] == "bfloat16"


def test_no_half_and_the_defaults_are_unchanged():
    cpu, entry = torch.device("cpu"), {"dtype": "float16"}
    assert choose_dtype({}, cpu, no_half=False) == torch.float32  # no dtype given: float32 on a CPU, as before
    assert choose_dtype(entry, cpu, no_half=False) == torch.float16
    assert choose_dtype(entry, cpu, no_half=True) == torch.float32  # --no-half wins over the entry
