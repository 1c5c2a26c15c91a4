"""Accuracy beyond the frameworks and the NaN/inf policy (conventions.md, issue 4): large
offsets, constants, huge magnitudes, on both layouts, every ISA path, any thread count."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import reference as ref

LAYOUTS = [((64, 32, 12, 12), 1), ((64, 12, 12, 32), -1), ((2048, 48), 1), ((8, 3, 5, 5), 1)]


def _channel_shape(shape, axis):
    return [-1 if i == axis % len(shape) else 1 for i in range(len(shape))]


@pytest.mark.parametrize("nthreads", [1, 2, 3])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_offset_data_keeps_float32_accuracy(isa, threads, nthreads, shape, axis):
    """x = 1e4 + N(0, 1) in float32: within 1e-5 of the float64 reference on the same input
    (PyTorch's CPU kernels are off by 5e-3..5e-2 here)."""
    bn.set_num_threads(nthreads)
    x = (1e4 + np.random.default_rng(0).normal(size=shape)).astype(np.float32)
    y, st = bn.forward_train(x, axis=axis)
    y_ref, st_ref = ref.forward_train(x, axis=axis)
    assert np.abs(y - y_ref).max() < 1e-5
    np.testing.assert_allclose(st.var, st_ref.var, rtol=1e-10)
    dy = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    dx, _, _ = bn.backward(dy, x, st, axis=axis)
    dx_ref, _, _ = ref.backward(dy, x, st_ref, axis=axis)
    assert np.abs(dx - dx_ref).max() < 1e-5 * max(1.0, np.abs(dx_ref).max())


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_constant_channel_gives_exactly_beta(isa, dt, shape, axis):
    beta = np.random.default_rng(2).normal(size=shape[axis])
    for value in (0.0, 1.0, -3.25, 1e7, 123456.7):
        x = np.full(shape, value, dt)
        y, st = bn.forward_train(x, None, beta, axis=axis)
        assert (st.var == 0).all()
        expected = np.broadcast_to(beta.astype(dt).reshape(_channel_shape(shape, axis)), shape)
        assert np.array_equal(y, expected), value


@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_variance_never_negative(isa, shape, axis):
    rng = np.random.default_rng(4)
    # nearly constant channels at a large offset: the classic negative-variance trap
    x = (1e6 + rng.integers(0, 2, size=shape) * np.float32(0.0625)).astype(np.float32)
    st = bn.batch_stats(x, axis=axis)
    assert (st.var >= 0).all()
    np.testing.assert_allclose(st.var, ref.batch_stats(x, axis=axis).var, rtol=1e-9, atol=1e-18)


@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_huge_magnitudes_stay_finite_and_correct(isa, shape, axis):
    """float32 data of magnitude 1e30 (squares overflow float32): finite, correct output."""
    x = (np.random.default_rng(5).normal(size=shape) * 1e30).astype(np.float32)
    y, st = bn.forward_train(x, axis=axis)
    y_ref, _ = ref.forward_train(x, axis=axis)
    assert np.isfinite(y).all() and np.isfinite(st.var).all()
    assert np.abs(y - y_ref).max() < 1e-5
    xe = (np.random.default_rng(6).normal(size=shape) * 1e37).astype(np.float32)
    ye, _ = bn.forward_train(xe, axis=axis)
    assert np.isfinite(ye).all() and np.abs(ye - ref.forward_train(xe, axis=axis)[0]).max() < 1e-5


@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_non_finite_values_stay_in_their_channel(isa, shape, axis):
    x = np.random.default_rng(8).normal(size=shape).astype(np.float32)
    bad = np.zeros(shape, bool)
    idx = [0] * len(shape)
    idx[axis % len(shape)] = 1
    bad[tuple(idx)] = True
    x_nan = np.where(bad, np.float32(np.nan), x)
    idx[axis % len(shape)] = 2
    x_nan[tuple(idx)] = np.inf
    y, st = bn.forward_train(x_nan, axis=axis)
    others = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    poisoned = np.isnan(y).any(axis=others)
    assert poisoned[1] and poisoned[2] and poisoned.sum() == 2
    clean = np.ones(shape[axis], bool)
    clean[[1, 2]] = False
    y_ref, _ = ref.forward_train(x, axis=axis)
    sel = [slice(None)] * len(shape)
    sel[axis % len(shape)] = clean
    assert np.abs(y[tuple(sel)] - y_ref[tuple(sel)]).max() < 1e-5


def test_check_finite_raises_and_names_channels():
    x = np.random.default_rng(9).normal(size=(6, 4, 3)).astype(np.float32)
    x[2, 3, 1] = np.inf
    out = np.full_like(x, 7.0)
    for call in (
        lambda: bn.batch_stats(x, check_finite=True),
        lambda: bn.forward_train(x, out=out, check_finite=True),
        lambda: bn.forward_eval(x, np.zeros(4), np.ones(4), out=out, check_finite=True),
        lambda: bn.backward(np.ones_like(x), x, bn.batch_stats(x), out=out, check_finite=True),
    ):
        with pytest.raises(ValueError, match=r"x contains NaN or inf in channel\(s\) 3"):
            call()
    assert (out == 7.0).all()  # nothing written by a call that raised
    dy = np.ones_like(x)
    dy[0, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"dy contains NaN or inf in channel\(s\) 1"):
        bn.backward(dy, np.ones_like(x), bn.batch_stats(np.ones_like(x)), check_finite=True)


def test_layer_never_lets_non_finite_statistics_in():
    layer = bn.BatchNorm(4)
    x = np.random.default_rng(10).normal(size=(8, 4)).astype(np.float32)
    layer(x)
    before = layer.state_dict()
    x[0, 2] = np.inf
    with pytest.warns(RuntimeWarning, match="not updated"):
        y = layer(x)
    assert np.isnan(y[:, 2]).all() and np.isfinite(np.delete(y, 2, axis=1)).all()
    after = layer.state_dict()
    for key in before:
        assert np.array_equal(before[key], after[key])
    strict = bn.BatchNorm(4, check_finite=True)
    with pytest.raises(ValueError, match="channel"):
        strict(x)
    assert strict.num_batches_tracked == 0
