"""Plain-NumPy float64 twins of the public functions: the oracle for tests and benchmarks.

Written for clarity, not speed: each line is a formula of conventions.md. Inputs of any
float dtype are computed in float64 and returned in float64.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ._stats import Stats

__all__ = ["batch_stats", "forward_train", "forward_eval", "backward", "renorm_forward_train"]


def _reduce_axes(ndim: int, axis: int) -> tuple:
    axis %= ndim
    return tuple(i for i in range(ndim) if i != axis)


def _per_channel(v: Optional[np.ndarray], ndim: int, axis: int, default: float) -> np.ndarray:
    """A (C,) vector shaped to broadcast against the input along `axis`."""
    shape = [1] * ndim
    shape[axis % ndim] = -1
    if v is None:
        return np.full([1] * ndim, default)
    return np.asarray(v, dtype=np.float64).reshape(shape)


def batch_stats(x, axis: int = 1) -> Stats:
    x = np.asarray(x, dtype=np.float64)
    axes = _reduce_axes(x.ndim, axis)
    mean = x.mean(axis=axes)
    var = ((x - mean.reshape([-1 if i == axis % x.ndim else 1 for i in range(x.ndim)])) ** 2).mean(
        axis=axes
    )
    return Stats(mean, var, x.size // x.shape[axis])


def _normalized(x, m, inv):
    """xhat = (x - mean) / sqrt(var + eps): 0 where x == mean, even when var + eps == 0
    (conventions.md: zero variance gives beta exactly)."""
    d = x - m
    with np.errstate(invalid="ignore"):
        return np.where(d == 0, 0.0, d * inv)


def forward_eval(x, mean, var, gamma=None, beta=None, *, axis: int = 1, eps: float = 1e-5):
    x = np.asarray(x, dtype=np.float64)
    m = _per_channel(mean, x.ndim, axis, 0.0)
    v = _per_channel(var, x.ndim, axis, 1.0)
    with np.errstate(divide="ignore"):
        inv = 1.0 / np.sqrt(v + eps)
    xhat = _normalized(x, m, inv)
    return _per_channel(gamma, x.ndim, axis, 1.0) * xhat + _per_channel(beta, x.ndim, axis, 0.0)


def forward_train(x, gamma=None, beta=None, *, axis: int = 1, eps: float = 1e-5):
    st = batch_stats(x, axis)
    return forward_eval(x, st.mean, st.var, gamma, beta, axis=axis, eps=eps), st


def backward(dy, x, st, gamma=None, *, axis: int = 1, eps: float = 1e-5, training: bool = True):
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    axes = _reduce_axes(x.ndim, axis)
    n = x.size // x.shape[axis]
    m = _per_channel(st[0], x.ndim, axis, 0.0)
    with np.errstate(divide="ignore"):
        inv = 1.0 / np.sqrt(_per_channel(st[1], x.ndim, axis, 1.0) + eps)
    g = _per_channel(gamma, x.ndim, axis, 1.0)
    xhat = _normalized(x, m, inv)
    dbeta = dy.sum(axis=axes)
    # dgamma = sum(dy * xhat), taken as sum(dy * (x - mean)) / sqrt(var + eps): 0 when the
    # sum is 0, even where var + eps == 0 makes xhat infinite
    sdyx = (dy * (x - m)).sum(axis=axes)
    with np.errstate(invalid="ignore"):
        dgamma = np.where(sdyx == 0, 0.0, sdyx * inv.reshape(-1))
    if training:
        db = _per_channel(dbeta, x.ndim, axis, 0.0)
        dg = _per_channel(dgamma, x.ndim, axis, 0.0)
        dx = g * inv * (dy - db / n - xhat * dg / n)
    else:
        dx = dy * g * inv
    return dx, dgamma, dbeta


def renorm_forward_train(x, gamma, beta, renorm_mean, renorm_std, *, axis: int = 1,
                         eps: float = 1e-5, rmax=None, rmin=None, dmax=None):
    """Batch renormalization in training (Ioffe 2017, Keras 3): (y, Stats, r, d).

    ``y = (xhat * r + d) * gamma + beta`` with ``r = std / s`` and ``d = (mean - renorm_mean)
    / s``, the batch's ``std = sqrt(var + eps)``, ``s = max(renorm_std, sqrt(eps))``, then
    clipped to [rmin, rmax] and [-dmax, dmax]."""
    st = batch_stats(x, axis)
    s = np.maximum(np.asarray(renorm_std, dtype=np.float64), np.sqrt(eps))
    r = np.sqrt(st.var + eps) / s
    d = (st.mean - np.asarray(renorm_mean, dtype=np.float64)) / s
    r = np.clip(r, -np.inf if rmin is None else rmin, np.inf if rmax is None else rmax)
    d = d if dmax is None else np.clip(d, -dmax, dmax)
    xhat = forward_eval(x, st.mean, st.var, axis=axis, eps=eps)
    nd = xhat.ndim
    y = (_per_channel(gamma, nd, axis, 1.0) * (xhat * _per_channel(r, nd, axis, 1.0)
                                               + _per_channel(d, nd, axis, 0.0))
         + _per_channel(beta, nd, axis, 0.0))
    return y, st, r, d
