"""Untrusted files and names (issue 14, class 6): pickle weights the safe loader refuses are one line
(and never run); a registry name never takes a cache path outside the cache; ivlib deletes only the
folders it made there."""

import pickle
from pathlib import Path

import pytest
import torch

from ivlib import models
from ivlib.builtin_tasks import vocabulary
from ivlib.cli import main
from ivlib.errors import UsageError
from ivlib.tiny import build_tiny

REPO = Path(__file__).resolve().parent.parent


class _Payload:
    """What a hostile checkpoint runs when unpickled without the weights-only loader: creates a file."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_weights_the_safe_loader_refuses_are_one_line_and_never_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    folder = tmp_path / "hostile"
    model, tokenizer = build_tiny("gpt2", vocabulary())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    ran = tmp_path / "payload-ran"
    torch.save({"transformer.wte.weight": _Payload(ran)}, folder / "pytorch_model.bin")
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"models:\n  hostile: {{path: '{folder}'}}\n")
    argv = ["-c", "config/tiny.yaml", "-c", str(cfg), "-m", "hostile", "-t", "review_sentiment", "--method", "icl"]
    capsys.readouterr()  # save_pretrained's own progress bar
    code = main(argv + ["-n", "4", "--quiet", "--results", str(tmp_path / "r.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "refused by torch's safe loader" in err and "Unsupported global" in err, err
    assert not ran.exists() and not (tmp_path / "r.jsonl").exists()


NAMES = ["../../victim", "/etc", "..", ".", "a/../../../b", "~root", "x\x00y", "../" * 20, "é/../ü", ""]


@pytest.mark.parametrize("name", NAMES)
def test_a_registry_name_never_leaves_the_cache(name, tmp_path, monkeypatch):
    monkeypatch.setenv("IVLIB_CACHE", str(tmp_path / "cache"))
    folder = models.checkpoint_dir(name, {"path": "/x.gguf", "size": 1, "mtime_ns": 1})
    assert folder.parent == tmp_path / "cache" / "models"
    assert folder.resolve().parent == (tmp_path / "cache" / "models").resolve()
    assert folder.name not in ("", ".", "..")


def test_a_hostile_name_converts_inside_the_cache_and_deletes_nothing_outside(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("IVLIB_CACHE", str(cache))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    gguf = tmp_path / "src" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake")

    def convert(_folder, _gguf_file, out, _quiet):
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    for name in ("../../victim", "../victim", str(victim)):
        target, _ = models._gguf_checkpoint(name, str(gguf.parent), gguf.name, quiet=True)
        assert Path(target).resolve().is_relative_to(cache.resolve())
    assert (victim / "precious.txt").read_text() == "keep me"


def test_only_folders_ivlib_made_are_deleted(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("IVLIB_CACHE", str(cache))
    inside = cache / "models"
    inside.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / models.CACHE_MARKER).write_text("{}")  # a marker does not make a folder outside the cache ivlib's
    unmarked = inside / "unmarked"
    unmarked.mkdir()
    link = inside / "link"
    link.symlink_to(outside, target_is_directory=True)
    for folder in (outside, unmarked, link):
        with pytest.raises(UsageError, match="ivlib"):
            models._remove_own(folder)
    assert outside.is_dir() and unmarked.is_dir() and link.is_symlink()
    own = inside / "own"
    own.mkdir()
    (own / models.CACHE_MARKER).write_text("{}")
    models._remove_own(own)
    assert not own.exists()


def test_the_payload_would_run_under_a_plain_unpickler(tmp_path):
    """The test's hostile file is really hostile: a plain pickle load runs it (so its refusal above means something)."""
    ran = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(ran)))
    assert ran.exists()
