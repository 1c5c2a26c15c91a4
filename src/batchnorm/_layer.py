"""The stateful BatchNorm layer: a thin owner of parameters and running statistics."""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import numpy as np

from . import _kernels, _validation
from ._stats import Stats, merge_stats

__all__ = ["BatchNorm"]

_STATE_KEYS = ("gamma", "beta", "running_mean", "running_var", "num_batches_tracked")
# Batch renormalization's state (Keras' moving_stddev, renorm_mean, renorm_stddev)
_RENORM_KEYS = ("running_std", "renorm_mean", "renorm_std")
_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


# Values of the forward input that backward checks for changes: a buffer refilled with the
# next batch (as data loaders do) changes nearly all of them.
_SAMPLE_SIZE = 64


def _sample(x: np.ndarray) -> bytes:
    """The bytes of up to about _SAMPLE_SIZE values of x, evenly spread over it."""
    return _kernels.sample(x, _SAMPLE_SIZE)


def _check_input(x: Optional[np.ndarray], sample: Optional[bytes]) -> np.ndarray:
    """The forward input backward needs, if it is still there unchanged."""
    if x is None:
        raise RuntimeError(
            "backward() needs the forward input, which the forward call overwrote (out=x)")
    if _sample(x) != sample:
        raise RuntimeError(
            "backward() needs the forward input, which was modified after the forward "
            "call (a reused buffer?); pass a copy to the forward call, or call backward "
            "before reusing x")
    return x


def _channels(bad: np.ndarray) -> str:
    idx = np.flatnonzero(bad)
    return ", ".join(map(str, idx[:10])) + (", ..." if idx.size > 10 else "")


class BatchNorm:
    """Batch normalization layer with PyTorch's semantics, for NumPy arrays.

    In training mode (the default) every batch is normalized with its own statistics, from
    the first batch on, and the running statistics are updated as
    ``running = (1 - momentum) * running + momentum * batch``. In eval mode the running
    statistics are used, so a single example can be normalized.

    Parameters
    ----------
    num_features : int
        C, the length of the channel axis; gamma, beta, running_mean and running_var all
        have shape (C,).
    axis : int, default 1
        The channel axis of the inputs (-1 for channels-last).
    eps : float, default 1e-5
    momentum : float or None, default 0.1
        Weight of the new batch in the running averages (PyTorch's convention; Keras'
        ``momentum=0.99`` is ``momentum=0.01`` here). None: cumulative average.
    affine : bool, default True
        Learn gamma (scale) and beta (shift); False means gamma = 1, beta = 0.
    track_running_stats : bool, default True
        Keep running averages; False normalizes with batch statistics in eval mode too.
    unbiased_running_var : bool, default True
        Accumulate ``var * n / (n - 1)`` (PyTorch) rather than the biased batch variance
        (Keras, Flax, ONNX).
    dtype : float32 or float64, default float32
        Storage type of the parameters and running statistics (inputs may be float16 or
        bfloat16 as well; outputs have the input's dtype).
    check_finite : bool, default False
        Raise ValueError on NaN or inf in the input (and in dy in backward) instead of
        letting them propagate; either way they never enter the running statistics.
    virtual_batch_size : int >= 2, optional
        Ghost batch normalization: a training call splits x along its first axis into
        consecutive groups of this many rows (the last may be smaller, but not 1) and is
        exactly the successive training calls on those groups: outputs, running statistics,
        ``num_batches_tracked`` and gradients. Eval mode is unchanged.
    renorm : bool, default False
        Batch renormalization (Ioffe 2017), with Keras 3's semantics: in training,
        ``y = (xhat * r + d) * gamma + beta`` with ``r = std / renorm_std`` and
        ``d = (mean - renorm_mean) / renorm_std`` (the batch's ``std = sqrt(var + eps)``,
        ``renorm_std`` at least ``sqrt(eps)``), clipped, and constants for the gradient.
        ``renorm_mean`` and ``renorm_std`` are averages with ``renorm_momentum``; the
        running standard deviation ``running_std`` is averaged with ``momentum`` and gives
        ``running_var = max(running_std**2 - eps, 0)`` for inference.
    renorm_clipping : dict, optional
        ``{"rmax": >= 1, "rmin": in [0, 1], "dmax": >= 0}``; a missing key does not clip.
    renorm_momentum : float, default 0.01
        Weight of the new batch in ``renorm_mean`` and ``renorm_std`` (this package's
        convention: Keras' ``renorm_momentum=0.99`` is 0.01 here).
    activation : None or "relu", default None
        Fused epilogue: the layer returns ``relu(bn(x) + residual)``, computed in the pass
        that writes the output; :meth:`backward` applies the ReLU's gradient first.

    Notes
    -----
    :meth:`backward` needs the input of the last forward call. The layer keeps a reference
    to it, as PyTorch does (a copy would cost more than the call itself on large inputs),
    and a sample of its values: a backward after ``x`` was modified (a data loader that
    refills its batch buffer) or overwritten (``out=x``) raises a RuntimeError instead of
    returning the gradient of other data. Pass a copy to the forward call if you must reuse
    the buffer first.
    A call that raises changes none of the layer's state; under warnings-as-errors the
    warning about non-finite batch statistics is raised before the layer stores anything
    (an ``out=`` buffer has been written by then).

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> layer = bn.BatchNorm(4, momentum=None, unbiased_running_var=False, dtype=np.float64)
    >>> batch = np.array([[4, 5, 2, 1], [3, 4, 6, 0], [1, 4, 7, 9]], dtype=np.float64)
    >>> y = layer(batch)                       # normalized with this batch's statistics
    >>> layer.running_mean * 3
    array([ 8., 13., 15., 10.])
    >>> _ = layer.eval()
    >>> np.round(layer(np.array([[3.0, 5, 7, 9]])), 2)   # inference: running statistics
    array([[0.27, 1.41, 0.93, 1.41]])
    """

    def __init__(
        self,
        num_features: int,
        *,
        axis: int = 1,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        unbiased_running_var: bool = True,
        dtype: Any = np.float32,
        check_finite: bool = False,
        virtual_batch_size: Optional[int] = None,
        renorm: bool = False,
        renorm_clipping: Optional[dict] = None,
        renorm_momentum: float = 0.01,
        activation: Optional[str] = None,
    ) -> None:
        c = _validation.integer(num_features, "num_features", "an integer >= 1", low=1)
        dt = np.dtype(dtype)
        if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype must be float32 or float64, got {dt}")
        if momentum is not None:
            momentum = _validation.fraction(momentum, "momentum")
        self.num_features = c
        self.axis = _validation.axis_index(axis)
        self.eps = _validation.eps(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.unbiased_running_var = bool(unbiased_running_var)
        self.dtype = dt
        self.check_finite = bool(check_finite)
        self.virtual_batch_size = None if virtual_batch_size is None else _validation.integer(
            virtual_batch_size, "virtual_batch_size", "an integer >= 2 or None", low=2)
        self.renorm = _validation.flag(renorm, "renorm")
        self.renorm_clipping = _renorm_clipping(renorm_clipping, self.renorm)
        self.renorm_momentum = _validation.fraction(renorm_momentum, "renorm_momentum")
        _validation.activation(activation)
        self.activation = activation
        if self.renorm and not self.track_running_stats:
            raise ValueError("renorm=True needs track_running_stats=True (r and d come from "
                             "running statistics)")
        self.training = True
        self.grad_gamma: Optional[np.ndarray] = None
        self.grad_beta: Optional[np.ndarray] = None
        self._gamma = self._beta = None
        self._running_mean = self._running_var = None
        self._running_std = self._renorm_mean = self._renorm_std = None
        self.num_batches_tracked: Optional[int] = None
        self._saved: Optional[tuple] = None  # what backward needs from the last forward
        self.reset_parameters()

    # --- state --------------------------------------------------------------------------

    def _checked_vector(self, value: Any, name: str) -> np.ndarray:
        """value as a (C,) vector in the layer's dtype, its values checked: no value that
        overflows the dtype; running statistics finite, the variance >= 0."""
        v = _validation.vector(value, self.num_features, name)
        with np.errstate(all="ignore"):  # the overflow is reported below, by name
            cast = v.astype(self.dtype)
        finite = np.isfinite(v)
        if name.startswith(("running_", "renorm_")) and not finite.all():
            raise ValueError(f"{name} must be finite, got NaN or inf in channel(s) "
                             f"{_channels(~finite)}")
        if (finite & ~np.isfinite(cast)).any():
            raise ValueError(f"{name} has values beyond the range of {self.dtype.name} in "
                             f"channel(s) {_channels(finite & ~np.isfinite(cast))}")
        if name in ("running_var", "running_std", "renorm_std") and (v < 0).any():
            raise ValueError(f"{name} must be non-negative, got negative values in "
                             f"channel(s) {_channels(v < 0)}")
        return cast

    def _vector_property(name: str, needs: str):  # noqa: N805 (a property factory)
        attr = "_" + name

        def get(self):
            return getattr(self, attr)

        def set(self, value):
            if not getattr(self, needs):
                raise AttributeError(f"{name} is None when {needs}=False")
            setattr(self, attr, self._checked_vector(value, name))

        return property(get, set, doc=f"{name}, shape (C,), in the layer's dtype (None when not {needs}).")

    gamma = _vector_property("gamma", "affine")
    beta = _vector_property("beta", "affine")
    running_mean = _vector_property("running_mean", "track_running_stats")
    running_var = _vector_property("running_var", "track_running_stats")
    running_std = _vector_property("running_std", "renorm")
    renorm_mean = _vector_property("renorm_mean", "renorm")
    renorm_std = _vector_property("renorm_std", "renorm")
    del _vector_property

    def reset_running_stats(self) -> None:
        """running_mean = 0, running_var = 1, num_batches_tracked = 0."""
        if self.track_running_stats:
            self._running_mean = np.zeros(self.num_features, self.dtype)
            self._running_var = np.ones(self.num_features, self.dtype)
            self.num_batches_tracked = 0
        if self.renorm:     # Keras' initial values: stds sqrt(running_var) = 1, mean 0
            self._running_std = np.ones(self.num_features, self.dtype)
            self._renorm_mean = np.zeros(self.num_features, self.dtype)
            self._renorm_std = np.ones(self.num_features, self.dtype)

    def set_running_stats(self, stats: Any, n_batches: Optional[int] = None) -> None:
        """Set the running statistics to exact statistics of a whole data set ("precise BN").

        ``running_mean = stats.mean`` and ``running_var = stats.var``, or
        ``stats.var * count / (count - 1)`` with ``unbiased_running_var`` (the layer's
        convention), in the layer's dtype. Give it :func:`merge_stats` of the
        :func:`batch_stats` of every batch, or :func:`batchnorm.dask.batch_stats` of the whole
        data set, to replace the exponential averages by the population statistics after
        training (or after the weights changed, as with SWA).

        ``torch.optim.swa_utils.update_bn`` and fvcore's ``update_bn_stats`` instead average
        the per-batch statistics with equal weights: the same mean when the batches are
        equally large, but a variance that leaves out the spread between the batch means
        (and the unbiased correction of each batch). See :doc:`processes`.

        Parameters
        ----------
        stats : Stats or (mean, var, count)
            Per-channel statistics, count >= 1 (>= 2 with ``unbiased_running_var``).
        n_batches : int, optional
            Stored in ``num_batches_tracked`` (``update_bn`` leaves the number of batches
            there); None leaves it as it is.

        Examples
        --------
        >>> import numpy as np, batchnorm as bn
        >>> rng = np.random.default_rng(0)
        >>> batches = [rng.normal(5.0, 2.0, size=(64, 3)) for _ in range(10)]
        >>> layer = bn.BatchNorm(3, dtype=np.float64)
        >>> st = bn.merge_stats(*map(bn.batch_stats, batches))
        >>> layer.set_running_stats(st, n_batches=10)
        >>> whole = np.concatenate(batches)
        >>> bool(np.allclose(layer.running_var, whole.var(axis=0, ddof=1), rtol=1e-13))
        True
        """
        if not self.track_running_stats:
            raise AttributeError("set_running_stats needs track_running_stats=True")
        st = merge_stats(stats)         # checked, as a Stats of float64 vectors
        if st.mean.shape[0] != self.num_features:
            raise ValueError(f"stats have {st.mean.shape[0]} channels; the layer has "
                             f"num_features={self.num_features}")
        least = 2 if self.unbiased_running_var else 1
        if np.any(np.asarray(st.count) < least):
            raise ValueError(f"stats.count must be >= {least} "
                             f"({'unbiased' if least == 2 else 'biased'} running variance), "
                             f"got {st.count}")
        if n_batches is not None:
            n_batches = _validation.integer(n_batches, "n_batches",
                                            "an integer in [0, 2**63) or None", 0, 2**63)
        var = st.unbiased_var() if self.unbiased_running_var else st.var
        mean = self._checked_vector(st.mean, "running_mean")
        var = self._checked_vector(var, "running_var")
        self._running_mean, self._running_var = mean, var
        if self.renorm:
            self._running_std = self._checked_vector(
                np.sqrt(var.astype(np.float64) + self.eps), "running_std")
        if n_batches is not None:
            self.num_batches_tracked = n_batches

    def reset_parameters(self) -> None:
        """gamma = 1, beta = 0, and the running statistics reset."""
        self.reset_running_stats()
        if self.affine:
            self._gamma = np.ones(self.num_features, self.dtype)
            self._beta = np.zeros(self.num_features, self.dtype)

    def state_dict(self) -> dict:
        """Copies of the parameters and running statistics, by name."""
        d = {}
        for key in _STATE_KEYS + (_RENORM_KEYS if self.renorm else ()):
            value = getattr(self, key)
            if value is not None:
                d[key] = value.copy() if isinstance(value, np.ndarray) else value
        return d

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Load what :meth:`state_dict` returned. All entries are checked before any is set.

        With ``strict=True`` the keys must be exactly those this layer has.
        """
        expected = set(self.state_dict())
        given = set(state)
        if strict and given != expected:
            raise KeyError(
                f"state keys do not match: missing {sorted(expected - given)}, "
                f"unexpected {sorted(given - expected)}"
            )
        new = {}
        for key in sorted(expected & given):
            if key == "num_batches_tracked":
                new[key] = _validation.integer(np.asarray(state[key]).item(), key,
                                               "an integer in [0, 2**63)", 0, 2**63)
            else:
                new["_" + key] = self._checked_vector(state[key], key)
        for key, value in new.items():
            setattr(self, key, value)

    def __getstate__(self) -> dict:
        d = self.__dict__.copy()
        d["_saved"] = None  # the last forward's input is not part of the layer
        return d

    def __repr__(self) -> str:
        shown = (("virtual_batch_size",) if self.virtual_batch_size else ()) + (
            ("renorm", "renorm_clipping", "renorm_momentum") if self.renorm else ()) + (
            ("activation",) if self.activation else ())
        variants = "".join(f", {k}={getattr(self, k)!r}" for k in shown)
        return (
            f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, dtype={self.dtype.name}"
            f"{variants})"
        )

    # --- mode ---------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "BatchNorm":
        """Training mode: batch statistics, running statistics updated. Returns self."""
        self.training = bool(mode)
        return self

    def eval(self) -> "BatchNorm":
        """Inference mode: running statistics (if tracked). Returns self."""
        return self.train(False)

    # --- computation --------------------------------------------------------------------

    def __call__(self, x: Any, *, mask: Any = None, residual: Any = None,
                 out: Optional[np.ndarray] = None) -> np.ndarray:
        """Normalize a batch; see the class docstring for which statistics are used.

        ``mask`` (training): the positions that count in the batch statistics, a boolean
        array of x's shape without the channel axis (or broadcasting to it); every position
        is normalized. ``residual``: added before the activation (the layer's ``activation``),
        in the same pass; :meth:`backward` then also returns its gradient.

        The parameters and running statistics go to the kernels as they are (in the layer's
        dtype); the route in ``_kernels`` checks ``x`` and ``out`` once.
        """
        # backward reads x again: keep a reference (a copy would cost more than the call on
        # large inputs) and a sample of its values, which backward checks (_check_input)
        x = _validation.as_array(x, "x")
        saved = None if out is not None and np.may_share_memory(out, x) else x
        sample = _sample(x) if saved is not None else None
        if mask is not None:    # split by rows with x (ghost batches): broadcast up front
            ax = _validation.channel_axis(self.axis, max(x.ndim, 1))
            mask = _validation.mask(mask, x.shape, ax)[0]
        if not self.training and self.track_running_stats:
            y = _kernels.forward_eval(
                x, self._running_mean, self._running_var, self._gamma, self._beta, self.axis,
                self.eps, out, self.check_finite, self.num_features, self.activation, residual,
            )
            steps = [(_ALL, (self._running_mean, self._running_var), self._gamma,
                      self._frozen_gradient, None)]
            mask = None         # frozen statistics: the mask changes nothing
        elif self.training and (self.virtual_batch_size or self.renorm):
            y, steps = self._train_in_steps(x, out, mask, residual)
        else:   # the plain training step, or eval mode without running statistics
            track = self.training and self.track_running_stats
            y, st, grad, running = self._normalize_batch(x, out, mask, residual, track)
            if track:
                self._store_running(running, stacklevel=3)
            steps = [(_ALL, st, self._gamma, grad, None)]
        # with an activation backward needs y too, checked as x is
        kept_y = (y, _sample(y)) if self.activation else None
        self._saved = (saved, sample, steps, mask, kept_y, residual is not None)
        return y

    forward = __call__

    # The two steps a subclass may change (SyncBatchNorm takes its statistics over all
    # processes): normalizing with the statistics of the batch, and its gradient.

    def _normalize_batch(self, x: np.ndarray, out: Optional[np.ndarray], mask: Any = None,
                         residual: Any = None, track: bool = False) -> tuple:
        """(y, the statistics used, the method that gives their gradient, and with `track`
        the running statistics after this batch: running_update's (mean, var), or None
        when they are not finite). The kernels update them in the normalizing call: on
        small inputs a separate update cost as much as the normalization."""
        res = _kernels.forward_train(
            x, self._gamma, self._beta, self.axis, self.eps, out, self.check_finite,
            self.num_features, mask, self.activation, residual,
            self._running_args() if track else None,
        )
        return res[0], res[1], self._batch_gradient, res[2] if track else None

    def _batch_gradient(self, dy: Any, x: Optional[np.ndarray], sample: Optional[bytes],
                        st: Any, gamma: Any, out: Optional[np.ndarray], mask: Any = None,
                        y: Any = None) -> tuple:
        return _kernels.backward(dy, _check_input(x, sample), st, gamma, self.axis, self.eps,
                                 True, out, self.check_finite, None, True, mask,
                                 self.activation, y)

    def _frozen_gradient(self, dy: Any, x: Optional[np.ndarray], sample: Optional[bytes],
                         st: Any, gamma: Any, out: Optional[np.ndarray], mask: Any = None,
                         y: Any = None) -> tuple:
        return _kernels.backward(dy, _check_input(x, sample), st, gamma, self.axis, self.eps,
                                 False, out, self.check_finite, None, True, None,
                                 self.activation, y)

    # --- ghost batches and batch renormalization ------------------------------------------

    def _groups(self, x: np.ndarray) -> list:
        """The slices of x's first axis that are normalized one after the other."""
        k, n = self.virtual_batch_size, x.shape[0] if x.ndim else 0
        if k is None or n == 0:
            return [_ALL]
        if _validation.channel_axis(self.axis, max(x.ndim, 1)) == 0:
            raise ValueError("virtual_batch_size splits the first axis, which is this layer's "
                             "channel axis (axis=0)")
        if n % k == 1:
            raise ValueError(f"virtual_batch_size={k} splits a batch of {n} rows into groups "
                             f"whose last holds one row, which has no batch statistics")
        return [slice(i, min(i + k, n)) for i in range(0, n, k)]

    def _train_in_steps(self, x: np.ndarray, out: Optional[np.ndarray], mask: Any,
                        residual: Any) -> tuple:
        """Training on each group of rows in turn (one group without virtual batches), the
        running statistics carried from group to group and stored only when all succeeded."""
        groups = self._groups(x)
        if len(groups) > 1:
            if out is not None:
                _validation.output(out, x)
            if residual is not None:
                residual = _validation.as_array(residual, "residual")
                if residual.shape != x.shape:
                    raise ValueError(f"residual must have the shape of x, {x.shape}, got "
                                     f"{residual.shape}")
        state = self._running_state()
        y, steps = out, []
        for rows in groups:
            xg = x[rows]
            yg, st, gamma, grad, rd = self._train_step(
                xg, None if y is None else y[rows], state, None if mask is None else mask[rows],
                None if residual is None else residual[rows])
            if y is None:
                y = yg if len(groups) == 1 else np.empty_like(x, dtype=yg.dtype)
                if len(groups) > 1:
                    y[rows] = yg
            if state is not None:
                state = self._running_update(state, st, rd is not None)
            steps.append((rows, st, gamma, grad, rd))
        self._commit(state, stacklevel=4)
        return y, steps

    def _train_step(self, x: np.ndarray, out: Optional[np.ndarray], state: Optional[dict],
                    mask: Any = None, residual: Any = None) -> tuple:
        """(y, statistics, the gamma the kernels used, gradient, (r, d) or None), with the
        running statistics ``state`` as the previous groups left them."""
        if not self.renorm:
            y, st, grad, _ = self._normalize_batch(x, out, mask, residual)
            return y, st, self._gamma, grad, None
        st = _kernels.batch_stats(x, self.axis, self.check_finite, self.num_features, mask)
        ax = _validation.channel_axis(self.axis, x.ndim)
        if mask is None:
            _kernels.training_count(x, ax, st.count)
        else:
            _kernels.masked_count(x, ax, _count(st))
        r, d = self._renorm_correction(st, state)
        g = 1.0 if self._gamma is None else self._gamma.astype(np.float64)
        b = 0.0 if self._beta is None else self._beta.astype(np.float64)
        # (xhat * r + d) * gamma + beta = xhat * (r * gamma) + (d * gamma + beta): one pass
        gamma = r * g
        y = _kernels.forward_eval(x, st.mean, st.var, gamma, d * g + b, self.axis, self.eps,
                                  out, False, self.num_features, self.activation, residual)
        return y, st, gamma, self._batch_gradient, (r, d)

    def _renorm_correction(self, st: Stats, state: dict) -> tuple:
        """r and d of this batch, from the renorm statistics before its update (Keras 3)."""
        with np.errstate(all="ignore"):  # non-finite statistics give non-finite r, d (as y)
            floor = np.maximum(state["renorm_std"].astype(np.float64), math.sqrt(self.eps))
            r = np.sqrt(st.var + self.eps) / floor
            d = (st.mean - state["renorm_mean"].astype(np.float64)) / floor
        clip = self.renorm_clipping
        if "rmin" in clip:
            r = np.maximum(r, clip["rmin"])
        if "rmax" in clip:
            r = np.minimum(r, clip["rmax"])
        if "dmax" in clip:
            d = np.clip(d, -clip["dmax"], clip["dmax"])
        return r, d

    # --- running statistics -------------------------------------------------------------

    def _running_state(self) -> Optional[dict]:
        if not self.track_running_stats:
            return None
        state = {"running_mean": self._running_mean, "running_var": self._running_var,
                 "num_batches_tracked": self.num_batches_tracked}
        if self.renorm:
            state.update((key, getattr(self, "_" + key)) for key in _RENORM_KEYS)
        return state

    def _running_update(self, state: Optional[dict], st: Stats,
                        renorm: bool = False) -> Optional[dict]:
        """The running statistics after a batch with statistics st; None (warned about
        when committed) if they are not finite. ``renorm``: batch renormalization's update
        (standard deviations averaged, as Keras 3 does), whose r and d this batch used.
        A batch whose statistics are not finite leaves them as they are, flagged."""
        if state is None:
            return None
        n = state["num_batches_tracked"] + 1
        m = self._momentum(n)
        if not renorm:
            new = _kernels.running_update(state["running_mean"], state["running_var"], st.mean,
                                          st.var, _count(st), m, self.unbiased_running_var)
            if new is None:
                return {**state, "not_finite": True}
            return {**state, "running_mean": new[0], "running_var": new[1],
                    "num_batches_tracked": n}
        with np.errstate(all="ignore"):
            var = st.var * (st.count / (st.count - 1)) if self.unbiased_running_var else st.var
            std_running, std_batch = np.sqrt(var + self.eps), np.sqrt(st.var + self.eps)
        moving = _kernels.running_update(state["running_mean"], state["running_std"], st.mean,
                                         std_running, _count(st), m, False)
        tracked = _kernels.running_update(state["renorm_mean"], state["renorm_std"], st.mean,
                                          std_batch, _count(st), self.renorm_momentum, False)
        if moving is None or tracked is None:
            return {**state, "not_finite": True}
        running_var = np.maximum(moving[1].astype(np.float64) ** 2 - self.eps, 0.0)
        return {**state, "running_mean": moving[0], "running_std": moving[1],
                "running_var": running_var.astype(self.dtype), "renorm_mean": tracked[0],
                "renorm_std": tracked[1], "num_batches_tracked": n}

    def _momentum(self, n_batches: int) -> float:
        """The weight of batch number n_batches (from 1) in the running statistics."""
        return 1.0 / n_batches if self.momentum is None else self.momentum

    def _running_args(self) -> tuple:
        """What the kernels' running update takes besides the batch: (running_mean,
        running_var, momentum, unbiased)."""
        return (self._running_mean, self._running_var,
                self._momentum(self.num_batches_tracked + 1), self.unbiased_running_var)

    def _store_running(self, running: Optional[tuple], stacklevel: int) -> None:
        """Store the plain training call's new running (mean, var); None: the batch's
        statistics were not finite, and they stay as they were (warned about)."""
        if running is None:
            self._warn_not_finite(stacklevel)
            return
        self._running_mean, self._running_var = running
        self.num_batches_tracked += 1

    def _warn_not_finite(self, stacklevel: int) -> None:
        """The warning for running statistics left as they were; stacklevel as the caller
        would give it to warnings.warn."""
        warnings.warn(
            f"batch statistics are not finite (NaN or inf in the input, or beyond the "
            f"range of {self.dtype.name}): the running statistics were not updated"
            f"{' from those groups' if self.virtual_batch_size else ''}",
            RuntimeWarning, stacklevel=stacklevel + 1)

    def _commit(self, state: Optional[dict], stacklevel: int) -> None:
        """Store the running statistics of a call that succeeded."""
        if state is None:
            return
        if state.pop("not_finite", False):
            self._warn_not_finite(stacklevel)
        for key, value in state.items():
            setattr(self, key if key == "num_batches_tracked" else "_" + key, value)

    def backward(self, dy: Any, *, out: Optional[np.ndarray] = None) -> Any:
        """Gradient with respect to the input of the last forward call: dx, or ``(dx, dz)``
        when that call had a residual (dz, its gradient, is that of ``bn(x) + residual``).

        Sets ``grad_gamma`` and ``grad_beta`` (when affine). After a training-mode forward the
        gradient flows through the batch statistics (the unmasked positions', with a mask);
        after an eval-mode forward they are constants. With ghost batches each group's
        gradient is that of its own statistics (gamma's and beta's are summed over the
        groups); with renorm, r and d are constants. With an activation the forward's
        output is read again: modified since, it raises a RuntimeError, as x does.
        """
        if self._saved is None:
            raise RuntimeError("backward() needs a forward call first")
        x, sample, steps, mask, kept_y, had_residual = self._saved
        y = None
        if kept_y is not None:
            y = kept_y[0]
            if _sample(y) != kept_y[1]:
                raise RuntimeError("backward() needs the forward output (for the activation's "
                                   "gradient), which was modified after the forward call; "
                                   "call backward before reusing it")
        dz = None
        if len(steps) == 1:
            _, st, gamma, gradient, rd = steps[0]
            grads = gradient(dy, x, sample, st, gamma, out, mask, y)
            dx, dgamma, dbeta = grads[:3]
            dz = grads[3] if len(grads) == 4 else None
            dgamma = _renorm_dgamma(dgamma, dbeta, rd)
        else:
            x = _check_input(x, sample)
            dy = _validation.as_array(dy, "dy")
            if dy.shape != x.shape:
                raise ValueError(f"dy must have the shape of x, {x.shape}, got {dy.shape}")
            if out is not None:
                _validation.output(out, x)
            dx, dgamma, dbeta = out, 0.0, 0.0
            for rows, st, gamma, gradient, rd in steps:
                xg = x[rows]
                grads = gradient(dy[rows], xg, _sample(xg), st, gamma,
                                 None if dx is None else dx[rows],
                                 None if mask is None else mask[rows],
                                 None if y is None else y[rows])
                if dx is None:
                    dx = np.empty_like(x, dtype=grads[0].dtype)
                    dx[rows] = grads[0]
                if len(grads) == 4:
                    if dz is None:
                        dz = np.empty_like(dx)
                    dz[rows] = grads[3]
                dgamma, dbeta = dgamma + _renorm_dgamma(grads[1], grads[2], rd), dbeta + grads[2]
        if self.affine:
            self.grad_gamma = np.asarray(dgamma).astype(self.dtype, copy=False)
            self.grad_beta = np.asarray(dbeta).astype(self.dtype, copy=False)
        if not had_residual:
            return dx
        # without an activation the sum passes dy on unchanged, as autograd's add does
        return dx, (dz if dz is not None else _validation.as_array(dy, "dy"))


def _count(st: Any) -> int:
    """The values per channel of statistics from the kernels: masked ones carry per-channel
    counts, all equal (a mask has no channel axis)."""
    n = st.count    # (np.ndim would cost a microsecond a call)
    return int(n) if isinstance(n, (int, np.integer)) else int(n[0])


# The whole batch, as the one "group" of a call without virtual batches.
_ALL = slice(None)


def _renorm_dgamma(dgamma: np.ndarray, dbeta: np.ndarray, rd: Optional[tuple]) -> np.ndarray:
    """gamma's gradient: sum(dy * xhat) from the kernels, or with renorm (the kernels saw
    r * gamma) sum(dy * (xhat * r + d))."""
    if rd is None:
        return dgamma
    r, d = rd
    return r * dgamma + d * dbeta


def _renorm_clipping(clipping: Any, renorm: bool) -> dict:
    """renorm_clipping checked: keys rmax (>= 1), rmin (in [0, 1]), dmax (>= 0), all
    optional; given only with renorm=True."""
    if clipping is None:
        return {}
    if not renorm:
        raise ValueError("renorm_clipping is given but renorm=False")
    if not isinstance(clipping, dict):
        raise TypeError(f"renorm_clipping must be a dict with keys among {_CLIPPING_KEYS}, "
                        f"got {type(clipping).__name__}")
    unknown = set(clipping) - set(_CLIPPING_KEYS)
    if unknown:
        raise ValueError(f"renorm_clipping has unknown keys {sorted(unknown)}; expected "
                         f"some of {_CLIPPING_KEYS}")
    clip = {}
    for key, value in clipping.items():
        if value is None:       # Keras' way of saying "no limit"
            continue
        if isinstance(value, (bool, np.bool_, str, bytes)):
            raise TypeError(f"renorm_clipping[{key!r}] must be a number, got {value!r}")
        clip[key] = float(value)
    limits = {"rmax": (1.0, math.inf, ">= 1"), "rmin": (0.0, 1.0, "in [0, 1]"),
              "dmax": (0.0, math.inf, ">= 0")}
    for key, v in clip.items():
        low, high, what = limits[key]
        if not low <= v <= high:    # (NaN fails too)
            raise ValueError(f"renorm_clipping[{key!r}] must be {what} (r = 1, d = 0 must "
                             f"stay allowed), got {v}")
    return clip
