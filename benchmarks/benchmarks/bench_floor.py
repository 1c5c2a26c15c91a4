"""The ratio of each operation's time to its memory floor, measured in the same method.

The floor is the fastest of NumPy's copy ``x -> y`` on one thread and over slices in as many
threads as batchnorm uses (``x + dy -> dx`` for backward); see common.Floor. The operation
writes into a preallocated ``out=``; every destination lies half a page from x (common.apart);
statistics only read ``x`` and are quoted against the copy too (their ideal is below 1). float32. Floor and operation run round-robin, and the
ratio is that of the fastest samples (common.interleaved_ratio): the ratio is what to compare
across commits, the absolute times move with machine load.

RatioToFloor: batchnorm's default threads (all cores), as in issue 3's targets. On a shared
2-core virtual machine two threads are at the mercy of the host (the ratio moved by up to
1.5x between runs), so these are for watching, not for flagging.
RatioToFloorOneThread: the same on one thread (batchnorm and the floor), over shapes that stay
in one core's cache (common.REGRESSION_SHAPES), whose ratios moved by a few percent between
runs: the kernels' part of the regression set (benchmarks/README.md).
"""

from __future__ import annotations

import numpy as np

import batchnorm as bn

from .common import LAYOUTS, REGRESSION_SHAPES, SHAPES, Floor, apart, inputs, interleaved_ratio

OPS = ["batch_stats", "forward_train", "forward_eval", "backward"]


class RatioToFloor:
    params = [SHAPES, LAYOUTS, OPS]
    param_names = ["shape", "layout", "op"]
    unit = "time / floor"
    timeout = 180
    threads = None      # batchnorm's default

    def setup(self, shape, layout, op):
        self.x, self.dy, self.axis, self.gamma, self.beta = inputs(shape, layout, "float32")
        self.out = apart(self.x)        # outputs half a page from x (common.apart)
        self.out[...] = 0
        self.st = bn.batch_stats(self.x, axis=self.axis)
        bn.set_num_threads(self.threads)
        self.floor = Floor(bn.get_num_threads())

    def teardown(self, *params):
        if hasattr(self, "floor"):  # setup may have skipped this case
            self.floor.close()

    def track_ratio_to_floor(self, shape, layout, op):
        x, dy, out, ax, g, b, st = (self.x, self.dy, self.out, self.axis, self.gamma,
                                    self.beta, self.st)
        ops = {
            "batch_stats": lambda: bn.batch_stats(x, axis=ax),
            "forward_train": lambda: bn.forward_train(x, g, b, axis=ax, out=out),
            "forward_eval": lambda: bn.forward_eval(x, st.mean, st.var, g, b, axis=ax, out=out),
            "backward": lambda: bn.backward(dy, x, st, g, axis=ax, out=out),
        }
        if op == "backward":
            floors = self.floor.candidates("add", x, dy, apart(x))
        else:
            floors = self.floor.candidates("copy", x, apart(x))
        return interleaved_ratio(ops[op], floors)


class RatioToFloorOneThread(RatioToFloor):
    params = [REGRESSION_SHAPES, LAYOUTS, OPS]
    threads = 1
