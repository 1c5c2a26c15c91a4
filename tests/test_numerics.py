"""Accuracy beyond the frameworks and the NaN/inf policy (conventions.md, issue 4): large
offsets, constants, huge magnitudes, on both layouts, every ISA path, any thread count."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _api
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


# --- coefficients beyond the compute type's range: the exact path --------------------------
# gamma / sqrt(var + eps) is infinite when var + eps == 0 (eps = 0 and a constant channel) and
# beyond float32 when var + eps < ~1e-77; the training-backward coefficients grow like
# (var + eps)**-1.5. Such channels are computed element by element in float64, with x == mean
# giving beta exactly (conventions.md).

STORAGE_DTYPES = [np.dtype(d) for d in _api.supported_dtypes()]
# (shape, axis) pairs covering the planar (inner > 1) and interleaved (inner == 1) kernels,
# with SIMD tails and a mix of ordinary and wide channels side by side
EDGE_LAYOUTS = [((6, 21, 5, 3), 1), ((6, 5, 3, 21), -1), ((33, 21), 1)]


def _mixed_channels(shape, axis, dtype):
    """Every third channel constant (0.1, not exactly representable in binary), the others
    N(0, 1); returned as float64 values exactly representable in dtype."""
    c = shape[axis]
    cs = _channel_shape(shape, axis)
    x = np.random.default_rng(20).normal(size=shape)
    const = (np.arange(c) % 3 == 0).reshape(cs)
    x = np.where(const, 0.1, x)
    return np.asarray(x.astype(dtype), np.float64), const.reshape(-1)


@pytest.mark.parametrize("dtype", STORAGE_DTYPES, ids=str)
@pytest.mark.parametrize("shape, axis", EDGE_LAYOUTS)
def test_zero_variance_with_eps_zero_gives_beta(isa, threads, dtype, shape, axis):
    """eps = 0 is allowed; a constant channel then has var + eps == 0 and still gives beta
    exactly, while its neighbours are normalized as usual; any thread count, same bits."""
    xv, const = _mixed_channels(shape, axis, dtype)
    x = xv.astype(dtype)
    c = shape[axis]
    gamma = np.linspace(0.5, 2.0, c)
    beta = np.linspace(-1.0, 1.0, c)
    outs = []
    for nthreads in (1, 2, 3):
        bn.set_num_threads(nthreads)
        y, st = bn.forward_train(x, gamma, beta, axis=axis, eps=0.0)
        outs.append(y)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    assert (st.var[const] == 0).all()
    cs = _channel_shape(shape, axis)
    yf = np.asarray(y, np.float64)
    want_beta = np.broadcast_to(beta.astype(dtype).astype(np.float64).reshape(cs), shape)
    in_const = np.broadcast_to(const.reshape(cs), shape)
    assert np.array_equal(yf[in_const], want_beta[in_const])
    # the reference on our statistics (NumPy's own mean of 0.1s is not exactly 0.1, and
    # then its variance is not 0)
    np.testing.assert_allclose(st.mean, ref.batch_stats(xv, axis=axis).mean, atol=1e-14)
    y_ref = ref.forward_eval(xv, st.mean, st.var, gamma, beta, axis=axis, eps=0.0)
    tol = 1e-5 if dtype.itemsize >= 4 else 2e-2
    assert np.isfinite(yf).all() and np.abs(yf - y_ref).max() < tol


@pytest.mark.parametrize("dtype", STORAGE_DTYPES, ids=str)
@pytest.mark.parametrize("shape, axis", EDGE_LAYOUTS)
def test_scale_beyond_compute_range_forward_eval(isa, dtype, shape, axis):
    """var + eps = 1e-300: x == mean gives beta, x != mean gives an inf of the right sign
    in the storage type (the true value is beyond its range)."""
    c = shape[axis]
    x = np.random.default_rng(21).integers(-1, 2, size=shape).astype(dtype)
    beta = np.full(c, 0.25)
    y = np.asarray(bn.forward_eval(x, np.zeros(c), np.full(c, 1e-300), None, beta, axis=axis,
                                   eps=0.0), np.float64)
    xf = np.asarray(x, np.float64)
    assert (y[xf == 0] == 0.25).all()
    if dtype == np.float64:  # 1e150 fits
        np.testing.assert_allclose(y, xf * 1e150 + 0.25, rtol=1e-15)
    else:
        assert np.array_equal(y[xf != 0], np.copysign(np.inf, xf[xf != 0]))


@pytest.mark.parametrize("shape, axis", EDGE_LAYOUTS)
def test_finite_results_behind_an_overflowing_float32_scale(isa, threads, shape, axis):
    """The float32 scale overflows but y does not: x ~ 1e-39 (subnormal) times
    1 / sqrt(1e-80) = 1e40 is about 1; likewise a given mean beyond float32's range."""
    c = shape[axis]
    rng = np.random.default_rng(22)
    x = (rng.normal(size=shape) * 1e-39).astype(np.float32)
    for nthreads in (1, 2):
        bn.set_num_threads(nthreads)
        y = bn.forward_eval(x, np.zeros(c), np.full(c, 1e-80), axis=axis, eps=0.0)
        np.testing.assert_allclose(y, ref.forward_eval(x, np.zeros(c), np.full(c, 1e-80),
                                                       axis=axis, eps=0.0), rtol=1e-6)
        dx, _, _ = bn.backward(x, x, (np.zeros(c), np.full(c, 1e-80)), axis=axis, eps=0.0,
                               training=False)
        np.testing.assert_allclose(dx, ref.backward(x, x, (np.zeros(c), np.full(c, 1e-80)),
                                                    axis=axis, eps=0.0, training=False)[0],
                                   rtol=1e-6)
    z = np.zeros(shape, np.float32)
    y = bn.forward_eval(z, np.full(c, 1e39), np.full(c, 1e78), axis=axis)
    np.testing.assert_allclose(y, -1.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=str)
@pytest.mark.parametrize("shape, axis", EDGE_LAYOUTS)
def test_training_backward_with_tiny_variance(isa, threads, dtype, shape, axis):
    """The training-backward coefficient gamma * (var + eps)**-1.5 * sum(dy * (x - mean)) / n
    overflows while dx itself is moderate: data of spread 1e-20 with eps = 0 (float32), and
    constant channels with eps = 1e-300 (float64: dx = 1e150 * (dy - mean(dy)))."""
    rng = np.random.default_rng(23)
    c = shape[axis]
    cs = _channel_shape(shape, axis)
    dy = rng.normal(size=shape).astype(dtype)
    if dtype == np.float32:
        x = (rng.normal(size=shape) * 1e-20).astype(dtype)
        eps = 0.0
    else:
        x, _ = _mixed_channels(shape, axis, dtype)
        eps = 1e-300
    gamma = np.linspace(0.5, 2.0, c)
    results = []
    for nthreads in (1, 2, 3):
        bn.set_num_threads(nthreads)
        st = bn.batch_stats(x, axis=axis)
        results.append(bn.backward(dy, x, st, gamma, axis=axis, eps=eps))
    for r in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(results[0], r))
    dx, dgamma, dbeta = results[0]
    if dtype == np.float64:  # constant channels: our variance is exactly 0, NumPy's is not
        assert (st.var[np.arange(c) % 3 == 0] == 0).all()
    dx_ref, dg_ref, db_ref = ref.backward(dy, x, st, gamma, axis=axis, eps=eps)
    assert np.isfinite(dx).all()
    scale = np.abs(dx_ref).max(axis=tuple(i for i in range(x.ndim) if i != axis % x.ndim))
    tol = (1e-5 if dtype == np.float32 else 1e-12) * scale.reshape(cs)
    assert (np.abs(dx - dx_ref) <= tol).all()
    np.testing.assert_allclose(dbeta, db_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dgamma, dg_ref, rtol=1e-6, atol=1e-6 * np.abs(dg_ref).max())


def test_layer_with_eps_zero_and_a_constant_channel():
    """The layer follows the functions: a constant channel gives beta. With eps = 0 it is not
    differentiable there (any change of x moves xhat by O(1)): its dx is infinite (NaN where
    dy equals its mean), as the formula gives, and the other channels are untouched."""
    layer = bn.BatchNorm(3, eps=0.0)
    layer.beta[:] = [0.5, -0.5, 2.0]
    x = np.random.default_rng(24).normal(size=(8, 3)).astype(np.float32)
    x[:, 1] = 0.1
    y = layer(x)
    assert (y[:, 1] == np.float32(-0.5)).all() and np.isfinite(y).all()
    assert layer.running_var[1] == pytest.approx(0.9)  # (1 - 0.1) * 1 + 0.1 * 0
    dy = np.random.default_rng(25).normal(size=x.shape).astype(np.float32)
    dx = layer.backward(dy)
    assert np.isinf(dx[:, 1]).all()  # 0 * inf would be NaN; dy - mean(dy) != 0 here
    assert np.isfinite(np.delete(dx, 1, axis=1)).all()
    assert layer.grad_gamma[1] == 0.0 and np.isfinite(layer.grad_gamma).all()


# --- coefficients that lose precision in the compute type (issue 11, items 3 and 4) --------

def _storage(name):
    if name == "bfloat16":
        return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    return np.dtype(name)


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / np.abs(want).max()


# spread of each channel: a float32 coefficient near 1/var flushes to 0 or a subnormal
# (float32 and bfloat16 compute in float32), and float64's a * inv * inv underflows
HUGE_SPREAD = {"float32": 1e25, "bfloat16": 1e25, "float64": 1e150}


@pytest.mark.parametrize("name", list(HUGE_SPREAD))
@pytest.mark.parametrize("shape, axis", [((3, 4), 1), ((3, 2, 5, 5), 1), ((3, 5, 5, 2), -1)])
def test_training_with_a_huge_spread(isa, threads, name, shape, axis):
    """x of each channel spread over +-HUGE_SPREAD: forward and backward within a few ulps
    of the float64 reference (the backward was 5-25% off in float32, 1e120 in float64)."""
    dt = _storage(name)
    rng = np.random.default_rng(7)
    x = (rng.normal(size=shape) * HUGE_SPREAD[name]).astype(dt)
    dy = rng.normal(size=shape).astype(dt)
    xf, dyf = x.astype(np.float64), dy.astype(np.float64)
    for nthreads in (1, 2):
        bn.set_num_threads(nthreads)
        y, st = bn.forward_train(x, axis=axis)
        dx, dg, db = bn.backward(dy, x, st, axis=axis)
        y_ref, st_ref = ref.forward_train(xf, axis=axis)
        dx_ref, dg_ref, _ = ref.backward(dyf, xf, st_ref, axis=axis)
        tol = 8 * float(np.finfo(np.float32 if name != "float64" else np.float64).eps)
        if name == "bfloat16":
            tol = 2.0 ** -7
        assert _rel_err(y, y_ref) < tol and _rel_err(dx, dx_ref) < tol
        assert _rel_err(dg, dg_ref) < 1e-12


@pytest.mark.parametrize("name", ["float32", "bfloat16"])
def test_differences_beyond_the_compute_range_stay_finite(isa, name):
    """[3e38, 3e38, -3e38]: x - mean overflows float32; the answer is (0.71, 0.71, -1.41)."""
    dt = _storage(name)
    x = np.array([[3e38, 1.0], [3e38, 2.0], [-3e38, 3.0]]).astype(dt)
    y, st = bn.forward_train(x)
    want = ref.forward_train(x.astype(np.float64))[0]
    assert np.isfinite(y.astype(np.float64)).all()
    assert _rel_err(y, want) < (2.0 ** -7 if name == "bfloat16" else 1e-6)
    dx = bn.backward(np.ones_like(x), x, st)[0]
    assert np.isfinite(dx.astype(np.float64)).all()


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_given_statistics_with_differences_beyond_the_compute_range(isa, threads, name,
                                                                    layout):
    """forward_eval with a mean near the top of the range and x near the top of the other
    sign: x - mean overflows the compute type, the answer (x - mean) / 2 does not. Such a
    channel takes the exact path; the others (here channel 1) keep the fast one."""
    dt = _storage(name)
    top = 1.7e308 if name == "float64" else 3e38
    col = np.array([top, -top, 0.5 * top, -0.25 * top])
    x = np.stack([col, np.linspace(-1, 1, 4)], axis=1)          # (4, 2)
    if layout == "nchw":
        x = x.reshape(4, 2, 1, 1)
    axis = 1
    x = x.astype(dt)
    mean, var = np.array([-top, 0.25]), np.array([4.0, 2.0])
    # (x - mean) / sqrt(var) as (x/2 - mean/2) / sqrt(var/4): the float64 oracle stays in range
    want = ref.forward_eval(x.astype(np.float64) / 2, mean / 2, var / 4, eps=0.0, axis=axis)
    for nthreads in (1, 2):
        bn.set_num_threads(nthreads)
        y = bn.forward_eval(x, mean, var, eps=0.0, axis=axis)
        assert np.isfinite(y.astype(np.float64)).all(), y
        assert _rel_err(y, want) < (2.0 ** -7 if name == "bfloat16" else 1e-6)


def test_forward_eval_with_a_subnormal_float32_scale(isa):
    """gamma / sqrt(var + eps) = 1e-40 is subnormal in float32 (2 digits): the exact path
    gives the output to the last bit of float32."""
    x = np.linspace(1.0, 3.0, 24, dtype=np.float32).reshape(6, 4)
    var = np.full(4, 1e80)
    y = bn.forward_eval(x, np.zeros(4), var, eps=0.0)
    want = x.astype(np.float64) / 1e40
    assert np.array_equal(y, want.astype(np.float32))


def _exact_var(col):
    """The variance of float64 values in exact rational arithmetic."""
    from fractions import Fraction
    vals = [Fraction(float(v)) for v in col]
    mean = sum(vals) / len(vals)
    return sum((v - mean) ** 2 for v in vals) / len(vals)


@pytest.mark.parametrize("shape, axis", [((16, 32, 32, 2), -1), ((32, 2, 32, 32), 1),
                                         ((65536, 2), 1), ((65536, 1), 1)])
def test_float64_statistics_of_a_large_offset(isa, shape, axis):
    """1e10 + N(0, 1) in float64, many partial results merged: the variance within 1e-12 of
    the exact value (it was 1e-8 off when partial means were merged at the scale of 1e10;
    numpy.var is off by 1e-14 to 1e-12 here)."""
    x = 1e10 + np.random.default_rng(8).normal(size=shape)
    st = bn.batch_stats(x, axis=axis)
    c = shape[axis] - 1
    col = np.moveaxis(x, axis, -1)[..., c].ravel()
    exact = _exact_var(col)
    assert abs(st.var[c] - float(exact)) < 1e-12 * float(exact)
    assert abs(st.mean[c] - col.mean()) < 4e-15 * 1e10
