import json
import subprocess
import sys
from pathlib import Path

from ivlib.results import append_record, read_records

REPO = Path(__file__).resolve().parent.parent
BASE = {"method": "icl", "model": "m", "task": "t", "split": "validation", "hyperparameters": {}, "metrics": {}}


def test_append_and_read_back(tmp_path):
    path = tmp_path / "runs.jsonl"
    append_record(str(path), {**BASE, "a": 1})
    append_record(str(path), {**BASE, "b": [1, 2]})
    records, bad = read_records(str(path))
    assert records == [{**BASE, "a": 1}, {**BASE, "b": [1, 2]}] and bad == []


def test_a_partial_line_left_by_a_killed_writer_does_not_swallow_the_next_record(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps({**BASE, "ok": 1}) + '\n{"cut off')
    append_record(str(path), {**BASE, "next": 2})
    records, bad = read_records(str(path))
    assert records == [{**BASE, "ok": 1}, {**BASE, "next": 2}] and bad == [2]


def test_two_processes_appending_never_interleave(tmp_path):
    path = tmp_path / "runs.jsonl"
    script = (
        "import sys; from ivlib.results import append_record\n"
        "for i in range(200): append_record(sys.argv[1], {'writer': sys.argv[2], 'i': i, 'pad': 'x' * 5000})"
    )
    # `python -c` puts the working directory first on sys.path: run from the checkout to import it
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), w], cwd=REPO) for w in "ab"]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    lines = path.read_text().splitlines()
    assert len(lines) == 400
    parsed = [json.loads(line) for line in lines]
    for w in "ab":
        assert [r["i"] for r in parsed if r["writer"] == w] == list(range(200))


def test_a_signal_inside_signals_held_takes_effect_when_the_block_ends():
    import os
    import signal
    import threading

    import pytest

    from ivlib.results import signals_held

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop()

    previous = signal.signal(signal.SIGTERM, stop)
    done = []
    idle = threading.Event()
    worker = threading.Thread(target=idle.wait)  # like torch's threads: the kernel may hand it the signal
    worker.start()
    try:
        with pytest.raises(Stop):
            with signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler would have run by now, were it live
                    sum(range(100))
                done.append("after the signal")
        assert done == ["after the signal"]
        assert signal.getsignal(signal.SIGTERM) is stop  # the handler is back
    finally:
        idle.set()
        worker.join()
        signal.signal(signal.SIGTERM, previous)
