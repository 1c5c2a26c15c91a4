"""The one route from a Python call to the C core (``batchnorm._kernels``, with the rules of
``batchnorm._validation``): every kind of argument reaches the same kernel call and gives the
same bits, every rule raises its error before anything is written, and the fallbacks (copying
an input with no strided view, staging an output, converting vectors) are decisions on that
route."""

from __future__ import annotations

import gc
import sys

import numpy as np
import pytest
from conftest import assert_out_close

import batchnorm as bn
from batchnorm import _kernels, reference as ref

rng = np.random.default_rng(11)

C = 6
# exact in float16, float32 and float64 alike, so every vector kind holds the same values
GAMMA = np.array([0.5, 1.25, -2.0, 3.0, 1.0, 0.75])
BETA = np.array([0.125, -1.0, 2.5, 0.0, -0.25, 4.0])
MEAN = np.array([0.5, -1.0, 2.0, 0.25, 0.0, 1.5])
VAR = np.array([1.0, 0.5, 4.0, 2.25, 0.125, 8.0])


def _unaligned(values, dtype):
    dt = np.dtype(dtype)
    buf = np.zeros(len(values) * dt.itemsize + 1, np.uint8)
    a = np.ndarray((len(values),), dt, buffer=buf, offset=1)
    a[...] = values
    assert not a.flags.aligned
    return a


def _readonly(v):
    v = v.copy()
    v.flags.writeable = False
    return v


VECTOR_KINDS = {
    "float64": lambda v: v.copy(),
    "float32": lambda v: v.astype(np.float32),
    "float16": lambda v: v.astype(np.float16),
    "list": lambda v: v.tolist(),
    "tuple": lambda v: tuple(v.tolist()),
    "float32 strided": lambda v: np.repeat(v, 2).astype(np.float32)[::2],
    "float64 strided": lambda v: np.repeat(v, 3)[::3],
    "float64 reversed": lambda v: v[::-1].copy()[::-1],
    "float32 read-only": lambda v: _readonly(v.astype(np.float32)),
    "float64 unaligned": lambda v: _unaligned(v, np.float64),
    "float32 big-endian": lambda v: v.astype(">f4"),
    "int64": lambda v: (v * 8).astype(np.int64),  # scaled: exact as integers
}


def _vec(kind, v):
    if kind == "int64":
        return VECTOR_KINDS[kind](v), v * 8
    return VECTOR_KINDS[kind](v), v


@pytest.mark.parametrize("kind", list(VECTOR_KINDS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_vector_kind_gives_the_bits_of_float64_vectors(kind, dtype):
    x = rng.normal(1.0, 2.0, (7, C, 5)).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    (g, g64), (b, b64) = _vec(kind, GAMMA), _vec(kind, BETA)
    (m, m64), (v, v64) = _vec(kind, MEAN), _vec(kind, VAR)

    y, st = bn.forward_train(x, g, b)
    y64, st64 = bn.forward_train(x, g64, b64)
    assert np.array_equal(y, y64) and np.array_equal(st.var, st64.var)

    e = bn.forward_eval(x, m, v, g, b)
    assert np.array_equal(e, bn.forward_eval(x, m64, v64, g64, b64))

    for training in (True, False):
        st_arg = (m, v) if not training else st
        st_arg64 = (m64, v64) if not training else st
        got = bn.backward(dy, x, st_arg, g, training=training)
        want = bn.backward(dy, x, st_arg64, g64, training=training)
        for a, w in zip(got, want):
            assert np.array_equal(a, w)


def test_vectors_are_never_modified():
    g = GAMMA.astype(np.float32)
    g0 = g.copy()
    x = rng.normal(size=(4, C)).astype(np.float32)
    y, st = bn.forward_train(x, g, None, out=None)
    bn.backward(x, x, st, g)
    assert np.array_equal(g, g0)


LAYOUTS = {
    "C": lambda a: a,
    "F": np.asfortranarray,
    "sliced": lambda a: np.repeat(a, 2, axis=-1)[..., ::2],
    "negative": lambda a: a[::-1].copy()[::-1],
    "transposed": lambda a: np.ascontiguousarray(a.swapaxes(0, 2)).swapaxes(0, 2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_are_read_through_a_view_or_copied_once(layout, isa):
    """A strided (outer, C, inner) view is read in place; a layout without one is copied; both
    give the bits of the contiguous input."""
    base = rng.normal(size=(4, C, 3, 5)).astype(np.float32)
    x = LAYOUTS[layout](base)
    assert np.array_equal(x, base)
    has_view = _kernels.canonical_view(x, 1) is not None
    assert has_view == (layout not in ("F", "transposed"))  # 4-D F order: H, W do not merge
    y, st = bn.forward_train(x, GAMMA, BETA)
    y0, st0 = bn.forward_train(base, GAMMA, BETA)
    got, want = bn.backward(x, x, st, GAMMA), bn.backward(base, base, st0, GAMMA)
    if not has_view:    # copied: the kernels see the contiguous input itself
        assert np.array_equal(y, y0) and np.array_equal(st.var, st0.var)
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    # read in place: the loops follow the strides (a strided run is not vectorised the same
    # way), so the results agree to rounding
    assert_out_close(y, y0, np.float32)
    assert np.allclose(st.var, st0.var, rtol=1e-12, atol=0)
    assert_out_close(got[0], want[0], np.float32)
    assert np.allclose(got[1], want[1], rtol=1e-12, atol=1e-9)


def test_canonical_view_of_common_layouts():
    x = np.zeros((8, 3, 4, 5), np.float32)
    assert _kernels.canonical_view(x, 1) == ((8, 3, 20), (60, 20, 1))
    assert _kernels.canonical_view(x, 3) == ((96, 5, 1), (5, 1, 0))
    assert _kernels.canonical_view(x[::-1, :, :, ::2], 1) is None  # H and W no longer merge
    x3 = np.zeros((8, 3, 20), np.float32)
    assert _kernels.canonical_view(x3[::-1, :, ::2], 1) == ((8, 3, 10), (-60, 20, 2))
    assert _kernels.canonical_view(np.zeros((6, 4)), 1) == ((6, 4, 1), (4, 1, 0))


def test_strided_outputs_are_written_in_place():
    """Views with any strides, including negative ones, are written as they are."""
    x = rng.normal(size=(10, 4, 12)).astype(np.float32)
    xv = x[::-1, :, ::2]
    yv = np.full((10, 4, 12), np.nan, np.float32)[::-1, ::-1, ::2]
    assert _kernels.canonical_view(yv, 1) == ((10, 4, 6), (-48, -12, 2))
    y, st = bn.forward_train(xv, out=yv)
    assert y is yv
    assert_out_close(yv, ref.forward_train(xv)[0], np.float32)


def test_out_partly_overlapping_its_input_is_staged():
    buf = rng.normal(size=(9, 4)).astype(np.float32)
    x = buf[:8]
    x0 = x.copy()
    expected, _ = bn.forward_train(x0)
    got, _ = bn.forward_train(x, out=buf[1:])
    assert got.base is buf and np.array_equal(got, expected)
    # exactly in place: no staging needed, each element is read before it is written
    x2 = x0.copy()
    y2, _ = bn.forward_train(x2, out=x2)
    assert y2 is x2 and np.array_equal(x2, expected)


def test_backward_out_overlapping_dy_is_staged():
    x = rng.normal(size=(8, 4)).astype(np.float64)
    buf = rng.normal(size=(9, 4))
    dy = buf[:8]
    y, st = bn.forward_train(x)
    expected = bn.backward(dy.copy(), x, st)[0]
    dx = bn.backward(dy, x, st, out=buf[1:])[0]
    assert np.array_equal(dx, expected)


def test_out_with_no_strided_view_is_staged():
    x = rng.normal(size=(5, C, 4, 3)).astype(np.float32)
    out = np.empty((5, C, 3, 4), np.float32).swapaxes(2, 3)
    assert _kernels.canonical_view(out, 1) is None
    y = bn.forward_eval(x, MEAN, VAR, GAMMA, BETA, out=out)
    assert y is out and np.array_equal(out, bn.forward_eval(x, MEAN, VAR, GAMMA, BETA))


@pytest.mark.parametrize("op", ["train", "eval", "backward"])
def test_a_vector_inside_out_is_read_before_out_is_written(op):
    """gamma living in the output buffer gives the result of a separate gamma."""
    x = rng.normal(size=(64, C)).astype(np.float64)
    out = np.zeros((64, C))
    g = out[5]                      # a row of out: written by the kernel
    g[...] = GAMMA
    if op == "train":
        want = bn.forward_train(x, GAMMA.copy())[0]
        got = bn.forward_train(x, g, out=out)[0]
    elif op == "eval":
        want = bn.forward_eval(x, MEAN, VAR, GAMMA.copy())
        got = bn.forward_eval(x, MEAN, VAR, g, out=out)
    else:
        st = bn.batch_stats(x)
        want = bn.backward(x, x, st, GAMMA.copy())[0]
        got = bn.backward(x, x, st, g, out=out)[0]
    assert np.array_equal(got, want)


# --- every rule, checked before anything is written ----------------------------------------

X = np.ones((4, 3), np.float32)
M3, V3 = np.zeros(3), np.ones(3)

ERRORS = [
    # (call, exception, message)
    (lambda o: bn.forward_eval([[1, 2], [3, 4]], M3[:2], V3[:2], out=o), TypeError,
     "x must be a float32, float64, float16 or bfloat16 array, got dtype int"),
    (lambda o: bn.forward_eval(np.ones(3, np.float32), M3, V3, out=o), ValueError,
     r"x must have at least 2 dimensions"),
    (lambda o: bn.forward_eval(X, M3, V3, axis=5, out=o), ValueError,
     "axis 5 is out of range for an input with 2 dimensions"),
    (lambda o: bn.forward_eval(X, M3, V3, axis=1.0, out=o), TypeError, "axis must be an integer"),
    (lambda o: bn.forward_eval(X, None, V3, out=o), TypeError, r"mean must be an array of shape"),
    (lambda o: bn.forward_eval(X, np.zeros(4), V3, out=o), ValueError,
     r"mean must have shape \(C,\) = \(3,\), got \(4,\)"),
    (lambda o: bn.forward_eval(X, M3, -V3, out=o), ValueError, "var must be non-negative"),
    (lambda o: bn.forward_eval(X, M3, np.ones(3, np.float32) * -1, out=o), ValueError,
     "var must be non-negative"),
    (lambda o: bn.forward_eval(X, M3, V3, ["a", "b", "c"], out=o), TypeError,
     "gamma must be a real numeric array"),
    (lambda o: bn.forward_eval(X, M3, V3, np.ones((3, 1)), out=o), ValueError,
     r"gamma must have shape \(C,\)"),
    (lambda o: bn.forward_eval(X, M3, V3, None, np.ones(3, bool), out=o), TypeError,
     "beta must be a real numeric array, got dtype bool"),
    (lambda o: bn.forward_eval(X, M3, V3, eps=-1.0, out=o), ValueError,
     "eps must be a finite number >= 0"),
    (lambda o: bn.forward_eval(X, M3, V3, eps=np.float32("nan"), out=o), ValueError,
     "eps must be a finite number >= 0"),
    (lambda o: bn.forward_train(X[:1], out=o[:1]), ValueError,
     "training needs more than one value per channel"),
    (lambda o: bn.forward_train(X, np.ones(2), out=o), ValueError, r"gamma must have shape"),
    (lambda o: bn.forward_train(np.array([[1.0, np.nan, 3.0]] * 4, np.float32), out=o,
                                check_finite=True), ValueError,
     r"x contains NaN or inf in channel\(s\) 1"),
    (lambda o: bn.backward(X[:2], X, bn.Stats(M3, V3, 4), out=o), ValueError,
     r"dy must have the shape of x, \(4, 3\), got \(2, 3\)"),
    (lambda o: bn.backward(X.astype(np.float64), X, bn.Stats(M3, V3, 4), out=o), TypeError,
     "dy must have the dtype of x, float32, got float64"),
    (lambda o: bn.backward(X, X, "stats", out=o), TypeError, "st must be a Stats"),
    (lambda o: bn.backward(X, X, (M3, -V3), out=o), ValueError, "st.var must be non-negative"),
    (lambda o: bn.backward(X, X, (M3[:2], V3), out=o), ValueError, r"st.mean must have shape"),
    (lambda o: bn.forward_eval(X, M3, V3, out=np.empty((4, 3), np.float64)), TypeError,
     "out must have dtype float32, got float64"),
    (lambda o: bn.forward_eval(X, M3, V3, out=np.empty((3, 4), np.float32)), ValueError,
     r"out must have shape \(4, 3\), got \(3, 4\)"),
    (lambda o: bn.forward_eval(X, M3, V3, out=[[0.0] * 3] * 4), TypeError,
     r"out must be a numpy.ndarray \(not a matrix or masked array\), got list"),
    (lambda o: bn.forward_eval(X, M3, V3, axis=2**70, out=o), ValueError,
     "axis 1180591620717411303424 is out of range"),
    (lambda o: bn.forward_eval(X, M3, V3, axis=True, out=o), TypeError, "axis must be an integer"),
    (lambda o: bn.forward_eval(X, M3, V3, eps=None, out=o), TypeError, "eps must be a real"),
    (lambda o: bn.forward_eval(X, M3, V3, eps="abc", out=o), TypeError, "eps must be a real"),
    (lambda o: bn.forward_eval(X, M3, V3, eps="1e-5", out=o), TypeError, "eps must be a real"),
    (lambda o: bn.forward_eval(X, M3, V3, eps=[1e-5], out=o), TypeError, "eps must be a real"),
    (lambda o: bn.forward_eval(X, M3, V3, eps=1j, out=o), TypeError, "eps must be a real"),
    (lambda o: bn.forward_eval(X, M3, V3, eps=10**400, out=o), ValueError,
     "eps must be a finite number >= 0"),
    (lambda o: bn.forward_eval(X, M3, V3, out=np.matrix(np.zeros((4, 3), np.float32))),
     TypeError, "out must be a numpy.ndarray"),
    (lambda o: bn.forward_eval(X, M3, V3, out=np.ma.zeros((4, 3), np.float32)),
     TypeError, "out must be a numpy.ndarray"),
    (lambda o: bn.forward_eval(np.ma.array(X, mask=X > 0), M3, V3, out=o), TypeError,
     "x is a numpy.ma.MaskedArray, whose mask batchnorm would ignore"),
    (lambda o: bn.forward_eval(X, M3, V3, np.ma.array(V3), out=o), TypeError,
     "gamma is a numpy.ma.MaskedArray"),
    (lambda o: bn.forward_train([[1.0, 2.0, 3.0], [1.0, 2.0]], out=o), ValueError,
     "x must be a rectangular array of numbers"),
    (lambda o: bn.backward(X, X, (M3, None), out=o), TypeError, r"st.var must be an array"),
    (lambda o: bn.backward(X, X, np.stack([M3, V3]), out=o), TypeError,
     r"st must be a Stats .* got an ndarray of shape \(2, 3\)"),
    (lambda o: bn.backward(X, X, (M3, V3), training=None, out=o), TypeError,
     "training must be True or False, got None"),
    (lambda o: bn.forward_train(X, check_finite="yes", out=o), TypeError,
     "check_finite must be True or False"),
]


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
@pytest.mark.parametrize("call, exc, match", ERRORS)
def test_every_rule_raises_before_writing(call, exc, match):
    out = np.full((4, 3), 7.0, np.float32)
    with pytest.raises(exc, match=match):
        call(out)
    assert (out == 7.0).all()


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
def test_calls_hold_their_arguments_only_while_they_run():
    """The route reads ndarrays through their fields and holds a reference to each while a
    call runs: after every call, returned or raised, each argument's count is what it was."""
    out = np.full((4, 3), 7.0, np.float32)
    dy = np.full((4, 3), 0.5, np.float32)
    g32, g16 = GAMMA[:3].astype(np.float32), GAMMA[:3].astype(np.float16)
    mask = np.array([True, False, True, True])
    mean32, var32 = M3.astype(np.float32), V3.astype(np.float32)
    x16 = X.astype(np.float16)
    arrays = (X, M3, V3, out, dy, g32, g16, mask, mean32, var32, x16)
    before = [sys.getrefcount(a) for a in arrays]
    for call, exc, _ in ERRORS:
        with pytest.raises(exc):
            call(out)
    layer = bn.BatchNorm(3)
    for _ in range(3):
        bn.forward_eval(X, M3, V3, g32, g16)
        bn.forward_eval(X, mean32, var32, out=out)
        bn.forward_eval(x16, M3, V3, g16)
        st = bn.forward_train(X, g32, out=out)[1]
        bn.forward_train(X, g32, residual=dy, activation="relu")
        bn.backward(dy, X, st, g32)
        bn.backward(dy, X, st, g16, out=out, mask=mask)
        bn.batch_stats(X, mask=mask)
        _kernels.sample(X, 5)
        layer(X)
        layer.backward(dy)
        layer.eval()(X)
        layer.train()
        del st
    del layer  # it keeps its last training input for backward
    gc.collect()
    assert [sys.getrefcount(a) for a in arrays] == before


def test_read_only_out_is_refused():
    out = np.empty((4, 3), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        bn.forward_eval(X, M3, V3, out=out)


def test_layer_refuses_other_channel_counts_before_writing():
    layer = bn.BatchNorm(4, axis=-1)
    out = np.full((5, 3), 7.0, np.float32)
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        with pytest.raises(ValueError, match=r"3 channels along axis -1.*num_features=4"):
            layer(np.ones((5, 3), np.float32), out=out)
        assert (out == 7.0).all() and layer.num_batches_tracked == 0


def test_layer_passes_its_float32_parameters_as_they_are():
    """The layer's call is the function's call with its own (float32) vectors: same bits."""
    layer = bn.BatchNorm(C, momentum=0.25)
    layer.gamma, layer.beta = GAMMA, BETA
    x = rng.normal(size=(16, C, 3)).astype(np.float32)
    y = layer(x)
    y_fn, st = bn.forward_train(x, layer.gamma, layer.beta)
    assert np.array_equal(y, y_fn)
    dy = rng.normal(size=x.shape).astype(np.float32)
    dx = layer.backward(dy)
    dx_fn, dg, db = bn.backward(dy, x, st, layer.gamma)
    assert np.array_equal(dx, dx_fn) and np.array_equal(layer.grad_gamma, dg.astype(np.float32))
    # running statistics: (1 - m) * running + m * batch in float64, rounded once
    unbiased = st.var * (st.count / (st.count - 1))
    assert np.array_equal(layer.running_mean, (0.75 * 0.0 + 0.25 * st.mean).astype(np.float32))
    assert np.array_equal(layer.running_var, (0.75 * 1.0 + 0.25 * unbiased).astype(np.float32))
    layer.eval()
    rm, rv = layer.running_mean, layer.running_var
    assert np.array_equal(layer(x), bn.forward_eval(x, rm, rv, layer.gamma, layer.beta))
    dx = layer.backward(dy)
    assert np.array_equal(dx, bn.backward(dy, x, (rm, rv), layer.gamma, training=False)[0])


def test_every_fallback_at_once():
    """Byte-swapped inputs with no strided view, list vectors, and an out that needs staging:
    every conversion of one call at once still gives the plain call's bits."""
    base = rng.normal(size=(5, C, 4, 3))
    x = np.ascontiguousarray(base.swapaxes(2, 3)).swapaxes(2, 3).astype(">f8")
    dy = np.ascontiguousarray(base.swapaxes(2, 3)).swapaxes(2, 3).astype(">f8")
    st = bn.batch_stats(base)
    out = np.zeros((5, C, 3, 4)).swapaxes(2, 3)     # no strided view: staged
    want = bn.backward(base.copy(), base.copy(), st, GAMMA)
    got = bn.backward(dy, x, (st.mean.tolist(), st.var.tolist()), GAMMA.tolist(), out=out)
    assert got[0] is out
    for a, b in zip(got, want):
        assert np.array_equal(a, b)
