"""batchnorm.dask: statistics and normalization of chunked arrays, on Dask's threaded and
distributed schedulers, against float64 NumPy on the whole array."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from conftest import require

da = require("dask.array")
dask = require("dask")
import batchnorm.dask as bnd  # noqa: E402 (dask itself is imported on first use)

# (shape, channel axis, chunks): along the batch axis, along spatial axes, the channel axis
# chunked, odd sizes, channels-last
CASES = [
    ((1000, 3), 1, (333, 3)),
    ((101, 4, 7, 5), 1, (17, 4, 7, 5)),
    ((64, 4, 9, 11), 1, (64, 4, 4, 3)),
    ((50, 5, 6, 6), 1, (13, 2, 5, 6)),
    ((40, 7, 7, 6), -1, (9, 7, 3, 4)),
    ((7, 3), 1, (1, 1)),
]


def _data(shape, dtype=np.float64, offset=1e4):
    return np.random.default_rng(sum(shape)).normal(offset, 1.0, size=shape).astype(dtype)


@pytest.fixture(params=["threads", "distributed"])
def scheduler(request):
    if request.param == "threads":
        with dask.config.set(scheduler="threads"):
            yield
        return
    distributed = require("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster):
        yield


@pytest.mark.parametrize("shape, axis, chunks", CASES)
def test_batch_stats_equal_numpy_float64(scheduler, shape, axis, chunks):
    x = _data(shape)
    st = bnd.batch_stats(da.from_array(x, chunks=chunks), axis=axis)
    reduce_axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    assert st.count == x.size // x.shape[axis]
    np.testing.assert_allclose(st.mean, x.mean(axis=reduce_axes), rtol=1e-14)
    # data 1e4 from zero with std 1: the chunks' means carry ~1e-12 of rounding
    np.testing.assert_allclose(st.var, np.var(x, axis=reduce_axes), rtol=1e-11)


def test_statistics_do_not_depend_on_the_scheduler():
    x = _data((90, 3, 5, 5))
    dx = da.from_array(x, chunks=(7, 2, 5, 2))
    with dask.config.set(scheduler="threads"):
        a = bnd.batch_stats(dx)
    with dask.config.set(scheduler="synchronous"):
        b = bnd.batch_stats(dx)
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.var, b.var)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis, chunks", CASES[1:5])
def test_forward_eval_and_train_chunk_by_chunk(scheduler, shape, axis, chunks, dtype):
    x = _data(shape, dtype, offset=3.0)
    C = x.shape[axis]
    rng = np.random.default_rng(1)
    gamma, beta = rng.normal(size=C).astype(np.float32), rng.normal(size=C)
    dx = da.from_array(x, chunks=chunks)
    y, st = bnd.forward_train(dx, gamma, beta, axis=axis, eps=1e-3)
    assert isinstance(y, da.Array) and y.chunks == dx.chunks and y.dtype == dtype
    y_ref, st_ref = bn.forward_train(x, gamma, beta, axis=axis, eps=1e-3)
    mean, var = dask.compute(st.mean, st.var)
    assert st.count == st_ref.count
    np.testing.assert_allclose(mean, st_ref.mean, rtol=1e-14)
    np.testing.assert_allclose(var, st_ref.var, rtol=1e-12)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(y.compute(), y_ref, rtol=tol, atol=tol)
    y_eval = bnd.forward_eval(dx, st_ref.mean, st_ref.var, gamma, beta, axis=axis, eps=1e-3)
    # the same kernel; a chunk's layout (a view, or a copy on a worker) may pick another
    # loop, which can round the last bit differently
    np.testing.assert_allclose(
        y_eval.compute(),
        bn.forward_eval(x, st_ref.mean, st_ref.var, gamma, beta, axis=axis, eps=1e-3),
        rtol=4 * np.finfo(dtype).eps, atol=4 * np.finfo(dtype).eps)


def test_precise_bn_from_dask():
    x = _data((300, 4), np.float32)
    layer = bn.BatchNorm(4, dtype=np.float64)
    layer.set_running_stats(bnd.batch_stats(da.from_array(x, chunks=(64, 4))))
    np.testing.assert_allclose(layer.running_var, x.astype(np.float64).var(axis=0, ddof=1),
                               rtol=1e-10)


def test_lazy_stats_and_empty_chunks():
    x = _data((10, 3))
    dx = da.concatenate([da.from_array(x[:4], chunks=2), da.zeros((0, 3), chunks=(0, 3)),
                         da.from_array(x[4:], chunks=3)])
    st = bnd.batch_stats(dx, compute=False)
    assert isinstance(st.mean, da.Array) and st.count == 10
    np.testing.assert_allclose(st.var.compute(), x.var(axis=0), rtol=1e-11)


@pytest.mark.parametrize("call", [bnd.batch_stats, lambda a: bnd.forward_train(a),
                                  lambda a: bnd.forward_eval(a, [0.0], [1.0])])
def test_bad_input(call):
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        call(da.ones(5, chunks=2))
    with pytest.raises(TypeError, match="dask.array.Array"):
        call(np.ones((5, 1)))
    with pytest.raises(TypeError, match="float32, float64"):
        call(da.ones((5, 1), dtype=np.int64, chunks=2))


def test_bad_arguments_named():
    a = da.ones((6, 3), chunks=2)
    with pytest.raises(ValueError, match="axis"):
        bnd.batch_stats(a, axis=2)
    with pytest.raises(ValueError, match="var must be non-negative"):
        bnd.forward_eval(a, np.zeros(3), -np.ones(3))
    with pytest.raises(ValueError, match="gamma"):
        bnd.forward_train(a, gamma=np.ones(4))
    with pytest.raises(ValueError, match="more than one value"):
        bnd.forward_train(da.ones((1, 3), chunks=1))
    with pytest.raises(ValueError, match="NaN"):
        bad = np.ones((6, 3))
        bad[4, 1] = np.nan
        bnd.batch_stats(da.from_array(bad, chunks=2), check_finite=True)


def test_each_graph_has_its_own_keys():
    """Two normalizations of one array are two results, on a scheduler that caches keys."""
    a = da.from_array(_data((8, 2)), chunks=4)
    one = bnd.forward_eval(a, [0.0, 0.0], [1.0, 1.0])
    two = bnd.forward_eval(a, [1.0, 1.0], [1.0, 1.0])
    assert one.name != two.name
    np.testing.assert_allclose(one.compute() - two.compute(), 1.0 / np.sqrt(1 + 1e-5))
