"""Per-channel batch statistics, the value the functions return and the layer keeps.

A module of its own so that the functions, the layer and the Cython route all import it
directly. ``merge_stats`` combines the statistics of parts of a batch (or of a data set)
into those of the whole: what SyncBatchNorm and ``batchnorm.dask`` build on.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import _validation

__all__ = ["Stats", "merge_stats"]


class Stats(NamedTuple):
    """Per-channel batch statistics.

    Attributes
    ----------
    mean : ndarray, float64, shape (C,)
        Mean of each channel over the batch (and spatial) axes.
    var : ndarray, float64, shape (C,)
        Biased variance (divided by ``count``): the one used to normalize.
    count : int, or ndarray of int64, shape (C,)
        Number of values per channel (``x.size // C``); with a mask, the per-channel counts
        of unmasked values (equal across channels, as a mask has no channel axis). An empty
        batch has count 0 (and
        mean 0, var 0): it adds nothing in :func:`merge_stats`.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> st = bn.batch_stats(np.array([[1.0, 2.0], [3.0, 6.0]]))
    >>> st.mean, st.var, st.count
    (array([2., 4.]), array([1., 4.]), 2)
    >>> st.unbiased_var()
    array([2., 8.])
    """

    mean: np.ndarray
    var: np.ndarray
    count: int

    def unbiased_var(self) -> np.ndarray:
        """Variance divided by ``count - 1`` (PyTorch's running-variance convention)."""
        n = np.asarray(self.count)
        if (n < 2).any():
            raise ValueError(f"the unbiased variance needs count >= 2, got count={self.count}")
        return self.var * (n / (n - 1))


def _part(st: Any, i: int) -> tuple:
    """(mean, var, count) of argument i, checked: float64 vectors and a count >= 0, an int or
    per-channel integers (masked statistics)."""
    if not isinstance(st, tuple) or len(st) != 3:
        hint = (" (to merge a list of Stats, unpack it: merge_stats(*parts))"
                if isinstance(st, (list, tuple)) and st and isinstance(st[0], tuple) else "")
        raise TypeError(f"merge_stats: argument {i} must be a Stats or a (mean, var, count) "
                        f"tuple, got {type(st).__name__}{hint}")
    mean, var, count = st
    mean = np.asarray(mean)
    c = mean.shape[0] if mean.ndim == 1 else -1
    if c < 0:
        raise ValueError(f"merge_stats: argument {i} has mean of shape {mean.shape}; "
                         f"expected (C,)")
    if isinstance(count, np.ndarray) and count.ndim == 1:
        if count.shape != (c,) or count.dtype.kind not in "iu" or (count < 0).any():
            raise ValueError(f"merge_stats: argument {i}'s count must be an integer >= 0 or "
                             f"{c} per-channel integers >= 0, got {count!r}")
        n = count.astype(np.int64)
    else:
        n = _validation.integer(count, f"merge_stats: argument {i}'s count",
                                "an integer >= 0", low=0)
    mean = _validation.vector(mean, c, f"argument {i}: mean")
    var = _validation.vector(var, c, f"argument {i}: var")
    if (var < 0).any():
        raise ValueError(f"merge_stats: argument {i} has a negative variance")
    return mean, var, n


def merge_stats(*stats: Any) -> Stats:
    """The statistics of the union of several batches, from the statistics of each.

    Chan's parallel formula on (count, mean, biased var) in float64, merged pairwise in the
    order given: a fixed tree, so the result is deterministic for a given order. It agrees
    with the statistics of the concatenated data up to the rounding of the parts' means,
    about ``1e-16 * abs(mean) / std`` relative in the variance (1e-12 for data 1e4 away from
    zero with std 1, a few 1e-15 near zero). A part with count 0 (an empty batch) adds nothing,
    whatever its mean and var hold. This is what a batch split across processes needs:
    neither the mean of the per-part variances nor E[x^2] - E[x]^2 gives the variance of
    the union (``python -m batchnorm explain --topic processes`` shows the numbers).

    Parameters
    ----------
    *stats : Stats, or (mean, var, count) tuples
        One or more, all with the same number of channels C. A count is an int, or the
        per-channel counts of masked statistics (then the merged count is per channel too).

    Returns
    -------
    Stats
        float64 ``mean`` and biased ``var`` of shape (C,), and the total ``count``; all zero
        when every part is empty.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> a = np.array([[1.0], [2.0], [3.0]]); b = np.array([[10.0], [11.0]])
    >>> st = bn.merge_stats(bn.batch_stats(a), bn.batch_stats(b))
    >>> st.count, st.mean, np.round(st.var, 12)
    (5, array([5.4]), array([17.84]))
    >>> whole = bn.batch_stats(np.concatenate([a, b]))
    >>> bool(np.allclose(st.var, whole.var, rtol=1e-14))
    True
    >>> same = bn.merge_stats(st, bn.batch_stats(np.zeros((0, 1))))  # an empty batch
    >>> same.count, bool(same.mean == st.mean), bool(same.var == st.var)
    (5, True, True)
    """
    if not stats:
        raise TypeError("merge_stats needs at least one Stats")
    parts = [_part(st, i) for i, st in enumerate(stats)]
    c = parts[0][0].shape[0]
    for i, (m, _, _) in enumerate(parts):
        if m.shape[0] != c:
            raise ValueError(f"merge_stats: argument {i} has {m.shape[0]} channels; "
                             f"argument 0 has {c}")
    total = sum(n for _, _, n in parts)
    if len(parts) == 1:
        m, v, n = parts[0]
        if np.ndim(n):
            return Stats(np.where(n > 0, m, 0.0), np.where(n > 0, v, 0.0), n.copy())
        return Stats(m.copy(), v.copy(), n) if n else Stats(np.zeros(c), np.zeros(c), 0)
    from . import _kernels      # compiled; imported here, as _kernels imports this module

    counts = np.array([np.broadcast_to(np.asarray(n, dtype=np.float64), (c,))
                       for _, _, n in parts]) if c else np.zeros((len(parts), 0))
    mean, var = _kernels.merge_parts(counts, np.stack([m for m, _, _ in parts]),
                                     np.stack([v for _, v, _ in parts]))
    return Stats(mean, var, total)
