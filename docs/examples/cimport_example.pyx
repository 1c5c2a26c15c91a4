# cython: language_level=3, boundscheck=False, wraparound=False
"""Another extension module calling batchnorm's kernels directly, without the GIL.

Compiled and run by tests/test_guide.py; see docs/c_cython.rst.
"""
import numpy as np

from batchnorm cimport _kernels


def normalize_features(double[:, ::1] x, double eps=1e-5):
    """Training-mode BN of an (N, D) float64 batch: returns (y, mean, var)."""
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1]
    y = np.empty((n, d))
    mean, var = np.empty(d), np.empty(d)
    # (N, D) seen as (outer, channels, inner) = (N, D, 1)
    cdef const double[:, :, :] x3 = np.asarray(x).reshape(n, d, 1)
    cdef double[:, :, :] y3 = y.reshape(n, d, 1)
    cdef double[::1] m = mean, v = var
    cdef const double[::1] no_gamma = None, no_beta = None   # None: scale 1, shift 0
    cdef int rc
    with nogil:
        rc = _kernels.forward_train_f64(x3, y3, no_gamma, no_beta, eps, m, v)
    if rc != 0:
        raise ValueError(f"batchnorm kernel error {rc}")
    return y, mean, var
