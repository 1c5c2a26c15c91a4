"""Batch normalization for NumPy arrays on the CPU: fast, exact, and explained.

>>> import numpy as np, batchnorm as bn
>>> x = np.random.default_rng(0).normal(3.0, 2.0, size=(32, 8, 5, 5)).astype(np.float32)
>>> y, st = bn.forward_train(x)                 # statistics per channel, over N, H, W
>>> st.mean.shape, y.dtype
((8,), dtype('float32'))
>>> bool(abs(y.mean(axis=(0, 2, 3))).max() < 1e-5)
True

Run ``python -m batchnorm explain`` for a walk through what batch normalization computes.
"""

from ._api import (
    Stats,
    backward,
    batch_stats,
    forward_eval,
    forward_train,
    get_num_threads,
    set_num_threads,
    supported_dtypes,
)
from ._config import available_isas, config, show_config
from ._fold import fold
from ._layer import BatchNorm
from ._stats import merge_stats
from ._sync import SyncBatchNorm
from . import convert  # noqa: E402  (after BatchNorm, which it builds)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "Stats",
    "SyncBatchNorm",
    "available_isas",
    "backward",
    "batch_stats",
    "config",
    "convert",
    "forward_eval",
    "fold",
    "forward_train",
    "get_num_threads",
    "merge_stats",
    "set_num_threads",
    "show_config",
    "supported_dtypes",
]
