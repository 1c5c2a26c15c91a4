"""Plain-NumPy float64 twins of the public functions: the oracle for tests and benchmarks.

Written for clarity, not speed: each line is a formula of conventions.md. Inputs of any
float dtype are computed in float64 and returned in float64.

Beyond the public functions, the oracles of two extensions: masked statistics (Keras 3's
``mask``: statistics over the True positions, every position normalized with them) and the
fused epilogue ``y = activation(bn(x) + residual)`` with its gradients.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ._stats import Stats

__all__ = ["batch_stats", "forward_train", "forward_eval", "backward", "renorm_forward_train"]

# The epilogue's activations: None (identity) or "relu"
_ACTIVATIONS = (None, "relu")


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


def _mask(mask, x: np.ndarray, axis: int):
    """(m, n): the boolean mask broadcast to x's shape (the same for every channel) and the
    number n of True positions per channel. `mask` has x's shape without the channel axis,
    or one that broadcasts to it."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")
    axis %= x.ndim
    m = np.expand_dims(np.broadcast_to(mask, x.shape[:axis] + x.shape[axis + 1:]), axis)
    return np.broadcast_to(m, x.shape), int(np.count_nonzero(m))


def _epilogue(s, activation, residual):
    """y = activation(s + residual): residual None adds nothing, activation None is the
    identity."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if residual is not None:
        s = s + np.asarray(residual, dtype=np.float64)
    return np.maximum(s, 0.0) if activation == "relu" else s


def batch_stats(x, axis: int = 1, *, mask=None) -> Stats:
    """Per-channel mean and biased variance. With `mask`, over the True positions only
    (masked-out values, NaN and inf included, take no part): count is then an int64 (C,)
    vector, and a channel with no True position gets mean 0, var 0 (an empty Stats)."""
    x = np.asarray(x, dtype=np.float64)
    axes = _reduce_axes(x.ndim, axis)
    if mask is not None:
        m, n = _mask(mask, x, axis)
        mean = np.where(m, x, 0.0).sum(axis=axes) / max(n, 1)
        d = np.where(m, x - _per_channel(mean, x.ndim, axis, 0.0), 0.0)
        var = (d ** 2).sum(axis=axes) / max(n, 1)
        return Stats(mean, var, np.full(x.shape[axis], n, dtype=np.int64))
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


def forward_eval(x, mean, var, gamma=None, beta=None, *, axis: int = 1, eps: float = 1e-5,
                 activation=None, residual=None):
    """activation(gamma * (x - mean) / sqrt(var + eps) + beta + residual)."""
    x = np.asarray(x, dtype=np.float64)
    m = _per_channel(mean, x.ndim, axis, 0.0)
    v = _per_channel(var, x.ndim, axis, 1.0)
    with np.errstate(divide="ignore"):
        inv = 1.0 / np.sqrt(v + eps)
    xhat = _normalized(x, m, inv)
    s = _per_channel(gamma, x.ndim, axis, 1.0) * xhat + _per_channel(beta, x.ndim, axis, 0.0)
    return _epilogue(s, activation, residual)


def forward_train(x, gamma=None, beta=None, *, axis: int = 1, eps: float = 1e-5, mask=None,
                  activation=None, residual=None):
    """(y, Stats): the batch's statistics (over the mask's True positions, if given), with
    which EVERY position is normalized (Keras 3), then the epilogue of forward_eval."""
    st = batch_stats(x, axis, mask=mask)
    y = forward_eval(x, st.mean, st.var, gamma, beta, axis=axis, eps=eps,
                     activation=activation, residual=residual)
    return y, st


def backward(dy, x, st, gamma=None, *, axis: int = 1, eps: float = 1e-5, training: bool = True,
             mask=None, activation=None, y=None):
    """(dx, dgamma, dbeta), and dz (the gradient of bn(x) + residual, so the residual's) last
    when activation is given: "relu" needs the forward output y, and passes dy where y <= 0
    is false (0 at y == 0; NaN passes: PyTorch's threshold_backward). With `mask` in training, mean and var depend on the True
    positions only: dx_i = a*g_i - m_i*(a/n)*(dbeta + xhat_i*dgamma), a = gamma/sqrt(var + eps),
    m_i = 1 at a True position, else 0; dgamma and dbeta still sum over every position."""
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if activation == "relu":
        if y is None:
            raise ValueError('backward with activation="relu" needs the forward output y')
        with np.errstate(invalid="ignore"):
            dy = np.where(np.asarray(y, dtype=np.float64) <= 0, 0.0, dy)  # from here on: g
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
    if training and mask is not None:
        mk, nm = _mask(mask, x, axis)
        db = _per_channel(dbeta, x.ndim, axis, 0.0)
        dg = _per_channel(dgamma, x.ndim, axis, 0.0)
        # selected, not multiplied by m_i: the masked-out positions take no part
        dx = g * inv * (dy - np.where(mk, db / max(nm, 1) + xhat * dg / max(nm, 1), 0.0))
    elif training:
        db = _per_channel(dbeta, x.ndim, axis, 0.0)
        dg = _per_channel(dgamma, x.ndim, axis, 0.0)
        dx = g * inv * (dy - db / n - xhat * dg / n)
    else:
        dx = dy * g * inv
    return (dx, dgamma, dbeta) if activation is None else (dx, dgamma, dbeta, dy)


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
