"""The oracle (batchnorm.reference) against numbers worked out by hand.

Everything else is checked against reference.py, so reference.py is checked against
arithmetic done on paper (the fractions are in the comments).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchnorm import Stats
from batchnorm import reference as ref

# The seed batch of conventions.md: 3 examples, 4 features.
BATCH = np.array([[4, 5, 2, 1], [3, 4, 6, 0], [1, 4, 7, 9]], dtype=np.float64)
MEAN = np.array([8 / 3, 13 / 3, 5, 10 / 3])  # (4+3+1)/3, (5+4+4)/3, (2+6+7)/3, (1+0+9)/3
VAR = np.array([14 / 9, 2 / 9, 14 / 3, 146 / 9])  # e.g. ((4/3)^2+(1/3)^2+(5/3)^2)/3 = 42/27


def test_batch_stats_of_the_seed_batch():
    st = ref.batch_stats(BATCH)
    assert isinstance(st, Stats)
    np.testing.assert_allclose(st.mean, MEAN, rtol=1e-15)
    np.testing.assert_allclose(st.var, VAR, rtol=1e-14)
    assert st.count == 3
    # biased: the unbiased variance is n/(n-1) = 3/2 times larger
    np.testing.assert_allclose(st.unbiased_var(), [7 / 3, 1 / 3, 7, 73 / 3], rtol=1e-14)


def test_inference_on_the_seed_example():
    # (3 - 8/3) / sqrt(14/9) = 1/sqrt(14); (5 - 13/3) / sqrt(2/9) = sqrt(2);
    # (7 - 5) / sqrt(14/3) = sqrt(6/7); (9 - 10/3) / sqrt(146/9) = 17/sqrt(146)
    y = ref.forward_eval(np.array([[3.0, 5, 7, 9]]), MEAN, VAR, eps=0.0)
    expected = [1 / math.sqrt(14), math.sqrt(2), math.sqrt(6 / 7), 17 / math.sqrt(146)]
    np.testing.assert_allclose(y, [expected], rtol=1e-14)
    np.testing.assert_allclose(np.round(y, 2), [[0.27, 1.41, 0.93, 1.41]])


def test_forward_train_small_cases():
    # two values per column always normalize to -1, +1
    y, st = ref.forward_train(np.array([[1.0, 10.0], [3.0, 30.0]]), eps=0.0)
    np.testing.assert_array_equal(y, [[-1, -1], [1, 1]])
    np.testing.assert_array_equal(st.mean, [2, 20])
    np.testing.assert_array_equal(st.var, [1, 100])
    # gamma and beta: column (0, 2) has mean 1, var 1 -> (-1, 1) -> 3 * (-1, 1) + 0.5
    y, _ = ref.forward_train(np.array([[0.0], [2.0]]), [3.0], [0.5], eps=0.0)
    np.testing.assert_array_equal(y, [[-2.5], [3.5]])
    # eps enters as sqrt(var + eps): var 1, eps 3 -> divide by 2
    y, _ = ref.forward_train(np.array([[0.0], [2.0]]), eps=3.0)
    np.testing.assert_array_equal(y, [[-0.5], [0.5]])


def test_nchw_channels_and_channels_last():
    # channel 0 holds 1, 2, 3, 4 (mean 5/2, var 5/4); channel 1 is constant 5
    x = np.array([[[[1.0, 2.0]], [[5.0, 5.0]]], [[[3.0, 4.0]], [[5.0, 5.0]]]])
    assert x.shape == (2, 2, 1, 2)
    st = ref.batch_stats(x, axis=1)
    np.testing.assert_array_equal(st.mean, [2.5, 5.0])
    np.testing.assert_array_equal(st.var, [1.25, 0.0])
    assert st.count == 4
    with np.errstate(invalid="ignore"):  # channel 1 is 0/0 with eps = 0
        y, _ = ref.forward_train(x, gamma=[2.0, 2.0], beta=[0.0, -7.0], axis=1, eps=0.0)
    s = 2 / math.sqrt(1.25)
    np.testing.assert_allclose(y[:, 0].ravel(), [-1.5 * s, -0.5 * s, 0.5 * s, 1.5 * s], rtol=1e-15)
    # zero variance with eps > 0: exactly beta
    y, _ = ref.forward_train(x, gamma=[2.0, 2.0], beta=[0.0, -7.0], axis=1)
    assert (y[:, 1] == -7.0).all()
    # the same data channels-last gives the same numbers
    x_last = np.moveaxis(x, 1, -1)
    st_last = ref.batch_stats(x_last, axis=-1)
    np.testing.assert_array_equal(st_last.mean, st.mean)
    np.testing.assert_array_equal(st_last.var, st.var)
    y_last, _ = ref.forward_train(x_last, gamma=[2.0, 2.0], beta=[0.0, -7.0], axis=-1)
    np.testing.assert_allclose(np.moveaxis(y_last, -1, 1), y, rtol=1e-15)


def test_axis_zero_and_middle():
    x = np.arange(24.0).reshape(2, 3, 4)
    st = ref.batch_stats(x, axis=2)  # column j of every (2, 3) slice: j, j+4, ..., j+20
    np.testing.assert_allclose(st.mean, [10, 11, 12, 13])
    # values j + 4k, k in {0, 1, 2, 3, 4, 5}: variance 16 * var(0..5) = 16 * 35/12
    np.testing.assert_allclose(st.var, np.full(4, 16 * 35 / 12))
    st0 = ref.batch_stats(x, axis=0)  # 0..11 and 12..23
    np.testing.assert_allclose(st0.mean, [5.5, 17.5])
    np.testing.assert_allclose(st0.var, [143 / 12, 143 / 12])
    assert st0.count == 12


def test_backward_by_hand():
    # one channel, x = (0, 1, 5): mean 2, var 14/3 = sigma^2; dy = (1, 0, 0), eps = 0
    # dbeta = 1; dgamma = sum dy*xhat = -2/sigma
    # dx = gamma/sigma * (dy - 1/3 - xhat * dgamma/3) = gamma/sigma * (8, -10, 2)/21
    x = np.array([[0.0], [1.0], [5.0]])
    dy = np.array([[1.0], [0.0], [0.0]])
    sigma = math.sqrt(14 / 3)
    st = ref.batch_stats(x)
    for gamma in (None, [2.0]):
        g = 1.0 if gamma is None else 2.0
        dx, dgamma, dbeta = ref.backward(dy, x, st, gamma, eps=0.0)
        np.testing.assert_allclose(dx.ravel(), g / sigma * np.array([8, -10, 2]) / 21, rtol=1e-14)
        np.testing.assert_allclose(dgamma, [-2 / sigma], rtol=1e-14)
        np.testing.assert_array_equal(dbeta, [1.0])
    # frozen statistics: dx = dy * gamma / sqrt(var + eps) = dy * 2 / sqrt(3 + 1)
    dx, dgamma, dbeta = ref.backward(dy, x, (np.array([2.0]), np.array([3.0])), [2.0], eps=1.0,
                                     training=False)
    np.testing.assert_array_equal(dx, dy)
    np.testing.assert_allclose(dgamma, [(0 - 2) / 2], rtol=1e-15)  # dy*xhat at x=0: -2/2
    np.testing.assert_array_equal(dbeta, [1.0])


def test_a_bias_before_batch_norm_gets_no_gradient():
    """The mean absorbs a per-channel bias, so dx sums to zero over each channel."""
    rng = np.random.default_rng(60)
    x = rng.standard_normal((5, 3, 4))
    dy = rng.standard_normal((5, 3, 4))
    dx, _, _ = ref.backward(dy, x, ref.batch_stats(x), rng.standard_normal(3))
    np.testing.assert_allclose(dx.sum(axis=(0, 2)), 0.0, atol=1e-13)
    y1, _ = ref.forward_train(x)
    y2, _ = ref.forward_train(x + np.array([1.0, -2.0, 5.0]).reshape(1, 3, 1))
    np.testing.assert_allclose(y1, y2, atol=1e-14)


def test_reference_returns_float64_for_float32_input():
    x = BATCH.astype(np.float32)
    y, st = ref.forward_train(x)
    assert y.dtype == np.float64 and st.mean.dtype == np.float64
    dx, dg, db = ref.backward(x, x, st)
    assert dx.dtype == dg.dtype == db.dtype == np.float64
    assert ref.forward_eval(x, MEAN, VAR).dtype == np.float64


@pytest.mark.parametrize("training", [True, False])
def test_reference_gradients_are_those_of_its_forward(training):
    """Central differences of the reference's own forward (float64, small problem)."""
    rng = np.random.default_rng(61)
    x = rng.standard_normal((4, 3, 2)) * 2 + 1
    w = rng.standard_normal(x.shape)
    gamma = rng.uniform(0.5, 2.0, 3)
    frozen = (rng.standard_normal(3), rng.uniform(0.5, 2.0, 3))

    def loss(xx):
        if training:
            return float((ref.forward_train(xx, gamma, eps=1e-3)[0] * w).sum())
        return float((ref.forward_eval(xx, *frozen, gamma, eps=1e-3) * w).sum())

    st = ref.batch_stats(x) if training else frozen
    dx, _, _ = ref.backward(w, x, st, gamma, eps=1e-3, training=training)
    h = 1e-6
    fd = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        fd[i] = (loss(x + e) - loss(x - e)) / (2 * h)
    np.testing.assert_allclose(dx, fd, rtol=1e-6, atol=1e-8)
