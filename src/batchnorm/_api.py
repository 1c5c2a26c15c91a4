"""The functional API: the public functions, their documentation, and the threads.

Every function here is one call into the route in ``_kernels``, which converts the
arguments once (with the rules of ``_validation``), checks them all before anything is
written, and calls the C core. Functions keep no state.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _kernels
from ._stats import Stats
from . import _validation
from ._validation import supported_dtypes

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

# --- public functions ---------------------------------------------------------------------


def batch_stats(x: Any, axis: int = 1, *, mask: Any = None, check_finite: bool = False) -> Stats:
    """Per-channel mean and biased variance of a batch.

    Parameters
    ----------
    x : array_like, float32, float64, float16 or bfloat16, ndim >= 2
        The batch; ``axis`` is the channel (feature) axis.
    axis : int, default 1
        1 for (N, D) and (N, C, H, W); -1 for channels-last (N, H, W, C).
    mask : array_like of bool, optional
        The positions that count (padding in sequences, variable-length data): the shape of
        ``x`` without the channel axis, or one that broadcasts to it. Masked-out positions
        may hold anything, NaN included. See :doc:`variants`.
    check_finite : bool, default False
        Raise ValueError if the input holds NaN or inf (costs one extra pass). By default
        non-finite values propagate to the outputs of their own channel only.

    Returns
    -------
    Stats
        ``mean`` and ``var`` (float64, shape (C,)) over all axes but ``axis``, and ``count``
        (with a mask: the per-channel counts of unmasked values, an int64 array).

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
    >>> bn.batch_stats(x, mask=[True, True, False]).mean * 2     # the last row left out
    array([7., 9., 8., 1.])
    """
    return _kernels.batch_stats(x, axis, check_finite, -1, mask)


def forward_train(
    x: Any,
    gamma: Any = None,
    beta: Any = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    out: Optional[np.ndarray] = None,
    mask: Any = None,
    activation: Optional[str] = None,
    residual: Any = None,
    check_finite: bool = False,
) -> tuple[np.ndarray, Stats]:
    """Batch normalization in training mode: normalize with the batch's own statistics.

    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` where ``mean`` and ``var`` (biased)
    are computed per channel from ``x`` itself. With ``residual`` and ``activation`` the
    result is ``activation(y + residual)``, computed in the same pass.

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
    mask : array_like of bool, optional
        Statistics over the positions where ``mask`` is True only (see :func:`batch_stats`);
        every position is normalized with them, as Keras 3 does.
    activation : None or "relu", optional
        Applied last, in the same pass: ``relu(y + residual)``.
    residual : array_like, optional
        Added to the normalized output before the activation (same shape and dtype as
        ``x``); may be ``out`` itself.
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
    >>> bn.forward_train(x, eps=0.0, activation="relu", residual=[[0.5, 2.0], [0.5, 2.0]])[0]
    array([[0. , 1. ],
           [1.5, 3. ]])
    """
    return _kernels.forward_train(x, gamma, beta, axis, eps, out, check_finite, -1, mask,
                                  activation, residual)


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
    activation: Optional[str] = None,
    residual: Any = None,
    check_finite: bool = False,
) -> np.ndarray:
    """Batch normalization in inference mode: normalize with given (running) statistics.

    ``y = gamma * (x - mean) / sqrt(var + eps) + beta``, then ``activation(y + residual)``
    when those are given, in the same pass.

    Parameters
    ----------
    x : array_like, float32, float64, float16 or bfloat16, ndim >= 2
    mean, var : array_like of shape (C,)
        The statistics to normalize with, usually a layer's running averages.
    gamma, beta : array_like of shape (C,), optional
    axis : int, default 1
    eps : float, default 1e-5
    out : ndarray, optional
    activation : None or "relu", optional
    residual : array_like, optional
        As in :func:`forward_train`.
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
    return _kernels.forward_eval(x, mean, var, gamma, beta, axis, eps, out, check_finite, -1,
                                 activation, residual)


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
    mask: Any = None,
    activation: Optional[str] = None,
    y: Any = None,
    check_finite: bool = False,
) -> tuple:
    """Gradients of batch normalization.

    With ``training=True`` the statistics are those of the batch (``st`` from
    :func:`forward_train`) and the gradient flows through them::

        dbeta  = sum(dy)
        dgamma = sum(dy * xhat)
        dx     = gamma / sqrt(var + eps) * (dy - dbeta / n - xhat * dgamma / n)

    With ``training=False`` the statistics are constants (inference-mode backward):
    ``dx = dy * gamma / sqrt(var + eps)``.

    With a ``mask`` (training) the statistics were those of the unmasked positions: sums run
    over every position, ``n`` is the unmasked count, and the terms through the statistics
    reach only unmasked positions (masked ones get ``dy * gamma / sqrt(var + eps)``): the
    exact gradient of the masked forward. With ``activation="relu"`` the forward's output
    ``y`` is needed: ``dz = dy * (y > 0)`` is the gradient of the pre-activation sum (and so
    of a ``residual``), and the gradients above are taken with ``dz`` in place of ``dy``.

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
    mask : array_like of bool, optional
        The forward's mask.
    activation : None or "relu", optional
        The forward's activation; then ``y`` is required.
    y : array_like, optional
        The forward's output (with an activation).
    check_finite : bool, default False
        Raise ValueError if ``dy`` or ``x`` hold NaN or inf (costs one extra pass). By default
        non-finite values propagate to the outputs of their own channel only.

    Returns
    -------
    dx : ndarray, same shape and dtype as x
    dgamma, dbeta : ndarray, float64, shape (C,)
    dz : ndarray, same shape and dtype as x
        Only with an activation: the gradient of ``bn(x) + residual``, which is the
        residual's gradient.

    Examples
    --------
    A constant upstream gradient does not reach x: normalization removes the mean.

    >>> import numpy as np, batchnorm as bn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0]])
    >>> y, st = bn.forward_train(x)
    >>> dx, dgamma, dbeta = bn.backward(np.ones_like(x), x, st)
    >>> bool(np.abs(dx).max() < 1e-12), dbeta
    (True, array([3., 3.]))

    Behind a ReLU only the positive outputs pass the gradient on:

    >>> y, st = bn.forward_train(x, activation="relu")
    >>> dx, dgamma, dbeta, dz = bn.backward(np.ones_like(x), x, st, activation="relu", y=y)
    >>> dz
    array([[0., 0.],
           [0., 0.],
           [1., 1.]])
    """
    return _kernels.backward(dy, x, st, gamma, axis, eps, training, out, check_finite, None,
                             True, mask, activation, y)


def set_num_threads(n: Optional[int]) -> None:
    """Set the number of threads the kernels use; None restores the default.

    The default is OpenMP's (``OMP_NUM_THREADS``, or the number of cores). Requests above
    4 threads per processor (at least 16) are capped there. Results are bit-identical for
    any thread count. In a child made by ``os.fork()`` (``multiprocessing``'s "fork"
    context, data loaders) the kernels run on one thread until this is called in the child;
    see :doc:`numerics` for why.

    >>> import batchnorm as bn
    >>> bn.set_num_threads(1); bn.get_num_threads()
    1
    >>> bn.set_num_threads(None)
    """
    if n is None:
        _kernels.set_num_threads(0)
        return
    k = _validation.integer(n, "n", "a positive integer number of threads or None", low=1)
    _kernels.set_num_threads(min(k, _kernels.max_threads()))


def get_num_threads() -> int:
    """The number of threads the kernels use (1 in a build without OpenMP)."""
    return _kernels.get_num_threads()
