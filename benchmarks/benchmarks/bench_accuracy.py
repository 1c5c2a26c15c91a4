"""Accuracy against the float64 reference (batchnorm.reference), as max error / scale.

For each result the error is ``max |result - reference| / max |reference|`` (for the mean,
relative to the standard deviation, the scale it is used at); the figure tracked is the worst
over the op's results: mean and var for batch_stats; y for the forwards; dx, dgamma, dbeta for
backward. Data "3+2N": x = 3 + 2 * normal; "1000+N": x = 1000 + normal, where a one-pass sum
of squares in float32 would lose every digit. float32 results cannot do
better than about 6e-8 (half an ulp); float64 about 1e-16.
"""

from __future__ import annotations

import numpy as np

import batchnorm as bn
from batchnorm import reference

from .common import DTYPES, LAYOUTS, inputs

# small (one thread), C = 251 (vector tails), and a long reduction (25088 values a channel,
# cut into chunks over threads); the 2-D layout is the nhwc one (C contiguous).
ACCURACY_SHAPES = ["8x32x8x8", "32x251x7x7", "8x64x56x56"]
DATA = {"3+2N": (3.0, 2.0), "1000+N": (1000.0, 1.0)}
OPS = ["batch_stats", "forward_train", "forward_eval", "backward"]


def _err(got, ref, scale=None) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    scale = np.abs(ref).max() if scale is None else scale
    return float(np.abs(np.asarray(got, dtype=np.float64) - ref).max() / max(scale, 1e-300))


def _error(x, dy, axis, gamma, beta, op) -> float:
    st_ref = reference.batch_stats(x, axis=axis)
    if op == "batch_stats":
        st = bn.batch_stats(x, axis=axis)
        return max(_err(st.mean, st_ref.mean, float(np.sqrt(st_ref.var.max()))),
                   _err(st.var, st_ref.var))
    if op == "forward_train":
        y, _ = bn.forward_train(x, gamma, beta, axis=axis)
        y_ref, _ = reference.forward_train(x, gamma, beta, axis=axis)
        return _err(y, y_ref)
    if op == "forward_eval":
        y = bn.forward_eval(x, st_ref.mean, st_ref.var, gamma, beta, axis=axis)
        return _err(y, reference.forward_eval(x, st_ref.mean, st_ref.var, gamma, beta,
                                              axis=axis))
    st = bn.batch_stats(x, axis=axis)
    got = bn.backward(dy, x, st, gamma, axis=axis)
    ref = reference.backward(dy, x, st_ref, gamma, axis=axis)
    return max(_err(a, r) for a, r in zip(got, ref))


class Accuracy:
    params = [ACCURACY_SHAPES, LAYOUTS, DTYPES, OPS, list(DATA)]
    param_names = ["shape", "layout", "dtype", "op", "data"]
    unit = "max error / scale"
    timeout = 120

    def setup(self, shape, layout, dtype, op, data):
        loc, scale = DATA[data]
        self.inputs = inputs(shape, layout, dtype, loc=loc, scale=scale)

    def track_max_error(self, shape, layout, dtype, op, data):
        return _error(*self.inputs, op)
