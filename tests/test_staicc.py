"""StaICC's datasets as tasks (issue 27, item 1), on files the tests write in StaICC's format into a
fake package folder: loading without importing the package, label words, the stored shuffle undone,
splits and provenance, and pickles that name any Python object refused without being run."""

import json
import os
import pickle

import pytest

from ivlib import staicc
from ivlib.api import load_task as load_registry_task
from ivlib.cli import main
from ivlib.config import load_config
from ivlib.errors import UsageError
from ivlib.tasks import load_task
from ivlib.templates import named

WORDS = ["the food was great", "the movie was awful", "the soup was bland", "the show was superb"]


def staicc_stored_order(rows):
    """The order StaICC stores a dataset in: its generator (x <- 1664525 x + 1013904223 mod 2^32, from
    42) picks, n times, the remaining row at position int(x / 2^32 * remaining)."""
    remaining, x, picked = list(range(len(rows))), 42, []
    for _ in range(len(rows)):
        x = (x * 1664525 + 1013904223) % 2**32
        picked.append(remaining.pop(int(x / 2**32 * len(remaining))))
    return [rows[i] for i in picked]


def make_rows(n, n_classes, prefix="row"):
    """n distinct (text, label) rows in a known order, texts from the tiny models' vocabulary."""
    return [(f"{WORDS[i % len(WORDS)]} {prefix} {i}", i % n_classes) for i in range(n)]


def write_dataset(package, file, rows, stored=True):
    """A StaICC data file: a pickled list of ([text], label) tuples, in StaICC's stored order."""
    table = [([t], y) for t, y in (staicc_stored_order(rows) if stored else rows)]
    (package / "cached_dataset" / f"{file}.dataset").write_bytes(pickle.dumps(table, protocol=4))


@pytest.fixture()
def package(tmp_path, monkeypatch):
    """A fake installed StaICC (found on sys.path); importing it would leave a file behind."""
    site = tmp_path / "site"
    folder = site / "StaICC"
    (folder / "cached_dataset").mkdir(parents=True)
    (folder / "__init__.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(site))
    return folder


def test_generator_matches_staicc_own_picks():
    """Known answers of StaICC 0.1.1's stable_random (sample_index_set and shuffle_list, default seed)."""
    assert staicc.draws(10, 10) == [2, 0, 6, 3, 5, 1, 7, 4, 9, 8]
    assert staicc.draws(1000, 6) == [252, 88, 578, 222, 377, 25]
    assert staicc_stored_order(list("abcdefgh")) == list("cafdebgh")


def test_rows_come_back_in_the_original_order_with_staicc_label_words(package, tmp_path):
    rows = make_rows(50, 5)
    write_dataset(package, "sst5", rows)
    source = staicc.load("staicc/sst5", "sst5")
    assert source.splits == {"train": rows}
    task = load_task("staicc/sst5", {"staicc": "sst5"})
    assert task.label_words == ["poor", "bad", "neutral", "good", "great"]
    assert sorted(t for s in task.splits.values() for t in s.texts) == sorted(t for t, _ in rows)
    by_text = dict(rows)
    assert all(by_text[t] == y for s in task.splits.values() for t, y in zip(s.texts, s.labels.tolist()))
    assert task.provenance["carved"]["roles"] == ["validation", "test"]
    meta = task.provenance["staicc"]
    assert meta["split_mode"] == "original" and meta["order"].startswith("restored") and meta["rows"] == 50
    assert meta["file"] == "StaICC/cached_dataset/sst5.dataset" and len(meta["sha256"]) == 64
    assert meta["origin_rows"] == 8544 and meta["dropped_by_staicc"] == 8494
    assert not (tmp_path / "imported").exists()  # found, never imported


def test_the_entry_label_words_replace_staicc_own(package):
    write_dataset(package, "sst2", make_rows(20, 2))
    task = load_task("mine", {"staicc": "sst2", "label_words": ["bad", "good"]})
    assert task.label_words == ["bad", "good"]


def test_concatenated_hub_splits_are_told_apart(package):
    rows = make_rows(5452 + 500, 6)
    write_dataset(package, "trec", rows)
    task = load_task("staicc/trec", {"staicc": "trec"})
    assert task.splits["test"].texts == [t for t, _ in rows[5452:]]
    carved = set(task.splits["train"].texts) | set(task.splits["validation"].texts)
    assert carved == {t for t, _ in rows[:5452]}
    assert task.provenance["splits"] == {"train": "train", "test": "test"}
    assert task.provenance["carved"]["roles"] == ["validation"]
    assert task.provenance["staicc"]["original_splits"] == {"train": 5452, "test": 500}

    rows = make_rows(3257 + 374 + 1421, 4)
    write_dataset(package, "tweet_eval_emotion", rows)
    task = load_task("staicc/tweet_eval_emotion", {"staicc": "tweet_eval_emotion"})
    assert "carved" not in task.provenance
    assert task.splits["validation"].texts == [t for t, _ in rows[3257:3631]]
    assert task.splits["test"].labels.tolist() == [y for _, y in rows[3631:]]


def test_split_boundaries_unknown_when_staicc_dropped_rows(package):
    rows = make_rows(100, 4)
    write_dataset(package, "agnews", rows)
    task = load_task("staicc/ag_news", {"staicc": "ag_news"})
    assert task.provenance["carved"]["sizes"] == {"train": 80, "validation": 10, "test": 10}
    assert "not recoverable" in task.provenance["staicc"]["original_splits"]


def test_benchmark_split_is_staicc_own_triplet(package):
    rows = make_rows(2100, 3)
    write_dataset(package, "financial_phrasebank", rows)
    stored = staicc_stored_order(rows)
    remaining, x, picked = list(range(len(stored))), 42, []  # StaICC's sample_index_set(2048, 2100)
    for _ in range(1024 + 512 + 512):
        x = (x * 1664525 + 1013904223) % 2**32
        picked.append(remaining.pop(int(x / 2**32 * len(remaining))))
    task = load_task("staicc-bench/fp", {"staicc": "financial_phrasebank", "staicc_split": "benchmark"})
    assert task.provenance["splits"] == {"train": "demonstration", "validation": "calibration", "test": "test"}
    assert task.splits["validation"].texts == [stored[i][0] for i in picked[:1024]]
    assert task.splits["train"].texts == [stored[i][0] for i in picked[1024:1536]]
    assert task.splits["test"].labels.tolist() == [stored[i][1] for i in picked[1536:]]
    assert task.provenance["staicc"]["benchmark_split"] == {"calibration": 1024, "demonstration": 512, "test": 512}
    assert "carved" not in task.provenance
    write_dataset(package, "financial_phrasebank", rows[:2000])
    with pytest.raises(UsageError, match="fewer than its benchmark split needs"):
        load_task("x", {"staicc": "financial_phrasebank", "staicc_split": "benchmark"})


def test_empty_texts_are_dropped_and_counted(package):
    rows = make_rows(40, 2)
    rows[3] = ("", 0)
    rows[7] = ("  ", 1)
    write_dataset(package, "tweet_eval_hate", rows)
    task = load_task("staicc/tweet_eval_hate", {"staicc": "tweet_eval_hate"})
    assert sum(len(s.texts) for s in task.splits.values()) == 38
    assert task.provenance["staicc"]["dropped_empty_text"] == {"train": 2}


class _Payload:
    """What a hostile data file runs under a general unpickler: a shell command that creates a file."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch '{self.target}'",))


@pytest.mark.parametrize("where", ["whole", "label", "text"])
def test_a_pickle_naming_a_callable_is_refused_unrun(package, tmp_path, where):
    ran = tmp_path / "payload-ran"
    payload = _Payload(ran)
    table = {"whole": payload, "label": [(["a b"], 0), (["c d"], payload)], "text": [([payload], 1)]}[where]
    path = package / "cached_dataset" / "sst2.dataset"
    path.write_bytes(pickle.dumps(table, protocol=4))
    with pytest.raises(UsageError) as info:
        load_task("staicc/sst2", {"staicc": "sst2"})
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "system" in message and "refused unread" in message, message
    assert not ran.exists() and not (tmp_path / "imported").exists()


@pytest.mark.parametrize(
    "table, expected",
    [
        ({"rows": 1}, "holds dict"),
        ([], r"holds list \(empty"),
        ([(["a"], 2)], "row 0 is"),  # sst2 has two classes
        ([(["a"], True)], "row 0 is"),
        ([(["a", "b"], 0)], "row 0 is"),
        ([("a", 0)], "row 0 is"),
        ([(["a"], 0), (["b"], -1)], "row 1 is"),
        ([(["a"], 0.0)], "row 0 is"),
    ],
)
def test_data_of_another_shape_is_refused_in_one_line(package, table, expected):
    (package / "cached_dataset" / "sst2.dataset").write_bytes(pickle.dumps(table, protocol=4))
    with pytest.raises(UsageError, match=expected) as info:
        load_task("staicc/sst2", {"staicc": "sst2"})
    assert len(str(info.value).splitlines()) == 1


def test_damaged_oversized_and_absent_files_are_refused(package, monkeypatch):
    path = package / "cached_dataset" / "sst2.dataset"
    with pytest.raises(UsageError, match="does not exist"):
        load_task("staicc/sst2", {"staicc": "sst2"})
    path.write_bytes(pickle.dumps([(["a"], 0)] * 10, protocol=4)[:-5])
    with pytest.raises(UsageError, match="cannot be read as a pickle"):
        load_task("staicc/sst2", {"staicc": "sst2"})
    path.write_bytes(pickle.dumps([(["a"], 0)] * 10, protocol=4))
    monkeypatch.setattr(staicc, "MAX_FILE_BYTES", 20)
    with pytest.raises(UsageError, match="bytes, over the 20 read"):
        load_task("staicc/sst2", {"staicc": "sst2"})


def test_without_staicc_one_line_names_the_install_command(monkeypatch):
    monkeypatch.setattr(staicc, "PACKAGE", "StaICC_not_installed_here")
    with pytest.raises(UsageError) as info:
        load_task("staicc/sst2", {"staicc": "sst2"})
    assert "pip install 'ivlib[staicc]'" in str(info.value) and len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize(
    "entry, expected",
    [
        ("{staicc: sst3}", "tasks.t.staicc 'sst3' is not accepted; accepted: a dataset StaICC ships"),
        ("{staicc: sst2, staicc_split: test}", "tasks.t.staicc_split 'test' is not accepted"),
        ("{staicc: sst2, subset: x}", "key 'subset' does not apply to a StaICC task"),
        ("{dataset: x, staicc_split: benchmark}", "staicc_split applies to StaICC tasks only"),
    ],
)
def test_registry_refuses_staicc_entries_that_do_not_fit(tmp_path, entry, expected):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"tasks:\n  t: {entry}\n")
    with pytest.raises(UsageError, match=expected):
        load_config(str(cfg))


def test_registry_names_all_ten_datasets_both_ways(package):
    tasks = load_config(None).tasks
    for key in staicc.DATASETS:
        own = tasks[f"staicc/{key}"]
        assert own == {"staicc": key, "template_task": own["template_task"]}
        assert tasks[f"staicc-bench/{key}"] == {**own, "staicc_split": "benchmark"}
        assert named("staicc", f"staicc/{key}", own).name.startswith("staicc/")  # StaICC's own prompt resolves
    write_dataset(package, "rotten_tomatoes", make_rows(30, 2))
    assert load_registry_task("staicc/rotten_tomatoes").label_words == ["negative", "positive"]


def test_a_run_records_where_the_staicc_task_came_from(package, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(__file__)))
    write_dataset(package, "sst2", make_rows(200, 2))
    results = tmp_path / "r.jsonl"
    argv = ["-c", "config/tiny.yaml", "-m", "tiny-gpt2", "-t", "staicc/sst2", "--method", "icl", "-n", "4"]
    assert main(argv + ["--quiet", "--results", str(results)]) == 0
    record = json.loads(results.read_text().splitlines()[0])
    assert record["label_words"] == ["negative", "positive"]
    assert record["task_provenance"]["staicc"]["dataset"] == "sst2"
    assert record["task_provenance"]["carved"]["sizes"] == {"train": 160, "validation": 20, "test": 20}
