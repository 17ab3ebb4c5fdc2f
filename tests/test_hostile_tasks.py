"""Hostile task data (issue 29, items 5 and 6): a multiple-choice answer that names no option, a
question with fewer than two options, a class named twice and label words that differ only in
whitespace are refused in one line; a hidden answer (a hub test split's -1 or empty) is still dropped
and counted; texts found in two splits are counted in `task_provenance` and warned about once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ivlib.api import task_from_lists
from ivlib.cli import main
from ivlib.errors import UsageError
from ivlib.tasks import cross_split_duplicates, load_task

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "config" / "tiny.yaml")
KEYED = {"options": "choices.text", "option_keys": "choices.label", "answer": "answerKey"}
NUMBERED = {"options": ["o0", "o1", "o2"], "answer": "answer"}


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _keyed(tmp: Path, answers: list[object], labels: str = "ABC") -> dict:
    rows = [
        {"question": f"question {i}?", "choices": {"label": list(labels), "text": [f"x{i}", f"y{i}", f"z{i}"]}}
        | {"answerKey": a}
        for i, a in enumerate(answers)
    ]
    return {"data_files": {"train": _jsonl(tmp / "train.jsonl", rows)}, "multiple_choice": KEYED}


def _numbered(tmp: Path, answers: list[object], base: int = 0) -> dict:
    rows = [{"question": f"q{i}?", "o0": "a", "o1": "b", "o2": "c", "answer": a} for i, a in enumerate(answers)]
    mc = {**NUMBERED, "answer_base": base} if base else NUMBERED
    return {"data_files": {"train": _jsonl(tmp / "train.jsonl", rows)}, "multiple_choice": mc}


ANSWERS_OK = ["A", "B", "C"] * 4


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda t: _keyed(t, [*ANSWERS_OK, "D"]), "row 12: answer 'D' is not one of its option keys ['A', 'B', 'C']"),
        (lambda t: _keyed(t, [*ANSWERS_OK, "a"]), "row 12: answer 'a' is not one of its option keys"),
        (lambda t: _numbered(t, [0, 1, 2] * 4 + [3]), "row 12: answer 3 names none of its 3 options; accepted: 0..2"),
        (lambda t: _numbered(t, [0, 1, 2] * 4 + [-2]), "row 12: answer -2 names none of its 3 options"),
        (lambda t: _numbered(t, [0, 1, 2] * 4 + ["B"]), "row 12: answer 'B' names none of its 3 options"),
        (lambda t: _numbered(t, [0, 1, 2] * 4 + [True]), "row 12: answer True names none of its 3 options"),
        (
            lambda t: _numbered(t, [1, 2, 3] * 4 + [0], base=1),
            "row 12: answer 0 names none of its 3 options; accepted: 1..3",
        ),
    ],
    ids=["unknown key", "lower-case key", "index past the end", "negative", "letter", "bool", "0 with base 1"],
)
def test_an_answer_that_names_no_option_is_refused_not_dropped(tmp_path, make, says):
    with pytest.raises(UsageError) as caught:
        load_task("mc", make(tmp_path))
    assert says in str(caught.value) and "hidden answer" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("make", "dropped"),
    [
        (lambda t: _keyed(t, [*ANSWERS_OK, "", None, "  "]), 3),
        (lambda t: _numbered(t, [0, 1, 2] * 4 + [-1, "-1", None]), 3),
        (lambda t: _numbered(t, [1, 2, 3] * 4 + [-1], base=1), 1),
    ],
    ids=["empty keys", "minus one", "minus one with base 1"],
)
def test_a_hidden_answer_is_still_dropped_and_counted(tmp_path, make, dropped):
    task = load_task("mc", make(tmp_path))
    assert task.provenance["dropped_unlabelled"] == {"train": dropped}
    assert sum(len(s.texts) for s in task.splits.values()) == 12


def test_a_question_with_fewer_than_two_options_is_refused(tmp_path):
    rows = [
        {"question": f"q{i}?", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": "A"} for i in range(9)
    ]
    rows.append({"question": "alone?", "choices": {"label": ["A"], "text": ["x"]}, "answerKey": "A"})
    spec = {"data_files": {"train": _jsonl(tmp_path / "train.jsonl", rows)}, "multiple_choice": KEYED}
    with pytest.raises(UsageError, match=r"row 9 has 1 option\(s\); accepted: two or more options per question"):
        load_task("mc", spec)


def _classes(tmp: Path, **entry: object) -> dict:
    rows = [{"text": f"text {i}", "label": i % 2} for i in range(20)]
    return {"data_files": {"train": _jsonl(tmp / "train.jsonl", rows)}, **entry}


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"label_names": ["pos", "pos"]}, "label_names repeat 'pos'; accepted: a different name per class"),
        ({"label_names": ["good", " good"]}, "label_words differ only in whitespace: 'good' and ' good'"),
        (
            {"label_names": ["a", "b"], "label_words": ["good", "good "]},
            "differ only in whitespace: 'good' and 'good '",
        ),
        ({"label_names": ["a", "b"], "label_words": ["very good", "verygood"]}, "'very good' and 'verygood'"),
        ({"label_names": ["a", "b"], "label_words": ["yes", "yes"]}, "label_words repeat 'yes' and 'yes'"),
        ({"label_names": ["a", "b"], "label_words": ["yes", " "]}, "label word ' ' is empty or whitespace"),
    ],
    ids=["names twice", "names differ by a space", "trailing space", "inner space", "words twice", "blank word"],
)
def test_classes_the_model_cannot_tell_apart_are_refused_in_one_line(tmp_path, entry, says):
    with pytest.raises(UsageError) as caught:
        load_task("t", _classes(tmp_path, **entry))
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_the_api_refuses_label_words_that_differ_only_in_whitespace():
    with pytest.raises(UsageError, match="differ only in whitespace: 'good' and ' good'"):
        task_from_lists(["good", " good"], ([f"t{i}" for i in range(10)], [i % 2 for i in range(10)]))


def test_label_names_given_twice_in_a_config_are_refused_by_the_cli(tmp_path, capsys):
    data = _jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(20)])
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"tasks:\n  dup: {{data_files: {data}, label_names: [neg, neg]}}\n")
    argv = [
        "-c",
        TINY,
        "-c",
        str(cfg),
        "-m",
        "tiny-gpt2",
        "-t",
        "dup",
        "--quiet",
        "--results",
        str(tmp_path / "r.jsonl"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "label_names repeat 'neg'" in err


# ---- cross-split duplicates -------------------------------------------------------------------


def _split_files(tmp: Path, train: list[str], validation: list[str], test: list[str]) -> dict:
    def rows(texts: list[str]) -> list[dict]:
        return [{"text": t, "label": i % 2} for i, t in enumerate(texts)]

    files = {
        role: _jsonl(tmp / f"{role}.jsonl", rows(texts))
        for role, texts in (("train", train), ("validation", validation), ("test", test))
    }
    return {"data_files": files, "label_names": ["neg", "pos"]}


def test_texts_in_two_splits_are_counted_per_pair(tmp_path):
    train = [f"train {i}" for i in range(10)] + ["shared a", "shared b"]
    validation = ["shared a", "val 1", "val 2", "val 3"]
    test = ["shared a", "shared b", "shared b", "val 1", "test 1", "test 2"]
    task = load_task("leaky", _split_files(tmp_path, train, validation, test))
    # test rows whose text is in train: 'shared a' once and 'shared b' twice
    assert task.provenance["cross_split_duplicates"] == {"train/validation": 1, "train/test": 3, "validation/test": 2}


def test_no_key_without_duplicates(tmp_path):
    task = load_task("clean", _split_files(tmp_path, ["a", "b", "c", "d"], ["e", "f"], ["g", "h"]))
    assert "cross_split_duplicates" not in task.provenance
    assert cross_split_duplicates(task.splits) == {}


def test_carved_splits_are_checked_too(tmp_path):
    rows = [{"text": f"text {i % 25}", "label": i % 2} for i in range(100)]  # every text four times
    task = load_task("carved", {"data_files": {"train": _jsonl(tmp_path / "t.jsonl", rows)}, "label_names": ["a", "b"]})
    leaks = task.provenance["cross_split_duplicates"]
    assert set(leaks) == {"train/validation", "train/test", "validation/test"} and leaks["train/test"] > 0
    assert leaks == cross_split_duplicates(task.splits)


def test_the_cli_warns_once_and_records_the_counts(tmp_path, capsys):
    """review_sentiment, generated from a small grammar, repeats texts across its splits: the run says
    so once on stderr (however many records it writes), and every record holds the counts."""
    results = tmp_path / "runs.jsonl"
    argv = ["-c", TINY, "-m", "tiny-gpt2", "-t", "review_sentiment", "-s", "1", "-e", "4", "-n", "4", "--quiet"]
    assert main([*argv, "--strength", "0.1", "0.5", "--results", str(results)]) == 0
    err = capsys.readouterr().err
    warned = [w for w in err.splitlines() if "texts in two splits" in w]
    assert len(warned) == 1 and warned[0].startswith("warning: task 'review_sentiment' has texts in two splits: ")
    assert "361 test row(s) also in train" in warned[0] and "(task_provenance.cross_split_duplicates)" in warned[0]
    records = [json.loads(x) for x in results.read_text().splitlines()]
    assert len(records) == 2
    assert all(
        r["task_provenance"]["cross_split_duplicates"]
        == {"train/validation": 174, "train/test": 361, "validation/test": 102}
        for r in records
    )


def test_null_label_words_or_names_mean_not_given(tmp_path):
    task = load_task("t", _classes(tmp_path, label_names=["neg", "pos"], label_words=None))
    assert task.label_words == ["neg", "pos"]
    rows = [{"text": f"t{i}", "label": i % 2, "label_text": ["neg", "pos"][i % 2]} for i in range(20)]
    spec = {"data_files": {"train": _jsonl(tmp_path / "named.jsonl", rows)}, "label_names": None}
    assert load_task("t", spec).label_words == ["neg", "pos"]
