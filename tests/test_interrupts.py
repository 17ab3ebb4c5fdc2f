"""SIGINT / SIGTERM mid-run: every results line parses, the vectors file is whole or absent, the
message says what was saved, and --resume finishes the job."""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ivlib.state import load_state

REPO = Path(__file__).resolve().parent.parent
STRENGTHS = ["0.1", "0.3", "0.5", "0.7", "0.9"]


def _argv(results, vectors, episodes="20", n="400"):
    return [
        sys.executable,
        "iv.py",
        "-c",
        "config/tiny.yaml",
        "-m",
        "tiny-gpt2",
        "-t",
        "review_sentiment",
        "-s",
        "1",
        "-e",
        episodes,
        "-n",
        n,
        "--batch-size",
        "4",
        "--quiet",
        "--results",
        str(results),
        "--save-vectors",
        str(vectors),
        "--strength",
        *STRENGTHS,
    ]


def _as_a_terminal_starts_it() -> None:
    """Ctrl-C's default action in the child, as a terminal's foreground job has it. A child inherits
    an ignored SIGINT (a background job of a script, or a pytest-xdist worker after some tests), and
    Python then leaves it ignored: the test would send a signal the run never sees."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _check_vectors(vectors):
    assert not list(vectors.parent.glob("*.partial"))
    if vectors.exists():  # whole, or not there at all
        load_state(str(vectors), {"method": "iv", "model": "tiny-gpt2"})


def test_sigterm_during_evaluation_keeps_finished_records_and_resume_completes(tmp_path):
    results, vectors = tmp_path / "runs.jsonl", tmp_path / "iv.safetensors"
    proc = subprocess.Popen(
        _argv(results, vectors), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not _lines(results):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    # one line, after the warning that the tiny task repeats texts across its splits (printed with the first record)
    said = [line for line in err.strip().splitlines() if not line.startswith("warning: task 'review_sentiment' has")]
    assert len(said) == 1 and "Traceback" not in err
    written = _lines(results)
    assert 1 <= len(written) < len(STRENGTHS)
    assert f"{len(written)} record(s) of this run written" in err and "vectors saved to" in err and "--resume" in err
    _check_vectors(vectors)
    assert vectors.exists()  # evaluation starts only after the vectors are saved
    rerun = subprocess.run(
        _argv(results, vectors) + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(r["hyperparameters"]["strength"] for r in _lines(results)) == [float(a) for a in STRENGTHS]


def test_sigint_during_extraction_leaves_no_partial_files(tmp_path):
    results, vectors = tmp_path / "runs.jsonl", tmp_path / "iv.safetensors"
    results.write_text('{"earlier": "record"}\n')
    argv = [a for a in _argv(results, vectors, episodes="20000") if a != "--quiet"]  # progress bars show the phase
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_as_a_terminal_starts_it
    )
    seen = bytearray()

    def read() -> None:
        for chunk in iter(lambda: proc.stderr.read1(256), b""):
            seen.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and b"IV extract: few-shot" not in seen:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its extraction could be interrupted"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    err = seen.decode(errors="replace").replace("\r", "\n").strip().splitlines()[-1]
    assert proc.returncode == 130, err
    assert "0 record(s) of this run written" in err and "no vectors file written" in err
    assert results.read_text() == '{"earlier": "record"}\n'
    assert not vectors.exists()
    _check_vectors(vectors)


def _interrupt_during_imports(entry, sig):
    """Start the command under -X importtime (each import prints a line as it finishes) and signal
    it as soon as torch's submodules begin to load: inside the start-up imports, deterministically."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-X",
            "importtime",
            *entry,
            "-c",
            "config/tiny.yaml",
            "-m",
            "tiny-gpt2",
            "-t",
            "review_sentiment",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_as_a_terminal_starts_it,
    )
    seen = bytearray()
    signalled = threading.Event()

    def read() -> None:
        for line in iter(proc.stderr.readline, b""):
            seen.extend(line)
            if not signalled.is_set() and b"| " in line and b" torch." in line:
                proc.send_signal(sig)
                signalled.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc.wait(timeout=120)
    reader.join(timeout=10)
    assert signalled.is_set(), "torch was never imported"
    lines = [line for line in seen.decode(errors="replace").splitlines() if not line.startswith("import time:")]
    return proc.returncode, lines


@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
@pytest.mark.parametrize("entry", [["iv.py"], ["-m", "ivlib"]], ids=["iv.py", "python -m ivlib"])
def test_an_interrupt_during_the_start_up_imports_is_one_line(entry, sig, code, name):
    returncode, lines = _interrupt_during_imports(entry, sig)
    assert returncode == code, lines
    assert lines == [f"iv.py: interrupted ({name}) during start-up; nothing written"], lines
