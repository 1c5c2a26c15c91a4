"""The calls users write: float32 arrays, float32 parameter vectors, outputs allocated.

The other suites pass float64 gamma and beta (and batch_stats' float64 mean and var) and
mostly write into ``out=``: they time the kernels. A user holds float32 vectors (a
``BatchNorm`` layer's parameters and running statistics are float32 by default, and so are
weights loaded from PyTorch or ONNX) and lets the call allocate its output; what those calls
cost, conversion of the vectors and page faults of the output included, is timed here, over
per-call shapes (where fixed overhead shows) up to one of the peer table's, in nchw (axis=1),
batchnorm's default threads.

UserFunctions.time_*: ``bn.forward_train(x, gamma, beta)``, ``bn.forward_eval(x, mean, var,
gamma, beta)`` and ``bn.backward(dy, x, st, gamma)`` with ``st`` as ``forward_train`` returned
it (the object a user passes on), every vector float32.

UserLayer.time_*: a ``bn.BatchNorm(C)`` (float32 parameters): the training call (running
statistics updated), the eval call (running statistics used) and ``layer.backward(dy)`` after
a training call.

UserRatios.track_ratio_to_copy: each of those six calls, timed interleaved with
``np.copyto`` of an array like x (the cheapest call that reads x and writes an array of its
size), as a ratio (common.interleaved_ratio), on one thread. These are the user calls of the
regression set (benchmarks/README.md): a ratio measured this way moves by a few percent
between runs, where the absolute times above move with the machine's load (and two threads
with the host's).

UserLayerVariants.time_*: the training call and backward of a layer with ``renorm=True`` or
``virtual_batch_size=N/4``.

UserMaskedFused.time_*: the masked and fused calls: ``forward_train`` and ``backward`` with a
random mask (70% of positions set), ``forward_train`` and ``forward_eval`` with
``activation="relu"`` and with ``residual=z`` too, and ``backward`` through the relu.
EpilogueRatios.track_ratio_to_plain: each fused call over the plain call (interleaved, one
thread, writing into ``out=``), and the same epilogue written in NumPy after the plain call
(``np.add``, ``np.maximum`` in place): what fusing saves. The performance page quotes them.

CallOverhead: ``bn.forward_eval`` on a (4, 4) float32 array, float32 vectors, allocating (the
user's call) and with ``out=``, next to ``np.multiply(x, 2.0, out=y)`` on the same array, the
cheapest NumPy call that reads x and writes y. track_ratio_*: the ratio of the two,
measured interleaved in the same method (common.interleaved_ratio), which moves less with
machine load than the absolute times.
"""

from __future__ import annotations

import numpy as np

import batchnorm as bn

from .common import apart, inputs, interleaved_ratio

# per-call shapes (4x4, 64x128, 8x32x8x8) and the peer table's 2-D one
USER_SHAPES = ["4x4", "64x128", "8x32x8x8", "256x1024"]


def user_inputs(shape: str):
    """x, dy (float32, nchw), the axis, and float32 gamma, beta, mean and var of shape (C,)."""
    x, dy, axis, gamma, beta = inputs(shape, "nchw", "float32", param_dtype="float32")
    st = bn.batch_stats(x, axis=axis)
    mean = st.mean.astype(np.float32)
    var = st.var.astype(np.float32)
    return x, dy, axis, gamma, beta, mean, var


class UserFunctions:
    params = [USER_SHAPES]
    param_names = ["shape"]
    timeout = 120

    def setup(self, shape):
        bn.set_num_threads(None)
        (self.x, self.dy, self.axis, self.gamma, self.beta, self.mean,
         self.var) = user_inputs(shape)
        _, self.st = bn.forward_train(self.x, self.gamma, self.beta, axis=self.axis)

    def time_forward_train(self, shape):
        bn.forward_train(self.x, self.gamma, self.beta, axis=self.axis)

    def time_forward_eval(self, shape):
        bn.forward_eval(self.x, self.mean, self.var, self.gamma, self.beta, axis=self.axis)

    def time_backward(self, shape):
        bn.backward(self.dy, self.x, self.st, self.gamma, axis=self.axis)


class UserLayer:
    params = [USER_SHAPES]
    param_names = ["shape"]
    timeout = 120

    def setup(self, shape):
        bn.set_num_threads(None)
        self.x, self.dy, axis, gamma, beta, mean, var = user_inputs(shape)
        c = self.x.shape[axis]
        self.train_layer = bn.BatchNorm(c)
        self.train_layer.gamma, self.train_layer.beta = gamma, beta
        self.train_layer(self.x)  # a training call, so that backward has its input
        self.eval_layer = bn.BatchNorm(c)
        self.eval_layer.gamma, self.eval_layer.beta = gamma, beta
        self.eval_layer.running_mean, self.eval_layer.running_var = mean, var
        self.eval_layer.eval()

    def time_layer_train(self, shape):
        self.train_layer(self.x)

    def time_layer_eval(self, shape):
        self.eval_layer(self.x)

    def time_layer_backward(self, shape):
        self.train_layer.backward(self.dy)


class UserLayerVariants:
    """The layer's training call and backward with batch renormalization, and with ghost
    batches of N/4 rows (at least 2): per group, one training call's work and overhead."""

    params = [USER_SHAPES, ["renorm", "ghost"]]
    param_names = ["shape", "variant"]
    timeout = 120

    def setup(self, shape, variant):
        bn.set_num_threads(None)
        self.x, self.dy, axis, gamma, beta, _, _ = user_inputs(shape)
        kwargs = ({"renorm": True, "renorm_clipping": {"rmax": 3.0, "dmax": 5.0}}
                  if variant == "renorm" else
                  {"virtual_batch_size": max(2, self.x.shape[0] // 4)})
        self.layer = bn.BatchNorm(self.x.shape[axis], **kwargs)
        self.layer.gamma, self.layer.beta = gamma, beta
        self.layer(self.x)

    def time_layer_train(self, shape, variant):
        self.layer(self.x)

    def time_layer_backward(self, shape, variant):
        self.layer.backward(self.dy)


CALLS = ["forward_train", "forward_eval", "backward", "layer_train", "layer_eval",
         "layer_backward"]


class UserRatios:
    params = [USER_SHAPES, CALLS]
    param_names = ["shape", "call"]
    unit = "time / np.copyto"
    timeout = 120

    def setup(self, shape, call):
        bn.set_num_threads(1)
        x, dy, ax, gamma, beta, mean, var = user_inputs(shape)
        _, st = bn.forward_train(x, gamma, beta, axis=ax)
        c = x.shape[ax]
        layer = bn.BatchNorm(c)
        layer.gamma, layer.beta = gamma, beta
        if call == "layer_eval":
            layer.running_mean, layer.running_var = mean, var
            layer.eval()
        elif call == "layer_backward":
            layer(x)        # a training call, so that backward has its input
        self.call = {
            "forward_train": lambda: bn.forward_train(x, gamma, beta, axis=ax),
            "forward_eval": lambda: bn.forward_eval(x, mean, var, gamma, beta, axis=ax),
            "backward": lambda: bn.backward(dy, x, st, gamma, axis=ax),
            "layer_train": lambda: layer(x),
            "layer_eval": lambda: layer(x),
            "layer_backward": lambda: layer.backward(dy),
        }[call]
        y = apart(x)        # half a page from x: no 4K aliasing in the reference
        self.copy = lambda: np.copyto(y, x)

    def track_ratio_to_copy(self, shape, call):
        return interleaved_ratio(self.call, {"copy": self.copy})


# The shapes of the variant suites: per-call (64x128), the MLP layer (256x1024), and a
# ResNet-50 layer that fits in the last-level cache of neither machine's one core's share.
VARIANT_SHAPES = ["64x128", "256x1024", "32x64x28x28"]


def variant_inputs(shape: str):
    """user_inputs, plus a mask of 70% of x's positions (no channel axis) and a residual."""
    x, dy, axis, gamma, beta, mean, var = user_inputs(shape)
    rng = np.random.default_rng(1)
    mask = rng.random(np.delete(x.shape, axis)) < 0.7
    z = rng.standard_normal(x.shape, dtype=np.float32)
    return x, dy, axis, gamma, beta, mean, var, mask, z


class UserMaskedFused:
    params = [VARIANT_SHAPES, ["masked_train", "masked_backward", "relu_train",
                               "relu_residual_train", "relu_eval", "relu_residual_eval",
                               "relu_backward"]]
    param_names = ["shape", "call"]
    timeout = 120

    def setup(self, shape, call):
        bn.set_num_threads(None)
        x, dy, ax, gamma, beta, mean, var, mask, z = variant_inputs(shape)
        _, st_m = bn.forward_train(x, gamma, beta, axis=ax, mask=mask)
        y_r, st_r = bn.forward_train(x, gamma, beta, axis=ax, activation="relu")
        self.call = {
            "masked_train": lambda: bn.forward_train(x, gamma, beta, axis=ax, mask=mask),
            "masked_backward": lambda: bn.backward(dy, x, st_m, gamma, axis=ax, mask=mask),
            "relu_train": lambda: bn.forward_train(x, gamma, beta, axis=ax, activation="relu"),
            "relu_residual_train": lambda: bn.forward_train(x, gamma, beta, axis=ax,
                                                            activation="relu", residual=z),
            "relu_eval": lambda: bn.forward_eval(x, mean, var, gamma, beta, axis=ax,
                                                 activation="relu"),
            "relu_residual_eval": lambda: bn.forward_eval(x, mean, var, gamma, beta, axis=ax,
                                                          activation="relu", residual=z),
            "relu_backward": lambda: bn.backward(dy, x, st_r, gamma, axis=ax,
                                                 activation="relu", y=y_r),
        }[call]

    def time_call(self, shape, call):
        self.call()


class EpilogueRatios:
    """Fused epilogues over the plain call, and the NumPy epilogue after it, on one thread
    with ``out=`` (no page faults in either)."""

    params = [VARIANT_SHAPES, ["train_relu", "train_relu_residual", "train_numpy_epilogue",
                               "eval_relu", "eval_relu_residual", "eval_numpy_epilogue",
                               "train_masked"]]
    param_names = ["shape", "call"]
    unit = "time / plain call"
    timeout = 180

    def setup(self, shape, call):
        bn.set_num_threads(1)
        x, _, ax, gamma, beta, mean, var, mask, z = variant_inputs(shape)
        y = apart(x)

        def numpy_epilogue(plain):
            def run():
                plain()
                np.add(y, z, out=y)
                np.maximum(y, 0, out=y)
            return run

        train = lambda **kw: lambda: bn.forward_train(x, gamma, beta, axis=ax, out=y, **kw)  # noqa: E731
        evaluate = lambda **kw: lambda: bn.forward_eval(x, mean, var, gamma, beta, axis=ax,  # noqa: E731
                                                        out=y, **kw)
        self.plain = train() if call.startswith("train") else evaluate()
        self.call = {
            "train_relu": train(activation="relu"),
            "train_relu_residual": train(activation="relu", residual=z),
            "train_numpy_epilogue": numpy_epilogue(train()),
            "train_masked": train(mask=mask),
            "eval_relu": evaluate(activation="relu"),
            "eval_relu_residual": evaluate(activation="relu", residual=z),
            "eval_numpy_epilogue": numpy_epilogue(evaluate()),
        }[call]

    def track_ratio_to_plain(self, shape, call):
        return interleaved_ratio(self.call, {"plain": self.plain})


class CallOverhead:
    """(4, 4) float32: batchnorm's eval call against np.multiply on the same array."""

    unit = "time / np.multiply"
    timeout = 60

    def setup(self):
        bn.set_num_threads(None)
        self.x, _, self.axis, self.gamma, self.beta, self.mean, self.var = user_inputs("4x4")
        self.y = np.zeros_like(self.x)

    def _eval(self):
        x, m, v, g, b, ax = self.x, self.mean, self.var, self.gamma, self.beta, self.axis
        return lambda: bn.forward_eval(x, m, v, g, b, axis=ax)

    def _eval_out(self):
        x, m, v, g, b, ax, y = (self.x, self.mean, self.var, self.gamma, self.beta, self.axis,
                                self.y)
        return lambda: bn.forward_eval(x, m, v, g, b, axis=ax, out=y)

    def _multiply(self):
        x, y = self.x, self.y
        return lambda: np.multiply(x, 2.0, out=y)

    def _ratio(self, call) -> float:
        return interleaved_ratio(call, {"multiply": self._multiply()})

    def time_forward_eval(self):
        bn.forward_eval(self.x, self.mean, self.var, self.gamma, self.beta, axis=self.axis)

    def time_forward_eval_out(self):
        bn.forward_eval(self.x, self.mean, self.var, self.gamma, self.beta, axis=self.axis,
                        out=self.y)

    def time_multiply(self):
        np.multiply(self.x, 2.0, out=self.y)

    def track_ratio_to_multiply(self):
        """forward_eval allocating its output (the user's call) / np.multiply with out=."""
        return self._ratio(self._eval())

    def track_ratio_out_to_multiply(self):
        """forward_eval with out= / np.multiply with out=: the call's own overhead."""
        return self._ratio(self._eval_out())
