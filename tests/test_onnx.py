"""batchnorm.onnx: BatchNormalization for ONNX's reference evaluator, per opset (9, 14, 15),
in inference and training, against onnxruntime, the evaluator's own operator (opsets 14 and
15 only: its opset-9 one is wrong, see the module) and float64 NumPy."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from conftest import make_params, make_x, rel_err, require

onnx = require("onnx")
ort = require("onnxruntime")
from onnx import helper as oh, numpy_helper as onh  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from batchnorm.onnx import BatchNormalization  # noqa: E402

SHAPES = [(16, 3), (4, 3, 5, 6), (2, 3, 3, 4, 5)]
# max|got - ref| / max(1, max|ref|) for an output stored in this type (its rounding, with
# room for the reference implementations' own float32 arithmetic)
TOL = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def _tensor_type(dtype) -> int:
    return oh.np_dtype_to_tensor_dtype(np.dtype(dtype))


def make_model(opset, shape, x_dtype, outputs=("Y",), *, param_dtype=None, stat_dtype=None,
               seed=0, checked=True, **attrs):
    """A one-node model: X an input, scale/B (param_dtype) and mean/var (stat_dtype)
    initializers. Returns the model and the initializers' values as float64."""
    param_dtype = np.dtype(param_dtype or x_dtype)
    stat_dtype = np.dtype(stat_dtype or x_dtype)
    C = shape[1] if len(shape) > 1 else shape[0]
    rng = np.random.default_rng(seed)
    scale, bias = make_params(rng, C)
    # running statistics unlike the data's own (make_x: channel means in [-3, 3]), so that
    # normalizing with the wrong ones shows
    mean, var = rng.uniform(-1.0, 1.0, C), rng.uniform(0.5, 2.0, C)
    values = {"scale": scale.astype(param_dtype), "B": bias.astype(param_dtype),
              "mean": mean.astype(stat_dtype), "var": var.astype(stat_dtype)}
    inits = [onh.from_array(v, name) for name, v in values.items()]
    node = oh.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"],
                        list(outputs), **attrs)
    out_types = [_tensor_type(x_dtype), _tensor_type(stat_dtype), _tensor_type(stat_dtype),
                 _tensor_type(x_dtype), _tensor_type(x_dtype)]
    out_info = [oh.make_tensor_value_info(name, t, shape if i == 0 else [C])
                for i, (name, t) in enumerate(zip(outputs, out_types)) if name]
    graph = oh.make_graph([node], "bn", [oh.make_tensor_value_info(
        "X", _tensor_type(x_dtype), shape)], out_info, inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = 8        # within what onnxruntime reads
    if checked:
        onnx.checker.check_model(model, full_check=True)
    return model, {k: v.astype(np.float64) for k, v in values.items()}


def reference(x, p, *, training, eps=1e-5, momentum=0.9):
    """float64 NumPy of the specification: (Y, running mean, running var, batch mean, batch
    biased var); the last four None in inference."""
    # ONNX keeps float attributes in float32
    eps, momentum = float(np.float32(eps)), float(np.float32(momentum))
    xx = np.asarray(x, np.float64)
    axes = tuple(i for i in range(xx.ndim) if i != 1)
    cs = [1] * xx.ndim
    cs[1] = -1
    if training:
        m, v = xx.mean(axis=axes), xx.var(axis=axes)
    else:
        m, v = p["mean"], p["var"]
    y = (xx - m.reshape(cs)) / np.sqrt(v.reshape(cs) + eps) * p["scale"].reshape(cs) \
        + p["B"].reshape(cs)
    if not training:
        return y, None, None, None, None
    return (y, p["mean"] * momentum + m * (1 - momentum),
            p["var"] * momentum + v * (1 - momentum), m, v)


def run_ours(model, x):
    return ReferenceEvaluator(model, new_ops=[BatchNormalization]).run(None, {"X": x})


def run_builtin(model, x):
    return ReferenceEvaluator(model).run(None, {"X": x})


def run_ort(model, x):
    sess = ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x})


def check(got, ref, dtype, what, tol=None):
    got = np.asarray(got)
    assert got.dtype == np.dtype(dtype), f"{what}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == np.shape(ref), f"{what}: shape {got.shape}, expected {np.shape(ref)}"
    tol = TOL[np.dtype(dtype)] if tol is None else tol
    e = rel_err(got, ref)
    assert e <= tol, f"{what}: relative error {e:.3g} > {tol:g}"


def _x(shape, dtype, seed=1):
    return make_x(np.random.default_rng(seed), shape, 1, dtype)


# --- inference -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opset", [9, 13, 14, 15, 17])
def test_inference(opset, dtype, shape):
    attrs = {"training_mode": 0} if opset >= 14 and shape == SHAPES[1] else {}
    model, p = make_model(opset, shape, dtype, epsilon=1e-3, **attrs)
    x = _x(shape, dtype)
    (y,) = run_ours(model, x)
    ref = reference(x, p, training=False, eps=1e-3)[0]
    check(y, ref, dtype, "Y vs float64")
    check(y, run_ort(model, x)[0], dtype, "Y vs onnxruntime")
    if opset >= 14:     # the evaluator's own BatchNormalization_9 normalizes wrongly
        check(y, run_builtin(model, x)[0], dtype, "Y vs the evaluator's operator")


def test_opset9_inference_uses_the_given_statistics():
    """What the evaluator's own opset-9 operator gets wrong: one output means inference,
    with the model's statistics, not the batch's (nor a blend of them)."""
    shape = (8, 3, 4, 4)
    model, p = make_model(9, shape, np.float64)
    x = _x(shape, np.float64)
    (y,) = run_ours(model, x)
    check(y, reference(x, p, training=False)[0], np.float64, "Y")
    trained = reference(x, p, training=True)
    for stats in [(trained[3], trained[4]), (trained[1], trained[2])]:
        wrong = reference(x, dict(p, mean=stats[0], var=stats[1]), training=False)[0]
        assert rel_err(y, wrong) > 1e-2


# --- training --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opset", [14, 15, 18])
def test_training_mode(opset, dtype, shape):
    model, p = make_model(opset, shape, dtype, ("Y", "running_mean", "running_var"),
                          training_mode=1, momentum=0.7, epsilon=1e-4)
    x = _x(shape, dtype)
    y, rm, rv = run_ours(model, x)
    ref = reference(x, p, training=True, eps=1e-4, momentum=0.7)
    for got, r, what in [(y, ref[0], "Y"), (rm, ref[1], "running_mean"),
                         (rv, ref[2], "running_var")]:
        check(got, r, dtype, f"{what} vs float64")
    for engine, run in [("onnxruntime", run_ort), ("the evaluator's operator", run_builtin)]:
        for got, theirs, what in zip((y, rm, rv), run(model, x),
                                     ("Y", "running_mean", "running_var")):
            check(got, theirs, dtype, f"{what} vs {engine}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_opset9_training(dtype, shape):
    """More than one output means training; the five outputs as the specification names
    them. saved_var is the batch variance (the specification's "saved variance"), where
    onnxruntime writes 1 / sqrt(var + epsilon): asserted, so the difference stays known."""
    outputs = ("Y", "running_mean", "running_var", "saved_mean", "saved_var")
    model, p = make_model(9, shape, dtype, outputs, momentum=0.8)
    x = _x(shape, dtype)
    got = run_ours(model, x)
    ref = reference(x, p, training=True, momentum=0.8)
    for g, r, what in zip(got, ref, outputs):
        check(g, r, dtype, f"{what} vs float64")
    theirs = run_ort(model, x)
    for g, t, what in zip(got[:4], theirs[:4], outputs):
        check(g, t, dtype, f"{what} vs onnxruntime")
    check(theirs[4], 1.0 / np.sqrt(ref[4] + 1e-5), dtype, "onnxruntime's saved_var")


def test_opset9_absent_outputs():
    """An empty name marks an absent output (BatchNormalization-9 allows 1 or 5 outputs):
    running statistics without the saved ones is training; Y alone, inference."""
    shape = (6, 3, 4)
    x = _x(shape, np.float32)
    outputs = ("Y", "running_mean", "running_var", "", "")
    model, p = make_model(9, shape, np.float32, outputs)
    got = run_ours(model, x)
    ref = reference(x, p, training=True)
    for g, r, t, what in zip(got, ref, run_ort(model, x), outputs):
        check(g, r, np.float32, f"{what} vs float64")
        check(g, t, np.float32, f"{what} vs onnxruntime")
    # not run in onnxruntime: 1.32 crashes (segmentation fault) on this node
    model, p = make_model(9, shape, np.float32, ("Y", "", "", "", ""))
    y = run_ours(model, x)[0]
    check(y, reference(x, p, training=False)[0], np.float32, "Y (inference)")


def test_training_one_value_per_channel():
    """ONNX defines a batch of one (variance 0, Y = B), which forward_train refuses."""
    shape = (1, 4)
    model, p = make_model(15, shape, np.float32, ("Y", "running_mean", "running_var"),
                          training_mode=1)
    x = _x(shape, np.float32)
    got = run_ours(model, x)
    ref = reference(x, p, training=True)
    np.testing.assert_array_equal(got[0], p["B"].astype(np.float32)[None, :])
    for g, r, t, what in zip(got, ref, run_ort(model, x), ("Y", "rm", "rv")):
        check(g, r, np.float32, f"{what} vs float64")
        # onnxruntime folds the statistics into x * a + b, which cancels here: x / sqrt(eps)
        # is ~300 times x, so its Y is off by ~300 float32 roundings
        check(g, t, np.float32, f"{what} vs onnxruntime", tol=1e-4)


# --- opset 15: types of their own ------------------------------------------------------------

# (X, scale and B, input_mean and input_var)
MIXED = [
    (np.float16, np.float16, np.float16),
    (np.float16, np.float32, np.float32),
    (np.float16, np.float16, np.float32),
    (np.float16, np.float64, np.float64),
    (np.float32, np.float64, np.float64),
    (np.float32, np.float32, np.float64),
    (np.float32, np.float16, np.float16),
    (np.float64, np.float32, np.float32),
]


def _ort_supports(x_dtype, param_dtype, stat_dtype) -> bool:
    """The type combinations onnxruntime's CPU kernel has (1.32): all one
    type, or float16 data with float32 parameters and statistics."""
    types = {np.dtype(param_dtype), np.dtype(stat_dtype)}
    return types == {np.dtype(x_dtype)} or (np.dtype(x_dtype) == np.float16
                                            and types == {np.dtype(np.float32)})


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("x_dtype,param_dtype,stat_dtype", MIXED)
def test_opset15_types(x_dtype, param_dtype, stat_dtype, training):
    shape = (8, 3, 5, 5)
    outputs = ("Y", "running_mean", "running_var") if training else ("Y",)
    model, p = make_model(15, shape, x_dtype, outputs, param_dtype=param_dtype,
                          stat_dtype=stat_dtype, training_mode=int(training))
    x = _x(shape, x_dtype)
    got = run_ours(model, x)
    ref = reference(x, p, training=training)
    # Y in the type of X, the running statistics in that of input_mean (T2)
    types = (x_dtype, stat_dtype, stat_dtype)
    for g, r, dt, what in zip(got, ref, types, outputs):
        check(g, r, dt, f"{what} vs float64")
    if _ort_supports(x_dtype, param_dtype, stat_dtype):
        for g, t, dt, what in zip(got, run_ort(model, x), types, outputs):
            check(g, t, dt, f"{what} vs onnxruntime")
    # the evaluator's operator returns everything in the type of X: values only
    theirs = run_builtin(model, x)
    for g, t, what in zip(got, theirs, outputs):
        tol = max(TOL[np.dtype(d)] for d in (x_dtype, param_dtype, stat_dtype))
        assert rel_err(g, t) <= tol, f"{what} vs the evaluator's operator"


def test_bfloat16():
    ml_dtypes = require("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    shape = (8, 3, 4)
    for training in (False, True):
        outputs = ("Y", "running_mean", "running_var") if training else ("Y",)
        model, p = make_model(15, shape, bf16, outputs, stat_dtype=np.float32,
                              training_mode=int(training))
        x = _x(shape, np.float32).astype(bf16)
        got = run_ours(model, x)
        ref = reference(x, p, training=training)
        check(got[0], ref[0], bf16, "Y", tol=1e-2)
        for g, r in zip(got[1:], ref[1:]):
            check(g, r, np.float32, "running statistic")


# --- errors ----------------------------------------------------------------------------------


def test_opset_below_9_refused():
    shape = (4, 3, 2)
    model, _ = make_model(7, shape, np.float32, spatial=1)
    with pytest.raises(NotImplementedError, match=r"opset 7.*opsets 9|opsets 9.*opset 7"):
        run_ours(model, _x(shape, np.float32))


def _with_initializer(model, name, value):
    graph = model.graph
    for i, init in enumerate(graph.initializer):
        if init.name == name:
            graph.initializer[i].CopyFrom(onh.from_array(value, name))
    return model


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("name,message", [("scale", "gamma"), ("B", "beta"),
                                          ("mean", "mean"), ("var", "var")])
def test_wrong_vector_length(name, message, training):
    shape = (4, 3, 2)
    outputs = ("Y", "running_mean", "running_var") if training else ("Y",)
    model, _ = make_model(15, shape, np.float32, outputs, training_mode=int(training),
                          checked=False)
    _with_initializer(model, name, np.ones(4, np.float32))
    with pytest.raises(ValueError, match=rf"{message} must have shape \(C,\) = \(3,\), "
                                         rf"got \(4,\)"):
        run_ours(model, _x(shape, np.float32))


def test_one_dimensional_input_refused():
    model, _ = make_model(15, (3,), np.float32, checked=False)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        run_ours(model, np.ones(3, np.float32))


def test_negative_variance_refused_in_inference():
    shape = (4, 3)
    model, _ = make_model(15, shape, np.float32)
    _with_initializer(model, "var", np.array([1.0, -1.0, 1.0], np.float32))
    with pytest.raises(ValueError, match="var must be non-negative"):
        run_ours(model, _x(shape, np.float32))


def test_import_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)     # import onnx raises ImportError
    monkeypatch.delitem(sys.modules, "batchnorm.onnx")
    with pytest.raises(ImportError, match="pip install onnx"):
        importlib.import_module("batchnorm.onnx")
