"""The BatchNorm layer (batchnorm._layer): modes, running statistics, gradients and state."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import reference as ref
from conftest import (
    assert_grad_close,
    assert_out_close,
    assert_stat_close,
    make_params,
    make_x,
    param_grad_scales,
)

DTYPES = [np.float32, np.float64]
STATE_KEYS = ["gamma", "beta", "running_mean", "running_var", "num_batches_tracked"]


def state_equal(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for k in a:
        if isinstance(a[k], np.ndarray):
            if not (a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k], equal_nan=True)):
                return False
        elif a[k] != b[k] or type(a[k]) is not type(b[k]):
            return False
    return True


def trained_layer(dtype=np.float32, c=4, steps=3, seed=30, **kw):
    rng = np.random.default_rng(seed)
    layer = bn.BatchNorm(c, dtype=dtype, **kw)
    if layer.affine:
        g, b = make_params(rng, c)
        layer.gamma, layer.beta = g, b
    for _ in range(steps):
        layer(make_x(rng, (8, c, 3), 1, dtype))
    return layer


def stat_tol(dtype):
    return 1e-6 if dtype == np.float32 else 1e-14


# --- construction ---------------------------------------------------------------------------


def test_defaults():
    layer = bn.BatchNorm(5)
    assert layer.training and layer.num_features == 5 and layer.axis == 1
    assert layer.eps == 1e-5 and layer.momentum == 0.1
    assert layer.affine and layer.track_running_stats and layer.unbiased_running_var
    assert layer.dtype == np.float32
    for name, value in [("gamma", 1), ("beta", 0), ("running_mean", 0), ("running_var", 1)]:
        v = getattr(layer, name)
        assert v.dtype == np.float32 and v.shape == (5,) and (v == value).all(), name
    assert layer.num_batches_tracked == 0
    assert layer.grad_gamma is None and layer.grad_beta is None
    assert sorted(layer.state_dict()) == sorted(STATE_KEYS)
    assert "BatchNorm(5" in repr(layer) and "float32" in repr(layer)


@pytest.mark.parametrize(
    "args, kw, exc, msg",
    [
        ((0,), {}, ValueError, "num_features must be an integer >= 1, got 0"),
        ((2.5,), {}, TypeError, "num_features must be an integer"),
        ((3,), {"dtype": np.int32}, TypeError, "dtype must be float32 or float64"),
        ((3,), {"dtype": np.float16}, TypeError, "dtype must be float32 or float64"),
        ((3,), {"momentum": 1.5}, ValueError, "momentum must be in"),
        ((3,), {"momentum": -0.1}, ValueError, "momentum must be in"),
        ((3,), {"axis": "1"}, TypeError, "axis must be an integer"),
        ((3,), {"eps": -1.0}, ValueError, "eps must be a finite number"),
        ((3,), {"eps": float("nan")}, ValueError, "eps must be a finite number"),
    ],
)
def test_constructor_checks(args, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        bn.BatchNorm(*args, **kw)


# --- training mode and running statistics ---------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("momentum", [0.1, 0.3, 0.0, 1.0, None])
@pytest.mark.parametrize("unbiased", [True, False])
def test_running_statistics(dtype, momentum, unbiased):
    rng = np.random.default_rng(31)
    c = 3
    layer = bn.BatchNorm(c, momentum=momentum, unbiased_running_var=unbiased, dtype=dtype)
    gamma, beta = make_params(rng, c)
    layer.gamma, layer.beta = gamma, beta
    rm, rv = np.zeros(c), np.ones(c)
    for t in range(1, 5):
        x = make_x(rng, (5 + t, c, 2), 1, np.float32)  # batches of different sizes
        y = layer(x)
        ry, rst = ref.forward_train(x, layer.gamma, layer.beta, axis=1, eps=layer.eps)
        assert y.dtype == x.dtype
        assert_out_close(y, ry, np.float32)
        n = rst.count
        var = rst.var * n / (n - 1) if unbiased else rst.var
        m = 1.0 / t if momentum is None else momentum
        rm, rv = (1 - m) * rm + m * rst.mean, (1 - m) * rv + m * var
        assert layer.num_batches_tracked == t and isinstance(layer.num_batches_tracked, int)
        assert layer.running_mean.dtype == dtype and layer.running_var.dtype == dtype
        np.testing.assert_allclose(layer.running_mean, rm, rtol=stat_tol(dtype), atol=stat_tol(dtype))
        np.testing.assert_allclose(layer.running_var, rv, rtol=stat_tol(dtype), atol=stat_tol(dtype))


def test_cumulative_average_is_the_mean_of_the_batches():
    rng = np.random.default_rng(32)
    layer = bn.BatchNorm(4, momentum=None, unbiased_running_var=False, dtype=np.float64)
    means, variances = [], []
    for _ in range(6):
        x = make_x(rng, (10, 4), 1, np.float64)
        layer(x)
        st = ref.batch_stats(x)
        means.append(st.mean)
        variances.append(st.var)
    np.testing.assert_allclose(layer.running_mean, np.mean(means, axis=0), rtol=1e-13)
    np.testing.assert_allclose(layer.running_var, np.mean(variances, axis=0), rtol=1e-13)


def test_the_worked_example_of_the_conventions():
    """conventions.md: after one batch, cumulative average and biased running variance."""
    layer = bn.BatchNorm(4, momentum=None, unbiased_running_var=False, dtype=np.float64, eps=0.0)
    batch = np.array([[4, 5, 2, 1], [3, 4, 6, 0], [1, 4, 7, 9]], dtype=np.float64)
    layer(batch)
    np.testing.assert_allclose(layer.running_mean, [8 / 3, 13 / 3, 5, 10 / 3], rtol=1e-15)
    np.testing.assert_allclose(layer.running_var, [14 / 9, 2 / 9, 14 / 3, 146 / 9], rtol=1e-14)
    y = layer.eval()(np.array([[3.0, 5.0, 7.0, 9.0]]))
    np.testing.assert_allclose(np.round(y, 2), [[0.27, 1.41, 0.93, 1.41]])
    # PyTorch's defaults give something else after one batch
    torch_like = bn.BatchNorm(4, dtype=np.float64)
    torch_like(batch)
    assert not np.allclose(torch_like.eval()(np.array([[3.0, 5.0, 7.0, 9.0]])), y, atol=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_eval_uses_running_statistics(dtype):
    layer = trained_layer(dtype)
    before = layer.state_dict()
    assert layer.eval() is layer and not layer.training
    rng = np.random.default_rng(33)
    x = make_x(rng, (6, 4, 3), 1, dtype)
    y = layer(x)
    expected = ref.forward_eval(x, layer.running_mean, layer.running_var, layer.gamma,
                                layer.beta, eps=layer.eps)
    assert_out_close(y, expected, dtype)
    assert state_equal(layer.state_dict(), before)  # eval changes nothing
    # a single example can be normalized
    one = layer(x[:1, :, :1])
    assert one.shape == (1, 4, 1)
    assert_out_close(one, expected[:1, :, :1], dtype)
    assert layer.train() is layer and layer.training
    layer.train(False)
    assert not layer.training


def test_channels_last_and_float64_input_on_a_float32_layer():
    rng = np.random.default_rng(34)
    layer = bn.BatchNorm(5, axis=-1)
    x = make_x(rng, (4, 3, 3, 5), -1, np.float64)
    y = layer(x)
    assert y.dtype == np.float64 and layer.running_mean.dtype == np.float32
    assert_out_close(y, ref.forward_train(x, axis=-1)[0], np.float64)
    np.testing.assert_allclose(layer.running_mean, 0.1 * ref.batch_stats(x, -1).mean, rtol=1e-6)


def test_affine_false():
    rng = np.random.default_rng(35)
    layer = bn.BatchNorm(3, affine=False, dtype=np.float64)
    assert layer.gamma is None and layer.beta is None
    assert sorted(layer.state_dict()) == ["num_batches_tracked", "running_mean", "running_var"]
    x = make_x(rng, (7, 3), 1, np.float64)
    y = layer(x)
    assert_out_close(y, ref.forward_train(x)[0], np.float64)
    dy = make_x(rng, (7, 3), 1, np.float64)
    dx = layer.backward(dy)
    assert_grad_close(dx, ref.backward(dy, x, ref.batch_stats(x))[0], np.float64)
    assert layer.grad_gamma is None and layer.grad_beta is None
    with pytest.raises(AttributeError, match="gamma is None when affine=False"):
        layer.gamma = np.ones(3)
    with pytest.raises(AttributeError, match="beta is None when affine=False"):
        layer.beta = np.ones(3)


def test_track_running_stats_false():
    rng = np.random.default_rng(36)
    layer = bn.BatchNorm(3, track_running_stats=False, dtype=np.float64)
    assert layer.running_mean is None and layer.running_var is None
    assert layer.num_batches_tracked is None
    assert sorted(layer.state_dict()) == ["beta", "gamma"]
    layer.gamma, layer.beta = make_params(rng, 3)
    x = make_x(rng, (7, 3, 2), 1, np.float64)
    dy = make_x(rng, (7, 3, 2), 1, np.float64)
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        y = layer(x)  # batch statistics in both modes
        ry, rst = ref.forward_train(x, layer.gamma, layer.beta)
        assert_out_close(y, ry, np.float64)
        dx = layer.backward(dy)
        rdx, rdg, rdb = ref.backward(dy, x, rst, layer.gamma)
        assert_grad_close(dx, rdx, np.float64)
        assert_stat_close(layer.grad_gamma, rdg)
        assert_stat_close(layer.grad_beta, rdb)
        assert layer.running_mean is None and layer.num_batches_tracked is None
    with pytest.raises(ValueError, match="training needs more than one value per channel"):
        layer(x[:1, :, :1])  # eval mode, but batch statistics need a batch
    with pytest.raises(AttributeError, match="running_mean is None when track_running_stats"):
        layer.running_mean = np.zeros(3)
    layer.reset_running_stats()  # nothing to reset, no error
    assert layer.running_var is None


# --- backward -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape, axis", [((9, 4, 5), 1), ((6, 3, 3, 4), -1), ((40, 4), 1)])
def test_backward_training_and_eval(shape, axis, dtype):
    rng = np.random.default_rng(37)
    c = shape[axis]
    layer = bn.BatchNorm(c, axis=axis, dtype=np.float64)
    layer.gamma, layer.beta = make_params(rng, c)
    x = make_x(rng, shape, axis, dtype)
    dy = make_x(rng, shape, axis, dtype)
    x_copy, dy_copy = x.copy(), dy.copy()

    layer(x)
    dx = layer.backward(dy)
    rst = ref.batch_stats(x, axis)
    rdx, rdg, rdb = ref.backward(dy, x, rst, layer.gamma, axis=axis, eps=layer.eps)
    sg, sb = param_grad_scales(dy, x, rst.mean, rst.var, axis)
    assert dx.dtype == dtype
    assert_grad_close(dx, rdx, dtype)
    assert layer.grad_gamma.dtype == np.float64
    assert_stat_close(layer.grad_gamma, rdg, scale=sg)
    assert_stat_close(layer.grad_beta, rdb, scale=sb)

    layer.eval()
    layer(x)
    out = np.empty_like(x)
    assert layer.backward(dy, out=out) is out
    frozen = (layer.running_mean, layer.running_var)
    rdx, rdg, rdb = ref.backward(dy, x, frozen, layer.gamma, axis=axis, eps=layer.eps,
                                 training=False)
    sg, sb = param_grad_scales(dy, x, *frozen, axis, eps=layer.eps)
    assert_grad_close(out, rdx, dtype)
    assert_stat_close(layer.grad_gamma, rdg, scale=sg)
    assert_stat_close(layer.grad_beta, rdb, scale=sb)
    assert np.array_equal(x, x_copy) and np.array_equal(dy, dy_copy)


def test_grad_dtype_follows_the_layer():
    layer = trained_layer(np.float32)
    x = make_x(np.random.default_rng(38), (8, 4, 3), 1, np.float32)
    layer(x)
    layer.backward(np.ones_like(x))
    assert layer.grad_gamma.dtype == np.float32 and layer.grad_beta.dtype == np.float32
    np.testing.assert_allclose(layer.grad_beta, 24.0)


def test_backward_before_forward_raises():
    layer = bn.BatchNorm(3)
    with pytest.raises(RuntimeError, match="needs a forward call first"):
        layer.backward(np.ones((4, 3), np.float32))
    assert layer.grad_gamma is None


def test_backward_after_an_in_place_forward_raises():
    rng = np.random.default_rng(39)
    for mode in (True, False):
        layer = bn.BatchNorm(3, dtype=np.float64).train(mode)
        x = make_x(rng, (6, 3), 1, np.float64)
        expected = layer.__class__(3, dtype=np.float64).train(mode)(x.copy())
        y = layer(x, out=x)
        assert y is x
        assert_out_close(x, expected, np.float64)
        with pytest.raises(RuntimeError, match="overwrote"):
            layer.backward(np.ones_like(x))
        # the next ordinary forward makes backward available again
        x2 = make_x(rng, (6, 3), 1, np.float64)
        layer(x2)
        assert layer.backward(np.ones_like(x2)).shape == x2.shape


def test_backward_refuses_an_input_modified_since_the_forward():
    """A data loader refilling the batch buffer before backward: an error, not the gradient
    of the next batch."""
    rng = np.random.default_rng(41)
    for shape in [(16, 4, 3), (2, 4), (300, 4, 7)]:
        layer = bn.BatchNorm(4)
        buf = make_x(rng, shape, 1, np.float32)
        layer(buf)
        buf[...] = make_x(rng, buf.shape, 1, np.float32)     # the next batch arrives
        with pytest.raises(RuntimeError, match="modified after the forward call"):
            layer.backward(np.ones_like(buf))
        assert layer.grad_gamma is None
    # NaN in an unchanged input is no change
    x = make_x(rng, (8, 4), 1, np.float32)
    x[0, 0] = np.nan
    layer = bn.BatchNorm(4)
    with pytest.warns(RuntimeWarning):
        layer(x)
    assert layer.backward(np.ones_like(x)).shape == x.shape


def test_input_sample_reads_every_layout_in_c_order():
    """The values backward compares (_sample) are every (size // 64)-th of x in C order,
    whatever x's strides: the compiled reader against NumPy's slicing."""
    from batchnorm import _layer

    rng = np.random.default_rng(43)
    base = rng.standard_normal((30, 40, 6)).astype(np.float32)
    views = [base, base[:, ::3], base[::-1], base.transpose(2, 0, 1), np.asfortranarray(base),
             base[:1, :2], base[:0], base[5, :, 1], np.broadcast_to(base[:1], (7, 40, 6)),
             base.astype(np.float64)[:, 1:7:2], base.astype(np.float16).T, base[3:4, 7:8, 2:3]]
    for a in views:
        step = max(1, a.size // _layer._SAMPLE_SIZE)
        want = np.ascontiguousarray(a).reshape(-1)[::step].tobytes()
        assert _layer._sample(a) == want, (a.shape, a.strides)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    a = base.astype(ml_dtypes.bfloat16)[:, ::2]        # a dtype with no buffer format
    assert _layer._sample(a) == np.ascontiguousarray(a).reshape(-1)[::a.size // 64].tobytes()


def test_backward_sees_a_strided_input_modified():
    rng = np.random.default_rng(44)
    buf = make_x(rng, (40, 8, 5), 1, np.float32)
    x = buf[:, ::2]                     # no contiguous view: sampled through its strides
    layer = bn.BatchNorm(4)
    layer(x)
    x[...] = make_x(rng, x.shape, 1, np.float32)
    with pytest.raises(RuntimeError, match="modified after the forward call"):
        layer.backward(np.ones_like(x))


def test_backward_errors_change_nothing():
    rng = np.random.default_rng(40)
    layer = bn.BatchNorm(3, dtype=np.float64)
    x = make_x(rng, (6, 3), 1, np.float64)
    layer(x)
    dy = make_x(rng, (6, 3), 1, np.float64)
    dx = layer.backward(dy)
    g, b = layer.grad_gamma.copy(), layer.grad_beta.copy()
    with pytest.raises(ValueError, match="dy must have the shape of x"):
        layer.backward(np.ones((6, 4)))
    with pytest.raises(TypeError, match="dy must have the dtype of x"):
        layer.backward(np.ones((6, 3), np.float32))
    assert np.array_equal(layer.grad_gamma, g) and np.array_equal(layer.grad_beta, b)
    assert np.array_equal(layer.backward(dy), dx)


# --- state ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_state_dict_round_trip(dtype):
    layer = trained_layer(dtype, momentum=None)
    state = layer.state_dict()
    assert sorted(state) == sorted(STATE_KEYS)
    assert state["num_batches_tracked"] == 3
    # copies: changing them changes nothing in the layer
    state["running_mean"][:] = 99
    assert not (layer.running_mean == 99).any()
    state = layer.state_dict()

    other = bn.BatchNorm(4, momentum=None, dtype=dtype)
    other.load_state_dict(state)
    assert state_equal(other.state_dict(), state)
    state["gamma"][:] = 42  # the layer loaded copies
    assert not (other.gamma == 42).any()
    x = make_x(np.random.default_rng(41), (5, 4, 3), 1, dtype)
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        getattr(other, mode)()
        assert np.array_equal(layer(x), other(x))
    assert state_equal(other.state_dict(), layer.state_dict())  # incl. the cumulative count


def test_load_state_dict_converts_to_the_layer_dtype():
    layer = bn.BatchNorm(3, dtype=np.float32)
    layer.load_state_dict(
        {"gamma": [1, 2, 3], "beta": np.zeros(3), "running_mean": np.arange(3.0),
         "running_var": np.full(3, 2.0), "num_batches_tracked": np.int64(7)}
    )
    assert layer.gamma.dtype == np.float32 and np.array_equal(layer.gamma, [1, 2, 3])
    assert layer.num_batches_tracked == 7 and type(layer.num_batches_tracked) is int


@pytest.mark.parametrize(
    "change, exc, msg",
    [
        (lambda s: s.pop("running_var"), KeyError, r"missing \['running_var'\]"),
        (lambda s: s.update(extra=np.ones(4)), KeyError, r"unexpected \['extra'\]"),
        (lambda s: s.update(gamma=np.ones(5)), ValueError, r"gamma must have shape \(C,\)"),
        (lambda s: s.update(running_mean=np.ones((4, 1))), ValueError, "running_mean must have"),
        (lambda s: s.update(running_var=np.ones(3)), ValueError, "running_var must have shape"),
        (lambda s: s.update(beta=np.ones(4, complex)), TypeError, "beta must be a real"),
        (lambda s: s.update(num_batches_tracked=-1), ValueError, "num_batches_tracked must be"),
        (lambda s: s.update(num_batches_tracked=1.5), TypeError, "num_batches_tracked must be an"),
        (lambda s: s.update(num_batches_tracked=2**63), ValueError, r"\[0, 2\*\*63\)"),
        (lambda s: s.update(running_var=np.array([1.0, -1.0, 1.0, 1.0])), ValueError,
         r"running_var must be non-negative, got negative values in channel\(s\) 1"),
        (lambda s: s.update(running_var=np.array([1.0, 1.0, np.nan, 1.0])), ValueError,
         r"running_var must be finite, got NaN or inf in channel\(s\) 2"),
        (lambda s: s.update(running_mean=np.array([np.inf, 0.0, 0.0, 0.0])), ValueError,
         r"running_mean must be finite"),
        (lambda s: s.update(running_mean=np.array([0.0, 0.0, 0.0, 1e39])), ValueError,
         r"running_mean has values beyond the range of float32 in channel\(s\) 3"),
        (lambda s: s.update(gamma=np.array([0.0, -1e300, 0.0, 0.0])), ValueError,
         r"gamma has values beyond the range of float32"),
    ],
    ids=["missing", "unexpected", "gamma-length", "mean-2d", "var-length", "beta-complex",
         "count-negative", "count-float", "count-int64", "var-negative", "var-nan",
         "mean-inf", "mean-overflow", "gamma-overflow"],
)
def test_load_state_dict_rejects_bad_state_and_changes_nothing(change, exc, msg):
    layer = trained_layer(np.float32)
    before = layer.state_dict()
    state = layer.state_dict()
    state["gamma"] = state["gamma"] + 1  # a valid entry that must not be applied either
    state["running_mean"] = state["running_mean"] + 1
    change(state)
    with pytest.raises(exc, match=msg):
        layer.load_state_dict(state)
    assert state_equal(layer.state_dict(), before)


def test_load_state_dict_not_strict():
    layer = trained_layer(np.float64)
    before = layer.state_dict()
    layer.load_state_dict({"running_mean": np.full(4, 2.0)}, strict=False)
    after = layer.state_dict()
    assert np.array_equal(after["running_mean"], np.full(4, 2.0))
    for key in ("gamma", "beta", "running_var", "num_batches_tracked"):
        assert np.array_equal(after[key], before[key])
    with pytest.raises(ValueError, match="running_var must have shape"):
        layer.load_state_dict({"running_var": np.ones(2)}, strict=False)


def test_reset_running_stats_and_parameters():
    layer = trained_layer(np.float64)
    gamma, beta = layer.gamma.copy(), layer.beta.copy()
    layer.reset_running_stats()
    assert (layer.running_mean == 0).all() and (layer.running_var == 1).all()
    assert layer.num_batches_tracked == 0
    assert np.array_equal(layer.gamma, gamma) and np.array_equal(layer.beta, beta)
    assert layer.running_mean.dtype == np.float64
    layer.reset_parameters()
    assert (layer.gamma == 1).all() and (layer.beta == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kw", [{}, {"affine": False}, {"track_running_stats": False},
                                {"momentum": None, "axis": -1}])
def test_pickle_round_trip(dtype, kw):
    rng = np.random.default_rng(42)
    axis = kw.get("axis", 1)
    layer = bn.BatchNorm(4, dtype=dtype, **kw)
    shape = (6, 4, 3) if axis == 1 else (6, 3, 4)
    layer(make_x(rng, shape, axis, dtype))
    x = make_x(rng, shape, axis, dtype)
    layer(x)
    clone = pickle.loads(pickle.dumps(layer))
    assert repr(clone) == repr(layer)
    assert clone.training == layer.training and clone.unbiased_running_var == layer.unbiased_running_var
    assert state_equal(clone.state_dict(), layer.state_dict())
    # the last forward's input is not part of the pickled layer
    with pytest.raises(RuntimeError, match="needs a forward call first"):
        clone.backward(np.ones_like(x))
    assert layer.backward(np.ones_like(x)).shape == x.shape  # the original still has it
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        getattr(clone, mode)()
        x = make_x(rng, shape, axis, dtype)
        assert np.array_equal(clone(x), layer(x))
        assert state_equal(clone.state_dict(), layer.state_dict())


def test_property_setters_validate():
    layer = bn.BatchNorm(3, dtype=np.float32)
    layer.gamma = [1, 2, 3]
    assert layer.gamma.dtype == np.float32 and np.array_equal(layer.gamma, [1, 2, 3])
    layer.running_var = np.array([0.5, 1.0, 2.0])
    assert layer.running_var.dtype == np.float32
    before = layer.state_dict()
    for name in ("gamma", "beta", "running_mean", "running_var"):
        with pytest.raises(ValueError, match=rf"{name} must have shape \(C,\) = \(3,\)"):
            setattr(layer, name, np.ones(4))
        with pytest.raises(ValueError, match=rf"{name} must have shape"):
            setattr(layer, name, np.ones((3, 1)))
        with pytest.raises(TypeError, match=rf"{name} must be a real numeric array"):
            setattr(layer, name, np.array(["a", "b", "c"]))
    assert state_equal(layer.state_dict(), before)


# --- a call that raises changes no state ----------------------------------------------------


def test_a_forward_that_raises_changes_no_state():
    rng = np.random.default_rng(43)
    layer = trained_layer(np.float32)
    x = make_x(rng, (8, 4, 3), 1, np.float32)
    layer(x)
    dy = make_x(rng, (8, 4, 3), 1, np.float32)
    dx = layer.backward(dy)
    before = layer.state_dict()
    bad_calls = [
        (lambda: layer(np.ones((8, 5, 3), np.float32)), ValueError, "num_features=4"),
        (lambda: layer(np.ones((8, 4, 3), np.int32)), TypeError, "x must be a float32"),
        (lambda: layer(np.ones(4, np.float32)), ValueError, "at least 2 dimensions"),
        (lambda: layer(np.ones((1, 4), np.float32)), ValueError, "more than one value"),
        (lambda: layer(np.ones((0, 4), np.float32)), ValueError, "more than one value"),
        (lambda: layer(x, out=np.empty((8, 4, 2), np.float32)), ValueError, "out must have shape"),
        (lambda: layer(x, out=np.empty((8, 4, 3))), TypeError, "out must have dtype"),
    ]
    for call, exc, msg in bad_calls:
        with pytest.raises(exc, match=msg):
            call()
        assert state_equal(layer.state_dict(), before)
    # and backward still refers to the last successful forward
    assert np.array_equal(layer.backward(dy), dx)
    layer.eval()
    with pytest.raises(ValueError, match="num_features=4"):
        layer(np.ones((1, 3), np.float32))
    assert state_equal(layer.state_dict(), before)


def test_layer_axis_errors():
    layer = bn.BatchNorm(3, axis=2)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        layer(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="3 channels along axis -1.*num_features=4"):
        bn.BatchNorm(4, axis=-1)(np.ones((4, 2, 3), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_non_finite_input_leaves_running_statistics_alone(bad, momentum):
    rng = np.random.default_rng(44)
    layer = bn.BatchNorm(3, momentum=momentum, dtype=np.float64)
    good = [make_x(rng, (6, 3, 2), 1, np.float64) for _ in range(2)]
    layer(good[0])
    before = layer.state_dict()
    x = make_x(rng, (6, 3, 2), 1, np.float64)
    x[2, 1, 0] = bad
    with pytest.warns(RuntimeWarning, match="not finite"):
        y = layer(x)
    assert np.isnan(y[:, 1]).all()  # the output shows it
    assert np.isfinite(y[:, [0, 2]]).all()
    assert state_equal(layer.state_dict(), before)
    assert np.isfinite(layer.running_mean).all() and np.isfinite(layer.running_var).all()
    # the next good batch continues as if the bad one had never been seen
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(good[1])
    assert layer.num_batches_tracked == 2
    if momentum is None:
        means = [ref.batch_stats(g).mean for g in good]
        np.testing.assert_allclose(layer.running_mean, np.mean(means, axis=0), rtol=1e-13)


@pytest.mark.parametrize("virtual", [None, 4])
def test_running_update_beyond_float32_leaves_running_statistics_alone(virtual):
    """Finite batch statistics whose running update overflows the layer's float32 (a
    variance of 1e40): a warning pointing at the caller, nothing stored, y still given."""
    layer = bn.BatchNorm(2, virtual_batch_size=virtual)
    layer(np.arange(16, dtype=np.float32).reshape(8, 2))
    before = layer.state_dict()
    x = np.tile(np.array([[1e20, 1.0], [-1e20, 2.0]], np.float32), (4, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(x)
    assert [str(w.message)[:30] for w in caught] == ["batch statistics are not finit"]
    assert caught[0].filename == __file__
    assert state_equal(layer.state_dict(), before)
    assert np.isfinite(y).all()


@pytest.mark.parametrize("name", ["running_mean", "running_var", "gamma", "beta"])
def test_setters_check_values_like_load_state_dict(name):
    layer = bn.BatchNorm(4)
    before = getattr(layer, name).copy()
    with pytest.raises(ValueError, match=f"{name} has values beyond the range of float32"):
        setattr(layer, name, np.array([1.0, 1.0, 1e40, 1.0]))
    assert np.array_equal(getattr(layer, name), before)


def test_num_features_and_axis_are_not_bools():
    with pytest.raises(TypeError, match="num_features must be an integer"):
        bn.BatchNorm(True)
    with pytest.raises(TypeError, match="axis must be an integer"):
        bn.BatchNorm(4, axis=False)


def test_running_statistics_stay_finite_when_the_cast_overflows():
    """A finite batch whose variance overflows float32 leaves the running statistics as
    they were (with a warning), rather than storing inf."""
    layer = bn.BatchNorm(3, momentum=0.5)
    x = np.array([[3e19, 1.0, 0.0], [-3e19, 2.0, 1.0]], np.float64)
    before = layer.state_dict()
    with pytest.warns(RuntimeWarning, match="not updated"):
        layer(x)
    assert state_equal(layer.state_dict(), before)
    assert np.isfinite(layer.running_var).all()


@pytest.mark.parametrize("trap", ["errstate", "warnings"])
def test_a_call_that_raises_changes_no_state(trap):
    """Under np.errstate(all='raise') a training call works and updates everything; with
    warnings turned into errors, a batch with NaN raises before any state changes."""
    import warnings
    layer = trained_layer(np.float32)
    x = np.random.default_rng(3).normal(size=(8, 4)).astype(np.float32)
    if trap == "errstate":
        n = layer.num_batches_tracked
        with np.errstate(all="raise"):
            layer(x)
            layer.backward(x)
        assert layer.num_batches_tracked == n + 1
        return
    before = layer.state_dict()
    saved = layer._saved
    x[0, 1] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="not updated"):
            layer(x)
    assert state_equal(layer.state_dict(), before) and layer._saved is saved


# --- precise BN: set_running_stats ------------------------------------------------------------


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_set_running_stats_is_the_population_statistics(unbiased, dtype):
    rng = np.random.default_rng(0)
    batches = [rng.normal(1e3, 2.0, size=(n, 3, 2)) for n in (16, 16, 7, 30)]
    layer = bn.BatchNorm(3, unbiased_running_var=unbiased, dtype=dtype)
    layer(batches[0].astype(np.float32))
    layer.set_running_stats(bn.merge_stats(*map(bn.batch_stats, batches)), n_batches=4)
    whole = np.concatenate(batches)
    want_var = whole.var(axis=(0, 2), ddof=1 if unbiased else 0)
    assert layer.running_mean.dtype == dtype and layer.num_batches_tracked == 4
    rtol = 1e-12 if dtype == np.float64 else 1e-7
    np.testing.assert_allclose(layer.running_mean, whole.mean(axis=(0, 2)), rtol=rtol)
    np.testing.assert_allclose(layer.running_var, want_var, rtol=rtol * 10)


def test_set_running_stats_checks_everything_before_changing_anything():
    layer = bn.BatchNorm(2)
    before = layer.state_dict()
    good = bn.batch_stats(np.random.default_rng(1).normal(size=(5, 2)))
    cases = [
        (bn.Stats(good.mean, good.var, 1), ValueError, "count must be >= 2"),
        (bn.batch_stats(np.ones((4, 3))), ValueError, "3 channels"),
        (bn.Stats(np.array([1e39, 0.0]), good.var, 5), ValueError, "beyond the range"),
        (bn.Stats(good.mean, np.array([np.inf, 1.0]), 5), ValueError, "finite"),
        ((good.mean, good.var), TypeError, "Stats"),
    ]
    for st, exc, match in cases:
        with pytest.raises(exc, match=match):
            layer.set_running_stats(st)
    for n, exc in [(1.5, TypeError), (True, TypeError), (-1, ValueError)]:
        with pytest.raises(exc, match="n_batches"):
            layer.set_running_stats(good, n_batches=n)
    after = layer.state_dict()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)
    with pytest.raises(AttributeError, match="track_running_stats"):
        bn.BatchNorm(2, track_running_stats=False).set_running_stats(good)
    layer.set_running_stats(good)           # n_batches=None leaves the count alone
    assert layer.num_batches_tracked == 0


def test_set_running_stats_against_torch_update_bn():
    """update_bn averages per-batch statistics: its mean is the population mean for equal
    batches; its variance is the mean of the per-batch unbiased variances, short of the
    population variance by the spread of the batch means, which set_running_stats keeps."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    batches = [rng.normal(loc, 1.0, size=(32, 3)) for loc in (0.0, 1.0, 2.0, 3.0)]
    module = torch.nn.Sequential(torch.nn.BatchNorm1d(3).double())
    loader = [torch.from_numpy(b) for b in batches]
    torch.optim.swa_utils.update_bn(loader, module)
    layer = bn.BatchNorm(3, dtype=np.float64)
    layer.set_running_stats(bn.merge_stats(*map(bn.batch_stats, batches)), n_batches=4)
    whole = np.concatenate(batches)
    np.testing.assert_allclose(layer.running_mean, module[0].running_mean.numpy(), rtol=1e-12)
    assert layer.num_batches_tracked == int(module[0].num_batches_tracked)
    np.testing.assert_allclose(module[0].running_var.numpy(),
                               np.mean([b.var(axis=0, ddof=1) for b in batches], axis=0),
                               rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, whole.var(axis=0, ddof=1), rtol=1e-12)
    assert (layer.running_var > module[0].running_var.numpy() + 0.5).all()   # ~1.25 apart
