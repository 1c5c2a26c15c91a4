"""SyncBatchNorm: a BatchNorm whose training statistics are those of all processes' batches.

The transport is the caller's MPI communicator (mpi4py's buffer interface); nothing here
imports mpi4py. One Allgather per training forward carries each rank's (count, mean, var)
per channel, which every rank merges in rank order (Chan's formula, as ``merge_stats``), so all
ranks hold bit-identical statistics. One Allgather per training backward carries each rank's
sums of dy and dy * xhat, added in rank order; the C core's ``bn_backward_total`` turns them
into this rank's rows of dx. Every buffer also carries a flag: a rank whose arguments are
wrong tells the others, and every rank raises instead of one hanging in the next collective.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _kernels, _validation
from ._layer import BatchNorm, _check_input
from ._stats import Stats

__all__ = ["SyncBatchNorm"]

_OK, _FAILED = 0.0, 1.0


def _communicator(comm: Any) -> tuple:
    """(size, rank) of an mpi4py-like communicator, or a TypeError naming comm."""
    needed = ("Allgather", "Get_size", "Get_rank")
    if not all(callable(getattr(comm, name, None)) for name in needed):
        raise TypeError(
            f"comm must be an MPI communicator with mpi4py's buffer methods (Allgather, "
            f"Get_size, Get_rank), e.g. mpi4py.MPI.COMM_WORLD; got {type(comm).__name__}")
    size, rank = int(comm.Get_size()), int(comm.Get_rank())
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"comm reports rank {rank} of size {size}")
    return size, rank


class SyncBatchNorm(BatchNorm):
    """Batch normalization over a batch split across processes (data-parallel training).

    In training mode every rank normalizes its rows with the statistics of the union of all
    ranks' batches, and the running statistics, updated from those (the unbiased variance
    with the global count), are identical on all ranks. ``backward`` gives this rank's rows of
    the gradient of the whole batch; ``grad_gamma`` and ``grad_beta`` are this rank's
    contributions, as in PyTorch, so that summing them over ranks (as data-parallel training
    does for every parameter) gives the full gradient. In eval mode it is a BatchNorm and
    communicates nothing.

    Parameters
    ----------
    num_features : int
    comm : communicator
        Any object with mpi4py's ``Allgather``, ``Get_size`` and ``Get_rank``, e.g.
        ``mpi4py.MPI.COMM_WORLD``. Every rank of it must build the layer (the constructor
        checks, with one collective, that all ranks agree on ``num_features``) and make the
        same training calls in the same order.
    **kwargs
        As for :class:`BatchNorm` (axis, eps, momentum, affine, track_running_stats,
        unbiased_running_var, dtype, check_finite).

    Notes
    -----
    One collective per training forward and one per backward, whatever C: the per-channel
    quantities travel in one float64 buffer of 2 * C + 2 values per rank. Ranks may hold
    batches of different sizes, including none (shape (0, C, ...)); the union must hold at
    least two values per channel. A rank whose input is wrong (channel count, dtype, shape of
    dy) raises its own error and the other ranks raise a RuntimeError naming it; no rank
    changes its state. A rank that skips the call altogether cannot be detected: the others
    wait in the collective, as with any MPI program.

    Examples
    --------
    Run with ``mpiexec -n 2 python script.py`` (docs/examples/sync_batchnorm.py is a
    complete script)::

        import numpy as np, batchnorm as bn
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        layer = bn.SyncBatchNorm(4, comm)
        x = np.random.default_rng(comm.Get_rank()).normal(size=(8, 4)).astype(np.float32)
        y = layer(x)                        # normalized with the statistics of all ranks' rows
        dx = layer.backward(np.ones_like(y))
    """

    def __init__(self, num_features: int, comm: Any, **kwargs: Any) -> None:
        for variant in ("virtual_batch_size", "renorm", "renorm_clipping", "activation"):
            if kwargs.get(variant):
                raise NotImplementedError(f"SyncBatchNorm does not take {variant} (yet): "
                                          f"its statistics are those of all ranks' batches")
        super().__init__(num_features, **kwargs)
        self._size, self._rank = _communicator(comm)
        self.comm = comm
        # every rank must size its buffers alike: a mismatch found now, on every rank,
        # rather than a hang or a truncated message in the first forward call
        counts = self._allgather(np.array([float(self.num_features)]))[:, 0]
        if (counts != counts[0]).any():
            raise ValueError(
                f"SyncBatchNorm: the ranks disagree on num_features: "
                f"{dict(enumerate(counts.astype(int).tolist()))}")

    @classmethod
    def from_batchnorm(cls, layer: BatchNorm, comm: Any) -> "SyncBatchNorm":
        """A SyncBatchNorm with the configuration and state of ``layer`` (e.g. one loaded from
        a checkpoint), as PyTorch's ``convert_sync_batchnorm`` does for one layer."""
        if not isinstance(layer, BatchNorm):
            raise TypeError(f"layer must be a BatchNorm, got {type(layer).__name__}")
        if layer.virtual_batch_size or layer.renorm or layer.activation:
            raise NotImplementedError("SyncBatchNorm does not take ghost batches, renorm or a "
                                      "fused activation (yet): this layer has "
                                      + ("virtual_batch_size" if layer.virtual_batch_size
                                         else "renorm=True" if layer.renorm
                                         else f"activation={layer.activation!r}"))
        new = cls(layer.num_features, comm, axis=layer.axis, eps=layer.eps,
                  momentum=layer.momentum, affine=layer.affine,
                  track_running_stats=layer.track_running_stats,
                  unbiased_running_var=layer.unbiased_running_var, dtype=layer.dtype,
                  check_finite=layer.check_finite)
        new.load_state_dict(layer.state_dict())
        new.training = layer.training
        return new

    def __repr__(self) -> str:
        return "Sync" + super().__repr__()[:-1] + f", ranks={self._size})"

    def __getstate__(self) -> dict:
        raise TypeError("a SyncBatchNorm holds a communicator, which cannot be pickled; "
                        "pickle its state_dict() instead")

    # --- the exchange -------------------------------------------------------------------

    def _allgather(self, send: np.ndarray) -> np.ndarray:
        recv = np.empty((self._size, send.shape[0]))
        self.comm.Allgather(send, recv)
        return recv

    def _exchange(self, send: np.ndarray, error: Optional[BaseException]) -> np.ndarray:
        """All ranks' buffers, row by row; raises on every rank if any rank failed (its own
        error on that rank). send[0] is the flag, set here."""
        send[0] = _FAILED if error is not None else _OK
        recv = self._allgather(send)
        failed = np.flatnonzero(recv[:, 0] != _OK)
        if error is not None:
            raise error
        if failed.size:
            raise RuntimeError(
                f"SyncBatchNorm: rank(s) {', '.join(map(str, failed))} of {self._size} "
                f"could not take this call (see the error there); no rank changed its state")
        return recv

    # --- training: the statistics and the gradient of the whole batch -------------------

    def __call__(self, x: Any, *, mask: Any = None, residual: Any = None,
                 out: Optional[np.ndarray] = None) -> np.ndarray:
        if mask is not None or residual is not None:    # refused alike on every rank
            raise NotImplementedError("SyncBatchNorm does not take a mask or a residual (yet): "
                                      "its statistics are those of all ranks' batches")
        if self.training:
            try:
                x = _validation.as_array(x, "x")
            except (TypeError, ValueError) as e:    # the other ranks must hear of it
                self._exchange(np.zeros(2 * self.num_features + 2), e)
        return super().__call__(x, out=out)

    forward = __call__

    def _normalize_batch(self, x: np.ndarray, out: Optional[np.ndarray], mask: Any = None,
                         residual: Any = None, track: bool = False) -> tuple:
        if not self.training:   # eval without running statistics: this rank's batch alone
            return super()._normalize_batch(x, out)
        C = self.num_features
        send, error = np.zeros(2 * C + 2), None
        try:
            local = _kernels.batch_stats(x, self.axis, self.check_finite, C)
            if out is not None:
                _validation.output(out, x)
            send[1], send[2:C + 2], send[C + 2:] = local.count, local.mean, local.var
        except (TypeError, ValueError) as e:
            error = e
        recv = self._exchange(send, error)
        # merge_stats' arithmetic, on the rows as they came (checked by each rank's kernel)
        counts = np.broadcast_to(recv[:, 1:2], (recv.shape[0], C))
        mean, var = _kernels.merge_parts(counts, recv[:, 2:C + 2], recv[:, C + 2:])
        st = Stats(mean, var, int(recv[:, 1].sum()))
        if st.count < 2:
            raise ValueError(
                f"training needs more than one value per channel over all ranks; the "
                f"{self._size} ranks' batches hold {st.count} together")
        y = _kernels.forward_eval(x, st.mean, st.var, self._gamma, self._beta, self.axis,
                                  self.eps, out, False, C)
        running = None
        if track:
            rm, rv, momentum, unbiased = self._running_args()
            running = _kernels.running_update(rm, rv, st.mean, st.var, st.count, momentum,
                                              unbiased)
        return y, st, self._sync_gradient, running

    def _sync_gradient(self, dy: Any, x: Optional[np.ndarray], sample: Optional[bytes],
                       st: Stats, gamma: Any, out: Optional[np.ndarray], mask: Any = None,
                       y: Any = None) -> tuple:
        C = self.num_features
        send, error = np.zeros(2 * C + 1), None
        try:
            x = _check_input(x, sample)
            # this rank's sums of dy and dy * xhat, with the whole batch's statistics
            _, dgamma, dbeta = _kernels.backward(dy, x, st, gamma, self.axis, self.eps, False,
                                                 None, self.check_finite, None, False)
            if out is not None:
                _validation.output(out, x)
            send[1:C + 1], send[C + 1:] = dbeta, dgamma
        except (TypeError, ValueError, RuntimeError) as e:
            error = e
        recv = self._exchange(send, error)
        sum_dy, sum_dy_xhat = recv[0, 1:C + 1].copy(), recv[0, C + 1:].copy()
        for row in recv[1:]:        # in rank order: the same bits on every rank
            sum_dy += row[1:C + 1]
            sum_dy_xhat += row[C + 1:]
        dx, _, _ = _kernels.backward(dy, x, st, gamma, self.axis, self.eps, True, out, False,
                                     (st.count, sum_dy, sum_dy_xhat))
        return dx, dgamma, dbeta
