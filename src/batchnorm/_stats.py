"""Per-channel batch statistics, the value the functions return and the layer keeps.

A module of its own so that the functions, the layer and the Cython route all import it
directly.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Stats"]


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
        if self.count < 2:
            raise ValueError(f"the unbiased variance needs count >= 2, got count={self.count}")
        return self.var * (self.count / (self.count - 1))
