"""Batch normalization of Dask arrays: statistics of data sets larger than memory.

Needs ``dask[array]`` (``pip install "batchnorm[dask]"``), imported when a function here is
first called. The statistics are a ``dask.array.reduction``: the package's kernel takes each
chunk's (count, mean, var) per channel, and ``merge_stats`` (Chan's formula, float64)
combines them, in the fixed order of the chunk grid, so the result does not depend on the
scheduler. The channel axis may be chunked too. Normalization runs the kernel on each chunk
with the statistics of the whole array, lazily.

>>> import numpy as np, dask.array as da, batchnorm as bn, batchnorm.dask as bnd
>>> x = np.random.default_rng(0).normal(1e4, 1.0, size=(1000, 3, 6, 6))
>>> dx = da.from_array(x, chunks=(333, 2, 6, 5))
>>> st = bnd.batch_stats(dx)                         # axis=1: per channel over N, H, W
>>> st.count, bool(np.allclose(st.var, x.var(axis=(0, 2, 3)), rtol=1e-11, atol=0))
(36000, True)
>>> y = bnd.forward_eval(dx, st.mean, st.var)        # lazy, chunk by chunk
>>> bool(abs(y.mean(axis=(0, 2, 3)).compute()).max() < 1e-8)
True
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from . import _kernels, _validation
from ._stats import Stats, merge_stats

__all__ = ["batch_stats", "forward_eval", "forward_train"]

# What a chunk's statistics travel as through the reduction: one structured value per
# channel, so that dask concatenates the partial results of the chunk grid itself.
_PART = np.dtype([("n", "f8"), ("mean", "f8"), ("var", "f8")])


def _dask_array() -> Any:
    try:
        import dask.array
    except ImportError:
        raise ImportError(
            'batchnorm.dask needs dask[array]: pip install "dask[array]"') from None
    return dask.array


def _checked(darr: Any, axis: Any) -> tuple:
    """(dask.array module, the channel axis in [0, ndim)), or an error naming darr/axis."""
    da = _dask_array()
    if not isinstance(darr, da.Array):
        raise TypeError(f"darr must be a dask.array.Array (for NumPy arrays use "
                        f"batchnorm.batch_stats and friends), got {type(darr).__name__}")
    # the dtype and ndim rules of the NumPy functions, checked on an empty array
    _validation.as_input(np.empty((0,) * max(darr.ndim, 1), darr.dtype), "darr")
    if darr.ndim < 2:
        raise ValueError(f"darr must have at least 2 dimensions, (N, C) or (N, C, ...), "
                         f"got shape {darr.shape}")
    return da, _validation.channel_axis(axis, darr.ndim)


def _chunk_stats(block: np.ndarray, axis: Any = None, keepdims: bool = True, *,
                 channel: int, check_finite: bool) -> np.ndarray:
    """One chunk's (count, mean, var) per channel, shaped as the chunk reduced (keepdims)."""
    shape = tuple(n if i == channel else 1 for i, n in enumerate(block.shape))
    part = np.empty(shape, _PART)
    if block.ndim < 2:      # dask probing with a stand-in array
        return part
    st = _kernels.batch_stats(block, channel, check_finite)
    part["n"] = st.count
    part["mean"] = st.mean.reshape(shape)
    part["var"] = st.var.reshape(shape)
    return part


def _merge(parts: np.ndarray, axis: Any = None, keepdims: bool = True, *,
           channel: int) -> np.ndarray:
    """The partial statistics of a grid of chunks merged into one per channel, row-major
    over the grid (a fixed order)."""
    rows = np.moveaxis(parts, channel, -1).reshape(-1, parts.shape[channel])
    st = merge_stats(*(Stats(r["mean"], r["var"], int(r["n"][0]) if r.size else 0)
                       for r in rows))
    shape = tuple(n if i == channel else 1 for i, n in enumerate(parts.shape))
    out = np.empty(shape, _PART)
    out["n"], out["mean"], out["var"] = st.count, st.mean.reshape(shape), st.var.reshape(shape)
    return out if keepdims else out.reshape(-1)


def _statistics(da: Any, darr: Any, channel: int, check_finite: bool) -> Any:
    """The lazy (C,) array of merged (n, mean, var), chunked as darr's channel axis."""
    flag = _validation.flag(check_finite, "check_finite")
    reduced = tuple(i for i in range(darr.ndim) if i != channel)
    return da.reduction(
        darr,
        functools.partial(_chunk_stats, channel=channel, check_finite=flag),
        functools.partial(_merge, channel=channel),
        combine=functools.partial(_merge, channel=channel),
        axis=reduced, keepdims=False, dtype=_PART, concatenate=True,
        meta=np.empty((0,), _PART), name="batchnorm-stats",
    )


def _per_channel_count(darr: Any, channel: int) -> float:
    """Values per channel: prod of the other axes (NaN when dask does not know a size)."""
    return math.prod(n for i, n in enumerate(darr.shape) if i != channel)


def batch_stats(darr: Any, axis: int = 1, *, check_finite: bool = False,
                compute: bool = True) -> Stats:
    """Per-channel mean and biased variance of a Dask array, in one pass over its chunks.

    Chunks may split any axis, the channel axis included. The float64 results agree with
    :func:`batchnorm.batch_stats` of the whole array in memory up to the rounding of the
    chunks' means (see :func:`batchnorm.merge_stats`).

    Parameters
    ----------
    darr : dask.array.Array, float32, float64, float16 or bfloat16, ndim >= 2
    axis : int, default 1
        The channel axis.
    check_finite : bool, default False
        Raise ValueError (when computed) if a chunk holds NaN or inf.
    compute : bool, default True
        Compute now (one pass over the data with the current Dask scheduler) and return
        NumPy vectors; False returns ``mean`` and ``var`` as lazy (C,) dask arrays.

    Returns
    -------
    Stats
    """
    da, channel = _checked(darr, axis)
    parts = _statistics(da, darr, channel, check_finite)
    if not compute:
        return Stats(parts["mean"], parts["var"], _per_channel_count(darr, channel))
    merged = parts.compute()
    count = int(merged["n"][0]) if merged.size else _per_channel_count(darr, channel)
    return Stats(np.array(merged["mean"]), np.array(merged["var"]), count)


def _broadcast(da: Any, v: Any, darr: Any, channel: int) -> Any:
    """A (C,) vector as a dask array shaped to broadcast along darr's channel axis, with its
    chunks."""
    shape = tuple(n if i == channel else 1 for i, n in enumerate(darr.shape))
    chunks = tuple(c if i == channel else (1,) for i, c in enumerate(darr.chunks))
    if isinstance(v, da.Array):
        return v.rechunk((darr.chunks[channel],)).reshape(shape).rechunk(chunks)
    return da.from_array(np.asarray(v).reshape(shape), chunks=chunks)


def _normalize_chunk(block: np.ndarray, mean: np.ndarray, var: np.ndarray, gamma: Any,
                     beta: Any, *, channel: int, eps: float) -> np.ndarray:
    if block.ndim < 2:      # dask probing with a stand-in array
        return block
    flat = [None if v is None else v.reshape(-1) for v in (mean, var, gamma, beta)]
    return _kernels.forward_eval(block, *flat, channel, eps, None, False)


def _normalized(da: Any, darr: Any, channel: int, mean: Any, var: Any, gamma: Any,
                beta: Any, eps: float) -> Any:
    args = [darr] + [None if v is None else _broadcast(da, v, darr, channel)
                     for v in (mean, var, gamma, beta)]
    present = [a for a in args if a is not None]

    def chunk(block, *vectors):
        it = iter(vectors)
        m, v, g, b = (None if a is None else next(it) for a in args[1:])
        return _normalize_chunk(block, m, v, g, b, channel=channel, eps=eps)

    return da.map_blocks(chunk, *present, dtype=darr.dtype, meta=np.empty((0,) * darr.ndim,
                                                                         darr.dtype),
                         token="batchnorm-normalize")


def _vectors(darr: Any, channel: int, **vectors: Any) -> dict:
    """Parameter vectors as float64 (C,) NumPy arrays (None stays None), checked now."""
    C = darr.shape[channel]
    out = {name: None if v is None else _validation.vector(v, C, name)
           for name, v in vectors.items()}
    if out.get("var") is not None and (out["var"] < 0).any():
        raise ValueError("var must be non-negative")
    return out


def forward_eval(darr: Any, mean: Any, var: Any, gamma: Any = None, beta: Any = None, *,
                 axis: int = 1, eps: float = 1e-5) -> Any:
    """Normalize a Dask array with given statistics, chunk by chunk (lazy).

    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` per channel, as
    :func:`batchnorm.forward_eval`, whose kernel runs on each chunk. The statistics are
    typically those of :func:`batch_stats` of the whole data set.

    Returns
    -------
    dask.array.Array
        Same shape, chunks and dtype as ``darr``.
    """
    da, channel = _checked(darr, axis)
    e = _validation.eps(eps)
    v = _vectors(darr, channel, mean=mean, var=var, gamma=gamma, beta=beta)
    return _normalized(da, darr, channel, v["mean"], v["var"], v["gamma"], v["beta"], e)


def forward_train(darr: Any, gamma: Any = None, beta: Any = None, *, axis: int = 1,
                  eps: float = 1e-5, check_finite: bool = False) -> tuple:
    """Normalize a Dask array with its own statistics (lazy): :func:`batchnorm.forward_train`
    for data larger than memory.

    Returns
    -------
    y : dask.array.Array
        Same shape, chunks and dtype as ``darr``; computing it reads the data twice (the
        statistics, then the normalization).
    stats : Stats
        ``mean`` and ``var`` as lazy (C,) dask arrays (``dask.compute(st.mean, st.var)``),
        and the count.

    Examples
    --------
    >>> import numpy as np, dask, dask.array as da, batchnorm.dask as bnd
    >>> x = da.from_array(np.arange(24.0).reshape(4, 2, 3), chunks=(3, 1, 2))
    >>> y, st = bnd.forward_train(x, eps=0.0)
    >>> mean, var = dask.compute(st.mean, st.var)
    >>> mean, st.count
    (array([10., 13.]), 12)
    >>> bool(np.allclose(y.std(axis=(0, 2)).compute(), 1.0))
    True
    """
    da, channel = _checked(darr, axis)
    e = _validation.eps(eps)
    n = _per_channel_count(darr, channel)
    if n < 2:
        raise ValueError(f"training needs more than one value per channel; darr of shape "
                         f"{darr.shape} with channel axis {channel} has {n}")
    v = _vectors(darr, channel, gamma=gamma, beta=beta)
    parts = _statistics(da, darr, channel, check_finite)
    mean, var = parts["mean"], parts["var"]
    y = _normalized(da, darr, channel, mean, var, v["gamma"], v["beta"], e)
    return y, Stats(mean, var, n)
