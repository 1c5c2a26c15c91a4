"""merge_stats and the statistics of empty batches (batchnorm._stats)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.reference import batch_stats as ref_stats  # float64 NumPy oracle


def _split_stats(x, sizes, axis=1):
    """Stats of consecutive pieces of x along its first axis, of the given sizes."""
    edges = np.cumsum([0] + list(sizes))
    return [bn.batch_stats(x[a:b], axis) for a, b in zip(edges[:-1], edges[1:])]


def test_empty_batch_is_the_neutral_element():
    for shape, axis in [((0, 3), 1), ((4, 3, 0), 1), ((0, 2, 2, 5), -1)]:
        st = bn.batch_stats(np.zeros(shape, np.float32), axis)
        c = shape[axis]
        assert st.count == 0
        assert st.mean.shape == st.var.shape == (c,)
        assert st.mean.dtype == np.float64 and not st.mean.any() and not st.var.any()
    x = np.random.default_rng(0).normal(size=(7, 3))
    st = bn.batch_stats(x)
    empty = bn.batch_stats(np.zeros((0, 3)))
    for merged in (bn.merge_stats(st, empty), bn.merge_stats(empty, st),
                   bn.merge_stats(empty, st, empty, empty)):
        assert merged.count == 7
        np.testing.assert_array_equal(merged.mean, st.mean)  # exactly: adds nothing
        np.testing.assert_array_equal(merged.var, st.var)
    assert bn.merge_stats(empty, empty).count == 0
    assert not bn.merge_stats(empty, empty).mean.any()


def test_training_on_an_empty_batch_stays_an_error():
    with pytest.raises(ValueError, match="more than one value"):
        bn.forward_train(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="more than one value"):
        bn.BatchNorm(3)(np.zeros((0, 3), np.float32))


def test_an_empty_part_adds_nothing_whatever_it_holds():
    st = bn.batch_stats(np.arange(12.0).reshape(4, 3))
    junk = bn.Stats(np.full(3, 1e300), np.full(3, np.nan), 0)
    merged = bn.merge_stats(junk, st)
    np.testing.assert_array_equal(merged.mean, st.mean)
    np.testing.assert_array_equal(merged.var, st.var)


@pytest.mark.parametrize("offset", [0.0, 1e4, -1e8])
@pytest.mark.parametrize("sizes", [(5, 5), (1, 99), (3, 0, 8, 1, 13, 2), (50,) * 20])
def test_merge_equals_the_concatenation(offset, sizes):
    rng = np.random.default_rng(len(sizes))
    x = rng.normal(offset, 1.0, size=(sum(sizes), 4)) * [1, 10, 1e-3, 1]
    x[:, 3] = offset  # a constant channel: variance 0 exactly
    merged = bn.merge_stats(*_split_stats(x, sizes))
    mean, var, _ = ref_stats(x, axis=1)
    assert merged.count == len(x)
    # the parts' means are rounded to float64: a few ulps of |mean| for the mean, about
    # 1e-16 * |mean| / std relative for the variance
    scale = np.maximum(np.abs(mean), np.sqrt(var))[:3]
    np.testing.assert_array_less(np.abs(merged.mean - mean)[:3], 8 * 2.2e-16 * scale)
    np.testing.assert_array_less(np.abs(merged.var - var)[:3] / var[:3],
                                 8 * 2.2e-16 * scale / np.sqrt(var[:3]) + 1e-14)
    assert merged.var[3] == 0.0 and merged.mean[3] == offset


def test_chan_beats_the_sum_of_squares():
    """E[x^2] - E[x]^2 all-reduced over parts loses float32 data offset by 1e4 entirely;
    the merge keeps 1e-13."""
    rng = np.random.default_rng(3)
    x = (1e4 + rng.normal(size=(4096, 2))).astype(np.float32)
    parts = np.array_split(x, 8)
    n = sum(len(p) for p in parts)
    ex = sum(p.sum(axis=0, dtype=np.float32) for p in parts) / np.float32(n)
    ex2 = sum((p * p).sum(axis=0, dtype=np.float32) for p in parts) / np.float32(n)
    naive = ex2 - ex * ex
    merged = bn.merge_stats(*map(bn.batch_stats, parts))
    truth = x.astype(np.float64).var(axis=0)
    assert np.abs(naive / truth - 1).max() > 0.5
    assert np.abs(merged.var / truth - 1).max() < 1e-12


def test_merge_is_deterministic_and_associative_up_to_rounding():
    rng = np.random.default_rng(4)
    parts = _split_stats(rng.normal(3.0, 2.0, size=(97, 5)), (10, 20, 7, 30, 30))
    a = bn.merge_stats(*parts)
    b = bn.merge_stats(*parts)
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.var, b.var)
    grouped = bn.merge_stats(bn.merge_stats(*parts[:2]), bn.merge_stats(*parts[2:]))
    np.testing.assert_allclose(grouped.var, a.var, rtol=1e-14)
    np.testing.assert_allclose(grouped.mean, a.mean, rtol=1e-15)
    for perm in itertools.islice(itertools.permutations(parts), 10):
        p = bn.merge_stats(*perm)
        assert p.count == a.count
        np.testing.assert_allclose(p.var, a.var, rtol=1e-14)


def test_one_part_is_returned_as_it_is():
    st = bn.batch_stats(np.random.default_rng(5).normal(size=(6, 2)))
    m = bn.merge_stats(st)
    assert m.count == st.count and m.mean is not st.mean
    np.testing.assert_array_equal(m.var, st.var)
    m2 = bn.merge_stats((st.mean.astype(np.float32), list(st.var), np.int64(6)))
    assert m2.count == 6 and m2.mean.dtype == np.float64


def test_nan_propagates_to_its_channel_only():
    x = np.random.default_rng(6).normal(size=(8, 3))
    y = x.copy()
    y[2, 1] = np.nan
    m = bn.merge_stats(bn.batch_stats(x), bn.batch_stats(y))
    assert np.isnan(m.mean[1]) and np.isnan(m.var[1])
    assert np.isfinite(m.mean[[0, 2]]).all() and np.isfinite(m.var[[0, 2]]).all()


@pytest.mark.parametrize("args, exc, match", [
    ((), TypeError, "at least one"),
    (([bn.Stats(np.zeros(2), np.zeros(2), 1)] * 2,), TypeError, "unpack it"),
    ((np.zeros(2),), TypeError, "argument 0 must be a Stats"),
    (((np.zeros(2), np.zeros(2), 1.5),), TypeError, "count"),
    (((np.zeros(2), np.zeros(2), True),), TypeError, "count must be an integer >= 0, got True"),
    (((np.zeros(2), np.zeros(2), -1),), ValueError, "count must be an integer >= 0, got -1"),
    (((np.zeros(2), -np.ones(2), 3),), ValueError, "negative variance"),
    (((np.zeros((2, 1)), np.zeros(2), 3),), ValueError, r"shape \(2, 1\)"),
    (((np.zeros(2), np.zeros(3), 3),), ValueError, "var"),
    (((np.zeros(2), np.zeros(2), 3), (np.zeros(3), np.zeros(3), 3)), ValueError,
     "argument 1 has 3 channels"),
])
def test_bad_arguments_are_named(args, exc, match):
    with pytest.raises(exc, match=match):
        bn.merge_stats(*args)


# --- masked statistics: per-channel counts ----------------------------------------------------


@pytest.mark.parametrize("shape,axis", [((40, 3), 1), ((6, 4, 5, 5), 1), ((6, 5, 5, 4), -1)])
def test_masked_parts_merge_to_the_masked_whole(shape, axis):
    rng = np.random.default_rng(7)
    x = rng.normal(2.0, 3.0, shape)
    ax = axis % len(shape)
    mask = rng.random(np.delete(shape, ax)) < 0.6
    whole = bn.batch_stats(x, axis=axis, mask=mask)
    parts = [bn.batch_stats(x[i:i + 2], axis=axis, mask=mask[i:i + 2])
             for i in range(0, shape[0], 2)]
    merged = bn.merge_stats(*parts)
    assert merged.count.dtype == np.int64 and np.array_equal(merged.count, whole.count)
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-13)
    np.testing.assert_allclose(merged.var, whole.var, rtol=1e-12)
    np.testing.assert_allclose(whole.unbiased_var(), whole.var * whole.count / (whole.count - 1))
    # a masked part merged with an unmasked one: counts per channel
    mixed = bn.merge_stats(parts[0], bn.batch_stats(x[2:4], axis=axis))
    assert np.array_equal(mixed.count, parts[0].count + x[2:4].size // shape[ax])


def test_a_part_with_nothing_unmasked_adds_nothing():
    x = np.arange(12.0).reshape(6, 2)
    empty = bn.batch_stats(x[:2], mask=np.zeros(2, bool))
    assert np.array_equal(empty.count, [0, 0]) and not empty.mean.any() and not empty.var.any()
    st = bn.batch_stats(x[2:], mask=np.ones(4, bool))
    merged = bn.merge_stats(empty, st)
    assert np.array_equal(merged.mean, st.mean) and np.array_equal(merged.var, st.var)
    with pytest.raises(ValueError, match="count >= 2"):
        empty.unbiased_var()


@pytest.mark.parametrize("count", [np.array([3, 3, 3]), np.array([3.0, 3.0]), np.array([3, -1])])
def test_bad_per_channel_counts_are_refused(count):
    st = bn.Stats(np.zeros(2), np.ones(2), 3)
    with pytest.raises(ValueError, match="per-channel integers"):
        bn.merge_stats(st, bn.Stats(np.zeros(2), np.ones(2), count))
