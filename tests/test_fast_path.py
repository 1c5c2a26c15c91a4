"""The Cython fast path (common calls, no Python-level argument handling) and the general
path must give the same bits, accept the same calls and raise the same errors. check_finite=True
always takes the general path, which makes the comparison direct."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _kernels

rng = np.random.default_rng(11)

CASES = [
    ((8, 32, 8, 8), 1, "C"),
    ((8, 8, 8, 32), -1, "C"),
    ((64, 17), 1, "C"),
    ((64, 17), 0, "C"),
    ((5, 7, 3, 4), 2, "C"),
    ((6, 5, 9), 1, "F"),          # not mergeable: general path copies
    ((6, 5, 9), 1, "slice"),      # x[:, :, ::2]
    ((6, 5, 9), 1, "reverse"),    # x[::-1]
    ((32, 3, 40, 40), 1, "C"),    # several work units and threads
]


def _make(shape, order, dtype):
    x = rng.normal(2.0, 3.0, shape).astype(dtype)
    if order == "F":
        return np.asfortranarray(x)
    if order == "slice":
        return rng.normal(size=shape[:-1] + (2 * shape[-1],)).astype(dtype)[..., ::2]
    if order == "reverse":
        return x[::-1]
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis, order", CASES)
def test_fast_and_general_paths_agree(isa, dtype, shape, axis, order):
    x = _make(shape, order, dtype)
    dy = _make(shape, order, dtype)
    c = shape[axis]
    g, b = rng.normal(size=c), rng.normal(size=c)

    st_fast = bn.batch_stats(x, axis=axis)
    st_gen = bn.batch_stats(x, axis=axis, check_finite=True)
    assert np.array_equal(st_fast.mean, st_gen.mean) and np.array_equal(st_fast.var, st_gen.var)
    assert st_fast.count == st_gen.count and type(st_fast) is bn.Stats

    y_fast, s1 = bn.forward_train(x, g, b, axis=axis)
    y_gen, s2 = bn.forward_train(x, g, b, axis=axis, check_finite=True)
    assert np.array_equal(y_fast, y_gen) and np.array_equal(s1.var, s2.var)
    assert y_fast.dtype == x.dtype and y_fast.shape == x.shape

    e_fast = bn.forward_eval(x, s1.mean, s1.var, g, b, axis=axis)
    e_gen = bn.forward_eval(x, s1.mean, s1.var, g, b, axis=axis, check_finite=True)
    assert np.array_equal(e_fast, e_gen)

    for training in (True, False):
        r_fast = bn.backward(dy, x, s1, g, axis=axis, training=training)
        r_gen = bn.backward(dy, x, s1, g, axis=axis, training=training, check_finite=True)
        for a, b_ in zip(r_fast, r_gen):
            assert np.array_equal(a, b_)


def test_fast_path_is_taken_for_common_calls():
    x = rng.normal(size=(4, 3, 5)).astype(np.float32)
    m, v = np.zeros(3), np.ones(3)
    assert _kernels.fast_forward_eval(x, m, v, None, None, 1, 1e-5, None) is not None
    assert _kernels.fast_batch_stats(x, -2) is not None
    y, st = _kernels.fast_forward_train(x, None, None, 1, 1e-5, None)
    assert _kernels.fast_backward(x, x, st, None, 1, 1e-5, True, None) is not None


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(x=[[1.0, 2.0], [3.0, 4.0]]),                       # not an ndarray
        dict(x=np.ones((4, 3), np.float16)),                    # half precision
        dict(x=np.ones((4, 3), np.int32)),                      # not a float
        dict(x=np.ones((4, 3), ">f4")),                         # byte-swapped
        dict(mean=[0.0, 0.0, 0.0]),                             # a list
        dict(mean=np.zeros(3, np.float32)),                     # not float64
        dict(mean=np.zeros(4)),                                 # wrong length
        dict(var=-np.ones(3)),                                  # negative variance
        dict(var=np.ones(6)[::2]),                              # not contiguous
        dict(axis=np.int64(1)),                                 # not a plain int
        dict(axis=5),                                           # out of range
        dict(eps=-1.0),                                         # negative eps
        dict(eps=np.float32(1e-5)),                             # not a plain float
        dict(out=np.empty((4, 3), np.float64)),                 # wrong dtype
        dict(out=np.empty((3, 4), np.float32)),                 # wrong shape
    ],
)
def test_fast_path_declines_what_it_does_not_handle(kwargs):
    args = dict(x=np.ones((4, 3), np.float32), mean=np.zeros(3), var=np.ones(3), axis=1,
                eps=1e-5, out=None)
    args.update(kwargs)
    assert _kernels.fast_forward_eval(args["x"], args["mean"], args["var"], None, None,
                                      args["axis"], args["eps"], args["out"]) is None


def test_fast_path_declines_partial_overlap_but_takes_in_place():
    buf = rng.normal(size=(9, 4)).astype(np.float32)
    x = buf[:8]
    x0 = x.copy()
    assert _kernels.fast_forward_train(x, None, None, 1, 1e-5, buf[1:]) is None
    expected, _ = bn.forward_train(x0)
    got, _ = bn.forward_train(x, out=buf[1:])  # general path through a staging buffer
    assert np.array_equal(got, expected)
    x2 = x0.copy()
    assert _kernels.fast_forward_train(x2, None, None, 1, 1e-5, x2) is not None
    assert np.array_equal(x2, expected)


def test_fast_path_never_writes_before_declining():
    x = rng.normal(size=(1, 3)).astype(np.float32)       # one value per channel
    out = np.full_like(x, 5.0)
    assert _kernels.fast_forward_train(x, None, None, 1, 1e-5, out) is None
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn.forward_train(x, out=out)
    assert (out == 5.0).all()


def _unaligned(shape, dtype):
    dt = np.dtype(dtype)
    buf = np.zeros(int(np.prod(shape)) * dt.itemsize + 1, np.uint8)
    a = np.ndarray(shape, dt, buffer=buf, offset=1)
    assert not a.flags.aligned
    return a


def test_unaligned_arrays_are_copied_not_read_in_place():
    """Unaligned data would be undefined behaviour in C: both paths copy it (or stage out=)."""
    x = _unaligned((6, 3), np.float32)
    x[...] = rng.normal(size=(6, 3))
    assert _kernels.fast_forward_train(x, None, None, 1, 1e-5, None) is None
    g = _unaligned((3,), np.float64)
    g[...] = [1.0, 2.0, 3.0]
    out = _unaligned((6, 3), np.float32)
    y, st = bn.forward_train(x, g, out=out)
    expected, _ = bn.forward_train(np.ascontiguousarray(x), g.copy())
    assert y is out and np.array_equal(out, expected)
    dx, dg, db = bn.backward(x, x, st, g, out=_unaligned((6, 3), np.float32))
    assert np.array_equal(dx, bn.backward(x.copy(), x.copy(), st, g.copy())[0])
