"""Keras 3's NumPy backend with this package's batch statistics and normalization.

:func:`install` makes ``keras.ops.moments`` and ``keras.ops.batch_normalization`` (and so
``keras.layers.BatchNormalization``, and every other layer built on them) run this package's
kernels; :func:`uninstall` puts Keras' own functions back. Only the NumPy backend is served
(``KERAS_BACKEND=numpy``, set before keras is imported); keras is imported when
:func:`install` is called.

Why: Keras' NumPy ``moments`` computes the variance as ``E[x^2] - E[x]^2`` in the input's
precision, which cancels catastrophically when the mean is large next to the spread. On
float32 data around 3000 with unit spread its variances are off by several units, negative
ones included (then ``sqrt(var + epsilon)`` is NaN); the package accumulates its statistics
in float64, so they are exact to float32 rounding. The results keep Keras' shapes and types
(``keepdims``; a float16 input gives float16 statistics; ``batch_normalization`` returns
NumPy's promotion of its arguments' types). What the kernels do not take goes to Keras' own
function unchanged: integer or complex data, empty arrays or an empty set of axes, parameters
that are not vectors of the channel axis' length, negative variances, a negative epsilon,
arrays that are not plain ``numpy.ndarray``, and ``synchronized=True`` (which Keras refuses on
this backend).

>>> import os
>>> os.environ["KERAS_BACKEND"] = "numpy"            # before keras is first imported
>>> import numpy as np, keras, batchnorm.keras
>>> x = np.random.default_rng(0).normal(3000.0, 1.0, size=(1000, 8)).astype(np.float32)
>>> exact = x.astype(np.float64).var(axis=0)
>>> bool((keras.ops.moments(x, axes=[0])[1] < 0).any())      # Keras' own
True
>>> batchnorm.keras.install()
>>> mean, var = keras.ops.moments(x, axes=[0])
>>> var.dtype, bool(np.allclose(var, exact, rtol=1e-6, atol=0))
(dtype('float32'), True)
>>> batchnorm.keras.uninstall()
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Optional

import numpy as np

from . import _validation
from ._api import batch_stats, forward_eval

__all__ = ["install", "uninstall"]

# The backend module whose attributes install() replaced, and Keras' functions it replaced
# (None while not installed).
_patched_module: Any = None
_originals: dict = {}

_NAMES = ("moments", "batch_normalization")


# --- install / uninstall ---------------------------------------------------------------------


def _backend_nn() -> Any:
    """Keras' backend ``nn`` module (the one ``keras.ops`` calls), after checking that it is
    the NumPy backend's."""
    try:
        import keras
    except ImportError:
        raise ImportError("batchnorm.keras needs Keras 3: pip install keras") from None
    backend = keras.backend.backend()
    if backend != "numpy":
        raise RuntimeError(
            f"batchnorm.keras serves Keras' NumPy backend, but Keras runs the {backend!r} "
            f"backend; set KERAS_BACKEND=numpy before keras is first imported")
    import importlib

    # keras.ops.moments and keras.ops.batch_normalization call keras.src.backend.nn.<name>,
    # looked up at each call, which is keras.src.backend.numpy.nn on this backend
    return importlib.import_module("keras.src.backend").nn


def install() -> None:
    """Make Keras' NumPy backend compute ``moments`` and ``batch_normalization`` here.

    Replaces the two functions of the backend module that ``keras.ops.moments`` and
    ``keras.ops.batch_normalization`` call (Keras' originals are kept for
    :func:`uninstall` and for the inputs the kernels do not take). Calling it again is
    harmless.

    Raises
    ------
    RuntimeError
        When Keras does not run the NumPy backend (set ``KERAS_BACKEND=numpy`` before keras
        is imported).
    ImportError
        When keras is not installed.

    Examples
    --------
    >>> import os
    >>> os.environ["KERAS_BACKEND"] = "numpy"            # before keras is first imported
    >>> import numpy as np, keras, batchnorm.keras
    >>> batchnorm.keras.install()
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]], np.float32)
    >>> keras.ops.moments(x, axes=[0])
    (array([ 2., 20.], dtype=float32), array([  1., 100.], dtype=float32))
    >>> layer = keras.layers.BatchNormalization(epsilon=0.0)
    >>> layer(x, training=True)
    array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> batchnorm.keras.uninstall()
    """
    global _patched_module
    nn = _backend_nn()
    if _patched_module is nn:
        return
    if _patched_module is not None:     # a different backend module: put the first one back
        uninstall()
    _originals.update({name: getattr(nn, name) for name in _NAMES})
    nn.moments = _moments
    nn.batch_normalization = _batch_normalization
    _patched_module = nn


def uninstall() -> None:
    """Give Keras its own ``moments`` and ``batch_normalization`` back (after
    :func:`install`; otherwise nothing happens)."""
    global _patched_module
    if _patched_module is None:
        return
    for name in _NAMES:
        setattr(_patched_module, name, _originals[name])
    _originals.clear()
    _patched_module = None


# --- the replacements ------------------------------------------------------------------------


def _plain_input(x: Any) -> bool:
    return type(x) is np.ndarray and x.size > 0 and _validation.is_kernel_dtype(x.dtype)


def _reduction_axes(axes: Any, ndim: int) -> Optional[tuple]:
    """Keras' ``axes`` (an int, a tuple or list of ints, or None for all) as sorted axes in
    [0, ndim), or None where Keras' own function should answer (empty, repeated, out of
    range, not integers)."""
    if axes is None:
        return tuple(range(ndim))
    items = list(axes) if isinstance(axes, (tuple, list)) else [axes]
    red = []
    for a in items:
        if isinstance(a, (bool, np.bool_)):
            return None
        try:
            k = operator.index(a)
        except TypeError:
            return None
        if not -ndim <= k < ndim:
            return None
        red.append(k % ndim)
    if not red or len(set(red)) != len(red):
        return None
    return tuple(sorted(red))


def _to_keras_dtype(v: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float64 statistics in the input's type, as Keras returns them (float16 results are
    clipped to its finite range first, as Keras does)."""
    if dtype == np.float16:
        info = np.finfo(np.float16)
        v = np.clip(v, info.min, info.max, out=np.empty_like(v))   # stays an array if 0-d
    return v.astype(dtype)


def _moments(x: Any, axes: Any, keepdims: bool = False, synchronized: bool = False) -> tuple:
    """Keras' ``moments`` (mean and biased variance over ``axes``) with float64 statistics."""
    original = _originals["moments"]
    if synchronized or not _plain_input(x) or x.ndim == 0:
        return original(x, axes, keepdims, synchronized)
    red = _reduction_axes(axes, x.ndim)
    if red is None:
        return original(x, axes, keepdims, synchronized)
    kept = [i for i in range(x.ndim) if i not in red]
    kept_shape = tuple(x.shape[i] for i in kept)
    if len(kept) == 1:
        # one channel axis: the kernels read x where it lies, whatever its strides
        st = batch_stats(x, axis=kept[0])
    elif not kept:
        st = batch_stats(x.reshape(-1, 1), axis=1)
    else:
        # several kept axes: one channel per combination of them, last (a copy when needed)
        k = len(kept)
        flat = np.moveaxis(x, kept, range(x.ndim - k, x.ndim))
        st = batch_stats(flat.reshape(-1, math.prod(kept_shape)), axis=1)
    if keepdims:
        shape = tuple(1 if i in red else n for i, n in enumerate(x.shape))
    else:
        shape = kept_shape
    return (_to_keras_dtype(st.mean.reshape(shape), x.dtype),
            _to_keras_dtype(st.var.reshape(shape), x.dtype))


def _keras_result_dtype(x: np.ndarray, mean: np.ndarray, variance: np.ndarray,
                        offset: Optional[np.ndarray], scale: Optional[np.ndarray],
                        epsilon: Any) -> np.dtype:
    """The type Keras' formula gives for these arguments: its own arithmetic on empty
    arrays of their types (NumPy's promotion, with ml_dtypes' rules for bfloat16 and a
    Python float epsilon taking the type of the array it is added to)."""
    e = lambda a: np.empty(0, a.dtype)  # noqa: E731
    inv = 1.0 / np.sqrt(e(variance) + epsilon)
    if scale is not None:
        inv = inv * e(scale)
    res = -e(mean) * inv
    if offset is not None:
        res = res + e(offset)
    return (e(x) * inv + res).dtype


def _batch_normalization(x: Any, mean: Any, variance: Any, axis: Any, offset: Any = None,
                         scale: Any = None, epsilon: Any = 1e-3) -> Any:
    """Keras' ``batch_normalization`` by :func:`batchnorm.forward_eval`."""
    original: Callable = _originals["batch_normalization"]
    args = (x, mean, variance, axis, offset, scale, epsilon)
    if not _plain_input(x) or x.ndim == 0:
        return original(*args)
    try:
        ax = _validation.channel_axis(axis, x.ndim)
        eps = _validation.eps(epsilon)
    except (TypeError, ValueError):
        return original(*args)
    C = x.shape[ax]
    vectors = (mean, variance, offset, scale)
    for v in vectors:
        if v is None:
            continue
        if type(v) is not np.ndarray or v.shape != (C,) or not (
                v.dtype.kind == "f" or _validation.is_bfloat16(v.dtype)):
            return original(*args)
    try:
        dtype = _keras_result_dtype(x, mean, variance, offset, scale, epsilon)
    except TypeError:
        return original(*args)
    if not _validation.is_kernel_dtype(dtype):
        return original(*args)
    m, v, b, g = vectors
    if np.any(v < 0):
        # Keras gives NaN there (or a value where var + epsilon > 0); the kernels refuse it
        return original(*args)
    xx = x if x.dtype == dtype else x.astype(dtype)
    if xx.ndim == 1:        # one example of C features: (1, C) for the kernels
        return forward_eval(xx.reshape(1, C), m, v, g, b, axis=1, eps=eps).reshape(C)
    return forward_eval(xx, m, v, g, b, axis=ax, eps=eps)
