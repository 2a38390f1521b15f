"""Tests for tasks.values: the regress target bound and the classify class count."""

import numpy as np
import pytest

from tasks.values import MAX_REGRESS_MAGNITUDE, check_classes, regress_target


def test_the_regress_bound_keeps_float32_sums_of_squared_errors_finite():
    """The bound's derivation: 2**24 squared errors of targets at the bound sum finitely in float32, 10x does not."""
    with np.errstate(over="ignore"):
        for bound, finite in ((MAX_REGRESS_MAGNITUDE, True), (10 * MAX_REGRESS_MAGNITUDE, False)):
            worst = np.square(np.float32(bound) - np.float32(-bound))  # the largest squared error
            total = np.float32(worst) * np.float32(2**24)
            assert np.isfinite(total) == finite, (bound, total)


@pytest.mark.parametrize(
    "value, expected", [(3, 3.0), ("-2.5", -2.5), (MAX_REGRESS_MAGNITUDE, 1e15), ("1e-300", 1e-300)]
)
def test_regress_target_accepts_finite_numbers_within_the_bound(value, expected):
    assert regress_target(value, "Task file 'v.csv'", "on line 2") == expected


@pytest.mark.parametrize(
    "value, message",
    [
        (float("nan"), "value nan on line 7, which float32 training cannot hold"),
        ("inf", "value 'inf' on line 7, which float32 training cannot hold"),
        (float("-inf"), "value -inf on line 7"),
        (1e38, r"value 1e\+38 on line 7"),
        ("-2e15", "value '-2e15' on line 7"),
        ("high", "value 'high' on line 7; a finite number"),
        (None, "an empty or NaN 'value' on line 7"),
        ([1.0], r"value \[1.0\] on line 7"),
    ],
)
def test_regress_target_refuses_what_float32_cannot_hold_naming_file_and_line(value, message):
    with pytest.raises(ValueError, match=message) as info:
        regress_target(value, "Task file 'v.csv'", "on line 7")
    text = str(info.value)
    assert text.startswith("Task file 'v.csv' has ") and text.endswith("1e+15 is accepted.") and "\n" not in text


def test_a_classify_task_needs_two_distinct_labels():
    check_classes(["pos", "neg", "pos"], "Task file 'c.csv'")
    with pytest.raises(ValueError, match=r"^Task file 'c.csv' has only the label 'pos'; .* at least two distinct"):
        check_classes(["pos"] * 5, "Task file 'c.csv'")
    with pytest.raises(ValueError, match="has no labels"):
        check_classes([], "Task file 'c.csv'")
