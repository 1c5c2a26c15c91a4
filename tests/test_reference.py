"""The oracle (batchnorm.reference) against numbers worked out by hand.

Everything else is checked against reference.py, so reference.py is checked against
arithmetic done on paper (the fractions are in the comments); its masked statistics and fused
epilogue also against their peers: Keras 3, jax.grad and PyTorch autograd.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchnorm import Stats
from batchnorm import reference as ref
from conftest import rel_err, require

# The seed batch of conventions.md: 3 examples, 4 features.
BATCH = np.array([[4, 5, 2, 1], [3, 4, 6, 0], [1, 4, 7, 9]], dtype=np.float64)
MEAN = np.array([8 / 3, 13 / 3, 5, 10 / 3])  # (4+3+1)/3, (5+4+4)/3, (2+6+7)/3, (1+0+9)/3
VAR = np.array([14 / 9, 2 / 9, 14 / 3, 146 / 9])  # e.g. ((4/3)^2+(1/3)^2+(5/3)^2)/3 = 42/27


def test_batch_stats_of_the_seed_batch():
    st = ref.batch_stats(BATCH)
    assert isinstance(st, Stats)
    np.testing.assert_allclose(st.mean, MEAN, rtol=1e-15)
    np.testing.assert_allclose(st.var, VAR, rtol=1e-14)
    assert st.count == 3
    # biased: the unbiased variance is n/(n-1) = 3/2 times larger
    np.testing.assert_allclose(st.unbiased_var(), [7 / 3, 1 / 3, 7, 73 / 3], rtol=1e-14)


def test_inference_on_the_seed_example():
    # (3 - 8/3) / sqrt(14/9) = 1/sqrt(14); (5 - 13/3) / sqrt(2/9) = sqrt(2);
    # (7 - 5) / sqrt(14/3) = sqrt(6/7); (9 - 10/3) / sqrt(146/9) = 17/sqrt(146)
    y = ref.forward_eval(np.array([[3.0, 5, 7, 9]]), MEAN, VAR, eps=0.0)
    expected = [1 / math.sqrt(14), math.sqrt(2), math.sqrt(6 / 7), 17 / math.sqrt(146)]
    np.testing.assert_allclose(y, [expected], rtol=1e-14)
    np.testing.assert_allclose(np.round(y, 2), [[0.27, 1.41, 0.93, 1.41]])


def test_forward_train_small_cases():
    # two values per column always normalize to -1, +1
    y, st = ref.forward_train(np.array([[1.0, 10.0], [3.0, 30.0]]), eps=0.0)
    np.testing.assert_array_equal(y, [[-1, -1], [1, 1]])
    np.testing.assert_array_equal(st.mean, [2, 20])
    np.testing.assert_array_equal(st.var, [1, 100])
    # gamma and beta: column (0, 2) has mean 1, var 1 -> (-1, 1) -> 3 * (-1, 1) + 0.5
    y, _ = ref.forward_train(np.array([[0.0], [2.0]]), [3.0], [0.5], eps=0.0)
    np.testing.assert_array_equal(y, [[-2.5], [3.5]])
    # eps enters as sqrt(var + eps): var 1, eps 3 -> divide by 2
    y, _ = ref.forward_train(np.array([[0.0], [2.0]]), eps=3.0)
    np.testing.assert_array_equal(y, [[-0.5], [0.5]])


def test_nchw_channels_and_channels_last():
    # channel 0 holds 1, 2, 3, 4 (mean 5/2, var 5/4); channel 1 is constant 5
    x = np.array([[[[1.0, 2.0]], [[5.0, 5.0]]], [[[3.0, 4.0]], [[5.0, 5.0]]]])
    assert x.shape == (2, 2, 1, 2)
    st = ref.batch_stats(x, axis=1)
    np.testing.assert_array_equal(st.mean, [2.5, 5.0])
    np.testing.assert_array_equal(st.var, [1.25, 0.0])
    assert st.count == 4
    with np.errstate(invalid="ignore"):  # channel 1 is 0/0 with eps = 0
        y, _ = ref.forward_train(x, gamma=[2.0, 2.0], beta=[0.0, -7.0], axis=1, eps=0.0)
    s = 2 / math.sqrt(1.25)
    np.testing.assert_allclose(y[:, 0].ravel(), [-1.5 * s, -0.5 * s, 0.5 * s, 1.5 * s], rtol=1e-15)
    # zero variance with eps > 0: exactly beta
    y, _ = ref.forward_train(x, gamma=[2.0, 2.0], beta=[0.0, -7.0], axis=1)
    assert (y[:, 1] == -7.0).all()
    # the same data channels-last gives the same numbers
    x_last = np.moveaxis(x, 1, -1)
    st_last = ref.batch_stats(x_last, axis=-1)
    np.testing.assert_array_equal(st_last.mean, st.mean)
    np.testing.assert_array_equal(st_last.var, st.var)
    y_last, _ = ref.forward_train(x_last, gamma=[2.0, 2.0], beta=[0.0, -7.0], axis=-1)
    np.testing.assert_allclose(np.moveaxis(y_last, -1, 1), y, rtol=1e-15)


def test_axis_zero_and_middle():
    x = np.arange(24.0).reshape(2, 3, 4)
    st = ref.batch_stats(x, axis=2)  # column j of every (2, 3) slice: j, j+4, ..., j+20
    np.testing.assert_allclose(st.mean, [10, 11, 12, 13])
    # values j + 4k, k in {0, 1, 2, 3, 4, 5}: variance 16 * var(0..5) = 16 * 35/12
    np.testing.assert_allclose(st.var, np.full(4, 16 * 35 / 12))
    st0 = ref.batch_stats(x, axis=0)  # 0..11 and 12..23
    np.testing.assert_allclose(st0.mean, [5.5, 17.5])
    np.testing.assert_allclose(st0.var, [143 / 12, 143 / 12])
    assert st0.count == 12


def test_backward_by_hand():
    # one channel, x = (0, 1, 5): mean 2, var 14/3 = sigma^2; dy = (1, 0, 0), eps = 0
    # dbeta = 1; dgamma = sum dy*xhat = -2/sigma
    # dx = gamma/sigma * (dy - 1/3 - xhat * dgamma/3) = gamma/sigma * (8, -10, 2)/21
    x = np.array([[0.0], [1.0], [5.0]])
    dy = np.array([[1.0], [0.0], [0.0]])
    sigma = math.sqrt(14 / 3)
    st = ref.batch_stats(x)
    for gamma in (None, [2.0]):
        g = 1.0 if gamma is None else 2.0
        dx, dgamma, dbeta = ref.backward(dy, x, st, gamma, eps=0.0)
        np.testing.assert_allclose(dx.ravel(), g / sigma * np.array([8, -10, 2]) / 21, rtol=1e-14)
        np.testing.assert_allclose(dgamma, [-2 / sigma], rtol=1e-14)
        np.testing.assert_array_equal(dbeta, [1.0])
    # frozen statistics: dx = dy * gamma / sqrt(var + eps) = dy * 2 / sqrt(3 + 1)
    dx, dgamma, dbeta = ref.backward(dy, x, (np.array([2.0]), np.array([3.0])), [2.0], eps=1.0,
                                     training=False)
    np.testing.assert_array_equal(dx, dy)
    np.testing.assert_allclose(dgamma, [(0 - 2) / 2], rtol=1e-15)  # dy*xhat at x=0: -2/2
    np.testing.assert_array_equal(dbeta, [1.0])


def test_a_bias_before_batch_norm_gets_no_gradient():
    """The mean absorbs a per-channel bias, so dx sums to zero over each channel."""
    rng = np.random.default_rng(60)
    x = rng.standard_normal((5, 3, 4))
    dy = rng.standard_normal((5, 3, 4))
    dx, _, _ = ref.backward(dy, x, ref.batch_stats(x), rng.standard_normal(3))
    np.testing.assert_allclose(dx.sum(axis=(0, 2)), 0.0, atol=1e-13)
    y1, _ = ref.forward_train(x)
    y2, _ = ref.forward_train(x + np.array([1.0, -2.0, 5.0]).reshape(1, 3, 1))
    np.testing.assert_allclose(y1, y2, atol=1e-14)


def test_reference_returns_float64_for_float32_input():
    x = BATCH.astype(np.float32)
    y, st = ref.forward_train(x)
    assert y.dtype == np.float64 and st.mean.dtype == np.float64
    dx, dg, db = ref.backward(x, x, st)
    assert dx.dtype == dg.dtype == db.dtype == np.float64
    assert ref.forward_eval(x, MEAN, VAR).dtype == np.float64


@pytest.mark.parametrize("training", [True, False])
def test_reference_gradients_are_those_of_its_forward(training):
    """Central differences of the reference's own forward (float64, small problem)."""
    rng = np.random.default_rng(61)
    x = rng.standard_normal((4, 3, 2)) * 2 + 1
    w = rng.standard_normal(x.shape)
    gamma = rng.uniform(0.5, 2.0, 3)
    frozen = (rng.standard_normal(3), rng.uniform(0.5, 2.0, 3))

    def loss(xx):
        if training:
            return float((ref.forward_train(xx, gamma, eps=1e-3)[0] * w).sum())
        return float((ref.forward_eval(xx, *frozen, gamma, eps=1e-3) * w).sum())

    st = ref.batch_stats(x) if training else frozen
    dx, _, _ = ref.backward(w, x, st, gamma, eps=1e-3, training=training)
    h = 1e-6
    fd = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        fd[i] = (loss(x + e) - loss(x - e)) / (2 * h)
    np.testing.assert_allclose(dx, fd, rtol=1e-6, atol=1e-8)


# --- masked statistics and the fused epilogue -------------------------------------------------
#
# Keras 3's `mask`: the statistics over the True positions only, EVERY position normalized with
# them; the epilogue y = relu(bn(x) + z) with its gradients (dz, the residual's, last). By hand
# first, then against Keras 3, jax.grad and PyTorch autograd.

MASK = np.array([True, False, True])  # the seed batch without its middle example

# what masked-out positions may hold: none of it may reach the statistics
POISON = np.array([np.nan, np.inf, -np.inf, 1e30, -1e300])


def _gather(x, axis, mask):
    """The selected positions as an (n, C) array: what the masked statistics are those of."""
    ax = axis % x.ndim
    rest = x.shape[:ax] + x.shape[ax + 1:]
    return np.moveaxis(x, ax, -1)[np.broadcast_to(mask, rest)]


def _poisoned(x, axis, mask, poison=POISON):
    """x with `poison` values in every masked-out position."""
    x = x.copy()
    ax = axis % x.ndim
    view = np.moveaxis(x, ax, -1)
    out = ~np.broadcast_to(mask, x.shape[:ax] + x.shape[ax + 1:])
    view[out] = np.resize(poison, view[out].shape)
    return x


def test_masked_stats_of_the_seed_batch():
    # rows 0 and 2: columns (4, 1), (5, 4), (2, 7), (1, 9): means 5/2, 9/2, 9/2, 5 and
    # variances (3/2)^2, (1/2)^2, (5/2)^2, 4^2
    st = ref.batch_stats(BATCH, mask=MASK)
    np.testing.assert_array_equal(st.mean, [2.5, 4.5, 4.5, 5.0])
    np.testing.assert_array_equal(st.var, [2.25, 0.25, 6.25, 16.0])
    assert st.count.dtype == np.int64 and st.count.shape == (4,)
    np.testing.assert_array_equal(st.count, [2, 2, 2, 2])
    # every row is normalized with them, the masked-out one too:
    # (3 - 5/2) / (3/2) = 1/3, (4 - 9/2) / (1/2) = -1, (6 - 9/2) / (5/2) = 3/5, (0 - 5) / 4
    y, _ = ref.forward_train(BATCH, mask=MASK, eps=0.0)
    np.testing.assert_allclose(y[1], [1 / 3, -1, 3 / 5, -5 / 4], rtol=1e-15)
    np.testing.assert_allclose(y[[0, 2]], [[1, 1, -1, -1], [-1, -1, 1, 1]], rtol=1e-15)
    # the middle row may hold anything: the statistics stay the same, and nothing is raised
    for bad in POISON:
        xb = BATCH.copy()
        xb[1, 2] = bad
        with np.errstate(all="raise"):
            stb = ref.batch_stats(xb, mask=MASK)
        np.testing.assert_array_equal(stb.mean, st.mean)
        np.testing.assert_array_equal(stb.var, st.var)


MASK_CASES = [  # (x shape, channel axis, mask shape)
    ((9, 4), 1, (9,)),
    ((9, 4), -1, (9,)),
    ((3, 4, 5, 2), 1, (3, 5, 2)),      # NCHW, a mask per (n, h, w)
    ((3, 5, 2, 4), -1, (3, 5, 2)),     # NHWC, the same
    ((3, 4, 5, 2), 1, (3, 1, 1)),      # whole examples
    ((3, 4, 5, 2), 1, (5, 2)),         # the same positions of every example
    ((3, 5, 2, 4), -1, (3, 1, 2)),
    ((4, 3, 6), 0, (3, 6)),            # the channel axis first
]


@pytest.mark.parametrize("shape,axis,mask_shape", MASK_CASES)
def test_masked_stats_are_those_of_the_selected_positions(shape, axis, mask_shape):
    rng = np.random.default_rng(70)
    c = shape[axis]
    x = rng.standard_normal(shape) * 2 + 3
    mask = rng.random(mask_shape) < 0.6
    mask.flat[0], mask.flat[-1] = True, False  # both kinds of position
    sel = _gather(x, axis, mask)
    st = ref.batch_stats(x, axis, mask=mask)
    plain = ref.batch_stats(sel, axis=-1)
    np.testing.assert_allclose(st.mean, plain.mean, rtol=1e-14)
    np.testing.assert_allclose(st.var, plain.var, rtol=1e-13)
    assert st.count.dtype == np.int64
    np.testing.assert_array_equal(st.count, np.full(c, plain.count))
    # NaN, inf and huge values in the masked-out positions change nothing, and raise nothing
    xp = _poisoned(x, axis, mask)
    with np.errstate(all="raise"):
        stp = ref.batch_stats(xp, axis, mask=mask)
    np.testing.assert_array_equal(stp.mean, st.mean)
    np.testing.assert_array_equal(stp.var, st.var)
    np.testing.assert_array_equal(stp.count, st.count)
    # every position is normalized with the masked statistics: the selected ones are those of
    # the plain forward of the selection, the others keep their own (poisoned) values
    y, _ = ref.forward_train(x, axis=axis, mask=mask)
    y_sel, _ = ref.forward_train(sel, axis=-1)
    np.testing.assert_allclose(_gather(y, axis, mask), y_sel, rtol=1e-12, atol=1e-13)
    yp, _ = ref.forward_train(xp, axis=axis, mask=mask)
    np.testing.assert_array_equal(_gather(yp, axis, mask), _gather(y, axis, mask))
    assert np.isnan(yp).any() and np.isinf(yp).any()


def test_masked_corner_cases():
    rng = np.random.default_rng(71)
    x = rng.standard_normal((6, 3))
    # all True: the unmasked statistics (count a vector instead of an int)
    st = ref.batch_stats(x, mask=np.ones(6, bool))
    np.testing.assert_allclose(st.mean, ref.batch_stats(x).mean, rtol=1e-14)
    np.testing.assert_allclose(st.var, ref.batch_stats(x).var, rtol=1e-14)
    np.testing.assert_array_equal(st.count, [6, 6, 6])
    # nothing selected: an empty Stats (mean 0, var 0, count 0), as Keras' (0 / (0 + 1e-7))
    st = ref.batch_stats(_poisoned(x, 1, np.zeros(6, bool)), mask=np.zeros(6, bool))
    np.testing.assert_array_equal(st.mean, 0.0)
    np.testing.assert_array_equal(st.var, 0.0)
    np.testing.assert_array_equal(st.count, 0)
    dx, _, _ = ref.backward(x, x, ref.batch_stats(x, mask=np.zeros(6, bool)),
                       mask=np.zeros(6, bool), eps=0.25)
    np.testing.assert_array_equal(dx, 2 * x)  # no statistic depends on x: a = 1/sqrt(0.25)
    # a mask is boolean, with the shape of x without the channel axis or one broadcasting to it
    with pytest.raises(TypeError, match="boolean"):
        ref.batch_stats(x, mask=np.ones(6))
    with pytest.raises(ValueError):
        ref.batch_stats(x, mask=np.ones((6, 3), bool))


def test_the_epilogue_by_hand():
    # one channel, x = (0, 1, 5): mean 2, sigma^2 = 14/3, xhat = (-2, -1, 3)/sigma (eps = 0);
    # gamma = -1: s = (2, 1, -3)/sigma; + z = (0, -2, 0): (0.93, -1.54, -1.39); relu: y_0 only
    x = np.array([[0.0], [1.0], [5.0]])
    z = np.array([[0.0], [-2.0], [0.0]])
    sigma = math.sqrt(14 / 3)
    y, st = ref.forward_train(x, [-1.0], eps=0.0, activation="relu", residual=z)
    np.testing.assert_allclose(y.ravel(), [2 / sigma, 0, 0], rtol=1e-15)
    s = ref.forward_eval(x, st.mean, st.var, [-1.0], eps=0.0, residual=z)
    np.testing.assert_allclose(s.ravel(), [2 / sigma, 1 / sigma - 2, -3 / sigma], rtol=1e-15)
    np.testing.assert_array_equal(
        ref.forward_eval(x, st.mean, st.var, [-1.0], eps=0.0, activation="relu"),
        np.maximum(ref.forward_eval(x, st.mean, st.var, [-1.0], eps=0.0), 0.0))
    # dy = 1 everywhere passes only at y_0: g = (1, 0, 0), the case of test_backward_by_hand:
    # dx = gamma/sigma * (8, -10, 2)/21, dgamma = -2/sigma, dbeta = 1, and dz = g
    dx, dgamma, dbeta, dz = ref.backward(np.ones_like(x), x, st, [-1.0], eps=0.0,
                                         activation="relu", y=y)
    np.testing.assert_allclose(dx.ravel(), -np.array([8, -10, 2]) / 21 / sigma, rtol=1e-14)
    np.testing.assert_allclose(dgamma, [-2 / sigma], rtol=1e-14)
    np.testing.assert_array_equal(dbeta, [1.0])
    np.testing.assert_array_equal(dz, [[1.0], [0.0], [0.0]])
    # relu's gradient at 0 is 0 (PyTorch's): a y of exactly 0 passes nothing
    _, _, _, dz = ref.backward(np.ones((2, 1)), np.zeros((2, 1)), ref.batch_stats(np.zeros((2, 1))),
                               activation="relu", y=np.zeros((2, 1)))
    np.testing.assert_array_equal(dz, 0.0)
    with pytest.raises(ValueError, match="needs the forward output"):
        ref.backward(np.ones_like(x), x, st, activation="relu")
    with pytest.raises(ValueError, match="activation"):
        ref.forward_train(x, activation="gelu")


@pytest.mark.parametrize("case", ["mask", "relu", "mask+relu"])
def test_masked_and_fused_gradients_are_those_of_the_forward(case):
    """Central differences of the reference's own forward (float64, small problem)."""
    rng = np.random.default_rng(72)
    x = rng.standard_normal((4, 3, 2)) * 2 + 1
    w = rng.standard_normal(x.shape)
    args = {"x": x, "gamma": rng.uniform(0.5, 2.0, 3), "beta": rng.uniform(-1, 1, 3)}
    mask = np.array([[True, False], [True, True], [False, True], [False, False]])
    kw = {"eps": 1e-3, "mask": mask if "mask" in case else None}
    relu = "relu" in case
    if relu:
        args["z"] = rng.standard_normal(x.shape)

    def forward(a):
        epilogue = {"activation": "relu", "residual": a["z"]} if relu else {}
        return ref.forward_train(a["x"], a["gamma"], a["beta"], **kw, **epilogue)

    y, st = forward(args)
    grads = ref.backward(w, x, st, args["gamma"], **kw,
                         **({"activation": "relu", "y": y} if relu else {}))
    assert len(grads) == len(args)
    h = 1e-6
    for g, (name, v) in zip(grads, args.items()):
        fd = np.zeros_like(v)
        for i in np.ndindex(v.shape):
            e = np.zeros_like(v)
            e[i] = h
            fd[i] = ((forward({**args, name: v + e})[0] * w).sum()
                     - (forward({**args, name: v - e})[0] * w).sum()) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8, err_msg=name)


def test_masked_backward_with_frozen_stats_or_a_full_mask():
    rng = np.random.default_rng(73)
    x = rng.standard_normal((5, 3, 4))
    dy = rng.standard_normal(x.shape)
    gamma = rng.standard_normal(3)
    frozen = (rng.standard_normal(3), rng.uniform(0.5, 2.0, 3))
    mask = rng.random((5, 4)) < 0.5
    # frozen statistics: the mask changes nothing
    for a, b in zip(ref.backward(dy, x, frozen, gamma, training=False, mask=mask),
                    ref.backward(dy, x, frozen, gamma, training=False)):
        np.testing.assert_array_equal(a, b)
    # a mask selecting everything: the unmasked gradient
    st = ref.batch_stats(x)
    for a, b in zip(ref.backward(dy, x, st, gamma, mask=np.ones((5, 4), bool)),
                    ref.backward(dy, x, st, gamma)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


# --- the peers: Keras 3, jax.grad, PyTorch autograd ---------------------------------------------


def _keras():
    keras = require("keras", extra="test-frameworks")
    if keras.backend.backend() != "numpy":
        pytest.skip(f"keras was imported with the {keras.backend.backend()!r} backend")
    import importlib

    nn = importlib.import_module("keras.src.backend").nn
    assert nn.batch_normalization.__module__.startswith("keras."), "batchnorm.keras installed"
    return keras


# Keras' BatchNormalization computes in float32 even in a float64 layer outside TensorFlow: its
# compute dtype is backend.result_type(x.dtype, "float32"), and Keras' type promotion maps
# float64 to float32 there (so a masked-out 1e300 is inf, and its output too). Its masked
# moments also divide by (count + 1e-7). Relative to max(1, max|y| over the selected positions):
VS_KERAS = 1e-6


@pytest.mark.parametrize("shape,mask_shape", [((6, 5), (6,)), ((4, 3, 5, 3), (4, 3, 5)),
                                              ((4, 3, 5, 3), (4, 1, 1))])
def test_masked_forward_matches_keras(shape, mask_shape):
    """keras.layers.BatchNormalization(layer(x, training=True, mask=mask)): masked statistics,
    every position normalized, the moving averages updated with the masked statistics."""
    keras = _keras()
    rng = np.random.default_rng(74)
    c, eps = shape[-1], 1e-3
    x = rng.standard_normal(shape) * rng.uniform(0.5, 2.0, c) + rng.uniform(-3, 3, c)
    mask = rng.random(mask_shape) < 0.6
    mask.flat[0], mask.flat[-1] = True, False  # both kinds of position
    x = _poisoned(x, -1, mask, poison=[np.nan, np.inf, -np.inf, 1e30])  # float32's range
    gamma, beta = rng.uniform(0.5, 2.0, c), rng.uniform(-1, 1, c)
    layer = keras.layers.BatchNormalization(axis=-1, epsilon=eps, dtype="float64")
    layer.build(shape)
    layer.set_weights([gamma, beta, np.zeros(c), np.ones(c)])
    got = np.asarray(layer(x, training=True, mask=mask))
    y, st = ref.forward_train(x, gamma, beta, axis=-1, eps=eps, mask=mask)
    assert got.dtype == np.float64
    sel = np.broadcast_to(mask[..., None], shape)
    scale = max(1.0, float(np.abs(y[sel]).max()))
    # every position, NaN and inf where the reference has them
    np.testing.assert_allclose(got, y, rtol=VS_KERAS, atol=VS_KERAS * scale)
    # (the mask matters far beyond that tolerance: the plain statistics of the selection's
    # values with zeros in the masked-out positions)
    plain, _ = ref.forward_train(np.where(sel, x, 0.0), gamma, beta, axis=-1, eps=eps)
    assert rel_err(plain[sel], y[sel], scale) > 1e-2
    # momentum 0.99: moving = 0.99 * initial + 0.01 * masked batch statistic
    np.testing.assert_allclose(np.asarray(layer.moving_mean), 0.01 * st.mean, rtol=VS_KERAS,
                               atol=1e-9)
    np.testing.assert_allclose(np.asarray(layer.moving_variance), 0.99 + 0.01 * st.var,
                               rtol=VS_KERAS)


def test_masked_backward_matches_jax_grad():
    """jax.grad of the masked formula (statistics by jnp.where over the mask, every position
    normalized) w.r.t. x, gamma and beta, with huge finite values in masked-out positions."""
    jax = require("jax", extra="test-frameworks")
    jnp = jax.numpy
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(75)
        eps = 1e-3
        for shape, axis, mask_shape in [((7, 3), 1, (7,)), ((3, 4, 5, 2), 1, (3, 5, 2)),
                                        ((3, 5, 2, 4), -1, (3, 1, 2))]:
            c = shape[axis]
            x = rng.standard_normal(shape) * 2 + 1
            mask = rng.random(mask_shape) < 0.6
            mask.flat[0], mask.flat[-1] = True, False  # both kinds of position
            ax = axis % len(shape)
            full = np.broadcast_to(np.expand_dims(
                np.broadcast_to(mask, shape[:ax] + shape[ax + 1:]), ax), shape)
            x = np.where(full, x, rng.choice([1e6, -1e8, 3e4], shape))
            dy = rng.standard_normal(shape)
            gamma, beta = rng.uniform(0.5, 2.0, c), rng.uniform(-1, 1, c)
            cs = [1] * len(shape)
            cs[ax] = c
            red = tuple(i for i in range(len(shape)) if i != ax)
            m = jnp.asarray(full)

            def loss(x, gamma, beta):
                n = m.sum(axis=red, keepdims=True)
                mean = jnp.where(m, x, 0.0).sum(axis=red, keepdims=True) / n
                var = (jnp.where(m, x - mean, 0.0) ** 2).sum(axis=red, keepdims=True) / n
                y = gamma.reshape(cs) * (x - mean) / jnp.sqrt(var + eps) + beta.reshape(cs)
                return jnp.sum(y * dy)

            want = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(gamma),
                                                      jnp.asarray(beta))
            st = ref.batch_stats(x, axis, mask=mask)
            got = ref.backward(dy, x, st, gamma, axis=axis, eps=eps, mask=mask)
            for g, w, what in zip(got, want, ("dx", "dgamma", "dbeta")):
                w = np.asarray(w)
                assert w.dtype == np.float64
                np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12 * np.abs(w).max(),
                                           err_msg=f"{what} {shape}")
    finally:
        jax.config.update("jax_enable_x64", x64)


@pytest.mark.parametrize("shape", [(8, 4), (4, 3, 2, 5)])
@pytest.mark.parametrize("training", [True, False])
def test_fused_relu_residual_matches_torch_autograd(shape, training):
    """relu(F.batch_norm(x, ..., weight, bias) + z) in float64 and its autograd gradients
    w.r.t. x, weight, bias and z, against forward_* and backward(activation="relu", y=y).

    Channel 0 is constant 2.0 with bias 0 and z 0 there: its pre-activation is exactly 0 in
    both (2.0, not 0.1, whose mean PyTorch does not get back exactly), pinning relu'(0) = 0."""
    torch = require("torch", extra="torch")
    F = torch.nn.functional
    rng = np.random.default_rng(76)
    c, eps = shape[1], 1e-3
    x = rng.standard_normal(shape) * 2 + 1
    x[:, 0] = 2.0
    z = rng.standard_normal(shape)
    z[:, 0] = 0.0
    dy = rng.standard_normal(shape)
    gamma, beta = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c), rng.uniform(-1, 1, c)
    beta[0] = 0.0
    frozen = (np.concatenate([[2.0], rng.standard_normal(c - 1)]), rng.uniform(0.5, 2.0, c))

    t = {k: torch.tensor(v, requires_grad=True) for k, v in
         [("x", x), ("weight", gamma), ("bias", beta), ("z", z)]}
    rm, rv = (None, None) if training else (torch.tensor(frozen[0]), torch.tensor(frozen[1]))
    s_t = F.batch_norm(t["x"], rm, rv, t["weight"], t["bias"], training=training, eps=eps) + t["z"]
    y_t = torch.relu(s_t)
    (y_t * torch.tensor(dy)).sum().backward()
    assert (s_t[:, 0] == 0).all()

    if training:
        y, st = ref.forward_train(x, gamma, beta, eps=eps, activation="relu", residual=z)
    else:
        st = frozen
        y = ref.forward_eval(x, *frozen, gamma, beta, eps=eps, activation="relu", residual=z)
    assert (y[:, 0] == 0).all()
    assert rel_err(y_t.detach().numpy(), y) <= 1e-13
    got = ref.backward(dy, x, st, gamma, eps=eps, training=training, activation="relu", y=y)
    for g, k in zip(got, ("x", "weight", "bias", "z")):
        w = t[k].grad.numpy()
        scale = max(1.0, float(np.abs(w).max()))
        assert rel_err(g, w, scale) <= 1e-12, k
    np.testing.assert_array_equal(got[0][:, 0], 0.0)  # nothing passes relu at 0
    np.testing.assert_array_equal(t["x"].grad.numpy()[:, 0], 0.0)
