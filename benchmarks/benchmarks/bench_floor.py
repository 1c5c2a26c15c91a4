"""The ratio of each operation's time to its memory floor, measured in the same method.

The floor is the fastest of NumPy's copy ``x -> y`` on one thread and over slices in as many
threads as batchnorm uses (``x + dy -> dx`` for backward); see common.Floor. The operation
writes into a preallocated ``out=``; statistics only read ``x`` and are quoted against the
copy too (their ideal is below 1). float32, batchnorm's default threads (all cores), as in
issue 3's targets. Floor and operation run round-robin (common.interleaved_medians: 15 kept
rounds after a warm-up one, each sample after the settle pause): the ratio of medians is what
to compare across commits; the absolute times move with machine load, the ratio by a few
percent (benchmarks/README.md gives the measured spread).
"""

from __future__ import annotations

import numpy as np

import batchnorm as bn

from .common import LAYOUTS, SHAPES, Floor, interleaved_medians, inputs

OPS = ["batch_stats", "forward_train", "forward_eval", "backward"]


class RatioToFloor:
    params = [SHAPES, LAYOUTS, OPS]
    param_names = ["shape", "layout", "op"]
    unit = "time / floor"
    timeout = 180

    def setup(self, shape, layout, op):
        self.x, self.dy, self.axis, self.gamma, self.beta = inputs(shape, layout, "float32")
        self.out = np.zeros_like(self.x)
        self.st = bn.batch_stats(self.x, axis=self.axis)
        bn.set_num_threads(None)
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
            cands = self.floor.candidates("add", x, dy, np.empty_like(x))
        else:
            cands = self.floor.candidates("copy", x, np.empty_like(x))
        floor_names = list(cands)
        cands["op"] = ops[op]
        medians = interleaved_medians(cands)
        return medians["op"] / min(medians[n] for n in floor_names)
