"""batchnorm.keras: Keras 3's NumPy backend with this package's moments and
batch_normalization, against Keras' own functions and layer, and float64 NumPy."""

from __future__ import annotations

import importlib
import os
import warnings

os.environ["KERAS_BACKEND"] = "numpy"   # Keras reads it once, when first imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import make_params, make_x, rel_err, require  # noqa: E402

keras = require("keras", extra="test-frameworks")
if keras.backend.backend() != "numpy":
    pytest.skip(f"keras was imported with the {keras.backend.backend()!r} backend before "
                f"these tests; batchnorm.keras serves the NumPy backend (KERAS_BACKEND=numpy)",
                allow_module_level=True)

import batchnorm.keras as bnk  # noqa: E402

NN = importlib.import_module("keras.src.backend").nn      # what keras.ops calls
ORIGINAL = {"moments": NN.moments, "batch_normalization": NN.batch_normalization}
assert ORIGINAL["moments"].__module__.startswith("keras."), "installed before the tests"

# Installed vs Keras' own on well-conditioned data: both round to the type (Keras' float16
# statistics are computed in float32, then rounded); max|got - ref| / max(1, max|ref|)
VS_KERAS = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 1e-5,
            np.dtype(np.float64): 1e-12}
# Installed vs float64 NumPy: the float64 statistics rounded once to the type
VS_EXACT = {np.dtype(np.float16): 1e-3, np.dtype(np.float32): 1e-7,
            np.dtype(np.float64): 1e-13}


@pytest.fixture(autouse=True)
def _uninstalled():
    """Every test ends with Keras' own functions back, whatever it did."""
    yield
    bnk.uninstall()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls batchnorm.keras makes into the package's kernels."""
    calls = {"batch_stats": 0, "forward_eval": 0}
    for name in calls:
        real = getattr(bnk, name)

        def spy(*args, _name=name, _real=real, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(bnk, name, spy)
    return calls


def original_and_installed(fn, *args, **kwargs):
    """fn (a keras.ops function) with Keras' own backend functions, then installed."""
    bnk.uninstall()
    theirs = fn(*args, **kwargs)
    bnk.install()
    try:
        ours = fn(*args, **kwargs)
    finally:
        bnk.uninstall()
    return theirs, ours


def assert_like_keras(ours, theirs, what, tol=None):
    assert type(ours) is type(theirs), f"{what}: {type(ours)} vs Keras' {type(theirs)}"
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} vs Keras' {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs Keras' {theirs.shape}"
    tol = VS_KERAS[np.dtype(ours.dtype)] if tol is None else tol
    e = rel_err(ours, theirs)
    assert e <= tol, f"{what}: relative error {e:.3g} vs Keras > {tol:g}"


# --- moments ---------------------------------------------------------------------------------

# (shape, axes): one kept axis (channels first, last, in the middle), several kept, none,
# an int, negative axes, a tuple, None (all)
MOMENT_CASES = [
    ((64, 5), [0]),
    ((8, 4, 5, 6), [0, 2, 3]),
    ((8, 5, 6, 4), [0, 1, 2]),
    ((6, 4, 7), [0, 2]),
    ((8, 4, 5, 6), [0]),
    ((8, 4, 5, 6), (0, 3)),
    ((8, 4, 5, 6), [-1, 0, -2]),
    ((8, 4, 5), 1),
    ((8, 4, 5), -1),
    ((50,), [0]),
    ((6, 4, 5), [0, 1, 2]),
    ((6, 4, 5), None),
]


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,axes", MOMENT_CASES)
def test_moments_like_keras(shape, axes, dtype, keepdims, kernel_calls):
    rng = np.random.default_rng(len(shape) + sum(shape))
    x = make_x(rng, shape, -1, np.float64, loc=2.0).astype(dtype)
    theirs, ours = original_and_installed(keras.ops.moments, x, axes, keepdims=keepdims)
    assert kernel_calls["batch_stats"] == 1
    for o, t, what in zip(ours, theirs, ("mean", "variance")):
        assert_like_keras(o, t, what)
    # and the float64 statistics, rounded once
    red = tuple(range(len(shape))) if axes is None else axes
    red = tuple(np.atleast_1d(red))
    x64 = x.astype(np.float64)
    for o, ref, what in [(ours[0], x64.mean(axis=red, keepdims=keepdims), "mean"),
                         (ours[1], x64.var(axis=red, keepdims=keepdims), "variance")]:
        e = rel_err(o, ref)
        assert e <= VS_EXACT[np.dtype(dtype)], f"{what}: relative error {e:.3g} vs float64"


def test_moments_of_strided_views(kernel_calls):
    x = make_x(np.random.default_rng(3), (10, 7, 8), 1, np.float32)
    for view in (x[::2, :, ::-1], x.transpose(2, 0, 1), np.asfortranarray(x)):
        for axes in ([0, 2], [0, 1]):
            theirs, ours = original_and_installed(keras.ops.moments, view, axes)
            for o, t, what in zip(ours, theirs, ("mean", "variance")):
                assert_like_keras(o, t, what)
    assert kernel_calls["batch_stats"] == 6


def test_moments_offset_3000():
    """Keras' own E[x^2] - E[x]^2 in float32 is off by units here, negative variances
    included (asserted, so that the test shows why this module exists); ours are exact to
    float32 rounding."""
    x = np.random.default_rng(0).normal(3000.0, 1.0, size=(1000, 8)).astype(np.float32)
    exact_mean = x.astype(np.float64).mean(axis=0)
    exact_var = x.astype(np.float64).var(axis=0)
    (kmean, kvar), (mean, var) = original_and_installed(keras.ops.moments, x, [0])
    assert (kvar < 0).any() and np.abs(kvar - exact_var).max() > 1.0
    assert var.dtype == np.float32 and (var >= 0).all()
    assert rel_err(var, exact_var) <= 1e-7
    assert rel_err(mean, exact_mean, scale=3000.0) <= 1e-7
    # through the layer: Keras' own normalizes with a negative variance (NaN); ours does not
    outputs = {}
    for use_ours in (False, True):
        if use_ours:
            bnk.install()
        layer = keras.layers.BatchNormalization()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)     # sqrt of a negative
            outputs[use_ours] = layer(x, training=True)
        bnk.uninstall()
    assert np.isnan(outputs[False]).any()
    y = outputs[True].astype(np.float64)
    assert np.isfinite(y).all()
    assert np.abs(y.mean(axis=0)).max() < 1e-3 and np.abs(y.std(axis=0) - 1).max() < 1e-3


# --- batch_normalization ---------------------------------------------------------------------

# (shape, axis, x dtype, vector dtype)
BN_CASES = [
    ((16, 5), 1, np.float32, np.float32),
    ((16, 5), -1, np.float64, np.float64),
    ((4, 3, 5, 6), 1, np.float32, np.float32),
    ((4, 5, 6, 3), -1, np.float32, np.float32),
    ((4, 5, 6, 3), 3, np.float16, np.float16),
    ((4, 3, 5), 1, np.float16, np.float32),      # Keras: float32 result
    ((4, 3, 5), 1, np.float32, np.float64),      # Keras: float64 result
    ((7,), 0, np.float32, np.float32),            # one example of C features
]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,axis,dtype,vdtype", BN_CASES)
def test_batch_normalization_like_keras(shape, axis, dtype, vdtype, affine, kernel_calls):
    rng = np.random.default_rng(sum(shape))
    C = shape[axis]
    x = make_x(rng, shape, axis, np.float64).astype(dtype) if len(shape) > 1 else \
        rng.normal(size=shape).astype(dtype)
    gamma, beta = make_params(rng, C)
    mean, var = rng.uniform(-1, 1, C), rng.uniform(0.5, 2.0, C)
    vecs = [v.astype(vdtype) for v in (mean, var, beta, gamma)]
    kwargs = {"offset": vecs[2], "scale": vecs[3]} if affine else {}
    theirs, ours = original_and_installed(keras.ops.batch_normalization, x, vecs[0],
                                          vecs[1], axis, epsilon=1e-3, **kwargs)
    assert kernel_calls["forward_eval"] == 1
    assert_like_keras(ours, theirs, "output")


def test_bfloat16(kernel_calls):
    ml_dtypes = require("ml_dtypes")
    x = make_x(np.random.default_rng(2), (16, 4), 1, np.float32).astype(ml_dtypes.bfloat16)
    theirs, ours = original_and_installed(keras.ops.moments, x, [0])
    # Keras' own variance, E[x^2] - E[x]^2 in bfloat16, is off by a few percent here: its
    # types and shapes, and float64's values rounded once (8 bits of mantissa)
    x64 = x.astype(np.float64)
    for o, t, ref, what in zip(ours, theirs, (x64.mean(axis=0), x64.var(axis=0)),
                               ("mean", "variance")):
        assert_like_keras(o, t, what, tol=0.1)
        assert rel_err(o, ref) <= 4e-3, what
    mean, var = theirs
    theirs, ours = original_and_installed(keras.ops.batch_normalization, x, mean, var, 1)
    # the result type is Keras' promotion of bfloat16 with its constants: float32 with
    # ml_dtypes < 0.7, bfloat16 from 0.7 on, where Keras rounds each of its steps to 8 bits
    # and the kernels round once (so they agree to a bfloat16 unit or two, and the kernels'
    # output is within half a unit of the float64 result)
    bf16 = ours.dtype == np.dtype(ml_dtypes.bfloat16)
    assert_like_keras(ours, theirs, "output", tol=2 ** -6 if bf16 else 1e-5)
    exact = ((x64 - mean.astype(np.float64)) / np.sqrt(var.astype(np.float64) + 1e-3))
    assert rel_err(ours, exact) <= (2 ** -8 if bf16 else 1e-6)
    assert kernel_calls == {"batch_stats": 1, "forward_eval": 1}


# --- what goes to Keras' own functions -------------------------------------------------------


def _same(ours, theirs):
    for o, t in zip(ours if isinstance(ours, tuple) else (ours,),
                    theirs if isinstance(theirs, tuple) else (theirs,)):
        assert type(o) is type(t) and o.dtype == t.dtype and o.shape == t.shape
        np.testing.assert_array_equal(o, t)


@pytest.mark.parametrize("x,axes", [
    (np.arange(24, dtype=np.int32).reshape(6, 4), [0]),          # integers
    (np.zeros((0, 3), np.float32), [0]),                          # empty
    (np.ones((4, 3), np.float32), []),                            # no axes
    (np.ones((4, 3), np.float32).view(np.recarray), [0]),        # not a plain ndarray
    (np.float32(3.0) * np.ones(()), None),                       # 0-d
], ids=["int", "empty", "no-axes", "subclass", "0-d"])
def test_moments_falls_back(x, axes, kernel_calls):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # the mean of an empty slice
        theirs, ours = original_and_installed(keras.ops.moments, x, axes)
    assert kernel_calls["batch_stats"] == 0
    _same(ours, theirs)


def test_moments_errors_are_keras():
    x = np.ones((4, 3), np.float32)
    bnk.install()
    with pytest.raises(NotImplementedError, match="synchronized=True"):
        keras.ops.moments(x, [0], synchronized=True)
    with pytest.raises(np.exceptions.AxisError):
        keras.ops.moments(x, [2])


def test_batch_normalization_falls_back(kernel_calls):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    mean, var = np.zeros(4, np.float32), np.ones(4, np.float32)
    cases = [
        (x, np.zeros(1, np.float32), np.ones(1, np.float32), 1),   # length 1: broadcast
        (x, mean, np.array([1, -0.5, 1, 1], np.float32), 1),       # a negative variance
        (x.astype(np.int32), mean, var, 1),                         # integer data
        (x, mean.astype(np.int64), var, 1),                         # integer statistics
        (x[:0], mean, var, 1),                                      # empty
    ]
    for args in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)     # sqrt of a negative
            theirs, ours = original_and_installed(keras.ops.batch_normalization, *args)
        _same(ours, theirs)
    assert kernel_calls["forward_eval"] == 0


# --- the layer -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("shape,axis", [((32, 6), -1), ((8, 5, 5, 4), -1), ((8, 4, 5, 5), 1)])
def test_layer_like_keras(shape, axis, dtype, kernel_calls):
    """keras.layers.BatchNormalization with install(): the same training output and
    moving-statistics update, then the same inference output, as the layer without it."""
    rng = np.random.default_rng(7)
    C = shape[axis]
    x = make_x(rng, shape, axis, np.float64).astype(dtype)
    gamma, beta = make_params(rng, C)
    weights = [gamma, beta, rng.uniform(-1, 1, C), rng.uniform(0.5, 2.0, C)]
    results = {}
    for use_ours in (False, True):
        if use_ours:
            bnk.install()
        layer = keras.layers.BatchNormalization(axis=axis, momentum=0.8, epsilon=1e-3,
                                                dtype=dtype)
        layer.build(shape)
        layer.set_weights([w.astype(dtype) for w in weights])
        y_train = layer(x, training=True)
        moving = [np.asarray(w) for w in layer.get_weights()[2:]]
        y_eval = layer(x, training=False)
        results[use_ours] = (y_train, *moving, y_eval)
        bnk.uninstall()
    assert kernel_calls == {"batch_stats": 1, "forward_eval": 2}
    # Keras hands a float64 layer's NumPy input over as float32 (its input conversion makes
    # float32 of it, which the float64 policy does not cast back): float32 arithmetic then
    tol = VS_KERAS[np.dtype(np.float32 if dtype == "float64" else dtype)]
    for o, t, what in zip(results[True], results[False],
                          ("training output", "moving_mean", "moving_variance",
                           "inference output")):
        assert_like_keras(o, t, what, tol)
    # the update itself, against float64
    x64 = x.astype(np.float64)
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    for got, w, batch in [(results[True][1], weights[2], x64.mean(axis=red)),
                          (results[True][2], weights[3], x64.var(axis=red))]:
        ref = w.astype(dtype).astype(np.float64) * 0.8 + batch * 0.2
        assert rel_err(got, ref) <= tol


# --- install / uninstall ---------------------------------------------------------------------


def test_install_and_uninstall():
    assert NN.moments is ORIGINAL["moments"]
    bnk.install()
    assert NN.moments is not ORIGINAL["moments"]
    assert NN.batch_normalization is not ORIGINAL["batch_normalization"]
    installed = (NN.moments, NN.batch_normalization)
    bnk.install()                       # again: harmless, the originals stay Keras'
    assert (NN.moments, NN.batch_normalization) == installed
    bnk.uninstall()
    assert NN.moments is ORIGINAL["moments"]
    assert NN.batch_normalization is ORIGINAL["batch_normalization"]
    bnk.uninstall()                     # again: nothing to do
    assert NN.moments is ORIGINAL["moments"]


def test_ops_use_the_installed_functions(kernel_calls):
    x = np.ones((4, 3), np.float32)
    bnk.install()
    keras.ops.moments(x, [0])
    keras.ops.batch_normalization(x, np.zeros(3, np.float32), np.ones(3, np.float32), 1)
    assert kernel_calls == {"batch_stats": 1, "forward_eval": 1}
    bnk.uninstall()
    keras.ops.moments(x, [0])
    keras.ops.batch_normalization(x, np.zeros(3, np.float32), np.ones(3, np.float32), 1)
    assert kernel_calls == {"batch_stats": 1, "forward_eval": 1}


def test_wrong_backend(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match=r"'jax' backend.*KERAS_BACKEND=numpy"):
        bnk.install()
    assert NN.moments is ORIGINAL["moments"]
