"""BatchNormalization for ONNX's reference evaluator, computed by this package's kernels.

Needs ``onnx`` (``pip install onnx``), imported with this module. Pass the operator to the
evaluator and every ``BatchNormalization`` node of the default domain runs here instead of in
the evaluator's own NumPy code (one pass over the input instead of several temporaries):

>>> import numpy as np, onnx.helper as oh, onnx.numpy_helper as onh
>>> from onnx import TensorProto
>>> from onnx.reference import ReferenceEvaluator
>>> import batchnorm.onnx
>>> C = 3
>>> inits = [onh.from_array(np.full(C, v, np.float32), name)
...          for name, v in [("scale", 2.0), ("B", 0.5), ("mean", 1.0), ("var", 4.0)]]
>>> node = oh.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], ["Y"],
...                     epsilon=0.0)
>>> graph = oh.make_graph([node], "bn", [oh.make_tensor_value_info("X", TensorProto.FLOAT,
...                       [None, C, None])], [oh.make_tensor_value_info(
...                       "Y", TensorProto.FLOAT, [None, C, None])], inits)
>>> model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 15)])
>>> sess = ReferenceEvaluator(model, new_ops=[batchnorm.onnx.BatchNormalization])
>>> x = np.array([[[1.0, 3.0], [5.0, 7.0], [-1.0, 1.0]]], np.float32)
>>> sess.run(None, {"X": x})[0]          # (x - 1) / 2 * 2 + 0.5
array([[[ 0.5,  2.5],
        [ 4.5,  6.5],
        [-1.5,  0.5]]], dtype=float32)

What each opset asks of the operator (the channel axis is 1; variances are biased, i.e.
divided by the number of values per channel, as the specification says):

* opsets 9 to 13 (BatchNormalization-9): training when the node has more than one output,
  with outputs ``Y, mean, var, saved_mean, saved_var``: ``Y`` normalized with the batch's own
  statistics, the running statistics updated as ``input * momentum + batch * (1 - momentum)``
  and the batch's mean and variance saved. With one output, inference with the given
  statistics. The evaluator's own ``BatchNormalization_9`` does not do this: it always
  updates the statistics and normalizes with the updated ones (it takes the default momentum
  the evaluator passes as a request for training), so a one-output opset-9 node there does not
  give what onnxruntime gives; this operator does.
* opsets 14 and 15 onwards (BatchNormalization-14/15): the ``training_mode`` attribute
  chooses; in training the optional outputs are ``running_mean, running_var``. Opset 15 lets
  ``scale, B`` and ``input_mean, input_var`` have types of their own: ``Y`` keeps the type of
  ``X``, the running statistics that of ``input_mean``.

Two deliberate choices where implementations differ: ``saved_var`` is the batch variance
(what the specification calls it; onnxruntime writes ``1 / sqrt(var + epsilon)`` there), and
in inference a negative ``input_var`` is refused with a ValueError (onnxruntime returns NaN).
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:
    import onnx
    from onnx.reference.op_run import OpRun
except ImportError:
    raise ImportError("batchnorm.onnx needs onnx: pip install onnx") from None

from . import _validation
from ._api import batch_stats, forward_eval, forward_train

__all__ = ["BatchNormalization"]

# The opset where each version of the operator begins (the latest one serves every opset
# after it: BatchNormalization-15 is the latest up to at least opset 28, onnx 1.23).
_TRAINING_BY_OUTPUTS = 9       # BatchNormalization-9: training iff more than one output
_TRAINING_MODE_ATTR = 14       # BatchNormalization-14: the training_mode attribute


def _vector(v: Any) -> np.ndarray:
    """A parameter or statistic as float64 (exact for every ONNX float type), in which the
    running statistics are computed; the kernels check the shape."""
    return np.asarray(v).astype(np.float64, copy=False)


class BatchNormalization(OpRun):
    """ONNX ``BatchNormalization`` (opsets 9 onwards) for ``onnx.reference``.

    Use it as ``ReferenceEvaluator(model, new_ops=[BatchNormalization])``; the evaluator
    creates one instance per node and calls :meth:`_run` with the node's inputs and
    attributes. Inference runs :func:`batchnorm.forward_eval`, training
    :func:`batchnorm.forward_train` (both with the channel axis 1); the running statistics
    are updated in float64 and returned in the type of ``input_mean``.

    Raises
    ------
    NotImplementedError
        For a model whose default-domain opset is below 9 (BatchNormalization-6/7, with the
        ``spatial`` and ``is_test`` attributes).
    ValueError, TypeError
        From the package's own checks, naming the argument: ``X`` with fewer than 2
        dimensions or of a type the kernels do not take, a vector whose length is not the
        number of channels (``scale`` is called ``gamma`` there, ``B`` ``beta``), a negative
        ``input_var`` in inference.

    Examples
    --------
    A training-mode node (opset 15) returns the updated running statistics:

    >>> import numpy as np, onnx.helper as oh, onnx.numpy_helper as onh
    >>> from onnx import TensorProto
    >>> from onnx.reference import ReferenceEvaluator
    >>> from batchnorm.onnx import BatchNormalization
    >>> inits = [onh.from_array(np.array(v, np.float64), name) for name, v in
    ...          [("scale", [1.0]), ("B", [0.0]), ("mean", [0.0]), ("var", [1.0])]]
    >>> node = oh.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"],
    ...                     ["Y", "running_mean", "running_var"], training_mode=1,
    ...                     momentum=0.5, epsilon=0.0)
    >>> vi = lambda name, shape: oh.make_tensor_value_info(name, TensorProto.DOUBLE, shape)
    >>> graph = oh.make_graph([node], "bn", [vi("X", [4, 1])],
    ...                       [vi("Y", [4, 1]), vi("running_mean", [1]),
    ...                        vi("running_var", [1])], inits)
    >>> model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 15)])
    >>> sess = ReferenceEvaluator(model, new_ops=[BatchNormalization])
    >>> y, rm, rv = sess.run(None, {"X": np.array([[1.0], [3.0], [5.0], [7.0]])})
    >>> y.ravel(), rm, rv      # batch mean 4, biased variance 5
    (array([-1.34164079, -0.4472136 ,  0.4472136 ,  1.34164079]), array([2.]), array([3.]))
    """

    op_domain = ""

    def _opset(self) -> int:
        """The default-domain opset of the model this node belongs to (the latest one when
        the node was created outside an evaluator that says)."""
        opsets = self.run_params.get("opsets") or {}
        if "" in opsets:
            return int(opsets[""])
        return onnx.defs.onnx_opset_version()

    def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None,
             training_mode=None, spatial=None, is_test=None):
        # The evaluator passes the node's attributes and the defaults of the latest schema
        # (BatchNormalization-15), so training_mode arrives even for opset-9 models: which
        # attributes count is decided by the model's opset, not by what arrives. spatial and
        # is_test belong to opsets < 9 and are refused with them.
        opset = self._opset()
        if opset < _TRAINING_BY_OUTPUTS:
            raise NotImplementedError(
                f"batchnorm.onnx.BatchNormalization supports opsets 9 and later "
                f"(BatchNormalization-9, -14 and -15); this model imports opset {opset} of "
                f"the default domain (BatchNormalization-6/7, with is_test and spatial): "
                f"convert it with onnx.version_converter.convert_version(model, 9) or later")
        eps = 1e-5 if epsilon is None else float(epsilon)
        mom = 0.9 if momentum is None else float(momentum)
        n_outputs = len(self.onnx_node.output)
        if opset < _TRAINING_MODE_ATTR:
            # BatchNormalization-9: the outputs tell the mode (empty names are absent outputs)
            training = sum(1 for name in self.onnx_node.output if name) > 1
        else:
            training = bool(training_mode)

        x = np.asarray(x)
        vectors = [_vector(v) for v in (scale, bias, mean, var)]
        if not training:
            return (forward_eval(x, vectors[2], vectors[3], vectors[0], vectors[1], axis=1,
                                 eps=eps),)

        y, batch_mean, batch_var = self._train(x, *vectors, eps)
        # running statistics as the specification writes them, in float64, then in the type
        # of the incoming statistics (T2 of opset 15; the same as X before)
        rm = (vectors[2] * mom + batch_mean * (1.0 - mom)).astype(np.asarray(mean).dtype)
        rv = (vectors[3] * mom + batch_var * (1.0 - mom)).astype(np.asarray(var).dtype)
        if opset < _TRAINING_MODE_ATTR:
            # Y, mean, var, saved_mean, saved_var, all of type T
            extra = (rm, rv, batch_mean.astype(x.dtype), batch_var.astype(x.dtype))
        else:
            extra = (rm, rv)
        # one value per declared output, in order (the evaluator zips them with the names)
        return ((y,) + extra)[:max(1, n_outputs)]

    @staticmethod
    def _train(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray,
               var: np.ndarray, eps: float) -> tuple:
        """(Y, batch mean, batch variance), the statistics float64."""
        if x.ndim >= 2 and x.shape[1] and x.size // x.shape[1] <= 1:
            # forward_train refuses one value per channel (as PyTorch does); ONNX defines it:
            # the variance is 0 and Y is B
            st = batch_stats(x, axis=1)
            y = forward_eval(x, st.mean, st.var, gamma, beta, axis=1, eps=eps)
        else:
            y, st = forward_train(x, gamma, beta, axis=1, eps=eps)
        # the incoming statistics are only added to, not passed to a kernel: checked here
        # with the kernels' rule (and message)
        _validation.vector(mean, x.shape[1], "mean")
        _validation.vector(var, x.shape[1], "var")
        return y, st.mean, st.var
