"""The functional API: argument checks, the (outer, C, inner) view, one kernel call.

Functions here keep no state. Every check happens before any output is written, so a call
that raises leaves its ``out=`` buffer untouched.
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple, Optional

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import _kernels

__all__ = [
    "Stats",
    "batch_stats",
    "forward_train",
    "forward_eval",
    "backward",
    "set_num_threads",
    "get_num_threads",
    "supported_dtypes",
]

# Storage types the kernels take. float16 and bfloat16 (from the optional ml_dtypes package)
# are computed in float32 with float64 statistics; bfloat16 is recognised by name so that
# ml_dtypes is never imported here.
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))


def _is_bfloat16(dt: np.dtype) -> bool:
    # kind first: dtype.name is slow, and float16/32/64 are kind 'f'
    return dt.kind == "V" and dt.itemsize == 2 and dt.name == "bfloat16"


def supported_dtypes() -> tuple:
    """The storage dtypes the kernels take: float32, float64, float16, and bfloat16 when
    ml_dtypes is installed."""
    try:
        import ml_dtypes
    except ImportError:
        return _FLOAT_DTYPES
    return _FLOAT_DTYPES + (np.dtype(ml_dtypes.bfloat16),)


def _kernel_array(a: np.ndarray) -> np.ndarray:
    """What the Cython layer takes: 16-bit floats as their bit patterns."""
    return a.view(np.uint16) if a.itemsize == 2 else a


class Stats(NamedTuple):
    """Per-channel batch statistics.

    Attributes
    ----------
    mean : ndarray, float64, shape (C,)
        Mean of each channel over the batch (and spatial) axes.
    var : ndarray, float64, shape (C,)
        Biased variance (divided by ``count``): the one used to normalize.
    count : int
        Number of values per channel (``x.size // C``).
    """

    mean: np.ndarray
    var: np.ndarray
    count: int

    def unbiased_var(self) -> np.ndarray:
        """Variance divided by ``count - 1`` (PyTorch's running-variance convention)."""
        if self.count < 2:
            raise ValueError(f"the unbiased variance needs count >= 2, got count={self.count}")
        return self.var * (self.count / (self.count - 1))


# --- argument checks ----------------------------------------------------------------------


def _as_input(a: Any, name: str) -> np.ndarray:
    """A float ndarray (see supported_dtypes) with native byte order and ndim >= 2."""
    arr = a if type(a) is np.ndarray else np.asarray(a)
    dt = arr.dtype
    if dt not in _FLOAT_DTYPES and not _is_bfloat16(dt):
        if dt.kind == "f" and dt.newbyteorder("=") in _FLOAT_DTYPES:
            arr = arr.astype(dt.newbyteorder("="))
        else:
            raise TypeError(
                f"{name} must be a float32, float64, float16 or bfloat16 array, got dtype {dt}"
            )
    if arr.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions, (N, C) or (N, C, ...), "
            f"got shape {arr.shape}"
        )
    return arr


def _channel_axis(axis: Any, ndim: int) -> int:
    if type(axis) is not int:
        try:
            axis = operator.index(axis)
        except TypeError:
            raise TypeError(f"axis must be an integer, got {axis!r}") from None
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an input with {ndim} dimensions")
    return axis % ndim


def _eps(eps: Any) -> float:
    e = float(eps)
    if not (e >= 0.0 and math.isfinite(e)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return e


def _vector(v: Any, channels: int, name: str) -> Optional[np.ndarray]:
    """A contiguous float64 vector of length C (None stays None; never modified later)."""
    if v is None:
        return None
    arr = v if type(v) is np.ndarray else np.asarray(v)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.shape != (channels,):
        raise ValueError(f"{name} must have shape (C,) = ({channels},), got {arr.shape}")
    if arr.dtype != np.float64 or not (arr.flags.c_contiguous and arr.flags.aligned):
        arr = np.require(arr, np.float64, ["C", "A"])
    return arr


def _count(x: np.ndarray, axis: int) -> int:
    return math.prod(d for i, d in enumerate(x.shape) if i != axis)


def _check_training_count(x: np.ndarray, axis: int, name: str = "x") -> int:
    n = _count(x, axis)
    if n < 2:
        raise ValueError(
            f"training needs more than one value per channel; {name} of shape {x.shape} "
            f"with channel axis {axis} has {n}"
        )
    return n


def _check_finite(a: np.ndarray, axis: int, name: str) -> None:
    """With check_finite=True: a clear error naming the channels that hold NaN or inf."""
    finite = np.isfinite(a.astype(np.float32) if a.itemsize == 2 else a)
    if not finite.all():
        others = tuple(i for i in range(a.ndim) if i != axis)
        bad = np.flatnonzero(~finite.all(axis=others))
        shown = ", ".join(map(str, bad[:10])) + (", ..." if bad.size > 10 else "")
        raise ValueError(f"{name} contains NaN or inf in channel(s) {shown} (check_finite=True)")


# --- the canonical (outer, C, inner) view -------------------------------------------------


def _merged_stride(shape: tuple, strides: tuple) -> Optional[int]:
    """Stride of the dimensions `shape` merged into one, or None if they cannot merge."""
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    if any(n == 0 for n, _ in dims):
        return 0
    for (_, s_outer), (n_inner, s_inner) in zip(dims, dims[1:]):
        if s_outer != n_inner * s_inner:
            return None
    return dims[-1][1] if dims else 0


def _view3(a: np.ndarray, axis: int) -> Optional[np.ndarray]:
    """`a` seen as (outer, C, inner) without a copy, or None when no strided view exists."""
    shape = a.shape
    new_shape = (math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :]))
    if a.flags.c_contiguous:
        return a.reshape(new_shape)
    strides = a.strides
    s_outer = _merged_stride(shape[:axis], strides[:axis])
    s_inner = _merged_stride(shape[axis + 1 :], strides[axis + 1 :])
    if s_outer is None or s_inner is None:
        return None
    new_strides = (s_outer, strides[axis], s_inner)
    if any(s % a.itemsize for s in new_strides):
        return None
    return as_strided(a, new_shape, new_strides, writeable=a.flags.writeable)


def _input_view(a: np.ndarray, axis: int) -> np.ndarray:
    """The (outer, C, inner) view the kernels read; a layout with no such view is copied once.
    16-bit floats are passed as their bit patterns."""
    v = _view3(a, axis) if a.flags.aligned else None
    if v is None:
        v = _view3(np.require(a, a.dtype, ["C", "A"]), axis)
    return _kernel_array(v)


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.strides == b.strides
    )


_kernels.init_fast_paths(np.ndarray, np.empty_like, np.empty, Stats)


class _Output(NamedTuple):
    result: np.ndarray  # what the caller gets back
    view: np.ndarray  # (outer, C, inner) view the kernel writes
    staging: Optional[np.ndarray]  # written by the kernel, then copied into result


def _output(out: Any, like: np.ndarray, axis: int, inputs: tuple, name: str = "out") -> _Output:
    """Where the kernel writes: a fresh array shaped like `like`, or the caller's `out`.

    `out` may be one of the inputs itself (in place: each element is read before it is
    written); any other overlap, or a layout with no strided view, goes through a staging
    buffer so the result is still right.
    """
    if out is None:
        y = np.empty_like(like)
        v = _view3(y, axis)
        if v is None:
            y = np.empty(like.shape, like.dtype)
            v = _view3(y, axis)
        return _Output(y, _kernel_array(v), None)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != like.shape:
        raise ValueError(f"{name} must have shape {like.shape}, got {out.shape}")
    if out.dtype != like.dtype:
        raise TypeError(f"{name} must have dtype {like.dtype}, got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    v = _view3(out, axis) if out.flags.aligned else None
    overlaps = any(
        np.may_share_memory(out, a) and not _same_memory(out, a) for a in inputs if a is not None
    )
    if v is None or overlaps:
        staging = np.empty(like.shape, like.dtype)
        return _Output(out, _kernel_array(_view3(staging, axis)), staging)
    return _Output(out, _kernel_array(v), None)


def _finish(o: _Output) -> np.ndarray:
    if o.staging is not None:
        np.copyto(o.result, o.staging)
    return o.result


def _stats_arrays(st: Any, channels: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(st, Stats) or (hasattr(st, "mean") and hasattr(st, "var")):
        mean, var = st.mean, st.var
    elif isinstance(st, (tuple, list)) and len(st) in (2, 3):
        mean, var = st[0], st[1]
    else:
        raise TypeError(f"st must be a Stats (mean, var, count), got {type(st).__name__}")
    mean = _vector(mean, channels, "st.mean")
    var = _vector(var, channels, "st.var")
    if (var < 0).any():
        raise ValueError("st.var must be non-negative")
    return mean, var


# --- public functions ---------------------------------------------------------------------


def batch_stats(x: Any, axis: int = 1, *, check_finite: bool = False) -> Stats:
    """Per-channel mean and biased variance of a batch.

    Parameters
    ----------
    x : array_like, float32, float64, float16 or bfloat16, ndim >= 2
        The batch; ``axis`` is the channel (feature) axis.
    axis : int, default 1
        1 for (N, D) and (N, C, H, W); -1 for channels-last (N, H, W, C).
    check_finite : bool, default False
        Raise ValueError if the input holds NaN or inf (costs one extra pass). By default
        non-finite values propagate to the outputs of their own channel only.

    Returns
    -------
    Stats
        ``mean`` and ``var`` (float64, shape (C,)) over all axes but ``axis``, and ``count``.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> x = np.array([[4, 5, 2, 1], [3, 4, 6, 0], [1, 4, 7, 9]], dtype=np.float64)
    >>> st = bn.batch_stats(x)
    >>> st.mean * 3
    array([ 8., 13., 15., 10.])
    >>> np.round(st.var * 9, 12)
    array([ 14.,   2.,  42., 146.])
    >>> st.count
    3
    """
    if not check_finite:
        st = _kernels.fast_batch_stats(x, axis)
        if st is not None:
            return st
    x = _as_input(x, "x")
    ax = _channel_axis(axis, x.ndim)
    if check_finite:
        _check_finite(x, ax, "x")
    n = _count(x, ax)
    if n < 1:
        raise ValueError(f"x of shape {x.shape} has no values per channel along axis {ax}")
    channels = x.shape[ax]
    mean, var = np.empty(channels), np.empty(channels)
    _kernels.stats(_input_view(x, ax), mean, var, _is_bfloat16(x.dtype))
    return Stats(mean, var, n)


def forward_train(
    x: Any,
    gamma: Any = None,
    beta: Any = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    out: Optional[np.ndarray] = None,
    check_finite: bool = False,
) -> tuple[np.ndarray, Stats]:
    """Batch normalization in training mode: normalize with the batch's own statistics.

    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` where ``mean`` and ``var`` (biased)
    are computed per channel from ``x`` itself.

    Parameters
    ----------
    x : array_like, float32, float64, float16 or bfloat16, ndim >= 2
    gamma, beta : array_like of shape (C,), optional
        Scale and shift; None means 1 and 0.
    axis : int, default 1
        The channel axis.
    eps : float, default 1e-5
    out : ndarray, optional
        Buffer for ``y`` (same shape and dtype as ``x``); may be ``x`` itself.
    check_finite : bool, default False
        Raise ValueError if the input holds NaN or inf (costs one extra pass). By default
        non-finite values propagate to the outputs of their own channel only.

    Returns
    -------
    y : ndarray, same shape and dtype as x
    stats : Stats
        The batch statistics used (float64); pass them to :func:`backward`.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, st = bn.forward_train(x, eps=0.0)
    >>> y
    array([[-1., -1.],
           [ 1.,  1.]])
    >>> st.mean
    array([ 2., 20.])
    """
    if not check_finite:
        result = _kernels.fast_forward_train(x, gamma, beta, axis, eps, out)
        if result is not None:
            return result
    x = _as_input(x, "x")
    ax = _channel_axis(axis, x.ndim)
    channels = x.shape[ax]
    n = _check_training_count(x, ax)
    g, b, e = _vector(gamma, channels, "gamma"), _vector(beta, channels, "beta"), _eps(eps)
    if check_finite:
        _check_finite(x, ax, "x")
    o = _output(out, x, ax, (x,))
    mean, var = np.empty(channels), np.empty(channels)
    _kernels.forward_train(
        _input_view(x, ax), o.view, g, b, e, mean, var, _is_bfloat16(x.dtype)
    )
    return _finish(o), Stats(mean, var, n)


def forward_eval(
    x: Any,
    mean: Any,
    var: Any,
    gamma: Any = None,
    beta: Any = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    out: Optional[np.ndarray] = None,
    check_finite: bool = False,
) -> np.ndarray:
    """Batch normalization in inference mode: normalize with given (running) statistics.

    Parameters
    ----------
    x : array_like, float32, float64, float16 or bfloat16, ndim >= 2
    mean, var : array_like of shape (C,)
        The statistics to normalize with, usually a layer's running averages.
    gamma, beta : array_like of shape (C,), optional
    axis : int, default 1
    eps : float, default 1e-5
    out : ndarray, optional
    check_finite : bool, default False
        Raise ValueError if the input holds NaN or inf (costs one extra pass). By default
        non-finite values propagate to the outputs of their own channel only.

    Returns
    -------
    ndarray, same shape and dtype as x

    Examples
    --------
    A single example can be normalized at inference time:

    >>> import numpy as np, batchnorm as bn
    >>> x = np.array([[3.0, 5.0, 7.0, 9.0]])
    >>> y = bn.forward_eval(x, mean=[2, 4, 6, 8], var=[4, 4, 4, 4], eps=0.0)
    >>> y
    array([[0.5, 0.5, 0.5, 0.5]])
    """
    if not check_finite:
        y = _kernels.fast_forward_eval(x, mean, var, gamma, beta, axis, eps, out)
        if y is not None:
            return y
    x = _as_input(x, "x")
    ax = _channel_axis(axis, x.ndim)
    channels = x.shape[ax]
    m, v = _vector(mean, channels, "mean"), _vector(var, channels, "var")
    if (v < 0).any():
        raise ValueError("var must be non-negative")
    g, b, e = _vector(gamma, channels, "gamma"), _vector(beta, channels, "beta"), _eps(eps)
    if check_finite:
        _check_finite(x, ax, "x")
    o = _output(out, x, ax, (x,))
    _kernels.forward_eval(_input_view(x, ax), o.view, m, v, g, b, e, _is_bfloat16(x.dtype))
    return _finish(o)


def backward(
    dy: Any,
    x: Any,
    st: Any,
    gamma: Any = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    training: bool = True,
    out: Optional[np.ndarray] = None,
    check_finite: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of batch normalization.

    With ``training=True`` the statistics are those of the batch (``st`` from
    :func:`forward_train`) and the gradient flows through them::

        dbeta  = sum(dy)
        dgamma = sum(dy * xhat)
        dx     = gamma / sqrt(var + eps) * (dy - dbeta / n - xhat * dgamma / n)

    With ``training=False`` the statistics are constants (inference-mode backward):
    ``dx = dy * gamma / sqrt(var + eps)``.

    Parameters
    ----------
    dy : array_like, gradient of the loss with respect to y (same shape and dtype as x)
    x : array_like, the forward input
    st : Stats (or a (mean, var) pair)
        The statistics the forward pass normalized with.
    gamma : array_like of shape (C,), optional
    axis, eps : as in the forward call
    training : bool, default True
    out : ndarray, optional
        Buffer for ``dx``; may be ``dy`` itself.
    check_finite : bool, default False
        Raise ValueError if ``dy`` or ``x`` hold NaN or inf (costs one extra pass). By default
        non-finite values propagate to the outputs of their own channel only.

    Returns
    -------
    dx : ndarray, same shape and dtype as x
    dgamma, dbeta : ndarray, float64, shape (C,)

    Examples
    --------
    A constant upstream gradient does not reach x: normalization removes the mean.

    >>> import numpy as np, batchnorm as bn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0]])
    >>> y, st = bn.forward_train(x)
    >>> dx, dgamma, dbeta = bn.backward(np.ones_like(x), x, st)
    >>> bool(np.abs(dx).max() < 1e-12), dbeta
    (True, array([3., 3.]))
    """
    if not check_finite:
        result = _kernels.fast_backward(dy, x, st, gamma, axis, eps, training, out)
        if result is not None:
            return result
    x = _as_input(x, "x")
    dy = _as_input(dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x, {x.shape}, got {dy.shape}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have the dtype of x, {x.dtype}, got {dy.dtype}")
    ax = _channel_axis(axis, x.ndim)
    channels = x.shape[ax]
    if training:
        _check_training_count(x, ax)
    mean, var = _stats_arrays(st, channels)
    g, e = _vector(gamma, channels, "gamma"), _eps(eps)
    if check_finite:
        _check_finite(dy, ax, "dy")
        _check_finite(x, ax, "x")
    o = _output(out, x, ax, (x, dy))
    dgamma, dbeta = np.empty(channels), np.empty(channels)
    _kernels.backward(
        _input_view(dy, ax), _input_view(x, ax), o.view, mean, var, g, e, bool(training),
        dgamma, dbeta, _is_bfloat16(x.dtype),
    )
    return _finish(o), dgamma, dbeta


def set_num_threads(n: Optional[int]) -> None:
    """Set the number of threads the kernels use; None restores the default.

    The default is OpenMP's (``OMP_NUM_THREADS``, or the number of cores). Results are
    bit-identical for any thread count.

    >>> import batchnorm as bn
    >>> bn.set_num_threads(1); bn.get_num_threads()
    1
    >>> bn.set_num_threads(None)
    """
    if n is None:
        _kernels.set_num_threads(0)
        return
    k = operator.index(n)
    if k < 1:
        raise ValueError(f"n must be a positive number of threads or None, got {n!r}")
    _kernels.set_num_threads(k)


def get_num_threads() -> int:
    """The number of threads the kernels use (1 in a build without OpenMP)."""
    return _kernels.get_num_threads()
