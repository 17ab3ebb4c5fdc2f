"""Hostile files handed to ivlib's readers (issue 29, item 3): results files (`select`, `report`,
`--resume`), samples logs and YAML configs are read only as regular files of bounded size, line by
line, with JSON depth and type checks. A pipe or a device is refused in one line without being
opened (so it cannot hang the reader), a record that does not fit the record schema is skipped with
one warning naming its line, a bad samples log is left out with one warning, and a report output
that cannot be written is one line and exit code 2. Never a traceback, never a hang."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivlib import analyze, files
from ivlib.cli import main
from ivlib.config import load_config
from ivlib.errors import UsageError
from ivlib.results import read_records, record_problem
from ivlib.samples import SamplesError, read_samples
from ivlib.yamlread import MAX_YAML_DEPTH

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "config" / "tiny.yaml")
FAST = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@contextlib.contextmanager
def no_hang(seconds: int = 20) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the block blocks, e.g. on opening a pipe."""

    def stop(signum: int, frame: object) -> None:
        raise TimeoutError(f"the reader blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def rec(split: str = "validation", value: float = 0.6, method: str = "icl", **extra: object) -> dict:
    return {
        "method": method,
        "model": "tiny-gpt2",
        "task": "review_sentiment",
        "split": split,
        "hyperparameters": {"shot": 1},
        "metrics": {"macro": {"value": value, "ci_low": value - 0.1, "ci_high": value + 0.1}},
        "seed": 42,
        "n_eval_episodes": 4,
        "label_words": ["bad", "good"],
        "task_kind": "classification",
        **extra,
    }


def line(record: dict) -> bytes:
    return (json.dumps(record) + "\n").encode()


def nested(depth: int) -> bytes:
    return b'{"method": ' + b"[" * depth + b"]" * depth + b"}\n"


def _fifo(tmp: Path, name: str = "pipe") -> str:
    path = tmp / name
    os.mkfifo(path)
    return str(path)


def _analyse(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `iv.py select|report ...`, run in-process; its stdout stays in capsys.out."""
    with no_hang():
        code = analyze.main(argv)
    captured = capsys.readouterr()
    print(captured.out, end="")
    return code, captured.err


# ---- results files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda t: _fifo(t), "is a named pipe (FIFO), not a file"),
        (lambda t: "/dev/zero", "is a character device, not a file"),
        (lambda t: str(t), "is a directory, not a file"),
    ],
    ids=["fifo", "dev-zero", "directory"],
)
@pytest.mark.parametrize("subcommand", ["select", "report"])
def test_a_results_path_that_is_not_a_file_is_one_line_and_never_opened(tmp_path, capsys, make, says, subcommand):
    argv = [subcommand, "--results", make(tmp_path)] + (
        ["--out", str(tmp_path / "out")] if subcommand == "report" else []
    )
    code, err = _analyse(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err


def test_a_results_file_above_the_limit_is_refused_whole(tmp_path, capsys, monkeypatch):
    path = tmp_path / "runs.jsonl"
    path.write_bytes(line(rec()) * 50)
    monkeypatch.setattr(files, "MAX_RESULTS_BYTES", 1000)
    code, err = _analyse(["select", "--results", str(path)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "more than the 1,000 ivlib reads" in err, err


def test_records_that_do_not_fit_the_schema_are_skipped_with_one_warning_each(tmp_path, capsys):
    path = tmp_path / "runs.jsonl"
    lines = [
        line(rec(value=0.5)),  # 1: used
        nested(100_000),  # 2: deeper than any record
        b'{"method": "icl", "bad": "\xff\xfe"}\n',  # 3: not UTF-8
        line(rec(seed=[1, 2])),  # 4: an unhashable seed
        line(rec(hyperparameters=["shot", 1])),  # 5: not an object
        line(rec(command="python iv.py")),  # 6: not a list
        line(rec(samples={"path": 5})),  # 7
        line(rec(n_eval_episodes=True)),  # 8: a bool is not an episode count
        b"[1, 2]\n",  # 9
        line(rec(value=0.7, hyperparameters={"shot": 2})),  # 10: used, and the best
    ]
    path.write_bytes(b"".join(lines))
    code, err = _analyse(["select", "--results", str(path)], capsys)
    out = capsys.readouterr().out
    warned = [w for w in err.splitlines() if w.startswith("warning:")]
    assert code == 0 and len(warned) == 8 == len(err.splitlines()), err
    for number in range(2, 10):
        assert any(f"line {number}: " in w and w.endswith("; skipped") for w in warned), number
    assert "JSON nested 100001 deep (at most 32)" in err
    assert "'seed' is [1, 2]; accepted: an integer or null" in err
    assert "not UTF-8 text" in err
    assert "best of 2 setting(s)" in out  # lines 1 and 10


def test_a_line_longer_than_the_line_limit_is_skipped_and_the_next_one_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(files, "MAX_LINE_BYTES", 400)
    path = tmp_path / "runs.jsonl"
    path.write_bytes(line(rec(pad="x" * 1000)) + line(rec()))
    records, bad = read_records(str(path))
    assert bad == [1] and records == [rec()]
    assert "line 1: longer than" in capsys.readouterr().err


def test_resume_reads_a_results_file_with_bad_later_lines(tmp_path, capsys):
    """--resume skips a recorded setting although later lines are invalid UTF-8, nested 100,000 deep,
    or of the wrong types: each is one warning, the run no traceback."""
    results = tmp_path / "runs.jsonl"
    argv = ["-c", TINY, "-m", "tiny-gpt2", "-t", "review_sentiment", "--method", "icl", "-n", "4", "--quiet"]
    argv += ["--results", str(results), "--resume"]
    assert main(argv) == 0
    with results.open("ab") as f:
        f.write(b"\xff\xfe not UTF-8\n" + nested(100_000) + line(rec(seed=[1, 2])))
    before = results.read_bytes()
    capsys.readouterr()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "skipped (--resume)" in out
    assert [w.split(": ", 2)[1].rsplit(" ", 1)[-1] for w in err.splitlines() if "; skipped" in w] == ["2", "3", "4"]
    assert "Traceback" not in err and results.read_bytes() == before


# ---- the record reader as a property ----------------------------------------------------------


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    _containers,
    max_leaves=12,
)
FIELDS = st.sampled_from(["method", "model", "task", "split", "hyperparameters", "metrics", "seed", "command"])


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


@FAST
@given(st.lists(st.one_of(JSON, st.dictionaries(FIELDS, JSON, max_size=8)), max_size=6))
def test_json_depth_is_the_nesting_of_any_json_value(values):
    for value in values:
        text = json.dumps(value)
        assert files.json_depth(text) == _depth(value)
        assert files.json_line(text.encode())[0] == value


@FAST
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
            st.dictionaries(FIELDS, JSON, max_size=8).map(lambda d: json.dumps(d).encode()),
            st.builds(lambda extra: json.dumps({**rec(), **extra}).encode(), st.dictionaries(FIELDS, JSON, max_size=2)),
            st.integers(1, 60).map(lambda d: nested(d).strip()),
        ),
        max_size=8,
    )
)
def test_read_records_is_total_and_keeps_exactly_the_records_that_fit(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("r") / "runs.jsonl"
    path.write_bytes(b"".join(x + b"\n" for x in lines))
    records, bad = read_records(str(path))  # never raises
    expected = []
    for raw in lines:
        value, why = files.json_line(raw)
        if raw.strip() and why is None and record_problem(value) is None:
            expected.append(value)
    assert records == expected
    assert len(records) + len(bad) == sum(1 for x in lines if x.strip())
    assert all(isinstance(r["seed"], int) for r in records if r.get("seed") is not None)


# ---- samples logs -----------------------------------------------------------------------------


def _sampled(tmp: Path, data: bytes | None = None, path: str | None = None, n: int | None = None) -> dict:
    """A test record whose samples log holds `data` (its sha256 matching), or points at `path`."""
    if path is None:
        (tmp / "log.jsonl").write_bytes(data or b"")
        path = "log.jsonl"
    digest = hashlib.sha256(data or b"").hexdigest()
    return rec("test", samples={"path": path, "sha256": digest, **({"n": n} if n is not None else {})})


def _episodes(*pairs: tuple[int, int]) -> bytes:
    return b"".join(
        line(
            {
                "episode": i,
                "query_row": i,
                "demo_rows": [9],
                "gold": g,
                "pred": p,
                "correct": g == p,
                "scores": [0.1, 0.2],
            }
        )
        for i, (g, p) in enumerate(pairs)
    )


@pytest.mark.parametrize(
    ("log", "says"),
    [
        (lambda t: _sampled(t, path=_fifo(t, "log.fifo")), "is a named pipe (FIFO), not a file"),
        (lambda t: _sampled(t, path="/dev/zero"), "is a character device, not a file"),
        (lambda t: _sampled(t, path="."), "is a directory, not a file"),
        (lambda t: _sampled(t, b"[1, 2]\n[3]\n"), "line 1: not a JSON object"),
        (lambda t: _sampled(t, b'{"gold": "0", "pred": 1}\n'), "line 1: 'gold' missing or of the wrong type"),
        (lambda t: _sampled(t, _episodes((0, 0), (1, 7))), "line 2: pred 7 is out of range; accepted: 0..1"),
        (lambda t: _sampled(t, _episodes((0, 0), (-1, 1))), "line 2: gold -1 is out of range"),
        (lambda t: _sampled(t, _episodes((0, 0), (1, 1)), n=3), "holds 2 episodes; its record says 3"),
        (lambda t: _sampled(t, _episodes((0, 0))[::-1]), "line 2: not valid JSON"),
        (lambda t: _sampled(t, _episodes((0, 1)).replace(b'"correct": false', b'"correct": true')), "correct is True"),
        (lambda t: _sampled(t, nested(50_000)), "JSON nested 50001 deep"),
        (lambda t: _sampled(t, b"\xff\n"), "line 1: not UTF-8 text"),
    ],
    ids=[
        "fifo",
        "dev-zero",
        "directory",
        "lists",
        "text gold",
        "pred out of range",
        "negative gold",
        "fewer episodes",
        "reversed bytes",
        "correct lies",
        "deep",
        "not utf-8",
    ],
)
def test_a_bad_samples_log_is_one_line_never_a_hang_or_a_traceback(tmp_path, log, says):
    record = log(tmp_path)
    with no_hang(), pytest.raises(SamplesError) as caught:
        read_samples(record, tmp_path)
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_a_good_samples_log_reads_back(tmp_path):
    data = _episodes((0, 0), (1, 0), (1, 1))
    assert [e["pred"] for e in read_samples(_sampled(tmp_path, data, n=3), tmp_path) or []] == [0, 0, 1]


def test_report_leaves_a_bad_log_out_with_one_warning(tmp_path, capsys):
    """The report reads samples logs for its paired table: a FIFO or a log with out-of-range predictions
    is one warning each and the report is written; nothing hangs."""
    fifo = _fifo(tmp_path, "a.fifo")
    records = [
        rec(method="icl", value=0.6),
        rec(method="iv", value=0.7),
        {**_sampled(tmp_path, path=fifo), "method": "icl"},
        {**_sampled(tmp_path, _episodes((0, 0), (1, 5))), "method": "iv"},
    ]
    results = tmp_path / "runs.jsonl"
    results.write_bytes(b"".join(line(r) for r in records))
    code, err = _analyse(["report", "--results", str(results), "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    warned = err.splitlines()
    assert len(warned) == 2 and "a.fifo' is a named pipe" in warned[0] and "pred 5 is out of range" in warned[1], err
    assert (tmp_path / "out" / "table.md").is_file()


# ---- report outputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["table.md", "table.csv", "bars_tiny-gpt2.png"])
@pytest.mark.parametrize("what", ["directory", "fifo"])
def test_a_report_output_that_is_a_directory_or_pipe_is_one_line_exit_2(tmp_path, capsys, name, what):
    results = tmp_path / "runs.jsonl"
    results.write_bytes(line(rec()) + line(rec("test")))
    out = tmp_path / "out"
    out.mkdir()
    if what == "directory":
        (out / name).mkdir()
    else:
        os.mkfifo(out / name)
    code, err = _analyse(["report", "--results", str(results), "--out", str(out)], capsys)
    kind = "a directory" if what == "directory" else "a named pipe (FIFO)"
    assert code == 2 and len(err.splitlines()) == 1 and f"{name}' is {kind}, not a file" in err, err


# ---- YAML configs -----------------------------------------------------------------------------


def _config(tmp: Path, text: str) -> str:
    path = tmp / "cfg.yaml"
    path.write_text(text)
    return str(path)


def _bomb(levels: int = 9) -> str:
    """Billion laughs in a task entry no run uses: 9 aliases of the level below, 9 levels deep."""
    rows = ["      - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    rows += [f"      - &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "tasks:\n  unused:\n    dataset: x\n    label_names:\n" + "\n".join(rows) + "\n"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (_bomb(), "holds more than 100,000 values once its aliases (*name) are expanded"),
        ("tasks:\n  x: &a {dataset: d, label_names: [*a, b]}\n", "is inside the value it names"),
        ("tasks: " + "[" * 100_000 + "]" * 100_000 + "\n", f"nests more than {MAX_YAML_DEPTH} deep"),
        ("tasks:\n  x: {dataset: a}\n  x: {dataset: b}\n", "key 'x' is given twice (lines 2 and 3)"),
    ],
    ids=["alias bomb", "recursive alias", "deep", "duplicate key"],
)
def test_a_hostile_config_is_refused_in_one_line_fast(tmp_path, capsys, text, says):
    argv = ["-c", _config(tmp_path, text), "-m", "tiny-gpt2", "-t", "review_sentiment", "--results", "r.jsonl"]
    start = time.perf_counter()
    with no_hang():
        code = main(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err
    assert elapsed < 15  # a bound against a hang, not a speed target


def test_aliases_and_merge_keys_within_the_bound_still_work(tmp_path):
    """The bound is on what aliases expand to, not on their number: 300 entries sharing one anchor load."""
    text = "tasks:\n  base: &common {dataset: d, label_field: y, label_names: [&n neg, &p pos]}\n"
    text += "".join(f"  t{i}: {{<<: *common, dataset: e{i}, label_words: [*n, *p]}}\n" for i in range(300))
    cfg = load_config(_config(tmp_path, text))
    assert cfg.tasks["t299"] == {"dataset": "e299", "label_field": "y", "label_names": ["neg", "pos"]} | {
        "label_words": ["neg", "pos"]
    }


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda t: "/dev/zero", "config file '/dev/zero' is a character device, not a file"),
        (lambda t: _fifo(t, "cfg.yaml"), "is a named pipe (FIFO), not a file"),
        (lambda t: str(t / "absent.yaml"), "absent.yaml' does not exist"),
        (lambda t: str(t), "is a directory, not a file"),
    ],
    ids=["dev-zero", "fifo", "missing", "directory"],
)
def test_a_config_path_that_is_not_a_file_says_what_it_is(tmp_path, capsys, make, says):
    argv = ["-c", make(tmp_path), "-m", "tiny-gpt2", "-t", "review_sentiment", "--results", str(tmp_path / "r")]
    with no_hang():
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err


def test_a_config_above_the_limit_is_refused(tmp_path, monkeypatch):
    from ivlib.config import BASE_CONFIG

    limit = BASE_CONFIG.stat().st_size + 1000  # the built-in registry, read first, fits
    monkeypatch.setattr(files, "MAX_CONFIG_BYTES", limit)
    with pytest.raises(UsageError, match=f"holds {limit + 1:,} bytes, more than the {limit:,} ivlib reads"):
        load_config(_config(tmp_path, "#" * limit + "\n"))


def test_a_template_file_goes_through_the_same_bounded_loader(tmp_path):
    from ivlib.templates import from_file

    bomb = _bomb().replace("tasks:\n  unused:\n    dataset: x\n    label_names:\n", "input: 'T: {text}'\nname:\n")
    with no_hang(), pytest.raises(UsageError, match=r"--template '.*': holds more than 100,000 values"):
        from_file(_config(tmp_path, bomb))
    with no_hang(), pytest.raises(UsageError, match="--template '/dev/zero' is a character device, not a file"):
        from_file("/dev/zero")
