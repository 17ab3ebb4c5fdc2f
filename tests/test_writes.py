"""Writes that fail (issue 14, class 5): what can be checked is checked before the compute; an append
that fails half-way is cut back so no fragment stays; a record written whole whose fsync fails is
reported as such; the vectors file and the samples log are whole or absent. One line, exit 2."""

import errno
import json
import os
from pathlib import Path

import pytest

import ivlib.results
from ivlib.cli import main
from ivlib.results import WriteFailed, append_record

REPO = Path(__file__).resolve().parent.parent
GOOD = ["-c", "config/tiny.yaml", "-m", "tiny-gpt2", "-t", "review_sentiment", "-e", "4", "-n", "8", "--quiet"]
EARLIER = b'{"earlier": "record"}\n'


def _run(argv, capsys):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return code, err


def _on(path):
    """Whether descriptor `fd` is open on `path` (the fakes below fail that file's writes only)."""
    return lambda fd: os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(path)


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    path = tmp_path / "runs.jsonl"
    path.write_bytes(EARLIER)
    return path


def test_an_append_that_fails_half_way_leaves_the_file_as_it_was(results, monkeypatch, capsys):
    real_write, on_results = os.write, _on(results)

    def half_then_full(fd, data):
        if on_results(fd):
            real_write(fd, data[: len(data) // 2])  # the disk fills in the middle of the record
            half_then_full.calls += 1
            if half_then_full.calls > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return len(data) // 2
        return real_write(fd, data)

    half_then_full.calls = 0
    monkeypatch.setattr(ivlib.results.os, "write", half_then_full)
    code, err = _run(GOOD + ["--results", str(results)], capsys)
    assert half_then_full.calls == 2  # the fragment was really written before the failure
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "No space left on device" in err and "back to its previous 22 bytes" in err, err
    assert results.read_bytes() == EARLIER


def test_a_record_written_whole_whose_fsync_fails_is_reported_as_such(results, monkeypatch, capsys):
    real_fsync, on_results = os.fsync, _on(results)

    def failing_fsync(fd):
        if on_results(fd):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)

    monkeypatch.setattr(ivlib.results.os, "fsync", failing_fsync)
    code, err = _run(GOOD + ["--results", str(results)], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "written whole but fsync failed (Input/output error)" in err, err
    lines = results.read_bytes().splitlines(keepends=True)
    assert lines[0] == EARLIER and len(lines) == 2 and json.loads(lines[1])["method"] == "iv"


def test_appending_to_a_device_that_is_full_is_one_error():
    with pytest.raises(WriteFailed, match=r"No space left on device") as caught:
        append_record("/dev/full", {"a": 1})
    assert "\n" not in str(caught.value)


def test_a_vectors_file_that_cannot_be_written_leaves_nothing(results, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    vectors = tmp_path / "iv.safetensors"
    code, err = _run(GOOD + ["-s", "1", "--save-vectors", str(vectors), "--results", str(results)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "could not be written (No space left" in err, err
    assert not vectors.exists() and not list(tmp_path.glob("*.partial"))
    assert results.read_bytes() == EARLIER


def test_a_samples_log_that_cannot_be_written_leaves_no_log_and_no_record(results, monkeypatch, capsys):
    import ivlib.samples

    def eio(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(ivlib.samples.os, "fsync", eio)
    code, err = _run(GOOD + ["--log-samples", "--results", str(results)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "--log-samples" in err and "Input/output error" in err, err
    assert results.read_bytes() == EARLIER
    folder = results.with_name("runs.samples")
    assert not folder.exists() or not list(folder.iterdir())


def test_a_full_file_system_is_refused_before_the_compute(results, monkeypatch, capsys):
    import ivlib.experiment

    real = os.statvfs

    class Full:
        def __init__(self, real_result):
            self.f_frsize, self.f_bavail, self.f_blocks = real_result.f_frsize, 3, real_result.f_blocks

    monkeypatch.setattr(ivlib.results.os, "statvfs", lambda p: Full(real(p)))
    monkeypatch.setattr(ivlib.experiment, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    code, err = _run(GOOD + ["--results", str(results)], capsys)
    assert code == 2 and "is full" in err and str(results.parent) in err, err
    assert results.read_bytes() == EARLIER


def _loop(tmp):
    (tmp / "loop").symlink_to(tmp / "loop")
    return str(tmp / "loop")


def _dangling(tmp):
    (tmp / "dangling").symlink_to(tmp / "no" / "such.jsonl")
    return str(tmp / "dangling")


def _samples_name_taken(tmp):
    (tmp / "r.samples").write_text("a file where the log folder goes")
    return ["--log-samples", "--results", str(tmp / "r.jsonl")]


PATH_CASES = {
    "results is /dev/full": (lambda t: ["--results", "/dev/full"], "is not a regular file"),
    "results is a symlink loop": (lambda t: ["--results", _loop(t)], "is a symbolic link that loops"),
    "results is a dangling symlink": (lambda t: ["--results", _dangling(t)], "which does not exist"),
    "results ends with a slash": (lambda t: ["--results", str(t / "out") + "/"], "ends with '/', a directory"),
    "vectors to /dev/full": (lambda t: ["--save-vectors", "/dev/full"], "--save-vectors '/dev/full' is not a regular"),
    "vectors to a symlink loop": (lambda t: ["--save-vectors", _loop(t)], "--save-vectors"),
    "vectors path ends with a slash": (lambda t: ["--save-vectors", str(t / "v") + "/"], "ends with '/'"),
    "samples folder name taken by a file": (_samples_name_taken, "is a file, not a folder"),
}


@pytest.mark.parametrize("case", sorted(PATH_CASES))
def test_unwritable_paths_are_refused_before_the_model_loads(case, tmp_path, monkeypatch, capsys):
    import ivlib.experiment

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(ivlib.experiment, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    build, needle = PATH_CASES[case]
    extra = build(tmp_path)
    if "--results" not in extra:
        extra += ["--results", str(tmp_path / "r.jsonl")]
    code, err = _run(GOOD + extra, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists()
    assert os.path.exists("/dev/full") and not os.path.isfile("/dev/full")  # the device itself untouched
