import numpy as np
import pytest

from ivlib.metrics import bootstrap_f1, f1_scores


def test_f1_matches_hand_computation():
    y_true = [0, 0, 1, 1, 2]
    y_pred = [0, 1, 1, 1, 0]
    # class 0: tp 1, pred 2, true 2 -> 0.5; class 1: tp 2, pred 3, true 2 -> 0.8; class 2: 0
    got = f1_scores(y_true, y_pred, 3)
    assert got["micro"] == pytest.approx(3 / 5)
    assert got["macro"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert got["weighted"] == pytest.approx((0.5 * 2 + 0.8 * 2 + 0.0 * 1) / 5)


def test_class_absent_everywhere_is_left_out_of_macro():
    got = f1_scores([0, 1, 0, 1], [0, 1, 1, 1], 3)
    assert got["macro"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_bootstrap_interval_brackets_the_value_and_is_seeded():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 500)
    y_pred = np.where(rng.random(500) < 0.7, y_true, rng.integers(0, 4, 500))
    a = bootstrap_f1(y_true, y_pred, 4, resamples=300, seed=1)
    b = bootstrap_f1(y_true, y_pred, 4, resamples=300, seed=1)
    assert a == b
    for k in ("micro", "macro", "weighted"):
        assert a[k]["ci_low"] < a[k]["value"] < a[k]["ci_high"]
        assert a[k]["ci_high"] - a[k]["ci_low"] < 0.15
    perfect = bootstrap_f1(y_true, y_true, 4, resamples=50)
    assert perfect["macro"] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}
