"""Argument rules shared by the functions, the layer and the Cython route.

The route in ``_kernels`` takes the common arguments as they are (a native float ndarray,
a plain int axis, a float eps, a float32/float64/float16 vector of length C) and hands
anything else to the functions here, which convert it or raise an error that names the
argument and what was expected. So each rule and its message lives here once.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

# Storage types the kernels take. float16 and bfloat16 (from the optional ml_dtypes package)
# are computed in float32 with float64 statistics; bfloat16 is recognised by name so that
# ml_dtypes is never imported here.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))


def is_bfloat16(dt: np.dtype) -> bool:
    # kind first: dtype.name is slow, and float16/32/64 are kind 'f'
    return dt.kind == "V" and dt.itemsize == 2 and dt.name == "bfloat16"


def is_kernel_dtype(dt: np.dtype) -> bool:
    """Whether the kernels take arrays of this dtype as they are (see supported_dtypes)."""
    return dt in FLOAT_DTYPES or is_bfloat16(dt)


def supported_dtypes() -> tuple:
    """The storage dtypes the kernels take: float32, float64, float16, and bfloat16 when
    ml_dtypes is installed."""
    try:
        import ml_dtypes
    except ImportError:
        return FLOAT_DTYPES
    return FLOAT_DTYPES + (np.dtype(ml_dtypes.bfloat16),)


def not_masked(a: Any, name: str) -> None:
    """numpy.ma arrays would lose their mask silently: refused, saying what to do."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy.ma.MaskedArray, whose mask batchnorm would ignore; pass "
            f"{name}.filled(value), or {name}.data with a boolean mask= (True where a "
            f"position counts, one flag per position of all channels) where a function takes one")


def as_array(a: Any, name: str) -> np.ndarray:
    """a as an ndarray (no copy when it is one), with a clear error for what is not."""
    if type(a) is np.ndarray:
        return a
    not_masked(a, name)
    try:
        return np.asarray(a)
    except (ValueError, TypeError) as e:  # e.g. a ragged nested list
        raise ValueError(f"{name} must be a rectangular array of numbers: {e}") from None


def as_input(a: Any, name: str) -> np.ndarray:
    """A float ndarray (see supported_dtypes) with native byte order and ndim >= 2."""
    arr = as_array(a, name)
    dt = arr.dtype
    if not is_kernel_dtype(dt):
        if dt.kind == "f" and dt.newbyteorder("=") in FLOAT_DTYPES:
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


def output(out: Any, like: np.ndarray) -> None:
    """An `out` buffer for a result shaped like `like`: a writeable ndarray (a subclass but
    matrix and masked arrays is fine) of its shape and dtype, else an error saying why."""
    if not isinstance(out, np.ndarray) or isinstance(out, (np.matrix, np.ma.MaskedArray)):
        raise TypeError(f"out must be a numpy.ndarray (not a matrix or masked array), "
                        f"got {type(out).__name__}")
    if out.shape != like.shape:
        raise ValueError(f"out must have shape {like.shape}, got {out.shape}")
    if out.dtype != like.dtype:
        raise TypeError(f"out must have dtype {like.dtype}, got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")


def integer(value: Any, name: str, what: str = "an integer", low: Any = None,
            high: Any = None) -> int:
    """value as a Python int (any integer type but bool) in [low, high), else a TypeError or
    ValueError saying "{name} must be {what}, got ..."."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    try:
        k = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {what}, got {value!r}") from None
    if (low is not None and k < low) or (high is not None and k >= high):
        raise ValueError(f"{name} must be {what}, got {k}")
    return k


def axis_index(axis: Any) -> int:
    """axis as a Python int (any integer type but bool), or a TypeError naming it."""
    return integer(axis, "axis")


def channel_axis(axis: Any, ndim: int) -> int:
    """The channel axis in [0, ndim)."""
    axis = axis_index(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an input with {ndim} dimensions")
    return axis % ndim


def eps(value: Any) -> float:
    if isinstance(value, (str, bytes, complex, np.complexfloating)) or value is None:
        raise TypeError(f"eps must be a real number, got {value!r}")
    try:
        e = float(value)
    except OverflowError:
        e = math.inf
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a real number, got {value!r}") from None
    if not (e >= 0.0 and math.isfinite(e)):
        raise ValueError(f"eps must be a finite number >= 0, got {value!r}")
    return e


def fraction(value: Any, name: str) -> float:
    """A number in [0, 1] (a momentum or a decay) as a float, else an error naming it."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {v}")
    return v


def vector(v: Any, channels: int, name: str) -> np.ndarray:
    """v as a contiguous, aligned float64 vector of length C (a copy where it is not one);
    any real numeric dtype, bfloat16 included (exact in float64)."""
    arr = as_array(v, name)
    if arr.dtype.kind not in "fiu" and not is_bfloat16(arr.dtype):
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.shape != (channels,):
        raise ValueError(f"{name} must have shape (C,) = ({channels},), got {arr.shape}")
    return np.require(arr, np.float64, ["C", "A"])


def stats_pair(st: Any) -> tuple:
    """(mean, var) of a Stats, of anything with .mean and .var attributes (not methods, as
    an ndarray's are), or of a (mean, var[, count]) tuple or list."""
    if isinstance(st, np.ndarray):
        raise TypeError(
            f"st must be a Stats (mean, var, count) or a (mean, var) pair, got an ndarray of "
            f"shape {st.shape}; for a stacked (2, C) array pass tuple(st)")
    mean, var = getattr(st, "mean", None), getattr(st, "var", None)
    if mean is not None and var is not None and not (callable(mean) or callable(var)):
        return mean, var
    if isinstance(st, (tuple, list)) and len(st) in (2, 3):
        return st[0], st[1]
    raise TypeError(f"st must be a Stats (mean, var, count) or a (mean, var) pair, got "
                    f"{type(st).__name__}")


def mask(m: Any, shape: tuple, axis: int) -> tuple:
    """A statistics mask for an input of this shape and channel axis, as a boolean array of
    that shape without the channel axis (a view where broadcasting allows), and how many
    positions it sets (per channel: a mask has no channel axis)."""
    not_masked(m, "mask")
    m = as_array(m, "mask")
    if m.dtype != np.bool_:
        raise TypeError(f"mask must be a boolean array (True where a position counts in the "
                        f"statistics), got dtype {m.dtype}")
    target = shape[:axis] + shape[axis + 1:]
    try:
        full = np.broadcast_to(m, target)
    except ValueError:
        raise ValueError(f"mask must have the shape of x without its channel axis {axis}, "
                         f"{target}, or broadcast to it; got {m.shape}") from None
    return full, int(np.count_nonzero(full))


def activation(value: Any) -> int:
    """The code of a fused activation: 0 for None, 1 for "relu"."""
    if value is None:
        return 0
    if isinstance(value, str) and value == "relu":
        return 1
    raise ValueError(f"activation must be None or 'relu', got {value!r}")


def flag(value: Any, name: str) -> bool:
    """A True/False argument; None or other objects are not taken as either."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_finite(a: np.ndarray, axis: int, name: str) -> None:
    """With check_finite=True: a clear error naming the channels that hold NaN or inf."""
    finite = np.isfinite(a.astype(np.float32) if a.itemsize == 2 else a)
    if not finite.all():
        others = tuple(i for i in range(a.ndim) if i != axis)
        bad = np.flatnonzero(~finite.all(axis=others))
        shown = ", ".join(map(str, bad[:10])) + (", ..." if bad.size > 10 else "")
        raise ValueError(f"{name} contains NaN or inf in channel(s) {shown} (check_finite=True)")
