"""Tests for tasks.sampler: mixture rates and the (seed, step) -> batch function."""

import collections

import numpy as np
import pytest

from tasks import MixtureSampler, mixture_rates
from tasks.sampler import CHUNK

SIZES = {"big": 9000, "mid": 1000, "small": 100}


# --- mixture_rates ------------------------------------------------------------


def test_rates_by_form():
    r = mixture_rates("uniform", SIZES)
    assert r == pytest.approx({"big": 1 / 3, "mid": 1 / 3, "small": 1 / 3})
    r = mixture_rates("temperature:1", SIZES)
    assert r == pytest.approx({"big": 9000 / 10100, "mid": 1000 / 10100, "small": 100 / 10100})
    r = mixture_rates("temperature:2", SIZES)
    total = 9000**0.5 + 1000**0.5 + 100**0.5
    assert r == pytest.approx({"big": 9000**0.5 / total, "mid": 1000**0.5 / total, "small": 10 / total})
    assert max(mixture_rates("temperature:1000", SIZES).values()) < 0.34
    r = mixture_rates("proportional:1000", SIZES)
    assert r == pytest.approx({"big": 1000 / 2100, "mid": 1000 / 2100, "small": 100 / 2100})
    r = mixture_rates("weights:big=1, mid=3,small=0", SIZES)
    assert r == pytest.approx({"big": 0.25, "mid": 0.75, "small": 0.0})
    for spec in ["uniform", "temperature:3", "proportional:50", "weights:big=2,mid=1,small=1"]:
        assert sum(mixture_rates(spec, SIZES).values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "spec, named",
    [
        ("bogus", "'bogus'"),
        ("uniform:2", "'uniform:2'"),
        ("temperature", "'temperature'"),
        ("temperature:0", "'temperature:0'"),
        ("temperature:hot", "'temperature:hot'"),
        ("proportional:-5", "'proportional:-5'"),
        ("weights:big=1,mid=1", "'small'"),
        ("weights:big=1,mid=1,small=1,huge=2", "'huge'"),
        ("weights:big=1,mid=-1,small=1", "'mid=-1'"),
        ("weights:big=1,mid,small=1", "'mid'"),
        ("weights:big=0,mid=0,small=0", "all weights 0"),
        ("weights:big=1,big=2,mid=1,small=1", "'big' twice"),
    ],
)
def test_bad_mixture_specs(spec, named):
    with pytest.raises(ValueError, match=named) as info:
        mixture_rates(spec, SIZES)
    assert "\n" not in str(info.value)


def test_empty_task_is_refused():
    with pytest.raises(ValueError, match="'mid' has 0"):
        mixture_rates("uniform", {"big": 5, "mid": 0})


# --- MixtureSampler -----------------------------------------------------------


def _sampler(seed=0, batch_size=8, rates=None, **kw):
    return MixtureSampler(SIZES, rates or mixture_rates("temperature:2", SIZES), batch_size, seed, **kw)


def test_same_seed_and_step_same_batch():
    a, b = _sampler(), _sampler()
    for step in [0, 1, 1023, 1024, 5000, 123_457]:
        ta, ia = a.batch_at(step)
        tb, ib = b.batch_at(step)
        assert ta == tb
        np.testing.assert_array_equal(ia, ib)
        assert ia.dtype == np.int64 and ia.shape == (8,)
    other = _sampler(seed=1)
    assert any(
        a.batch_at(s)[0] != other.batch_at(s)[0] or not np.array_equal(a.batch_at(s)[1], other.batch_at(s)[1])
        for s in range(10)
    )


@pytest.mark.parametrize("step", [537, CHUNK + 37])
def test_resume_equals_uninterrupted(step):
    stepped = _sampler()
    for s in range(step):
        stepped.batch_at(s)
    task, indices = stepped.batch_at(step)
    fresh_task, fresh_indices = _sampler().batch_at(step)
    assert task == fresh_task
    np.testing.assert_array_equal(indices, fresh_indices)


def test_out_of_order_access_is_pure():
    s = _sampler()
    first = [s.batch_at(step) for step in range(3 * CHUNK)]
    for step in [2 * CHUNK + 5, 3, CHUNK, 10 * CHUNK, 7]:
        task, indices = s.batch_at(step)
        if step < len(first):
            assert task == first[step][0]
            np.testing.assert_array_equal(indices, first[step][1])


def test_rates_are_honoured():
    rates = {"big": 0.6, "mid": 0.3, "small": 0.1}
    s = _sampler(rates=rates)
    counts = collections.Counter(s.task_at(step) for step in range(20_000))
    for name, rate in rates.items():
        assert abs(counts[name] / 20_000 - rate) < 0.015, counts
    assert s.task_at(0) == s.batch_at(0)[0]


def test_zero_rate_task_is_never_drawn():
    s = _sampler(rates={"big": 0.5, "mid": 0.5, "small": 0.0})
    assert "small" not in {s.task_at(step) for step in range(5000)}


def test_each_epoch_is_a_permutation():
    # 100 examples in batches of 8: batches straddle epoch boundaries, and
    # the steps span several schedule chunks, so the walk must carry over.
    s = _sampler(rates={"big": 0.2, "mid": 0.2, "small": 0.6})
    steps = range(3 * CHUNK)
    walk = np.concatenate([idx for task, idx in (s.batch_at(st) for st in steps) if task == "small"])
    epochs = len(walk) // 100
    assert epochs >= 10
    for e in range(epochs):
        assert sorted(walk[e * 100 : (e + 1) * 100]) == list(range(100))
    assert not np.array_equal(walk[:100], walk[100:200])  # a fresh order each epoch


def test_batch_larger_than_task():
    s = MixtureSampler({"tiny": 3}, {"tiny": 1.0}, batch_size=7, seed=0)
    walk = np.concatenate([s.batch_at(step)[1] for step in range(3)])  # 21 = 7 epochs
    for e in range(7):
        assert sorted(walk[3 * e : 3 * e + 3]) == [0, 1, 2]


def test_process_slices_concatenate_to_the_global_batch():
    for count in [2, 4, 8]:
        for step in [0, 17, 2000]:
            task, full = _sampler(batch_size=16).batch_at(step)
            parts = [_sampler(batch_size=16, process_index=i, process_count=count).batch_at(step) for i in range(count)]
            assert {t for t, _ in parts} == {task}
            np.testing.assert_array_equal(np.concatenate([p for _, p in parts]), full)


def test_task_order_does_not_depend_on_listing_order():
    rates = mixture_rates("uniform", SIZES)
    a = MixtureSampler(SIZES, rates, 4, 3)
    b = MixtureSampler(dict(reversed(SIZES.items())), dict(reversed(rates.items())), 4, 3)
    for step in range(50):
        assert a.batch_at(step)[0] == b.batch_at(step)[0]
        np.testing.assert_array_equal(a.batch_at(step)[1], b.batch_at(step)[1])


def test_bad_sampler_arguments():
    rates = mixture_rates("uniform", SIZES)
    with pytest.raises(ValueError, match="Batch size 10"):
        MixtureSampler(SIZES, rates, 10, 0, process_count=4)
    with pytest.raises(ValueError, match="Process index 4"):
        MixtureSampler(SIZES, rates, 8, 0, process_index=4, process_count=4)
    with pytest.raises(ValueError, match="must match"):
        MixtureSampler(SIZES, {"big": 1.0}, 8, 0)
    with pytest.raises(ValueError, match="Step -1"):
        _sampler().batch_at(-1)


def test_far_step_is_cheap():
    # A million steps in: only chunk counts are computed, in well under a second.
    task, indices = _sampler().batch_at(1_000_000)
    assert task in SIZES and len(set(indices.tolist())) == 8
