"""The functional API (batchnorm._api) against the float64 oracle, on every ISA path.

Covers: the oracle sweep over shapes, axes, layouts and dtypes (small shapes with tails and
large ones that cross the multi-unit and multi-thread paths), gradients against finite
differences, ``out=`` semantics, inputs never modified, argument errors, degenerate cases and
the package doctests.
"""

from __future__ import annotations

import doctest
import importlib

import hypothesis
import hypothesis.strategies as st_
import numpy as np
import pytest

import batchnorm as bn
from batchnorm import reference as ref
from conftest import (
    DTYPES,
    LAYOUTS,
    assert_grad_close,
    assert_out_close,
    assert_stat_close,
    assert_unchanged,
    channel_shape,
    count_per_channel,
    layout_possible,
    make_layout,
    make_params,
    make_x,
    param_grad_scales,
)

# (shape, axis): C and inner sizes of 1, 3, 7, 8, 9, 17, 257; 2-D to 5-D; axis 0, middle, last.
SMALL_CASES = [
    ((5, 1), 1),
    ((6, 3), 1),
    ((4, 7), -1),
    ((9, 8), 1),
    ((17, 9), 1),
    ((3, 257), 1),
    ((257, 17), 1),
    ((4, 3, 7), 1),
    ((2, 17, 9), 1),
    ((3, 7, 1), 1),
    ((5, 1, 8), 1),
    ((2, 8, 257), 1),
    ((2, 3, 5, 7), 1),  # NCHW
    ((3, 8, 3, 3), 1),
    ((2, 9, 1, 17), 1),
    ((2, 257, 2, 3), 1),
    ((2, 5, 7, 3), -1),  # NHWC
    ((2, 3, 3, 17), -1),
    ((1, 4, 4, 257), -1),
    ((3, 2, 2, 1), -1),
    ((2, 3, 3, 4, 5), 1),  # NCDHW
    ((2, 3, 4, 5, 7), -1),
    ((7, 5, 3), 0),
    ((9, 4), 0),
    ((3, 4, 7, 5), 2),
    ((2, 3, 9, 4, 3), -3),
]

# Large enough for several 16384-element units per channel and for threads (> 65536 elements).
# (CHUNK_CASES below go further, past the kernels' cache-sized chunks.)
LARGE_CASES = [
    ((130, 3, 17, 17), 1),  # NCHW: several outer blocks per channel
    ((2, 3, 129, 129), 1),  # NCHW: inner longer than a unit
    ((16, 33, 33, 7), -1),  # NHWC: channels-contiguous units
    ((300, 600), 1),  # (N, D) with more channels than one channel block (512)
    ((70001, 1), 1),  # one channel, many units, odd length
    ((40, 9, 17, 13), 2),  # a middle axis
]
LARGE_LAYOUTS = ("C", "sliced", "negative", "transposed")


def _case_id(case):
    shape, axis = case
    return "x".join(map(str, shape)) + f"-ax{axis}"


def _sweep(cases, layouts):
    return [
        pytest.param(shape, axis, kind, id=f"{_case_id((shape, axis))}-{kind}")
        for shape, axis in cases
        for kind in layouts
        if layout_possible(shape, axis, kind)
    ]


SWEEP = _sweep(SMALL_CASES, LAYOUTS) + _sweep(LARGE_CASES, LARGE_LAYOUTS)


# --- the oracle sweep ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape, axis, kind", SWEEP)
def test_forward_matches_reference(shape, axis, kind, dtype, isa):
    rng = np.random.default_rng([len(shape), sum(shape), axis % len(shape), LAYOUTS.index(kind)])
    x = make_layout(rng, shape, axis, dtype, kind)
    c = shape[axis]
    gamma, beta = make_params(rng, c)
    inputs = (x, gamma, beta)
    copies = tuple(a.copy() for a in inputs)

    rst = ref.batch_stats(x, axis)
    st = bn.batch_stats(x, axis=axis)
    assert isinstance(st, bn.Stats)
    assert st.count == count_per_channel(shape, axis) == rst.count
    assert_stat_close(st.mean, rst.mean, "mean")
    assert_stat_close(st.var, rst.var, "var")
    assert (st.var >= 0).all()

    for g, b in [(None, None), (gamma, beta), (gamma, None), (None, beta)]:
        y, st2 = bn.forward_train(x, g, b, axis=axis)
        ry, _ = ref.forward_train(x, g, b, axis=axis)
        assert y.shape == x.shape
        assert_out_close(y, ry, dtype, what=f"forward_train y (gamma={g is not None})")
        assert_stat_close(st2.mean, rst.mean, "forward_train mean")
        assert_stat_close(st2.var, rst.var, "forward_train var")
        assert st2.count == rst.count

    # inference with statistics that are not the batch's own
    mean = rst.mean + rng.uniform(-1, 1, c)
    var = rst.var * rng.uniform(0.5, 2.0, c) + 0.1
    for g, b in [(None, None), (gamma, beta)]:
        y = bn.forward_eval(x, mean, var, g, b, axis=axis, eps=1e-3)
        ry = ref.forward_eval(x, mean, var, g, b, axis=axis, eps=1e-3)
        assert_out_close(y, ry, dtype, what="forward_eval y")
    assert_unchanged(inputs, copies)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape, axis, kind", SWEEP)
def test_backward_matches_reference(shape, axis, kind, dtype, isa):
    rng = np.random.default_rng([len(shape), sum(shape), axis % len(shape), LAYOUTS.index(kind), 1])
    x = make_layout(rng, shape, axis, dtype, kind)
    dy = make_layout(rng, shape, axis, dtype, kind)
    c = shape[axis]
    gamma, _ = make_params(rng, c)
    st = bn.batch_stats(x, axis=axis)
    rst = ref.batch_stats(x, axis)
    inputs = (x, dy, gamma, st.mean, st.var)
    copies = tuple(a.copy() for a in inputs)

    sg, sb = param_grad_scales(dy, x, rst.mean, rst.var, axis)
    for g in (None, gamma):
        dx, dgamma, dbeta = bn.backward(dy, x, st, g, axis=axis)
        rdx, rdgamma, rdbeta = ref.backward(dy, x, rst, g, axis=axis)
        assert dx.shape == x.shape
        assert_grad_close(dx, rdx, dtype, what=f"training dx (gamma={g is not None})")
        assert_stat_close(dgamma, rdgamma, "dgamma", scale=sg)
        assert_stat_close(dbeta, rdbeta, "dbeta", scale=sb)

    # frozen statistics (inference-mode backward)
    mean = rst.mean + rng.uniform(-1, 1, c)
    var = rst.var * rng.uniform(0.5, 2.0, c) + 0.1
    sg, sb = param_grad_scales(dy, x, mean, var, axis)
    for g in (None, gamma):
        dx, dgamma, dbeta = bn.backward(dy, x, (mean, var), g, axis=axis, training=False)
        rdx, rdgamma, rdbeta = ref.backward(dy, x, (mean, var), g, axis=axis, training=False)
        assert_grad_close(dx, rdx, dtype, what="frozen dx")
        assert_stat_close(dgamma, rdgamma, "frozen dgamma", scale=sg)
        assert_stat_close(dbeta, rdbeta, "frozen dbeta", scale=sb)
    assert_unchanged(inputs, copies)


# Larger than the kernels' cache-sized chunks of channels (4 MB of data), so that several
# chunks run one after the other; in float64 one channel of the last case alone is larger.
CHUNK_CASES = [
    ((20, 50, 33, 33), 1, ("C", "negative")),
    ((16500, 70), 1, ("C",)),
    ((8, 64, 64, 40), -1, ("C", "negative")),
    ((2, 3, 600, 600), 1, ("C",)),
]


@pytest.mark.parametrize(
    "shape, axis, kind, dtype",
    [pytest.param(sh, ax, kind, dt, id=f"{_case_id((sh, ax))}-{kind}-{np.dtype(dt).name}")
     for sh, ax, kinds in CHUNK_CASES
     for kind in kinds
     for dt in ((np.float32, np.float64) if kind == "C" else (np.float32,))],
)
def test_several_chunks_match_reference(shape, axis, kind, dtype, isa):
    rng = np.random.default_rng([sum(shape), LAYOUTS.index(kind)])
    x = make_layout(rng, shape, axis, dtype, kind)
    dy = make_layout(rng, shape, axis, dtype, kind)
    gamma, beta = make_params(rng, shape[axis])
    copies = (x.copy(), dy.copy())
    y, st = bn.forward_train(x, gamma, beta, axis=axis)
    ry, rst = ref.forward_train(x, gamma, beta, axis=axis)
    assert_out_close(y, ry, dtype)
    assert_stat_close(st.mean, rst.mean, "mean")
    assert_stat_close(st.var, rst.var, "var")
    ye = bn.forward_eval(x, rst.mean, rst.var + 0.5, gamma, beta, axis=axis)
    assert_out_close(ye, ref.forward_eval(x, rst.mean, rst.var + 0.5, gamma, beta, axis=axis),
                     dtype)
    dx, dg, db = bn.backward(dy, x, st, gamma, axis=axis)
    rdx, rdg, rdb = ref.backward(dy, x, rst, gamma, axis=axis)
    sg, sb = param_grad_scales(dy, x, rst.mean, rst.var, axis)
    assert_grad_close(dx, rdx, dtype)
    assert_stat_close(dg, rdg, "dgamma", scale=sg)
    assert_stat_close(db, rdb, "dbeta", scale=sb)
    fx, fg, fb = bn.backward(dy, x, st, gamma, axis=axis, training=False)
    rfx, rfg, rfb = ref.backward(dy, x, rst, gamma, axis=axis, training=False)
    assert_grad_close(fx, rfx, dtype, what="frozen dx")
    assert_stat_close(fg, rfg, "frozen dgamma", scale=sg)
    assert_unchanged((x, dy), copies)


def test_list_and_non_native_inputs():
    x = [[4.0, 5.0, 2.0, 1.0], [3.0, 4.0, 6.0, 0.0], [1.0, 4.0, 7.0, 9.0]]
    y, st = bn.forward_train(x)
    ry, rst = ref.forward_train(np.array(x))
    assert y.dtype == np.float64
    assert_out_close(y, ry, np.float64)
    big = np.array(x, dtype=">f4")
    y32, st32 = bn.forward_train(big)
    assert y32.dtype == np.float32 and y32.dtype.isnative
    assert_out_close(y32, ry, np.float32)
    assert_stat_close(st32.var, rst.var)


def test_stats_unbiased_var():
    x = np.array([[4.0, 5.0], [3.0, 4.0], [1.0, 4.0]])
    st = bn.batch_stats(x)
    np.testing.assert_allclose(st.unbiased_var(), x.var(axis=0, ddof=1), rtol=1e-14)
    one = bn.batch_stats(np.ones((1, 3)))
    assert one.count == 1
    with pytest.raises(ValueError, match="count >= 2"):
        one.unbiased_var()


# --- gradients against finite differences --------------------------------------------------


def _fd(f, a, h=1e-6):
    """Central differences of the scalar f with respect to every element of a (float64)."""
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        fp = f()
        a[i] = old - h
        fm = f()
        a[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


@pytest.mark.parametrize("shape, axis", [((4, 3, 2), 1), ((5, 3), -1), ((2, 2, 3, 2), -1)])
def test_training_gradients_match_finite_differences(shape, axis, isa):
    rng = np.random.default_rng(7)
    x = make_x(rng, shape, axis, np.float64)
    w = rng.standard_normal(shape)
    gamma, beta = make_params(rng, shape[axis])
    eps = 1e-3

    def loss():
        y, _ = bn.forward_train(x, gamma, beta, axis=axis, eps=eps)
        return float(np.sum(y * w))

    y, st = bn.forward_train(x, gamma, beta, axis=axis, eps=eps)
    dx, dgamma, dbeta = bn.backward(w, x, st, gamma, axis=axis, eps=eps)
    rdx, rdgamma, rdbeta = ref.backward(w, x, ref.batch_stats(x, axis), gamma, axis=axis, eps=eps)
    fdx, fdgamma, fdbeta = _fd(loss, x), _fd(loss, gamma), _fd(loss, beta)

    np.testing.assert_allclose(dx, fdx, rtol=1e-6, atol=1e-7 * np.abs(fdx).max())
    np.testing.assert_allclose(dgamma, fdgamma, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dbeta, fdbeta, rtol=1e-6, atol=1e-8)
    # the analytic formula of the oracle agrees too
    np.testing.assert_allclose(rdx, fdx, rtol=1e-6, atol=1e-7 * np.abs(fdx).max())
    np.testing.assert_allclose(rdgamma, fdgamma, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(rdbeta, fdbeta, rtol=1e-6, atol=1e-8)
    # the gradient of x sums to zero per channel (the mean is subtracted)
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    assert np.abs(dx.sum(axis=red)).max() < 1e-12 * np.abs(dx).sum()


def test_frozen_gradients_match_finite_differences(isa):
    rng = np.random.default_rng(8)
    shape, axis = (3, 4, 2), 1
    x = make_x(rng, shape, axis, np.float64)
    w = rng.standard_normal(shape)
    gamma, beta = make_params(rng, 4)
    mean, var = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)

    def loss():
        return float(np.sum(bn.forward_eval(x, mean, var, gamma, beta, axis=axis) * w))

    dx, dgamma, dbeta = bn.backward(w, x, (mean, var), gamma, axis=axis, training=False)
    np.testing.assert_allclose(dx, _fd(loss, x), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(dgamma, _fd(loss, gamma), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(dbeta, _fd(loss, beta), rtol=1e-6, atol=1e-9)


def test_constant_upstream_gradient_does_not_reach_x():
    rng = np.random.default_rng(9)
    x = make_x(rng, (64, 5, 3, 3), 1, np.float64)
    _, st = bn.forward_train(x)
    dx, dgamma, dbeta = bn.backward(np.full_like(x, 2.5), x, st)
    assert np.abs(dx).max() < 1e-12
    np.testing.assert_allclose(dbeta, 2.5 * st.count, rtol=1e-15)
    assert np.abs(dgamma).max() < 1e-9


# --- out= ----------------------------------------------------------------------------------

OUT_CASES = [((6, 4, 3, 5), 1), ((4, 3, 5, 6), -1), ((50, 7), 1), ((130, 3, 17, 17), 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape, axis", OUT_CASES, ids=[_case_id(c) for c in OUT_CASES])
def test_out_is_written_and_returned(shape, axis, dtype):
    rng = np.random.default_rng(10)
    x = make_x(rng, shape, axis, dtype)
    dy = make_x(rng, shape, axis, dtype)
    c = shape[axis]
    gamma, beta = make_params(rng, c)
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    y0, st0 = bn.forward_train(x, gamma, beta, axis=axis)
    e0 = bn.forward_eval(x, mean, var, gamma, beta, axis=axis)
    dx0, dg0, db0 = bn.backward(dy, x, st0, gamma, axis=axis)

    # C order: the layout of the default output, so the very same numbers
    out = np.full(shape, np.nan, dtype=dtype)
    y, st = bn.forward_train(x, gamma, beta, axis=axis, out=out)
    assert y is out and np.array_equal(out, y0)
    assert np.array_equal(st.mean, st0.mean) and np.array_equal(st.var, st0.var)
    out = np.full(shape, np.nan, dtype=dtype)
    assert bn.forward_eval(x, mean, var, gamma, beta, axis=axis, out=out) is out
    assert np.array_equal(out, e0)
    out = np.full(shape, np.nan, dtype=dtype)
    dx, dg, db = bn.backward(dy, x, st0, gamma, axis=axis, out=out)
    assert dx is out and np.array_equal(out, dx0)
    assert np.array_equal(dg, dg0) and np.array_equal(db, db0)

    # Fortran order and a strided view of a bigger buffer (only the view is written)
    ry, _ = ref.forward_train(x, gamma, beta, axis=axis)
    rdx, _, _ = ref.backward(dy, x, ref.batch_stats(x, axis), gamma, axis=axis)
    for kind in ("F", "view"):
        if kind == "F":
            outs = [np.full(shape, np.nan, dtype=dtype, order="F") for _ in range(3)]
            assert outs[0].flags.f_contiguous
        else:
            bigs = [np.full(shape[:-1] + (2 * shape[-1],), -7.0, dtype=dtype) for _ in range(3)]
            outs = [b[..., ::2] for b in bigs]
        assert bn.forward_train(x, gamma, beta, axis=axis, out=outs[0])[0] is outs[0]
        assert_out_close(outs[0], ry, dtype, what=f"forward_train into {kind} out")
        assert bn.forward_eval(x, mean, var, gamma, beta, axis=axis, out=outs[1]) is outs[1]
        assert_out_close(outs[1], e0, dtype, what=f"forward_eval into {kind} out")
        assert bn.backward(dy, x, st0, gamma, axis=axis, out=outs[2])[0] is outs[2]
        assert_grad_close(outs[2], rdx, dtype, what=f"backward into {kind} out")
        if kind == "view":
            assert all((b[..., 1::2] == -7.0).all() for b in bigs)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape, axis", OUT_CASES, ids=[_case_id(c) for c in OUT_CASES])
def test_in_place(shape, axis, dtype, isa):
    rng = np.random.default_rng(11)
    x = make_x(rng, shape, axis, dtype)
    dy = make_x(rng, shape, axis, dtype)
    c = shape[axis]
    gamma, beta = make_params(rng, c)
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    y0, st0 = bn.forward_train(x, gamma, beta, axis=axis)
    e0 = bn.forward_eval(x, mean, var, gamma, beta, axis=axis)
    dx0, dg0, db0 = bn.backward(dy, x, st0, gamma, axis=axis)
    fx0, fg0, fb0 = bn.backward(dy, x, st0, gamma, axis=axis, training=False)

    xi = x.copy()
    y, st = bn.forward_train(xi, gamma, beta, axis=axis, out=xi)
    assert y is xi and np.array_equal(xi, y0)
    assert np.array_equal(st.mean, st0.mean) and np.array_equal(st.var, st0.var)

    xi = x.copy()
    assert bn.forward_eval(xi, mean, var, gamma, beta, axis=axis, out=xi) is xi
    assert np.array_equal(xi, e0)

    for training, (rdx, rdg, rdb) in [(True, (dx0, dg0, db0)), (False, (fx0, fg0, fb0))]:
        dyi = dy.copy()
        dx, dg, db = bn.backward(dyi, x, st0, gamma, axis=axis, training=training, out=dyi)
        assert dx is dyi and np.array_equal(dyi, rdx)
        assert np.array_equal(dg, rdg) and np.array_equal(db, rdb)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shift", [1, 5, -3])
def test_out_partially_overlapping_an_input(dtype, shift):
    rng = np.random.default_rng(12)
    shape, axis = (20, 6, 9), 1
    n = int(np.prod(shape))
    c = shape[axis]
    gamma, beta = make_params(rng, c)
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)

    def buffers():
        buf = make_x(rng, (n + abs(shift), 1), 1, dtype).ravel()
        a = buf[max(0, -shift) : max(0, -shift) + n].reshape(shape)
        o = buf[max(0, shift) : max(0, shift) + n].reshape(shape)
        assert np.shares_memory(a, o) and a.ctypes.data != o.ctypes.data
        return a, o

    x, out = buffers()
    expected, st = ref.forward_train(x.copy(), gamma, beta, axis=axis)
    assert bn.forward_train(x, gamma, beta, axis=axis, out=out)[0] is out
    assert_out_close(out, expected, dtype)

    x, out = buffers()
    expected = ref.forward_eval(x.copy(), mean, var, gamma, beta, axis=axis)
    bn.forward_eval(x, mean, var, gamma, beta, axis=axis, out=out)
    assert_out_close(out, expected, dtype)

    # backward: out overlaps dy (and, separately, x)
    xb = make_x(rng, shape, axis, dtype)
    stb = bn.batch_stats(xb, axis=axis)
    dy, out = buffers()
    rdx, _, _ = ref.backward(dy.copy(), xb, ref.batch_stats(xb, axis), gamma, axis=axis)
    bn.backward(dy, xb, stb, gamma, axis=axis, out=out)
    assert_grad_close(out, rdx, dtype)

    x, out = buffers()
    dy = make_x(rng, shape, axis, dtype)
    rdx, _, _ = ref.backward(dy, x.copy(), ref.batch_stats(x.copy(), axis), gamma, axis=axis)
    bn.backward(dy, x, bn.batch_stats(x, axis=axis), gamma, axis=axis, out=out)
    assert_grad_close(out, rdx, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_out_is_a_reversed_view_of_the_input(dtype):
    rng = np.random.default_rng(13)
    x = make_x(rng, (30, 4, 5), 1, dtype)
    expected, _ = ref.forward_train(x.copy(), axis=1)
    out = x[::-1]
    bn.forward_train(x, axis=1, out=out)
    assert_out_close(out, expected, dtype)


def _bad_outs(shape, dtype):
    other = np.float64 if np.dtype(dtype) == np.float32 else np.float32
    ro = np.full(shape, 7.0, dtype=dtype)
    ro.flags.writeable = False
    return [
        (np.full(shape[:-1] + (shape[-1] + 1,), 7.0, dtype=dtype), ValueError, "out must have shape"),
        (np.full(shape, 7.0, dtype=other), TypeError, "out must have dtype"),
        (ro, ValueError, "out is read-only"),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_bad_out_raises_and_leaves_out_untouched(dtype):
    rng = np.random.default_rng(14)
    shape = (5, 3, 4)
    x = make_x(rng, shape, 1, dtype)
    dy = make_x(rng, shape, 1, dtype)
    st = bn.batch_stats(x)
    calls = [
        lambda out: bn.forward_train(x, out=out),
        lambda out: bn.forward_eval(x, st.mean, st.var, out=out),
        lambda out: bn.backward(dy, x, st, out=out),
    ]
    for call in calls:
        for out, exc, msg in _bad_outs(shape, dtype):
            with pytest.raises(exc, match=msg):
                call(out)
            assert (out == 7.0).all()
        with pytest.raises(TypeError, match="out must be a numpy.ndarray"):
            call(np.full(shape, 7.0).tolist())
    # a valid out and an invalid other argument: out is still untouched
    out = np.full(shape, 7.0, dtype=dtype)
    with pytest.raises(ValueError, match="gamma"):
        bn.forward_train(x, np.ones(4), out=out)
    with pytest.raises(ValueError, match="var must be non-negative"):
        bn.forward_eval(x, st.mean, -np.ones(3), out=out)
    with pytest.raises(ValueError, match="eps"):
        bn.backward(dy, x, st, eps=-1.0, out=out)
    assert (out == 7.0).all()


# --- argument errors -----------------------------------------------------------------------


def _all_calls(x, c=None, **kw):
    """Each public function called on x (the statistics are of the right length C)."""
    if c is None:
        c = np.asarray(x).shape[kw.get("axis", 1)] if np.ndim(x) >= 2 else 1
    m, v = np.zeros(c), np.ones(c)
    return {
        "batch_stats": lambda: bn.batch_stats(x, **kw),
        "forward_train": lambda: bn.forward_train(x, **kw),
        "forward_eval": lambda: bn.forward_eval(x, m, v, **kw),
        "backward": lambda: bn.backward(x, x, (m, v), **kw),
    }


@pytest.mark.parametrize("fn", ["batch_stats", "forward_train", "forward_eval", "backward"])
def test_bad_inputs_raise_and_name_the_argument(fn):
    x = np.ones((4, 3))
    cases = [
        (np.ones(5), {}, ValueError, r"x must have at least 2 dimensions"),
        (np.float64(3.0), {}, ValueError, r"x must have at least 2 dimensions"),
        (x, {"axis": 2}, ValueError, r"axis 2 is out of range"),
        (x, {"axis": -3}, ValueError, r"axis -3 is out of range"),
        (x, {"axis": 1.0}, TypeError, r"axis must be an integer"),
        (np.ones((4, 3), np.int64), {}, TypeError, r"x must be a float32, float64, float16"),
        (np.ones((4, 3), np.complex128), {}, TypeError, r"x must be a float32, float64"),
        (np.ones((4, 3), np.longdouble), {}, TypeError, r"x must be a float32, float64"),
        (np.ones((4, 3), bool), {}, TypeError, r"x must be a float32, float64"),
    ]
    for arr, kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            _all_calls(arr, c=3, **kw)[fn]()


def test_bad_vectors_raise_and_name_the_argument():
    rng = np.random.default_rng(15)
    x = make_x(rng, (4, 3, 2), 1, np.float32)
    st = bn.batch_stats(x)
    ok = np.ones(3)
    for bad, exc, msg in [
        (np.ones(4), ValueError, r"must have shape \(C,\) = \(3,\), got \(4,\)"),
        (np.ones(2), ValueError, r"must have shape \(C,\) = \(3,\)"),
        (np.ones((3, 1)), ValueError, r"must have shape \(C,\) = \(3,\)"),
        (np.ones(3, complex), TypeError, r"must be a real numeric array"),
    ]:
        with pytest.raises(exc, match="gamma " + msg):
            bn.forward_train(x, bad, ok)
        with pytest.raises(exc, match="beta " + msg):
            bn.forward_train(x, ok, bad)
        with pytest.raises(exc, match="mean " + msg):
            bn.forward_eval(x, bad, ok)
        with pytest.raises(exc, match="var " + msg):
            bn.forward_eval(x, ok, bad)
        with pytest.raises(exc, match="gamma " + msg):
            bn.forward_eval(x, ok, ok, bad)
        with pytest.raises(exc, match="beta " + msg):
            bn.forward_eval(x, ok, ok, ok, bad)
        with pytest.raises(exc, match="gamma " + msg):
            bn.backward(x, x, st, bad)
        with pytest.raises(exc, match="st.mean " + msg):
            bn.backward(x, x, (bad, ok))
        with pytest.raises(exc, match="st.var " + msg):
            bn.backward(x, x, (ok, bad))
    with pytest.raises(TypeError, match="st must be a Stats"):
        bn.backward(x, x, 5)
    with pytest.raises(ValueError, match="var must be non-negative"):
        bn.forward_eval(x, ok, np.array([1.0, -1e-30, 1.0]))
    with pytest.raises(ValueError, match="st.var must be non-negative"):
        bn.backward(x, x, (ok, np.array([1.0, -1.0, 1.0])))


@pytest.mark.parametrize("eps", [-1e-5, np.nan, np.inf, -np.inf])
def test_bad_eps_raises(eps):
    x = np.ones((4, 3))
    for name, call in _all_calls(x, eps=eps).items():
        if name == "batch_stats":
            continue
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            call()


def test_dy_mismatch_raises():
    x = np.ones((4, 3), np.float32)
    st = bn.batch_stats(x)
    with pytest.raises(ValueError, match=r"dy must have the shape of x"):
        bn.backward(np.ones((4, 4), np.float32), x, st)
    with pytest.raises(ValueError, match=r"dy must have the shape of x"):
        bn.backward(np.ones((4, 3, 1), np.float32), x, st)
    with pytest.raises(TypeError, match=r"dy must have the dtype of x"):
        bn.backward(np.ones((4, 3), np.float64), x, st)
    with pytest.raises(TypeError, match=r"dy must be a float32, float64, float16 or bfloat16"):
        bn.backward(np.ones((4, 3), np.int32), x, st)
    with pytest.raises(ValueError, match=r"dy must have at least 2 dimensions"):
        bn.backward(np.ones(3, np.float32), x, st)


@pytest.mark.parametrize(
    "shape, axis", [((1, 4), 1), ((1, 4, 1, 1), 1), ((4, 1), 0), ((1, 1, 5), -1), ((0, 4), 1)]
)
def test_training_needs_more_than_one_value_per_channel(shape, axis):
    x = np.ones(shape, np.float32)
    c = shape[axis]
    with pytest.raises(ValueError, match="training needs more than one value per channel"):
        bn.forward_train(x, axis=axis)
    with pytest.raises(ValueError, match="training needs more than one value per channel"):
        bn.backward(x, x, (np.zeros(c), np.ones(c)), axis=axis)
    # inference (and the frozen backward) work on any number of examples
    y = bn.forward_eval(x, np.zeros(c), np.full(c, 4.0), axis=axis, eps=0.0)
    assert y.shape == shape and np.array_equal(y, np.full(shape, 0.5, np.float32))
    dx, _, dbeta = bn.backward(x, x, (np.zeros(c), np.full(c, 4.0)), axis=axis, eps=0.0,
                               training=False)
    assert np.array_equal(dx, np.full(shape, 0.5, np.float32))
    assert np.array_equal(dbeta, np.full(c, x.size // c, np.float64))


def test_empty_batch_axis():
    x = np.ones((0, 4))
    st = bn.batch_stats(x)      # count 0: the neutral element of merge_stats
    assert st.count == 0 and st.mean.shape == (4,) and not st.mean.any() and not st.var.any()
    with pytest.raises(ValueError, match="training needs more than one value per channel"):
        bn.forward_train(x)
    with pytest.raises(ValueError, match="training needs more than one value per channel"):
        bn.backward(x, x, (np.zeros(4), np.ones(4)))
    assert bn.forward_eval(x, np.zeros(4), np.ones(4)).shape == (0, 4)


# --- degenerate cases ----------------------------------------------------------------------

CONSTANTS = [0.0, 1.0, -3.25, 0.1, 1e7, -2.5e-3]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(
    "shape, axis", [((5, 6), 1), ((7, 6, 3, 3), 1), ((4, 3, 3, 6), -1), ((130, 6, 17, 17), 1),
                    ((70001, 6), 1), ((3, 6, 129, 129), 1)],
)
def test_zero_variance_gives_beta_exactly(shape, axis, dtype, isa):
    rng = np.random.default_rng(16)
    cs = channel_shape(len(shape), axis)
    consts = np.array(CONSTANTS, dtype=dtype)
    x = np.ascontiguousarray(np.broadcast_to(consts.reshape(cs), shape))
    gamma, beta = make_params(rng, len(CONSTANTS))
    y, st = bn.forward_train(x, gamma, beta, axis=axis)
    expected = np.broadcast_to(beta.astype(dtype).reshape(cs), shape)
    assert np.array_equal(y, expected)
    assert np.array_equal(st.mean, consts.astype(np.float64))
    assert (st.var >= 0).all() and (st.var <= 1e-30).all()
    assert np.array_equal(bn.batch_stats(x, axis=axis).var, st.var)
    # no gamma/beta: exactly zero
    y0, _ = bn.forward_train(x, axis=axis)
    assert np.array_equal(y0, np.zeros(shape, dtype))
    # inference with the exact mean and zero variance
    ye = bn.forward_eval(x, consts.astype(np.float64), np.zeros(6), gamma, beta, axis=axis)
    assert np.array_equal(ye, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_variance_is_never_negative(dtype, isa):
    """Large means with tiny spreads: a one-pass E[x^2] - E[x]^2 would go negative."""
    rng = np.random.default_rng(17)
    base = np.array([1e7, -1e7, 3e5, 1e4, 0.1, 7.0])
    spread = np.array([1.0, 2.0, 0.03, 1e-3, 1e-9, 0.0])
    for shape in [(9, 6), (33, 6, 5, 7), (20000, 6)]:
        cs = channel_shape(len(shape), 1)
        x = (base.reshape(cs) + spread.reshape(cs) * rng.integers(0, 2, shape)).astype(dtype)
        st = bn.batch_stats(x)
        # an accurate two-pass reference in extended precision
        red = tuple(i for i in range(len(shape)) if i != 1)
        xl = x.astype(np.longdouble)
        ml = xl.mean(axis=red, keepdims=True)
        vl = ((xl - ml) ** 2).mean(axis=red)
        assert (st.var >= 0).all()
        # the variance is right relative to its own size, not just to the mean's
        np.testing.assert_allclose(st.var, vl.astype(np.float64), rtol=1e-9, atol=1e-300)
        np.testing.assert_allclose(st.mean, ml.ravel().astype(np.float64), rtol=1e-15)
        if dtype == np.float32:
            y, _ = bn.forward_train(x)
            assert_out_close(y, ref.forward_train(x)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_large_mean_small_spread_keeps_precision(dtype, isa):
    """float32 output keeps full precision when the mean is large next to the spread.

    In float64 the problem itself is ill-conditioned (x - mean loses log10(1e4) digits in any
    implementation, the oracle included), so the float64 tolerance grows by that factor.
    """
    rng = np.random.default_rng(18)
    x = (1e4 + rng.standard_normal((64, 5, 9, 9))).astype(dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-15 * 1e4 * 5
    y, st = bn.forward_train(x)
    ry, rst = ref.forward_train(x)
    assert_out_close(y, ry, dtype, tol=tol)
    assert_stat_close(st.var, rst.var)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, dg, db = bn.backward(dy, x, st)
    rdx, rdg, rdb = ref.backward(dy, x, rst)
    assert_grad_close(dx, rdx, dtype, tol=tol)
    sg, sb = param_grad_scales(dy, x, rst.mean, rst.var, 1)
    assert_stat_close(dg, rdg, "dgamma", scale=sg)
    assert_stat_close(db, rdb, "dbeta", scale=sb)


def test_non_finite_input_shows_in_its_channel_only():
    x = np.random.default_rng(19).standard_normal((8, 3, 4))
    x[2, 1, 3] = np.nan
    y, st = bn.forward_train(x)
    assert np.isnan(st.mean[1]) and np.isnan(st.var[1])
    assert np.isfinite(st.mean[[0, 2]]).all() and np.isfinite(st.var[[0, 2]]).all()
    assert np.isnan(y[:, 1]).all()
    assert np.isfinite(y[:, [0, 2]]).all()


# --- a property sweep ----------------------------------------------------------------------


def test_random_shapes_and_axes_match_reference():
    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @hypothesis.given(
        shape=st_.lists(st_.integers(1, 6), min_size=2, max_size=5),
        axis_pick=st_.integers(0, 100),
        f32=st_.booleans(),
        seed=st_.integers(0, 2**32 - 1),
    )
    def check(shape, axis_pick, f32, seed):
        shape = tuple(shape)
        axis = axis_pick % len(shape) - (len(shape) if axis_pick % 2 else 0)
        # with two values per channel the training dx is nearly zero (two normalized values
        # are always -1, +1), all cancellation: its relative error is meaningless there
        hypothesis.assume(count_per_channel(shape, axis) >= 3)
        dtype = np.float32 if f32 else np.float64
        rng = np.random.default_rng(seed)
        x = make_x(rng, shape, axis, dtype)
        dy = make_x(rng, shape, axis, dtype)
        gamma, beta = make_params(rng, shape[axis])
        y, st = bn.forward_train(x, gamma, beta, axis=axis)
        ry, rst = ref.forward_train(x, gamma, beta, axis=axis)
        assert_out_close(y, ry, dtype)
        dx, dg, db = bn.backward(dy, x, st, gamma, axis=axis)
        rdx, rdg, rdb = ref.backward(dy, x, rst, gamma, axis=axis)
        assert_grad_close(dx, rdx, dtype)
        sg, sb = param_grad_scales(dy, x, rst.mean, rst.var, axis)
        assert_stat_close(dg, rdg, scale=sg)
        assert_stat_close(db, rdb, scale=sb)

    check()


# --- doctests ------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["batchnorm", "batchnorm._api", "batchnorm._layer",
                                    "batchnorm._config", "batchnorm._stats"])
def test_doctests(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module} has no doctests"
    assert result.failed == 0


@pytest.mark.parametrize("module", ["batchnorm", "batchnorm._api"])
def test_every_name_in_all_exists(module):
    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.__all__ lists {name!r}, which it lacks"
    assert bn.supported_dtypes()[:3] == (np.dtype(np.float32), np.dtype(np.float64),
                                         np.dtype(np.float16))
