"""Tests for tasks.metrics, against values worked out by hand."""

import numpy as np
import pytest

from tasks import metrics


def test_edit_distance():
    assert metrics.edit_distance("kitten", "sitting") == 3
    assert metrics.edit_distance("", "abc") == 3
    assert metrics.edit_distance("abc", "") == 3
    assert metrics.edit_distance("abc", "abc") == 0
    assert metrics.edit_distance(["HH", "AH0", "L", "OW1"], ["HH", "EH0", "L", "OW1"]) == 1
    assert metrics.edit_distance(["a", "b"], ["b", "a"]) == 2


def test_generate_metrics():
    preds = ["HH AH0 L OW1", "K AE1 T", " W ER1  L D "]
    refs = ["HH AH0 L OW1", "K AE1 T S", "W ER1 L D"]
    assert metrics.exact_match(preds, refs) == pytest.approx(2 / 3)
    # token errors: 0 + 1 (deleted S) + 0, over 4 + 4 + 4 reference tokens.
    assert metrics.token_error_rate(preds, refs) == pytest.approx(1 / 12)
    # characters: 0 + 2 (" S") + 3 (leading space, extra space, trailing space).
    assert metrics.char_error_rate(preds, refs) == pytest.approx(5 / (12 + 9 + 9))
    assert metrics.token_error_rate(["A B C D"], ["A"]) == pytest.approx(3.0)


def test_classify_metrics():
    pred, gold = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0]
    assert metrics.accuracy(pred, gold) == pytest.approx(4 / 6)
    # F1 per class: 0: tp1 fp1 fn1 -> 1/2; 1: tp1 fp0 fn1 -> 2/3; 2: tp2 fp1 fn0 -> 4/5.
    assert metrics.macro_f1(pred, gold) == pytest.approx((1 / 2 + 2 / 3 + 4 / 5) / 3)
    assert metrics.macro_f1([1, 1], [0, 0]) == 0.0
    assert metrics.macro_f1([3, 3], [3, 3]) == 1.0


def test_results_are_plain_floats():
    assert type(metrics.accuracy([1], [1])) is float
    assert type(metrics.macro_f1([1], [1])) is float
    assert type(metrics.exact_match(["a"], ["a"])) is float
    assert type(metrics.token_error_rate(["a"], ["b"])) is float


def test_metrics_for_and_direction():
    assert set(metrics.metrics_for("generate")) == {"exact_match", "token_error_rate", "char_error_rate", "chrf"}
    assert set(metrics.metrics_for("classify")) == {"accuracy", "macro_f1"}
    assert set(metrics.metrics_for("regress")) == {"mse", "pearson", "spearman"}
    assert set(metrics.metrics_for("tag")) == {"tag_accuracy", "tag_f1"}
    for kind in ("generate", "classify", "regress", "tag"):
        for name in metrics.metrics_for(kind):
            assert name in metrics.HIGHER_IS_BETTER
        assert metrics.HIGHER_IS_BETTER[metrics.MAIN[kind]]
    assert metrics.HIGHER_IS_BETTER["accuracy"] and not metrics.HIGHER_IS_BETTER["token_error_rate"]
    with pytest.raises(ValueError, match="'rank'"):
        metrics.metrics_for("rank")


def test_regress_metrics_against_their_definitions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = 2 * x + rng.normal(size=200)
    assert metrics.mse(x, y) == pytest.approx(np.mean((x - y) ** 2))
    xc, yc = x - x.mean(), y - y.mean()
    assert metrics.pearson(x, y) == pytest.approx((xc @ yc) / np.sqrt((xc @ xc) * (yc @ yc)))
    # Spearman without ties: 1 - 6 sum d^2 / (n (n^2 - 1)).
    d = np.argsort(np.argsort(x)) - np.argsort(np.argsort(y))
    assert metrics.spearman(x, y) == pytest.approx(1 - 6 * np.sum(d**2) / (200 * (200**2 - 1)))
    assert metrics.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties at mean ranks
    assert metrics.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert metrics.pearson([1, 1, 1], [1, 2, 3]) == 0.0  # undefined: constant side


def test_tag_and_chrf_metrics():
    assert metrics.tag_accuracy([[0, 1], [1]], [[0, 0], [1]]) == pytest.approx(2 / 3)
    assert metrics.tag_f1([[0, 1], [1]], [[0, 1], [1]]) == 1.0
    assert metrics.chrf(["hello"], ["hello"]) == pytest.approx(1.0)
    assert 0 < metrics.chrf(["helo wrld"], ["hello world"]) < 1


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        metrics.exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError):
        metrics.accuracy([1], [1, 2])
