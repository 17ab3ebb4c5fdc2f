"""Same command, same record; batch size changes nothing; local model and data never touch the network."""

import json
import socket
from pathlib import Path

import datasets  # noqa: F401  imported before the offline variables are set, as in a long-lived process
import pandas as pd
import pytest

from ivlib.builtin_tasks import vocabulary
from ivlib.cli import main
from ivlib.tiny import build_tiny

REPO = Path(__file__).resolve().parent.parent
VOLATILE = {"time", "timing_s", "eval_episodes_per_s", "command", "batch_size", "batch_size_requested"}
RUN = [
    "-c",
    "config/tiny.yaml",
    "-m",
    "tiny-llama",
    "-t",
    "review_sentiment",
    "-s",
    "2",
    "-e",
    "10",
    "-n",
    "40",
    "--quiet",
]


def _stable(record):
    return {k: v for k, v in record.items() if k not in VOLATILE}


@pytest.mark.parametrize("method", ["iv", "dt"])
def test_same_command_twice_gives_the_same_record(tmp_path, monkeypatch, method):
    monkeypatch.chdir(REPO)
    out = tmp_path / "runs.jsonl"
    argv = RUN + ["--method", method, "--dt-steps", "3", "--select-episodes", "8", "--results", str(out)]
    assert main(argv) == 0 and main(argv) == 0
    first, second = [json.loads(line) for line in out.read_text().splitlines()]
    assert _stable(first) == _stable(second)


def test_batch_size_does_not_change_predictions(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "runs.jsonl"
    for bs in ("1", "7", "16"):
        assert main(RUN + ["--batch-size", bs, "--results", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({json.dumps(_stable(r), sort_keys=True) for r in records}) == 1
    assert [r["batch_size"] for r in records] == [1, 7, 16]


def test_local_model_and_data_run_with_the_network_cut(tmp_path, monkeypatch):
    model, tok = build_tiny("llama", vocabulary())
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    texts = [f"The film was {w} {i}." for i in range(60) for w in ("great",)] + [
        f"The film was awful {i}." for i in range(60)
    ]
    pd.DataFrame(
        {"text": texts, "label": [1] * 60 + [0] * 60, "label_text": ["positive"] * 60 + ["negative"] * 60}
    ).to_parquet(tmp_path / "train.parquet")
    cfg = tmp_path / "offline.yaml"
    cfg.write_text(
        f"models:\n  local-llama: {tmp_path / 'model'}\n"
        f"tasks:\n  local-reviews: {{data_files: {{train: {tmp_path / 'train.parquet'}}}}}\n"
    )
    for var, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("HF_DATASETS_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("HF_ENDPOINT", "http://127.0.0.1:9"),
    ):
        monkeypatch.setenv(var, value)
    attempts = []

    def refuse(_self, address, *args):
        attempts.append(address)
        raise OSError(f"network call attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    out = tmp_path / "runs.jsonl"
    for method in ("icl", "iv"):
        assert (
            main(
                [
                    "-c",
                    str(cfg),
                    "-m",
                    "local-llama",
                    "-t",
                    "local-reviews",
                    "--method",
                    method,
                    "-s",
                    "1",
                    "-e",
                    "6",
                    "-n",
                    "10",
                    "--quiet",
                    "--results",
                    str(out),
                ]
            )
            == 0
        )
    assert attempts == []
    assert len(out.read_text().splitlines()) == 2
