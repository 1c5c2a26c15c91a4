"""Time and peak memory of batch_stats, forward_train, forward_eval and backward.

time_<op>: over performance.md's shapes, both layouts, float32/float64, 1 and all threads,
writing into a preallocated ``out=`` (the kernel's speed). Allocating.time_<op>_alloc lets the
call allocate its output (page faults included: what a plain call costs, and what PyTorch's
figures in performance.md include), float32 and all threads only, to keep the suite short.

peakmem_*: the process's peak resident memory after an allocating call. It includes the
interpreter, NumPy and the inputs made in setup, so expect about baseline + inputs + one
output; a rise beyond that means a hidden copy or scratch buffer.
"""

from __future__ import annotations

import numpy as np

import batchnorm as bn

from .common import DTYPES, LAYOUTS, SHAPES, THREADS, inputs, set_threads


class _Timed:
    params = [SHAPES, LAYOUTS, DTYPES, THREADS]
    param_names = ["shape", "layout", "dtype", "threads"]
    timeout = 120

    def setup(self, shape, layout, dtype, threads):
        self.x, self.dy, self.axis, self.gamma, self.beta = inputs(shape, layout, dtype)
        self.out = np.zeros_like(self.x)
        self.st = bn.batch_stats(self.x, axis=self.axis)
        set_threads(threads)

    def teardown(self, *params):
        bn.set_num_threads(None)


class BatchStats(_Timed):
    def time_batch_stats(self, *params):
        bn.batch_stats(self.x, axis=self.axis)


class ForwardTrain(_Timed):
    def time_forward_train(self, *params):
        bn.forward_train(self.x, self.gamma, self.beta, axis=self.axis, out=self.out)


class ForwardEval(_Timed):
    def time_forward_eval(self, *params):
        bn.forward_eval(self.x, self.st.mean, self.st.var, self.gamma, self.beta,
                        axis=self.axis, out=self.out)


class Backward(_Timed):
    def time_backward(self, *params):
        bn.backward(self.dy, self.x, self.st, self.gamma, axis=self.axis, out=self.out)


class Allocating:
    params = [SHAPES, LAYOUTS]
    param_names = ["shape", "layout"]
    timeout = 120

    def setup(self, shape, layout):
        self.x, self.dy, self.axis, self.gamma, self.beta = inputs(shape, layout, "float32")
        self.st = bn.batch_stats(self.x, axis=self.axis)
        bn.set_num_threads(None)

    def time_forward_train_alloc(self, *params):
        bn.forward_train(self.x, self.gamma, self.beta, axis=self.axis)

    def time_forward_eval_alloc(self, *params):
        bn.forward_eval(self.x, self.st.mean, self.st.var, self.gamma, self.beta,
                        axis=self.axis)

    def time_backward_alloc(self, *params):
        bn.backward(self.dy, self.x, self.st, self.gamma, axis=self.axis)


class PeakMemory:
    params = [SHAPES, LAYOUTS, DTYPES]
    param_names = ["shape", "layout", "dtype"]
    timeout = 120

    def setup(self, shape, layout, dtype):
        self.x, self.dy, self.axis, self.gamma, self.beta = inputs(shape, layout, dtype)
        self.st = bn.batch_stats(self.x, axis=self.axis)

    def peakmem_batch_stats(self, *params):
        bn.batch_stats(self.x, axis=self.axis)

    def peakmem_forward_train(self, *params):
        bn.forward_train(self.x, self.gamma, self.beta, axis=self.axis)

    def peakmem_forward_eval(self, *params):
        bn.forward_eval(self.x, self.st.mean, self.st.var, self.gamma, self.beta,
                        axis=self.axis)

    def peakmem_backward(self, *params):
        bn.backward(self.dy, self.x, self.st, self.gamma, axis=self.axis)
