import numpy as np
import pytest

from ivlib.episodes import check_shots, sample_episodes
from ivlib.errors import UsageError


def test_episodes_are_seeded_balanced_and_never_leak_the_query(task):
    split = task.splits["train"]
    a = sample_episodes(split, 2, 3, 50, seed=7, stream="train/extract")
    b = sample_episodes(split, 2, 3, 50, seed=7, stream="train/extract")
    c = sample_episodes(split, 2, 3, 50, seed=8, stream="train/extract")
    assert a == b and a != c
    for ep in a:
        assert sorted(d.label for d in ep.demos) == [0, 0, 0, 1, 1, 1]
        assert ep.query.text not in {d.text for d in ep.demos}


def test_one_shot_order_is_shuffled_not_class_ordered(task):
    eps = sample_episodes(task.splits["validation"], 2, 1, 60, seed=42, stream="validation/eval")
    first_labels = {ep.demos[0].label for ep in eps}
    assert first_labels == {0, 1}


def test_queries_are_shared_across_shot_counts(task):
    split = task.splits["validation"]
    zero = sample_episodes(split, 2, 0, 30, seed=3, stream="validation/eval")
    one = sample_episodes(split, 2, 1, 30, seed=3, stream="validation/eval")
    assert [e.query for e in zero] == [e.query for e in one]
    assert all(e.demos == () for e in zero)


def test_queries_cover_both_classes(task):
    eps = sample_episodes(task.splits["test"], 2, 1, 200, seed=42, stream="test/eval")
    labels = np.array([e.query.label for e in eps])
    assert 0.3 < labels.mean() < 0.7


def test_shots_beyond_the_smallest_class_are_refused(task):
    split = task.splits["validation"]
    smallest = int(split.class_counts(2).min())
    check_shots(split, "validation", 2, smallest - 1, task.label_words, "--shot")
    with pytest.raises(UsageError, match=f"--shot {smallest} is too large"):
        check_shots(split, "validation", 2, smallest, task.label_words, "--shot")
