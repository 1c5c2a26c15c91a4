"""float16 and bfloat16 storage: float32 compute, float64 statistics, outputs in the input's
dtype, on every ISA path; conversions checked on every 16-bit pattern."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import reference as ref


try:
    import ml_dtypes as _ml_dtypes

    BF16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # the float16 tests still run
    BF16 = None

HALF_DTYPES = [np.dtype(np.float16)] + ([BF16] if BF16 is not None else [])
# Relative output bounds: a few units of the storage type's last place (float16 has 11
# significant bits, bfloat16 8), measured against the float64 reference on the same input.
TOL = {"float16": 2e-3, "bfloat16": 1.6e-2}

SHAPES = [((8, 3, 4, 5), 1), ((4, 5, 6, 37), -1), ((64, 17), 1), ((2, 33, 7, 7), 1),
          ((16, 28, 28, 64), -1), ((3, 257), 1)]


def _scaled_err(got, want):
    return np.abs(np.asarray(got, np.float64) - want).max() / max(1.0, np.abs(want).max())


@pytest.mark.parametrize("dt", HALF_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape, axis", SHAPES)
def test_half_matches_reference(isa, dt, shape, axis):
    rng = np.random.default_rng(7)
    x = rng.normal(3.0, 2.0, shape).astype(dt)
    dy = rng.normal(size=shape).astype(dt)
    c = shape[axis]
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)

    y, st = bn.forward_train(x, gamma, beta, axis=axis)
    y_ref, st_ref = ref.forward_train(x64, gamma, beta, axis=axis)
    assert y.dtype == dt and y.shape == x.shape
    assert _scaled_err(y, y_ref) < TOL[dt.name]
    # statistics of the (exactly representable) half values are float64-exact
    np.testing.assert_allclose(st.mean, st_ref.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st.var, st_ref.var, rtol=1e-12)

    y_eval = bn.forward_eval(x, st_ref.mean, st_ref.var, gamma, beta, axis=axis)
    assert y_eval.dtype == dt and _scaled_err(y_eval, y_ref) < TOL[dt.name]

    dx, dgamma, dbeta = bn.backward(dy, x, st, gamma, axis=axis)
    dx_ref, dgamma_ref, dbeta_ref = ref.backward(dy64, x64, st_ref, gamma, axis=axis)
    assert dx.dtype == dt
    assert np.abs(dx.astype(np.float64) - dx_ref).max() / np.abs(dx_ref).max() < TOL[dt.name]
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dt", HALF_DTYPES, ids=lambda d: d.name)
def test_every_bit_pattern_converts_like_numpy(isa, dt):
    """y = x * g (mean 0, var 1, eps 0) rounds exactly as float32 math then a cast would."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    x = bits.view(dt).reshape(-1, 8)
    x32 = x.astype(np.float32)
    for g in (1.0, 1.0 / 3.0, 7.0):
        y = bn.forward_eval(x, np.zeros(8), np.ones(8), np.full(8, g), eps=0.0)
        with np.errstate(all="ignore"):
            want = (x32 * np.float32(g) + np.float32(0.0)).astype(dt)
        same = y.view(np.uint16) == want.view(np.uint16)
        both_nan = np.isnan(y.astype(np.float32)) & np.isnan(want.astype(np.float32))
        assert (same | both_nan).all(), f"{(~(same | both_nan)).sum()} patterns differ"


@pytest.mark.parametrize("dt", HALF_DTYPES, ids=lambda d: d.name)
def test_half_thread_counts_give_identical_bits(dt, threads):
    x = np.random.default_rng(3).normal(size=(32, 16, 30, 30)).astype(dt)
    results = []
    for n in (1, 2, 3):
        bn.set_num_threads(n)
        y, st = bn.forward_train(x)
        dx, dg, db = bn.backward(x, x, st)
        results.append((y.view(np.uint16), st.mean, st.var, dx.view(np.uint16), dg, db))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("dt", HALF_DTYPES, ids=lambda d: d.name)
def test_half_layer_keeps_float32_state(dt):
    layer = bn.BatchNorm(6)
    x = np.random.default_rng(0).normal(1.0, 3.0, (16, 6, 5)).astype(dt)
    y = layer(x)
    assert y.dtype == dt
    assert layer.running_mean.dtype == np.float32 and layer.gamma.dtype == np.float32
    st = ref.batch_stats(x.astype(np.float64))
    np.testing.assert_allclose(layer.running_mean, 0.1 * st.mean, rtol=1e-6, atol=1e-7)
    dx = layer.backward(np.ones_like(x))
    assert dx.dtype == dt and layer.grad_beta.dtype == np.float32
    np.testing.assert_allclose(layer.grad_beta, np.full(6, 16 * 5.0))


@pytest.mark.parametrize("dt", HALF_DTYPES, ids=lambda d: d.name)
def test_half_out_and_in_place(dt):
    x = np.random.default_rng(1).normal(size=(9, 5, 7)).astype(dt)
    expected, _ = bn.forward_train(x)
    out = np.empty_like(x)
    y, _ = bn.forward_train(x, out=out)
    assert y is out and np.array_equal(out.view(np.uint16), expected.view(np.uint16))
    x2 = x.copy()
    bn.forward_train(x2, out=x2)
    assert np.array_equal(x2.view(np.uint16), expected.view(np.uint16))
    with pytest.raises(TypeError, match="out must have dtype"):
        bn.forward_train(x, out=np.empty(x.shape, np.float32))


def test_supported_dtypes_lists_half_types():
    names = [d.name for d in bn._api.supported_dtypes()]
    assert names[:3] == ["float32", "float64", "float16"]
    assert ("bfloat16" in names) == (BF16 is not None)


@pytest.mark.parametrize("dt", HALF_DTYPES, ids=lambda d: d.name)
def test_half_parameter_vectors_are_taken_exactly(dt):
    """float16 and bfloat16 vectors (as an ONNX or Keras model may hold them) give the same
    bits as the same values in float64."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 4, 3)).astype(np.float32)
    vecs = [rng.normal(size=4).astype(dt) for _ in range(3)] + [
        rng.uniform(0.5, 2, 4).astype(dt)]
    gamma, beta, mean, var = vecs
    wide = [v.astype(np.float64) for v in vecs]
    got = bn.forward_eval(x, mean, var, gamma, beta)
    assert np.array_equal(got, bn.forward_eval(x, wide[2], wide[3], wide[0], wide[1]))
    y, _ = bn.forward_train(x, gamma, beta)
    assert np.array_equal(y, bn.forward_train(x, wide[0], wide[1])[0])
