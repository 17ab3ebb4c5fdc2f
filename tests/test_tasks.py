import pandas as pd
import pytest

from ivlib.config import load_config
from ivlib.errors import UsageError
from ivlib.tasks import load_task


def _frame(n):
    return pd.DataFrame(
        {
            "text": [f"row {i}" for i in range(n)],
            "label": [i % 3 for i in range(n)],
            "label_text": [["World", "Sports", "Business"][i % 3] for i in range(n)],
        }
    )


def test_local_parquet_with_only_train_is_carved_deterministically(tmp_path):
    path = tmp_path / "train.parquet"
    _frame(100).to_parquet(path)
    spec = {"data_files": {"train": str(path)}}
    a, b = load_task("t", spec), load_task("t", spec)
    assert a.label_words == ["World", "Sports", "Business"]
    assert {k: len(v.texts) for k, v in a.splits.items()} == {"train": 80, "validation": 10, "test": 10}
    assert a.splits["test"].texts == b.splits["test"].texts
    assert not set(a.splits["train"].texts) & set(a.splits["test"].texts)
    assert not set(a.splits["validation"].texts) & set(a.splits["test"].texts)
    assert a.provenance["carved"]["roles"] == ["validation", "test"]


def test_train_and_test_files_carve_only_validation(tmp_path):
    _frame(50).to_parquet(tmp_path / "train.parquet")
    _frame(30).to_csv(tmp_path / "test.csv", index=False)
    spec = {"data_files": {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "train.parquet")}}
    task = load_task("t", spec)
    assert len(task.splits["validation"].texts) == 10 and len(task.splits["train"].texts) == 40
    assert len(task.splits["test"].texts) == 50


def test_csv_with_label_names_and_label_words(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"sentence": [f"s {i}" for i in range(20)], "y": [i % 2 for i in range(20)]}).to_csv(path, index=False)
    task = load_task(
        "t",
        {"data_files": str(path), "label_field": "y", "label_names": ["neg", "pos"], "label_words": ["bad", "good"]},
    )
    assert task.label_words == ["bad", "good"]
    assert task.splits["train"].texts[0].startswith("s ")
    assert sorted(set(task.splits["train"].labels.tolist())) == [0, 1]


def test_missing_label_column_and_unknown_suffix_are_clear_errors(tmp_path):
    path = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["a", "b"]}).to_parquet(path)
    with pytest.raises(UsageError, match="label column 'label' not found"):
        load_task("t", {"data_files": str(path)})
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(UsageError, match="suffix '.txt'"):
        load_task("t", {"data_files": str(tmp_path / "x.txt")})


def test_registry_has_the_paper_tasks_and_reference_models():
    cfg = load_config(None)
    for name in [
        "ag_news",
        "SetFit/sst5",
        "rotten_tomatoes",
        "trec",
        "sst2",
        "emotion",
        "financial_phrasebank",
        "subj",
        "review_sentiment",
    ] + [
        f"tweet_eval/{s}"
        for s in (
            "sentiment",
            "stance_abortion",
            "stance_atheism",
            "stance_climate",
            "stance_feminist",
            "stance_hillary",
            "hate",
            "irony",
            "offensive",
            "emotion",
            "emoji",
        )
    ]:
        assert name in cfg.tasks
    for name in ["gpt-j-6b", "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3.1-8b", "smollm2-135m"]:
        assert name in cfg.models


def test_user_config_overrides_whole_entries_and_resolves_relative_paths(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.parquet").write_bytes(b"")
    cfg_file = tmp_path / "mine.yaml"
    cfg_file.write_text("models:\n  gpt-j-6b: {builtin: tiny-gpt2}\ntasks:\n  mine: {data_files: data/x.parquet}\n")
    cfg = load_config(str(cfg_file))
    assert cfg.models["gpt-j-6b"] == {"builtin": "tiny-gpt2"}
    assert cfg.tasks["mine"]["data_files"] == str((tmp_path / "data" / "x.parquet").resolve())
    assert "llama-2-7b" in cfg.models


def test_split_used_as_test_is_never_also_validation(tmp_path):
    """sst2's hub 'validation' is the test set: validation must then be carved from train, or a
    method would select its hyperparameters on the very examples it is scored on."""
    _frame(50).to_parquet(tmp_path / "train.parquet")
    other = _frame(20)
    other["text"] = [f"held out {i}" for i in range(20)]
    other.to_parquet(tmp_path / "validation.parquet")
    spec = {
        "data_files": {"train": str(tmp_path / "train.parquet"), "validation": str(tmp_path / "validation.parquet")},
        "splits": {"train": "train", "test": "validation"},
    }
    task = load_task("t", spec)
    assert task.splits["test"].texts == [f"held out {i}" for i in range(20)]
    assert not set(task.splits["validation"].texts) & set(task.splits["test"].texts)
    assert task.provenance["carved"]["roles"] == ["validation"]
