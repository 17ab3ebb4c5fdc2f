"""Issue 15, loading: an unreachable hub fails in seconds with a message naming HF_HUB_OFFLINE=1 and
local paths (models and datasets); config paths take ${IVLIB_DATA:-default}, and a missing data file
names the variable."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from ivlib import hub
from ivlib.cli import main
from ivlib.config import load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def no_network(monkeypatch):
    """Every socket connection refused (as offline), the hub client not told to be offline, no earlier probe."""
    attempts = []

    def refuse(_self, address, *args):
        attempts.append(address)
        raise OSError(f"network unreachable: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # restored after the test: offline mode is per process
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    hub.reset()
    yield attempts
    hub.reset()


@pytest.mark.parametrize(
    "entry, argv, names",
    [
        ("models:\n  remote: ivlib-test-org/no-such-model\n", ["-m", "remote", "-t", "review_sentiment"], "model"),
        (
            "tasks:\n  remote: {dataset: ivlib-test-org/no-such-dataset}\n",
            ["-c", "{cfg}", "-m", "tiny-gpt2", "-t", "remote"],
            "task",
        ),
    ],
    ids=["model", "dataset"],
)
def test_unreachable_hub_fails_in_seconds_naming_offline_mode(
    entry, argv, names, no_network, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(REPO)
    cfg = tmp_path / "remote.yaml"
    # the tiny models come from config/tiny.yaml, the remote entry from a second file merged over it
    # (one file with `models:` twice is refused: a key given twice)
    cfg.write_text(entry)
    argv = [a.replace("{cfg}", str(cfg)) for a in argv]
    if "-c" not in argv:
        argv = ["-c", str(cfg), *argv]
    argv = ["-c", "config/tiny.yaml", *argv]
    start = time.perf_counter()
    code = main([*argv, "--method", "icl", "-n", "4", "--quiet", "--results", str(tmp_path / "runs.jsonl")])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"iv.py: error: {names} 'remote': the hub (") and "cannot be reached" in err
    assert "HF_HUB_OFFLINE=1" in err and ("local directory" in err or "local data_files" in err)
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert no_network, "the hub was never probed"
    assert not (tmp_path / "runs.jsonl").exists()


def test_probe_runs_once_and_offline_request_skips_it(no_network, monkeypatch):
    assert hub.hub_reachable() is False and hub.hub_reachable() is False
    assert len(no_network) == 1  # the answer is kept for the process
    hub.reset()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_reachable() is False and len(no_network) == 1  # asked to be offline: no probe at all


# ---- data directory from the environment ----------------------------------------------------------


def test_config_paths_expand_the_data_variable(tmp_path, monkeypatch):
    cfg = tmp_path / "cfg" / "data.yaml"
    cfg.parent.mkdir()
    cfg.write_text(
        "tasks:\n"
        "  a: {data_files: {train: '${IVLIB_DATA:-../data}/a.parquet'}}\n"
        "  b: {data_files: {train: '$IVLIB_DATA/b.parquet'}}\n"
    )
    monkeypatch.setenv("IVLIB_DATA", str(tmp_path / "elsewhere"))
    tasks = load_config(str(cfg)).tasks
    assert tasks["a"]["data_files"]["train"] == str(tmp_path / "elsewhere" / "a.parquet")
    assert tasks["b"]["data_files"]["train"] == str(tmp_path / "elsewhere" / "b.parquet")
    monkeypatch.delenv("IVLIB_DATA")
    from ivlib.errors import UsageError

    with pytest.raises(UsageError, match=r"uses \$IVLIB_DATA, which is not set"):
        load_config(str(cfg))  # b has no default
    cfg.write_text("tasks:\n  a: {data_files: {train: '${IVLIB_DATA:-../data}/a.parquet'}}\n")
    assert load_config(str(cfg)).tasks["a"]["data_files"]["train"] == str(tmp_path / "data" / "a.parquet")


def test_local_config_names_the_variable_when_a_file_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("IVLIB_DATA", str(tmp_path / "nowhere"))
    argv = ["-c", "config/local.yaml", "-m", "smollm2-135m", "-t", "sst2-local", "--results", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"data file '{tmp_path / 'nowhere' / 'sst2-train.parquet'}' does not exist" in err
    assert "IVLIB_DATA" in err and len(err.splitlines()) == 1
