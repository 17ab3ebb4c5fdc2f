"""Issue 20, bring your own model: the GGUF conversion cache is keyed by the source file's content
(a changed file is converted again, a missing one is refused even when a cache exists,
no registry name escapes the cache), the record names the file that ran; the one-time conversion
says so in one line; several -c files merge in order; a multi-part package's `assemble` entry point.

The conversion itself is replaced by saving a tiny model (no GGUF reader needed): what is tested is
ivlib's keying, checking and recording around it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from ivlib import models
from ivlib.builtin_tasks import vocabulary
from ivlib.cli import main
from ivlib.errors import UsageError
from ivlib.tiny import build_tiny


@pytest.fixture()
def fake_conversion(monkeypatch, tmp_path):
    """IVLIB_CACHE in tmp; `_convert_gguf` saves a tiny GPT-2 and counts its calls."""
    monkeypatch.setenv("IVLIB_CACHE", str(tmp_path / "cache"))
    calls: list[str] = []

    def convert(folder: str, gguf_file: str, out: Path, quiet: bool) -> None:
        calls.append(str(Path(folder) / gguf_file))
        model, tokenizer = build_tiny("gpt2", vocabulary())
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return calls


def _gguf(folder: Path, name: str, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content)
    return path


def test_changed_source_changes_the_key_and_missing_source_is_refused(tmp_path, fake_conversion, capsys):
    weights = tmp_path / "weights"
    path = _gguf(weights, "a.gguf", b"GGUF one")
    first, identity = models._gguf_checkpoint("m", str(weights), "a.gguf", quiet=True)
    assert identity["path"] == str(path.resolve()) and identity["size"] == 8
    notice = [line for line in capsys.readouterr().err.splitlines() if "[ivlib]" in line]
    assert len(notice) == 1 and "converting a.gguf" in notice[0] and "once, about 10 s;" in notice[0]  # how long
    again, _ = models._gguf_checkpoint("m", str(weights), "a.gguf", quiet=True)
    assert again == first and len(fake_conversion) == 1 and "[ivlib]" not in capsys.readouterr().err  # cached: silent

    path.write_bytes(b"GGUF two, longer")  # same registry name, the file changed
    changed, _ = models._gguf_checkpoint("m", str(weights), "a.gguf", quiet=True)
    assert changed != first and len(fake_conversion) == 2
    _gguf(weights, "b.gguf", b"GGUF one")  # another file under the same name, the first one's bytes
    other, _ = models._gguf_checkpoint("m", str(weights), "b.gguf", quiet=True)
    assert other == first and len(fake_conversion) == 2  # keyed by content: the first conversion serves it
    _gguf(weights, "c.gguf", b"GGUF three")  # another file, other bytes
    third, _ = models._gguf_checkpoint("m", str(weights), "c.gguf", quiet=True)
    assert third not in (first, changed) and len(fake_conversion) == 3

    path.unlink()  # a cache for a.gguf exists, the file does not: refused, not served
    with pytest.raises(UsageError, match=r"GGUF file '.*a\.gguf' does not exist") as err:
        models._gguf_checkpoint("m", str(weights), "a.gguf", quiet=True)
    assert "\n" not in str(err.value)


def test_touched_is_the_same_key_other_bytes_another(tmp_path, monkeypatch):
    monkeypatch.setenv("IVLIB_CACHE", str(tmp_path / "cache"))
    path = _gguf(tmp_path, "a.gguf", b"GGUF")
    before = models.content_identity(path)
    os.utime(path, ns=(before["mtime_ns"] + 10**9, before["mtime_ns"] + 10**9))
    assert models.checkpoint_dir("m", models.content_identity(path)) == models.checkpoint_dir("m", before)
    path.write_bytes(b"GGUF, other bytes")
    assert models.checkpoint_dir("m", models.content_identity(path)) != models.checkpoint_dir("m", before)


@pytest.mark.parametrize("name", ["../../escape", "/abs/olute", "..", "a/../../b", "ok name"])
def test_registry_name_stays_inside_the_cache(tmp_path, monkeypatch, name):
    monkeypatch.setenv("IVLIB_CACHE", str(tmp_path / "cache"))
    target = models.checkpoint_dir(name, models.source_identity(_gguf(tmp_path, "a.gguf", b"x")))
    assert target.parent == tmp_path / "cache" / "models" and "/" not in target.name and not target.name.startswith(".")


def test_refuses_to_delete_what_ivlib_did_not_make(tmp_path, fake_conversion):
    path = _gguf(tmp_path / "w", "a.gguf", b"GGUF")
    target = models.checkpoint_dir("m", models.content_identity(path))
    (target.with_name(target.name + ".partial")).mkdir(parents=True)
    (target.with_name(target.name + ".partial") / "precious.txt").write_text("not ivlib's")
    with pytest.raises(UsageError, match="not made by ivlib"):
        models._gguf_checkpoint("m", str(tmp_path / "w"), "a.gguf", quiet=True)
    assert (target.with_name(target.name + ".partial") / "precious.txt").is_file()


def test_record_names_the_gguf_file_and_its_identity(tmp_path, fake_conversion):
    path = _gguf(tmp_path / "w", "model.gguf", b"GGUF bytes")
    cfg = tmp_path / "models.yaml"
    cfg.write_text("models:\n  mine: {path: ./w, gguf_file: model.gguf}\n")
    runs = tmp_path / "runs.jsonl"
    argv = ["-c", str(cfg), "-m", "mine", "-t", "review_sentiment", "--method", "zero-shot", "-n", "4"]
    assert main([*argv, "--quiet", "--results", str(runs)]) == 0
    record = json.loads(runs.read_text().splitlines()[-1])
    assert record["model_source"] == str(path.resolve())
    identity = record["model_identity"]
    assert identity["file"] == "model.gguf" and identity["size"] == len(b"GGUF bytes")
    assert Path(identity["checkpoint"]).parent == tmp_path / "cache" / "models"


# ---- several -c files -------------------------------------------------------------------------
def _two_files(tmp_path: Path) -> tuple[Path, Path]:
    tasks = tmp_path / "tasks" / "tasks.yaml"
    tasks.parent.mkdir()
    tasks.write_text("tasks:\n  mine: {builtin: review_sentiment, label_words: [bad, good]}\n")
    model_file = tmp_path / "models.yaml"
    model_file.write_text("models:\n  tiny: {builtin: tiny-llama}\n  tiny-gpt2: {builtin: tiny-llama}\n")
    return tasks, model_file


def test_task_from_one_file_model_from_another(tmp_path):
    tasks, model_file = _two_files(tmp_path)
    runs = tmp_path / "runs.jsonl"
    argv = ["-c", str(tasks), "-c", str(model_file), "-m", "tiny", "-t", "mine", "--method", "zero-shot", "-n", "4"]
    assert main([*argv, "--quiet", "--results", str(runs)]) == 0
    record = json.loads(runs.read_text())
    assert record["model_source"] == "builtin:tiny-llama" and record["task"] == "mine"
    assert record["config_files"] == [str(models_base()), str(tasks.resolve()), str(model_file.resolve())]


def models_base() -> Path:
    from ivlib.config import BASE_CONFIG

    return BASE_CONFIG


def test_later_files_replace_earlier_entries_and_one_string_still_works(tmp_path):
    from ivlib.api import load_task
    from ivlib.config import load_config
    from ivlib.experiment import Experiment, RunSpec

    tiny = Path(__file__).resolve().parent.parent / "config" / "tiny.yaml"
    tasks, model_file = _two_files(tmp_path)
    assert load_config([str(tiny), str(model_file)]).models["tiny-gpt2"] == {"builtin": "tiny-llama"}
    assert load_config([str(model_file), str(tiny)]).models["tiny-gpt2"] == {"builtin": "tiny-gpt2"}
    assert load_config(str(tiny)).sources == [str(models_base()), str(tiny)]
    assert load_task("mine", str(tasks)).label_words == ["bad", "good"]
    assert load_task("mine", [str(tasks), str(model_file)]).label_words == ["bad", "good"]
    spec = RunSpec(model="tiny-gpt2", task="review_sentiment", method="zero-shot", config=str(tiny))
    experiment = Experiment(spec)
    experiment.prepare()
    assert experiment.config is not None and experiment.config.sources[-1] == str(tiny)


# ---- a multi-part package: `assemble: module:function` ----------------------------------------
FAKE_PACKAGE = """
from pathlib import Path
CALLS = []
PARTS = [Path(__file__).parent / "part0", Path(__file__).parent / "part1"]

def assemble(output_path=None, overwrite=False):
    CALLS.append(output_path)
    target = Path(output_path)
    target.write_bytes(b"".join(p.read_bytes() for p in PARTS))
    return target
"""


@pytest.fixture()
def fake_package(tmp_path, monkeypatch):
    """An installed package `parts_pkg` whose assemble() joins two part files into one GGUF."""
    package = tmp_path / "site" / "parts_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_PACKAGE)
    (package / "part0").write_bytes(b"GGUF first half ")
    (package / "part1").write_bytes(b"second half")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield package
    sys.modules.pop("parts_pkg", None)


def test_assemble_entry_point_is_called_once_and_its_file_is_the_source(tmp_path, fake_package, fake_conversion):
    cfg = tmp_path / "models.yaml"
    cfg.write_text("models:\n  parts: {assemble: 'parts_pkg:assemble'}\n")
    runs = tmp_path / "runs.jsonl"
    argv = ["-c", str(cfg), "-m", "parts", "-t", "review_sentiment", "--method", "zero-shot", "-n", "4"]
    for _ in range(2):
        assert main([*argv, "--quiet", "--results", str(runs)]) == 0
    import parts_pkg

    assert len(parts_pkg.CALLS) == 1 and len(fake_conversion) == 1  # joined once, converted once
    assert Path(parts_pkg.CALLS[0]).parent.parent == tmp_path / "cache" / "assembled"  # written in ivlib's cache
    first, second = (json.loads(line) for line in runs.read_text().splitlines())
    assert first["model_source"] == second["model_source"] == str(Path(parts_pkg.CALLS[0]).resolve())
    assert first["model_identity"]["size"] == len(b"GGUF first half second half")

    Path(parts_pkg.CALLS[0]).unlink()  # the joined file is gone: assembled again, not served stale
    assert main([*argv, "--quiet", "--results", str(runs)]) == 0
    assert len(parts_pkg.CALLS) == 2


def test_assemble_errors_are_one_line(tmp_path, fake_package, capsys, monkeypatch):
    monkeypatch.setenv("IVLIB_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "models.yaml"
    cfg.write_text(
        "models:\n  nopkg: {assemble: 'no_such_pkg:assemble'}\n  nofn: {assemble: 'parts_pkg:missing'}\n"
        "  both: {assemble: 'parts_pkg:assemble', gguf_file: x.gguf}\n  bare: {package: parts_pkg, gguf_file: x.gguf}\n"
    )
    expected = {
        "nopkg": "'no_such_pkg' (assemble) is not installed",
        "nofn": "has no function 'missing'",
        "both": "assemble replaces gguf_file",
        "bare": "assemble: module:function",  # a package without the joined file: the error says how to register it
    }
    for model, message in expected.items():
        argv = ["-c", str(cfg), "-m", model, "-t", "review_sentiment", "--method", "zero-shot", "-n", "4", "--quiet"]
        assert main([*argv, "--results", str(tmp_path / "runs.jsonl")]) == 2
        err = capsys.readouterr().err
        assert message in err and len([line for line in err.splitlines() if line.strip()]) == 1, err
