"""Issue 29 item 6: the GGUF conversion cache is keyed by the file's content (sha256), so the same file
installed in several environments (another path each) is converted once; the hash is computed once per
(path, size, modification time) and remembered, and a memo that is not ivlib's is ignored, never trusted.

The conversion itself is replaced by saving a tiny model (as in test_byom.py)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from ivlib import models
from ivlib.builtin_tasks import vocabulary
from ivlib.cli import main
from ivlib.tiny import build_tiny

CONTENT = b"GGUF the same bytes in every environment"


@pytest.fixture()
def conversions(monkeypatch, tmp_path) -> list[str]:
    monkeypatch.setenv("IVLIB_CACHE", str(tmp_path / "cache"))
    calls: list[str] = []

    def convert(folder: str, gguf_file: str, out: Path, quiet: bool) -> None:
        calls.append(str(Path(folder) / gguf_file))
        model, tokenizer = build_tiny("gpt2", vocabulary())
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return calls


def _install(root: Path, content: bytes = CONTENT) -> Path:
    """The package's GGUF file as one environment's site-packages holds it."""
    folder = root / "lib" / "site-packages" / "llm_pkg"
    folder.mkdir(parents=True)
    (folder / "model.gguf").write_bytes(content)
    return folder


def test_one_conversion_serves_every_environment(tmp_path, conversions):
    envs = [_install(tmp_path / f"venv{i}") for i in range(3)]
    targets = [models._gguf_checkpoint("smol", str(env), "model.gguf", quiet=True) for env in envs]
    assert len(conversions) == 1 and len({folder for folder, _ in targets}) == 1
    assert {identity["sha256"] for _, identity in targets} == {hashlib.sha256(CONTENT).hexdigest()}
    assert [identity["path"] for _, identity in targets] == [str((env / "model.gguf").resolve()) for env in envs]


def test_the_record_names_the_file_that_ran_and_its_hash(tmp_path, conversions, monkeypatch):
    cfg = tmp_path / "models.yaml"
    folder = _install(tmp_path / "venv")
    cfg.write_text(f"models:\n  smol: {{path: '{folder}', gguf_file: model.gguf}}\n")
    runs = tmp_path / "runs.jsonl"
    argv = ["-c", str(cfg), "-m", "smol", "-t", "review_sentiment", "--method", "zero-shot", "-n", "4", "--quiet"]
    assert main([*argv, "--results", str(runs)]) == 0
    identity = json.loads(runs.read_text())["model_identity"]
    assert identity["sha256"] == hashlib.sha256(CONTENT).hexdigest() and identity["file"] == "model.gguf"


def test_the_hash_is_remembered_by_path_size_and_mtime(tmp_path, conversions):
    folder = _install(tmp_path / "venv")
    path = folder / "model.gguf"
    _, first = models._gguf_checkpoint("smol", str(folder), "model.gguf", quiet=True)
    stat = path.stat()
    path.write_bytes(CONTENT.upper())  # same size, same mtime restored: the remembered hash is used, unread
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _, again = models._gguf_checkpoint("smol", str(folder), "model.gguf", quiet=True)
    assert again["sha256"] == first["sha256"] and len(conversions) == 1
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hashed again, new bytes seen
    _, touched = models._gguf_checkpoint("smol", str(folder), "model.gguf", quiet=True)
    assert touched["sha256"] == hashlib.sha256(CONTENT.upper()).hexdigest() and len(conversions) == 2


@pytest.mark.parametrize("memo", ["garbage", "list", "wrong-source", "directory", "symlink"])
def test_a_memo_that_is_not_ivlib_s_is_never_trusted(tmp_path, conversions, memo):
    folder = _install(tmp_path / "venv")
    identity = models.source_identity(folder / "model.gguf")
    models.content_sha256(identity)
    (written,) = (Path(os.environ["IVLIB_CACHE"]) / "sha256").glob("*.json")
    written.unlink()
    lie = {"source": [identity["path"], identity["size"], identity["mtime_ns"]], "sha256": "0" * 64}
    if memo == "garbage":
        written.write_bytes(b"\xff not json")
    elif memo == "list":
        written.write_text("[1, 2]")
    elif memo == "wrong-source":
        written.write_text(json.dumps({**lie, "source": ["/elsewhere", 1, 1]}))
    elif memo == "directory":
        written.mkdir()
    else:
        target = tmp_path / "planted.json"
        target.write_text(json.dumps(lie))
        written.symlink_to(target)
    assert models.content_sha256(identity) == hashlib.sha256(CONTENT).hexdigest()
