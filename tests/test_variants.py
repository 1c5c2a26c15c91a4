"""The variants: ghost batches (virtual_batch_size), batch renormalization, masks (mask=) and
fused epilogues (activation="relu", residual=), on the functions and the layer.

Oracles: for ghost batches, the successive plain training calls on the groups (outputs and
running statistics bit-identical, gradients from the functional backward of each group);
for renorm, ``batchnorm.reference.renorm_forward_train`` in float64, Keras 3's
``BatchNormalization(renorm=True)`` over several steps, and PyTorch autograd of the same
formula with r and d held constant. For masks and epilogues, ``batchnorm.reference`` (float64,
the same mask/activation/residual/y arguments) in every dtype, layout and kernel set, PyTorch
autograd of the same formulas, Keras 3's masked ``BatchNormalization`` over several steps, and
the package's own calls where the contract is bit-exact: an all-True mask gives the unmasked
bits, the fused relu alone gives relu of the plain output, AVX2 and AVX-512 (and any thread
count) give the same bits, whatever the padding holds the unmasked outputs keep theirs.
"""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _kernels, reference
from batchnorm import reference as ref
from conftest import make_params, make_x, param_grad_scales, require

RNG = np.random.default_rng(16)


def batch(shape, dtype=np.float32, shift=0.0, scale=1.0):
    return (RNG.normal(size=shape) * scale + shift).astype(dtype)


def state_equal(a: bn.BatchNorm, b: bn.BatchNorm) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert np.array_equal(sa[k], sb[k]), k


# --- ghost batches ---------------------------------------------------------------------------

GHOST_CASES = [((10, 3), 1, 4), ((8, 3, 4, 4), 1, 3), ((9, 5, 5, 2), -1, 3), ((7, 4), 1, 7),
               ((6, 2, 5), 1, 10)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape,axis,k", GHOST_CASES)
def test_ghost_batches_are_successive_calls(shape, axis, k, momentum, dtype):
    c = shape[axis]
    ghost = bn.BatchNorm(c, axis=axis, momentum=momentum, dtype=dtype, virtual_batch_size=k)
    plain = bn.BatchNorm(c, axis=axis, momentum=momentum, dtype=dtype)
    gamma, beta = RNG.normal(1, 0.3, c), RNG.normal(0, 0.5, c)
    for layer in (ghost, plain):
        layer.gamma, layer.beta = gamma, beta
    for step in range(2):
        x = batch(shape, dtype, shift=step)
        y = ghost(x)
        groups = [x[i:i + k] for i in range(0, shape[0], k)]
        expected = np.concatenate([plain(g) for g in groups])
        assert y.dtype == expected.dtype and np.array_equal(y, expected)
        state_equal(ghost, plain)
        assert ghost.num_batches_tracked == (step + 1) * len(groups)
    # gradients: each group's own, the parameters' summed over the groups
    dy = batch(shape, dtype)
    dx = ghost.backward(dy)
    want_dx, want_dg, want_db = [], 0.0, 0.0
    for i in range(0, shape[0], k):
        xg = x[i:i + k]
        gdx, gdg, gdb = bn.backward(dy[i:i + k], xg, bn.batch_stats(xg, axis=axis),
                                    ghost.gamma, axis=axis)
        want_dx.append(gdx)
        want_dg, want_db = want_dg + gdg, want_db + gdb
    assert np.array_equal(dx, np.concatenate(want_dx))
    assert np.array_equal(ghost.grad_gamma, np.asarray(want_dg).astype(dtype))
    assert np.array_equal(ghost.grad_beta, np.asarray(want_db).astype(dtype))


def test_ghost_batches_with_out_and_in_eval_mode():
    ghost = bn.BatchNorm(3, virtual_batch_size=2)
    x = batch((6, 3))
    out = np.empty_like(x)
    assert ghost(x, out=out) is out
    assert np.array_equal(out, bn.BatchNorm(3, virtual_batch_size=2)(x))
    dx_out = np.empty_like(x)
    assert ghost.backward(np.ones_like(x), out=dx_out) is dx_out
    ghost.eval()
    plain = bn.BatchNorm(3)
    plain.load_state_dict(ghost.state_dict())
    assert np.array_equal(ghost(x), plain.eval()(x))      # eval: unchanged


@pytest.mark.parametrize("make,x,error,match", [
    (lambda: bn.BatchNorm(3, virtual_batch_size=1), None, ValueError, "virtual_batch_size"),
    (lambda: bn.BatchNorm(3, virtual_batch_size=2.5), None, TypeError, "virtual_batch_size"),
    (lambda: bn.BatchNorm(3, virtual_batch_size=True), None, TypeError, "virtual_batch_size"),
    (lambda: bn.BatchNorm(3, virtual_batch_size=4), (9, 3), ValueError, "last holds one row"),
    (lambda: bn.BatchNorm(5, axis=0, virtual_batch_size=2), (5, 4), ValueError,
     "channel axis"),
])
def test_bad_virtual_batches(make, x, error, match):
    if x is None:
        with pytest.raises(error, match=match):
            make()
        return
    layer = make()
    before = layer.state_dict()
    with pytest.raises(error, match=match):
        layer(batch(x))
    state_equal_dict(layer.state_dict(), before)


def state_equal_dict(a, b):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_failing_group_changes_no_state():
    layer = bn.BatchNorm(2, virtual_batch_size=2, check_finite=True)
    x = batch((6, 2))
    x[4, 1] = np.nan                          # in the last group
    before = layer.state_dict()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer(x)
    state_equal_dict(layer.state_dict(), before)


# --- batch renormalization -------------------------------------------------------------------

CLIPS = [{}, {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}, {"rmax": 3.0}, {"dmax": 0.0}]


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_renorm_matches_the_reference(clip, dtype):
    layer = bn.BatchNorm(4, renorm=True, renorm_clipping=clip, dtype=dtype, eps=1e-3)
    layer.gamma, layer.beta = RNG.normal(1, 0.3, 4), RNG.normal(0, 0.5, 4)
    layer.renorm_mean, layer.renorm_std = RNG.normal(0, 1, 4), RNG.uniform(0.5, 2, 4)
    x = batch((16, 4, 3), dtype, shift=2, scale=3)
    want, st, r, d = reference.renorm_forward_train(
        x, layer.gamma, layer.beta, layer.renorm_mean, layer.renorm_std, eps=1e-3, **clip)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(layer(x), want, rtol=tol, atol=tol)
    if clip:
        assert r.min() >= clip.get("rmin", 0) and r.max() <= clip.get("rmax", np.inf)
        assert np.abs(d).max() <= clip.get("dmax", np.inf)


@pytest.mark.parametrize("clip", CLIPS[:2])
@pytest.mark.parametrize("shape,axis", [((16, 5), -1), ((4, 3, 3, 5), -1), ((6, 5, 4), 1)])
def test_renorm_matches_keras_over_several_steps(clip, shape, axis):
    keras = require("keras", extra="test-frameworks")
    c = shape[axis]
    kl = keras.layers.BatchNormalization(axis=axis, momentum=0.8, epsilon=1e-3, renorm=True,
                                         renorm_clipping=clip, renorm_momentum=0.9)
    kl.build(shape)
    layer = bn.BatchNorm(c, axis=axis, momentum=0.2, eps=1e-3, renorm=True,
                         renorm_clipping=clip, renorm_momentum=0.1, unbiased_running_var=False)
    weights = [RNG.normal(1, 0.3, c), RNG.normal(0, 0.5, c)]
    kl.set_weights(weights + kl.get_weights()[2:])
    layer.gamma, layer.beta = weights
    names = {"moving_mean": "running_mean", "moving_variance": "running_var",
             "moving_stddev": "running_std", "renorm_mean": "renorm_mean",
             "renorm_stddev": "renorm_std"}
    for step in range(5):               # a drifting distribution: r and d far from 1 and 0
        x = batch(shape, shift=step * 0.7, scale=1 + step)
        np.testing.assert_allclose(layer(x), kl(x, training=True), rtol=2e-5, atol=2e-5)
        for w in kl.weights:
            if w.name in names:
                np.testing.assert_allclose(getattr(layer, names[w.name]), np.asarray(w.value),
                                           rtol=2e-5, atol=2e-6, err_msg=w.name)
    x = batch(shape, shift=1)
    np.testing.assert_allclose(layer.eval()(x), kl(x, training=False), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("affine", [True, False])
def test_renorm_gradients_hold_r_and_d_constant(affine):
    torch = require("torch", extra="torch")
    clip = {"rmax": 1.2, "rmin": 0.8, "dmax": 0.3}
    layer = bn.BatchNorm(3, renorm=True, renorm_clipping=clip, affine=affine, dtype=np.float64)
    if affine:
        layer.gamma, layer.beta = RNG.normal(1, 0.3, 3), RNG.normal(0, 0.5, 3)
    layer.renorm_mean, layer.renorm_std = RNG.normal(0, 1, 3), RNG.uniform(0.5, 2, 3)
    x = batch((10, 3, 4), np.float64, shift=1, scale=2)
    dy = batch((10, 3, 4), np.float64)
    renorm_mean, renorm_std = layer.renorm_mean, layer.renorm_std     # before the update
    layer(x)
    dx = layer.backward(dy)

    xt = torch.from_numpy(x).requires_grad_(True)
    g = torch.from_numpy(layer.gamma if affine else np.ones(3)).requires_grad_(True)
    b = torch.from_numpy(layer.beta if affine else np.zeros(3)).requires_grad_(True)
    mean = xt.mean(dim=(0, 2), keepdim=True)
    var = xt.var(dim=(0, 2), unbiased=False, keepdim=True)
    std = torch.sqrt(var + layer.eps)
    floor = torch.clamp(torch.from_numpy(renorm_std).view(1, 3, 1), min=layer.eps ** 0.5)
    r = torch.clamp(std / floor, clip["rmin"], clip["rmax"]).detach()
    d = torch.clamp((mean - torch.from_numpy(renorm_mean).view(1, 3, 1)) / floor,
                    -clip["dmax"], clip["dmax"]).detach()
    y = ((xt - mean) / std * r + d) * g.view(1, 3, 1) + b.view(1, 3, 1)
    y.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    if affine:
        np.testing.assert_allclose(layer.grad_gamma, g.grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer.grad_beta, b.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_renorm_with_ghost_batches_is_successive_renorm_calls():
    ghost = bn.BatchNorm(3, renorm=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0},
                         virtual_batch_size=4)
    plain = bn.BatchNorm(3, renorm=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0})
    x = batch((12, 3), shift=3, scale=2)
    y = ghost(x)
    assert np.array_equal(y, np.concatenate([plain(x[i:i + 4]) for i in (0, 4, 8)]))
    state_equal(ghost, plain)


def test_renorm_state_is_saved_and_loaded():
    layer = bn.BatchNorm(2, renorm=True)
    layer(batch((8, 2), shift=4))
    state = layer.state_dict()
    assert {"running_std", "renorm_mean", "renorm_std"} <= set(state)
    again = bn.BatchNorm(2, renorm=True)
    again.load_state_dict(state)
    state_equal(layer, again)
    with pytest.raises(KeyError, match="missing.*renorm_mean"):
        again.load_state_dict({k: v for k, v in state.items() if k != "renorm_mean"})
    state["renorm_std"] = np.array([1.0, -1.0])
    with pytest.raises(ValueError, match="renorm_std must be non-negative"):
        again.load_state_dict(state)
    with pytest.raises(AttributeError, match="renorm_mean is None"):
        bn.BatchNorm(2).renorm_mean = [0.0, 0.0]


@pytest.mark.parametrize("kwargs,error,match", [
    ({"renorm_clipping": {"rmax": 0.5}}, ValueError, r"rmax.*>= 1"),
    ({"renorm_clipping": {"rmin": 1.5}}, ValueError, r"rmin.*in \[0, 1\]"),
    ({"renorm_clipping": {"dmax": -1}}, ValueError, r"dmax.*>= 0"),
    ({"renorm_clipping": {"rmax": float("nan")}}, ValueError, "rmax"),
    ({"renorm_clipping": {"r_max": 2}}, ValueError, "unknown keys"),
    ({"renorm_clipping": [("rmax", 2)]}, TypeError, "dict"),
    ({"renorm_momentum": 1.5}, ValueError, "renorm_momentum"),
    ({"renorm_momentum": None}, TypeError, "renorm_momentum"),
    ({"track_running_stats": False}, ValueError, "track_running_stats"),
    ({"renorm": "yes"}, TypeError, "renorm"),
])
def test_bad_renorm_arguments(kwargs, error, match):
    kwargs = {"renorm": True, **kwargs}
    with pytest.raises(error, match=match):
        bn.BatchNorm(3, **kwargs)


def test_clipping_needs_renorm_and_sync_refuses_variants():
    with pytest.raises(ValueError, match="renorm=False"):
        bn.BatchNorm(3, renorm_clipping={"rmax": 2})
    with pytest.raises(NotImplementedError, match="virtual_batch_size"):
        bn.SyncBatchNorm(3, None, virtual_batch_size=2)
    with pytest.raises(NotImplementedError, match="renorm=True"):
        bn.SyncBatchNorm.from_batchnorm(bn.BatchNorm(3, renorm=True), None)


def test_renorm_refuses_one_value_per_channel_as_the_plain_layer_does():
    for layer in (bn.BatchNorm(3), bn.BatchNorm(3, renorm=True)):
        before = layer.state_dict()
        with pytest.raises(ValueError, match="more than one value per channel; x of shape"):
            layer(batch((1, 3)))
        state_equal_dict(layer.state_dict(), before)


# --- masks and fused epilogues: helpers ------------------------------------------------------
#
# Oracles: batchnorm.reference (float64, mask/activation/residual/y arguments), PyTorch
# autograd of the same formulas, Keras 3's masked BatchNormalization, and the package's own
# plain calls (an all-True mask, relu of the plain output), bit for bit where the contract
# says so.

try:
    import ml_dtypes as _ml_dtypes

    BF16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:
    BF16 = None

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
ALL_DTYPES = [F64, F32, F16] + ([BF16] if BF16 is not None else [])
# elementwise bounds, relative to max(1, |reference|) (test_half.py's for the 16-bit types)
TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
SIMD = [name for name in _kernels.available_isas() if name != "baseline"]


def _rest(shape, axis):
    """x's shape without its channel axis: the shape of a full mask."""
    ax = axis % len(shape)
    return tuple(shape[:ax]) + tuple(shape[ax + 1:])


def _cs(ndim, axis):
    """The shape of a per-channel vector broadcast against x."""
    s = [1] * ndim
    s[axis % ndim] = -1
    return s


def full_mask(mask, shape, axis):
    """A mask broadcast to x's whole shape (the same for every channel)."""
    ax = axis % len(shape)
    m = np.broadcast_to(np.asarray(mask), _rest(shape, axis))
    return np.broadcast_to(np.expand_dims(m, ax), shape)


def random_mask(rng, mshape, p=0.6):
    """A random mask of mshape with at least two positions set."""
    m = rng.random(mshape) < p
    m.flat[:2] = True
    return m


def bits(a):
    a = np.asarray(a)
    return a.dtype, a.shape, a.tobytes()


def assert_bits(got, want, what="result"):
    assert bits(got) == bits(want), f"{what}: not the same bits"


def assert_close(got, want, dtype, what, tol=None, scale=None):
    """got (of dtype) matches the float64 reference elementwise: |got - want| <= tol *
    max(1, |want|) (or tol * scale), and where the reference, rounded to dtype, is NaN or inf
    so is got, with the same sign."""
    dtype = np.dtype(dtype)
    got = np.asarray(got)
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    tol = TOL[dtype.name] if tol is None else tol
    g = got.astype(np.float64)
    with np.errstate(all="ignore"):
        rounded = want.astype(dtype).astype(np.float64)
    fin = np.isfinite(rounded)
    assert np.array_equal(g[~fin], rounded[~fin], equal_nan=True), (
        f"{what}: non-finite values differ from the reference's")
    bound = tol * (np.maximum(1.0, np.abs(want[fin])) if scale is None else scale)
    err = np.abs(g[fin] - want[fin])
    assert (err <= bound).all(), (
        f"{what}: {int((err > bound).sum())} values off, worst {float((err - bound).max()):.3g} "
        f"beyond the bound")


def assert_grad(got, want, dtype, what="dx"):
    """A gradient, relative to its largest reference value (as test_half.py does)."""
    scale = float(np.abs(np.asarray(want, np.float64)).max()) or 1.0
    assert_close(got, want, dtype, what, scale=scale)


def assert_param_grads(dg, db, rdg, rdb, dy, x, st, axis, dtype, eps=1e-5):
    """dgamma and dbeta: float64, within the conditioning of their sums."""
    assert dg.dtype == F64 and db.dtype == F64
    sg, sb = param_grad_scales(dy, x, st[0], st[1], axis, eps)
    tol = 1e-12 if np.dtype(dtype).itemsize >= 4 else 1e-6
    assert np.abs(dg - rdg).max() <= tol * sg, "dgamma"
    assert np.abs(db - rdb).max() <= tol * sb, "dbeta"


def assert_stats(st, rst, what="stats"):
    """Statistics (float64) against the reference's, and the per-channel int64 counts."""
    assert st.mean.dtype == F64 and st.var.dtype == F64
    np.testing.assert_allclose(st.mean, rst.mean, rtol=1e-12, atol=1e-12, err_msg=what)
    np.testing.assert_allclose(st.var, rst.var, rtol=1e-12, atol=1e-300, err_msg=what)
    count = np.asarray(st.count)
    assert count.dtype == np.int64 and count.shape == rst.mean.shape, (what, st.count)
    assert np.array_equal(count, rst.count), (what, st.count, rst.count)


def junk_values(rng, size, dtype):
    """What padding may hold: NaN, +-inf and huge values (kept below the type's range after
    normalization)."""
    big = float(np.finfo(np.float32).max if np.dtype(dtype) == BF16 else np.finfo(dtype).max)
    pick = np.array([np.nan, np.inf, -np.inf, big / 64, -big / 64])
    return pick[rng.integers(0, len(pick), size)]


# --- masks: the functions against the reference ----------------------------------------------

# (shape, axis, mask shape): full masks and masks that broadcast
MASK_CASES = [
    ((8, 3, 5, 6), 1, (8, 5, 6)),
    ((8, 3, 5, 6), 1, (8, 1, 1)),        # whole examples
    ((8, 3, 5, 6), 1, (5, 6)),           # spatial positions of every example
    ((40, 7), 1, (40,)),
    ((6, 5, 4, 9), -1, (6, 5, 4)),
    ((6, 5, 4, 9), -1, (6, 1, 1)),
    ((6, 5, 4, 9), -1, (4,)),
    ((3, 4, 5, 6, 2), 1, (3, 5, 6, 2)),
]
_mask_ids = [f"{'x'.join(map(str, s))}-ax{a}-m{'x'.join(map(str, m))}" for s, a, m in MASK_CASES]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis,mshape", MASK_CASES, ids=_mask_ids)
def test_masked_functions_match_the_reference(shape, axis, mshape, dtype):
    rng = np.random.default_rng(101)
    c = shape[axis]
    x = make_x(rng, shape, axis, np.float64).astype(dtype)
    dy = make_x(rng, shape, axis, np.float64, loc=1.0).astype(dtype)
    gamma, beta = make_params(rng, c)
    mask = random_mask(rng, mshape)
    full = full_mask(mask, shape, axis)
    # padding: NaN, inf and huge values for the forward; outliers for the backward (the
    # backward's sums run over every position, so padding there must be finite)
    xp = x.copy()
    xp[~full] = junk_values(rng, int((~full).sum()), dtype).astype(dtype)
    xb = x.copy()
    xb[~full] = (50.0 + rng.normal(size=int((~full).sum()))).astype(dtype)
    x64, xp64, xb64 = (a.astype(np.float64) for a in (x, xp, xb))

    rst = ref.batch_stats(x64, axis, mask=mask)
    st = bn.batch_stats(xp, axis=axis, mask=mask)
    assert_stats(st, rst, "batch_stats")

    y, st2 = bn.forward_train(xp, gamma, beta, axis=axis, mask=mask)
    ry, _ = ref.forward_train(xp64, gamma, beta, axis=axis, mask=mask)
    assert_stats(st2, rst, "forward_train")
    assert_close(y, ry, dtype, "y")
    assert_bits(st2.mean, st.mean)
    assert_bits(st2.var, st.var)

    _, stb = bn.forward_train(xb, gamma, beta, axis=axis, mask=mask)
    dx, dg, db = bn.backward(dy, xb, stb, gamma, axis=axis, mask=mask)
    rdx, rdg, rdb = ref.backward(dy.astype(np.float64), xb64, rst, gamma, axis=axis, mask=mask)
    assert_grad(dx, rdx, dtype)
    assert_param_grads(dg, db, rdg, rdb, dy, xb64, rst, axis, dtype)


@pytest.mark.parametrize("dtype", [F32, F64], ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis,mshape", MASK_CASES[::2], ids=_mask_ids[::2])
def test_masked_positions_reach_only_their_own_outputs(shape, axis, mshape, dtype):
    """Whatever the padding holds: the statistics and the unmasked outputs keep their bits,
    and each masked position's output is its own value normalized."""
    rng = np.random.default_rng(102)
    c = shape[axis]
    x = make_x(rng, shape, axis, dtype)
    gamma, beta = make_params(rng, c)
    mask = random_mask(rng, mshape)
    full = full_mask(mask, shape, axis)
    y0, st0 = bn.forward_train(x, gamma, beta, axis=axis, mask=mask)
    for fill in ("nan", "inf", "junk", "zero"):
        xp = x.copy()
        n = int((~full).sum())
        xp[~full] = {"nan": np.full(n, np.nan), "inf": np.full(n, -np.inf),
                     "junk": junk_values(rng, n, dtype), "zero": np.zeros(n)}[fill]
        assert_bits(bn.batch_stats(xp, axis=axis, mask=mask).var, st0.var, fill)
        y, st = bn.forward_train(xp, gamma, beta, axis=axis, mask=mask)
        assert_bits(st.mean, st0.mean, fill)
        assert_bits(st.var, st0.var, fill)
        assert_bits(y[full], y0[full], fill)
        # the masked outputs: those of inference with the masked statistics
        ye = bn.forward_eval(xp, st0.mean, st0.var, gamma, beta, axis=axis)
        assert np.array_equal(y[~full], ye[~full], equal_nan=True), fill


def test_masked_statistics_are_exact_far_from_zero():
    """1e10 + N(0, 1): the masked variance is the correctly rounded one (exact sums) to a few
    units of float64's last place, as without a mask."""
    import math

    rng = np.random.default_rng(103)
    for shape, axis in [((32, 3, 32, 32), 1), ((20000, 4), 1), ((32, 16, 16, 3), -1)]:
        x = 1e10 + rng.normal(size=shape)
        ax = axis % len(shape)
        ms = _rest(shape, axis)
        masks = [rng.random(ms) < 0.3, np.zeros(ms, bool)]
        masks[1].flat[rng.choice(masks[1].size, 40, replace=False)] = True
        for mask in masks:
            st = bn.batch_stats(x, axis=axis, mask=mask)
            cols = np.moveaxis(x, ax, -1)[mask]         # (count, C)
            for k in range(shape[ax]):
                col = cols[:, k]
                mu = math.fsum(col) / len(col)
                d = col - mu
                exact_var = math.fsum(d * d) / len(col) - (math.fsum(d) / len(col)) ** 2
                assert abs(st.var[k] / exact_var - 1) < 1e-13
                assert abs(st.mean[k] - mu) <= 2e-16 * 1e10


# layouts of one and the same mask: a view that reads it in place, a copy, or a broadcast
def _mask_layouts(m):
    out = {"C": m, "reversed": np.ascontiguousarray(m[::-1])[::-1],
           "transposed": np.ascontiguousarray(m.T).T, "list": m.tolist()}
    if m.ndim and m.shape[-1] > 1:
        out["strided"] = np.repeat(m, 2, axis=-1)[..., ::2]
    return out


@pytest.mark.parametrize("shape,axis", [((8, 3, 5, 6), 1), ((40, 7), 1), ((6, 5, 4, 9), -1),
                                        ((3, 4, 5, 6, 2), 1), ((64, 16, 32, 32), 1)])
def test_any_mask_layout_or_broadcast_gives_the_masked_result(shape, axis):
    """Masks read in place (strided, broadcast with zero strides) or copied (negative and
    transposed strides, lists): the counts exactly, the reference's values, and the bits of
    the same mask stored contiguously (the route copies a layout the one-pass loops cannot
    read, so that a mask's layout never changes a result)."""
    rng = np.random.default_rng(104)
    c = shape[axis]
    x = make_x(rng, shape, axis, np.float32)
    dy = make_x(rng, shape, axis, np.float32, loc=1.0)
    gamma, beta = make_params(rng, c)
    ms = _rest(shape, axis)

    def check(mask, what):
        full = np.ascontiguousarray(np.broadcast_to(np.asarray(mask), ms))
        rst = ref.batch_stats(x, axis, mask=full)
        st = bn.batch_stats(x, axis=axis, mask=mask)
        assert_stats(st, rst, what)
        y, st2 = bn.forward_train(x, gamma, beta, axis=axis, mask=mask)
        assert_stats(st2, rst, what)
        assert_close(y, ref.forward_train(x, gamma, beta, axis=axis, mask=full)[0], F32, what)
        dx, dg, db = bn.backward(dy, x, st2, gamma, axis=axis, mask=mask)
        rdx, rdg, rdb = ref.backward(dy, x, rst, gamma, axis=axis, mask=full)
        assert_grad(dx, rdx, F32, what)
        assert_param_grads(dg, db, rdg, rdb, dy, x, rst, axis, F32)
        y_c, st_c = bn.forward_train(x, gamma, beta, axis=axis, mask=full)
        got = (y, st2.mean, st2.var, dx, dg, db)
        want = (y_c, st_c.mean, st_c.var) + bn.backward(dy, x, st_c, gamma, axis=axis, mask=full)
        for g, w in zip(got, want):
            assert np.array_equal(g.view(np.uint8), w.view(np.uint8)), what

    mask = random_mask(rng, ms)
    for name, m in _mask_layouts(mask).items():
        check(m, f"{name} mask")
    small = [(ms[0],) + (1,) * (len(ms) - 1), ms[1:]] if len(ms) > 1 else [(1,)]
    for sshape in small:
        check(random_mask(rng, sshape, 0.7), f"mask of shape {sshape}")


ALL_TRUE_CASES = [((32, 8, 24, 24), 1), ((2, 3, 129, 129), 1), ((16, 24, 24, 12), -1),
                  ((20000, 7), 1), ((300, 600), 1), ((20, 50, 33, 33), 1), ((16500, 70), 1),
                  ((5, 3, 4), 1), ((9, 251), 1)]


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=lambda d: d.name)
def test_an_all_true_mask_gives_the_unmasked_bits(dtype, isa):
    rng = np.random.default_rng(105)
    for shape, axis in ALL_TRUE_CASES:
        c = shape[axis]
        x = make_x(rng, shape, axis, np.float32).astype(dtype)
        dy = make_x(rng, shape, axis, np.float32, loc=1.0).astype(dtype)
        gamma, beta = make_params(rng, c)
        ms = _rest(shape, axis)
        st0 = bn.batch_stats(x, axis=axis)
        y0, s0 = bn.forward_train(x, gamma, beta, axis=axis)
        g0 = bn.backward(dy, x, s0, gamma, axis=axis)
        for mask in (np.ones(ms, bool), True, np.ones((1,) * len(ms), bool)):
            st = bn.batch_stats(x, axis=axis, mask=mask)
            y, s = bn.forward_train(x, gamma, beta, axis=axis, mask=mask)
            g = bn.backward(dy, x, s, gamma, axis=axis, mask=mask)
            what = f"{shape} axis={axis} mask {np.shape(mask)}"
            for a, b in [(st.mean, st0.mean), (st.var, st0.var), (y, y0), (s.mean, s0.mean),
                         (s.var, s0.var), *zip(g, g0)]:
                assert_bits(a, b, what)
            assert np.array_equal(st.count, np.full(c, st0.count)) and st.count.dtype == np.int64


@pytest.mark.parametrize("dtype", [F32, F64], ids=lambda d: d.name)
def test_a_mask_changes_no_frozen_gradient(dtype):
    """training=False: the statistics are constants, the mask is irrelevant (same bits)."""
    rng = np.random.default_rng(106)
    for shape, axis in [((8, 3, 5, 6), 1), ((6, 5, 4, 9), -1), ((40, 7), 1)]:
        x = make_x(rng, shape, axis, dtype)
        dy = make_x(rng, shape, axis, dtype)
        c = shape[axis]
        gamma = make_params(rng, c)[0]
        mean, var = rng.normal(size=c), rng.uniform(0.5, 2, c)
        mask = random_mask(rng, _rest(shape, axis))
        want = bn.backward(dy, x, (mean, var), gamma, axis=axis, training=False)
        for m in (mask, np.zeros_like(mask)):       # all-False too: no statistic is needed
            got = bn.backward(dy, x, (mean, var), gamma, axis=axis, training=False, mask=m)
            for a, b in zip(got, want):
                assert_bits(a, b)


def test_masked_stats_merge_and_give_unbiased_variances():
    rng = np.random.default_rng(107)
    parts = [(rng.normal(3, 2, (n, 4, 5)), rng.random((n, 5)) < 0.5) for n in (7, 5, 9)]
    sts = [bn.batch_stats(x, mask=m) for x, m in parts]
    whole = bn.batch_stats(np.concatenate([x for x, _ in parts]),
                           mask=np.concatenate([m for _, m in parts]))
    merged = bn.merge_stats(*sts)
    assert np.array_equal(merged.count, whole.count)
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(merged.var, whole.var, rtol=1e-13)
    n = whole.count
    np.testing.assert_allclose(whole.unbiased_var(), whole.var * n / (n - 1), rtol=1e-15)
    # a masked part and an unmasked one
    x = rng.normal(size=(6, 4, 5))
    both = bn.merge_stats(sts[0], bn.batch_stats(x))
    assert np.array_equal(both.count, sts[0].count + 30)
    # an all-False mask: the empty Stats, the neutral element of merge_stats
    empty = bn.batch_stats(x, mask=np.zeros((6, 5), bool))
    assert not empty.mean.any() and not empty.var.any()
    assert np.array_equal(empty.count, np.zeros(4, np.int64))
    again = bn.merge_stats(sts[0], empty)
    assert np.array_equal(again.count, sts[0].count)
    assert_bits(again.mean, sts[0].mean)
    assert_bits(again.var, sts[0].var)


@pytest.mark.parametrize("unbiased", [True, False])
def test_set_running_stats_takes_masked_stats(unbiased):
    """Precise BN over padded data: the merged masked Stats (per-channel counts) set the
    running statistics as an unmasked Stats of the same values does."""
    rng = np.random.default_rng(108)
    x = rng.normal(2, 3, (10, 3))
    mask = rng.random(10) < 0.6
    mask[:2] = True
    st = bn.batch_stats(x, mask=mask)
    plain = bn.batch_stats(x[mask])
    layer = bn.BatchNorm(3, dtype=np.float64, unbiased_running_var=unbiased)
    layer.set_running_stats(st, n_batches=1)
    want = bn.BatchNorm(3, dtype=np.float64, unbiased_running_var=unbiased)
    want.set_running_stats(plain, n_batches=1)
    np.testing.assert_allclose(layer.running_mean, want.running_mean, rtol=1e-15)
    np.testing.assert_allclose(layer.running_var, want.running_var, rtol=1e-15)


# --- masks and epilogues on large inputs: every kernel set, any thread count -----------------

BIG_CASES = [((64, 16, 32, 32), 1), ((4096, 64), -1)]


def _big_mask(rng, kind, ms):
    if kind == "random":
        return random_mask(rng, ms, 0.5)
    if kind == "rows":      # whole examples masked, others whole, others partly
        m = np.ones(ms, bool)
        r = rng.random(ms[0])
        m[r < 0.3] = False
        part = r > 0.8
        m[part] = rng.random(m[part].shape) < 0.5
        return m
    m = np.zeros(ms, bool)  # "few": a handful of positions in the whole batch
    m.flat[rng.choice(m.size, 5, replace=False)] = True
    return m


@pytest.mark.parametrize("kind", ["random", "rows", "few"])
@pytest.mark.parametrize("shape,axis", BIG_CASES, ids=["nchw", "nd-channels-last"])
def test_large_masked_and_fused_calls_agree_on_every_isa_and_thread_count(shape, axis, kind):
    """Inputs over many work units (the multi-unit merge of per-part counts, the runs of the
    mask): AVX2 and AVX-512 at 1, 2, 3 threads give the same bits (the baseline kernels the
    same bits at any thread count, and the right answer), and the answer is the reference's."""
    rng = np.random.default_rng(110)
    c = shape[axis]
    ms = _rest(shape, axis)
    x = make_x(rng, shape, axis, np.float32)
    dy = make_x(rng, shape, axis, np.float32, loc=1.0)
    z = make_x(rng, shape, axis, np.float32, loc=0.5)
    gamma, beta = make_params(rng, c)
    mask = _big_mask(rng, kind, ms)
    full = full_mask(mask, shape, axis)
    xn = x.copy()
    xn[~full & (rng.random(shape) < 0.3)] = np.nan         # padding, in part NaN

    def everything():
        st = bn.batch_stats(xn, axis=axis, mask=mask)
        y, st2 = bn.forward_train(xn, gamma, beta, axis=axis, mask=mask)
        yf, st3 = bn.forward_train(x, gamma, beta, axis=axis, mask=mask, activation="relu",
                                   residual=z)
        ye = bn.forward_eval(x, st.mean, st.var, gamma, beta, axis=axis, activation="relu",
                             residual=z)
        g = bn.backward(dy, x, st2, gamma, axis=axis, mask=mask)
        gf = bn.backward(dy, x, st3, gamma, axis=axis, mask=mask, activation="relu", y=yf)
        return [st.mean, st.var, y, st2.mean, st2.var, yf, st3.var, ye, *g, *gf]

    results = {}
    for name in _kernels.available_isas():
        _kernels.set_isa(name)
        for n in (1, 2, 3):
            bn.set_num_threads(n)
            results[name, n] = everything()
    for name in _kernels.available_isas():
        first = results[name, 1]
        for key, got in results.items():
            if key[0] == name or (name in SIMD and key[0] in SIMD):
                for i, (a, b) in enumerate(zip(got, first)):
                    assert_bits(a, b, f"result {i} of {key} against {name} at 1 thread")

    rst = ref.batch_stats(x, axis, mask=mask)
    ry, _ = ref.forward_train(xn, gamma, beta, axis=axis, mask=mask)
    ryf, _ = ref.forward_train(x, gamma, beta, axis=axis, mask=mask, activation="relu",
                               residual=z)
    for name in _kernels.available_isas():
        (sm, sv, y, sm2, sv2, yf, sv3, ye, dx, dg, db, dxf, dgf, dbf, dz) = results[name, 2]
        for got in (sv, sv2, sv3):
            np.testing.assert_allclose(got, rst.var, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(sm, rst.mean, rtol=1e-12, atol=1e-12, err_msg=name)
        assert_close(y, ry, F32, f"{name} y")
        assert_close(yf, ryf, F32, f"{name} fused y")
        assert_close(ye, ryf, F32, f"{name} fused eval y")
        rdx, rdg, rdb = ref.backward(dy, x, rst, gamma, axis=axis, mask=mask)
        assert_grad(dx, rdx, F32, f"{name} dx")
        assert_param_grads(dg, db, rdg, rdb, dy, x, rst, axis, F32)
        rdxf, rdgf, rdbf, rdz = ref.backward(dy, x, rst, gamma, axis=axis, mask=mask,
                                             activation="relu", y=yf)
        assert_bits(dz, rdz.astype(np.float32), f"{name} dz")
        assert_grad(dxf, rdxf, F32, f"{name} fused dx")
        assert_param_grads(dgf, dbf, rdgf, rdbf, rdz, x, rst, axis, F32)


# Shapes whose runs end in every kind of SIMD tail (test_kernels.py's)
SIMD_CASES = [((6, 5, 7, 7), 1), ((3, 4, 1, 17), 1), ((2, 3, 100), 1), ((2, 9, 15, 1), 1),
              ((40, 3), 1), ((33, 17), 1), ((5, 6, 7, 33), -1), ((9, 251), 1), ((3, 700), 1),
              ((64, 16), 1), ((2, 2, 130, 80), 1)]


def _runs_mask(rng, ms, kind):
    """Masks whose runs of set and unset positions end anywhere in a vector: random, runs of
    random lengths (1 to 40 along the flattened positions), all but one position."""
    if kind == "random":
        return random_mask(rng, ms, 0.5)
    if kind == "all but one":
        m = np.ones(ms, bool)
        m.flat[rng.integers(0, m.size)] = False
        return m
    lengths = rng.integers(1, 41, int(np.prod(ms)))
    flags = np.repeat(np.arange(len(lengths)) % 2 == 0, lengths)[:int(np.prod(ms))]
    return flags.reshape(ms)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: d.name)
def test_masks_and_epilogues_match_the_reference_in_every_simd_tail(dtype, isa):
    rng = np.random.default_rng(112)
    for shape, axis in SIMD_CASES:
        c = shape[axis]
        ms = _rest(shape, axis)
        x = make_x(rng, shape, axis, np.float32).astype(dtype)
        dy = make_x(rng, shape, axis, np.float32, loc=1.0).astype(dtype)
        z = make_x(rng, shape, axis, np.float32, loc=1.0).astype(dtype)
        gamma, beta = make_params(rng, c)
        x64, dy64, z64 = (a.astype(np.float64) for a in (x, dy, z))
        for kind in ("random", "runs", "all but one"):
            mask = _runs_mask(rng, ms, kind)
            if mask.sum() < 2:
                continue
            what = f"{shape} axis={axis} {kind} mask"
            full = full_mask(mask, shape, axis)
            xn = x.copy()
            xn[~full] = np.nan
            rst = ref.batch_stats(x64, axis, mask=mask)
            assert_stats(bn.batch_stats(xn, axis=axis, mask=mask), rst, what)
            y, st = bn.forward_train(xn, gamma, beta, axis=axis, mask=mask, activation="relu",
                                     residual=z)
            assert_stats(st, rst, what)
            ry = ref.forward_train(xn.astype(np.float64), gamma, beta, axis=axis, mask=mask,
                                   activation="relu", residual=z64)[0]
            assert_close(y, ry, dtype, what)
            yb, stb = bn.forward_train(x, gamma, beta, axis=axis, mask=mask, activation="relu",
                                       residual=z)
            dx, dg, db, dz = bn.backward(dy, x, stb, gamma, axis=axis, mask=mask,
                                         activation="relu", y=yb)
            rdx, rdg, rdb, rdz = ref.backward(dy64, x64, rst, gamma, axis=axis, mask=mask,
                                              activation="relu", y=yb.astype(np.float64))
            assert_bits(dz, rdz.astype(dtype), f"{what}: dz")
            if np.abs(rdx).max() > 0:
                assert_grad(dx, rdx, dtype, f"{what}: dx")
            assert_param_grads(dg, db, rdg, rdb, rdz, x64, rst, axis, dtype)


@pytest.mark.skipif("avx512" not in SIMD or "avx2" not in SIMD,
                    reason="needs both the AVX2 and the AVX-512 kernel sets")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: d.name)
def test_masks_and_epilogues_give_the_same_bits_on_avx2_and_avx512(dtype):
    rng = np.random.default_rng(111)
    for shape, axis in SIMD_CASES:
        c = shape[axis]
        x = make_x(rng, shape, axis, np.float32).astype(dtype)
        dy = make_x(rng, shape, axis, np.float32, loc=1.0).astype(dtype)
        z = make_x(rng, shape, axis, np.float32, loc=1.0).astype(dtype)
        gamma, beta = make_params(rng, c)
        mean, var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
        mask = random_mask(rng, _rest(shape, axis), 0.5)
        results = {}
        for name in ("avx2", "avx512"):
            _kernels.set_isa(name)
            st = bn.batch_stats(x, axis=axis, mask=mask)
            y, st2 = bn.forward_train(x, gamma, beta, axis=axis, mask=mask)
            yr, _ = bn.forward_train(x, gamma, beta, axis=axis, activation="relu")
            yz, _ = bn.forward_train(x, gamma, beta, axis=axis, residual=z)
            yf, st3 = bn.forward_train(x, gamma, beta, axis=axis, mask=mask, activation="relu",
                                       residual=z)
            ye = bn.forward_eval(x, mean, var, gamma, beta, axis=axis, activation="relu",
                                 residual=z)
            g = bn.backward(dy, x, st2, gamma, axis=axis, mask=mask)
            gf = bn.backward(dy, x, st3, gamma, axis=axis, mask=mask, activation="relu", y=yf)
            ge = bn.backward(dy, x, (mean, var), gamma, axis=axis, training=False,
                             activation="relu", y=ye)
            results[name] = [st.mean, st.var, y, yr, yz, yf, ye, *g, *gf, *ge]
        for i, (a, b) in enumerate(zip(results["avx2"], results["avx512"])):
            assert_bits(a, b, f"result {i} of {shape} axis={axis}")


# --- fused epilogues: relu(bn(x) + z) --------------------------------------------------------

EPI_CASES = [((8, 3, 5, 6), 1), ((40, 7), 1), ((6, 5, 4, 9), -1), ((9, 251), 1),
             ((5, 6, 7, 33), -1)]
EPILOGUES = [("relu", False), ("relu", True), (None, True)]


def _relu(v):
    """The activation as specified: v < 0 ? 0 : v (NaN and -0.0 stay)."""
    return np.where(v < 0, np.zeros((), v.dtype), v)


@pytest.mark.parametrize("act,with_z", EPILOGUES, ids=["relu", "relu+z", "z"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", EPI_CASES, ids=lambda v: str(v))
def test_epilogues_match_the_reference(shape, axis, dtype, act, with_z):
    rng = np.random.default_rng(120)
    c = shape[axis]
    x = make_x(rng, shape, axis, dtype)
    dy = make_x(rng, shape, axis, dtype, loc=1.0)
    z = make_x(rng, shape, axis, dtype, loc=0.5) if with_z else None
    gamma, beta = make_params(rng, c)
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)

    y, st = bn.forward_train(x, gamma, beta, axis=axis, activation=act, residual=z)
    ry, rst = ref.forward_train(x, gamma, beta, axis=axis, activation=act, residual=z)
    np.testing.assert_allclose(st.var, rst.var, rtol=1e-12)
    assert st.count == x.size // c
    assert_close(y, ry, dtype, "forward_train")
    ye = bn.forward_eval(x, mean, var, gamma, beta, axis=axis, activation=act, residual=z)
    rye = ref.forward_eval(x, mean, var, gamma, beta, axis=axis, activation=act, residual=z)
    assert_close(ye, rye, dtype, "forward_eval")
    if act == "relu":
        assert (y >= 0).all() and (ye >= 0).all()

    for training, stats, out in [(True, st, y), (False, (mean, var), ye)]:
        kw = {"activation": act, "y": out} if act else {}
        got = bn.backward(dy, x, stats, gamma, axis=axis, training=training, **kw)
        want = ref.backward(dy, x, stats, gamma, axis=axis, training=training, **kw)
        assert len(got) == (4 if act else 3)
        assert_grad(got[0], want[0], dtype, f"dx (training={training})")
        assert_param_grads(got[1], got[2], want[1], want[2], want[3] if act else dy, x,
                           (stats[0], stats[1]), axis, dtype)
        if act:
            assert got[3].dtype == dtype and got[3].shape == x.shape
            assert_bits(got[3], np.where(out > 0, dy, np.zeros((), dtype)), "dz")


def assert_one_rounding(got, plain, z, relu, what):
    """got is relu(plain + z) (or plain + z) up to the rounding of the add: within one unit
    of the terms' size where that sum is finite, the same NaN and inf elsewhere."""
    with np.errstate(invalid="ignore"):
        exact = plain.astype(np.float64) + z.astype(np.float64)
        if relu:
            exact = _relu(exact)
        bound = np.finfo(got.dtype).eps * (np.abs(plain) + np.abs(z)).astype(np.float64)
    fin = np.isfinite(exact)
    assert np.array_equal(got[~fin], exact[~fin].astype(got.dtype), equal_nan=True), what
    err = np.abs(got[fin].astype(np.float64) - exact[fin])
    assert (err <= bound[fin]).all(), f"{what}: {float((err - bound[fin]).max()):.3g}"


@pytest.mark.parametrize("dtype", [F32, F64], ids=lambda d: d.name)
def test_fused_relu_is_relu_of_the_plain_output(dtype, isa):
    """relu alone: the bits of v < 0 ? 0 : v applied to the plain call's output, -0.0 and NaN
    included; with z, relu(plain + z) up to the rounding of that one add."""
    rng = np.random.default_rng(121)
    for shape, axis in EPI_CASES + [((64, 16, 16, 16), 1), ((2048, 40), -1)]:
        c = shape[axis]
        mean = rng.normal(size=c).astype(dtype).astype(np.float64)
        x = make_x(rng, shape, axis, dtype)
        # x == mean in places: with gamma < 0 and beta = -0.0 the output is -0.0 there
        at_mean = np.broadcast_to(mean.reshape(_cs(len(shape), axis)), shape).astype(dtype)
        x = np.where(rng.random(shape) < 0.3, at_mean, x)
        xf = x.copy()                       # finite, for the training calls
        for v in (np.nan, np.inf, -np.inf):
            x[rng.random(shape) < 0.03] = v
        gamma = -rng.uniform(0.5, 2.0, c)
        beta = np.where(rng.random(c) < 0.5, -0.0, rng.normal(size=c))
        var = rng.uniform(0.5, 2.0, c)
        z = np.where(rng.random(shape) < 0.2, -0.0, rng.normal(size=shape)).astype(dtype)

        plain = bn.forward_eval(x, mean, var, gamma, beta, axis=axis)
        fused = bn.forward_eval(x, mean, var, gamma, beta, axis=axis, activation="relu")
        assert_bits(fused, _relu(plain), f"forward_eval {shape}")
        assert np.signbit(fused[fused == 0]).any() and np.isnan(fused).any()  # both were met
        fz = bn.forward_eval(x, mean, var, gamma, beta, axis=axis, activation="relu", residual=z)
        assert_one_rounding(fz, plain, z, True, f"forward_eval relu+z {shape}")
        fz = bn.forward_eval(x, mean, var, gamma, beta, axis=axis, residual=z)
        assert_one_rounding(fz, plain, z, False, f"forward_eval z {shape}")

        p, st = bn.forward_train(xf, gamma, beta, axis=axis)
        f, st2 = bn.forward_train(xf, gamma, beta, axis=axis, activation="relu")
        assert_bits(f, _relu(p), f"forward_train {shape}")
        assert_bits(st2.var, st.var)
        fz, st3 = bn.forward_train(xf, gamma, beta, axis=axis, activation="relu", residual=z)
        assert_one_rounding(fz, p, z, True, f"forward_train relu+z {shape}")
        assert_bits(st3.var, st.var)
        fz, _ = bn.forward_train(xf, gamma, beta, axis=axis, residual=z)
        assert_one_rounding(fz, p, z, False, f"forward_train z {shape}")


def test_relu_on_the_exact_path_is_relu_of_the_plain_output():
    """A channel whose scale gamma / sqrt(var + eps) is subnormal in float32 takes the exact
    path (computed in double): its fused relu must still be v < 0 ? 0 : v of the plain
    output, bit for bit, as on the fast path (-0.0 stays -0.0)."""
    x = np.array([[-1.0, 1.0], [-2.0, 3.0], [0.5, -0.5]], np.float32)
    mean, var = np.zeros(2), np.array([1e92, 1.0])     # channel 0: scale 1e-46
    for name in _kernels.available_isas():
        _kernels.set_isa(name)
        plain = bn.forward_eval(x, mean, var, eps=0.0)
        fused = bn.forward_eval(x, mean, var, eps=0.0, activation="relu")
        assert fused.tolist() == _relu(plain).tolist()         # the values agree
        assert_bits(fused, _relu(plain), f"{name}: the sign of zero")


OUT_CASES = [((8, 3, 5, 6), 1), ((40, 7), 1), ((6, 5, 4, 9), -1)]


@pytest.mark.parametrize("dtype", [F32, F64], ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", OUT_CASES, ids=lambda v: str(v))
def test_epilogue_out_residual_and_layouts(shape, axis, dtype):
    """out= the residual (in place), out= x, out= x = residual, transposed and strided x and
    residual, a broadcast (read-only) residual, an out= partly overlapping the residual: all
    give the reference's values, and the contiguous cases the bits of out=None."""
    rng = np.random.default_rng(122)
    c = shape[axis]
    x = make_x(rng, shape, axis, dtype)
    z = make_x(rng, shape, axis, dtype, loc=0.5)
    gamma, beta = make_params(rng, c)
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    mask = random_mask(rng, _rest(shape, axis))
    kw = dict(axis=axis, activation="relu")
    for fn in ("train", "eval"):
        if fn == "train":
            def call(xx, zz, out=None):
                return bn.forward_train(xx, gamma, beta, mask=mask, residual=zz, out=out, **kw)[0]

            def want(xx, zz):
                return ref.forward_train(xx, gamma, beta, mask=mask, residual=zz, **kw)[0]
        else:
            def call(xx, zz, out=None):
                return bn.forward_eval(xx, mean, var, gamma, beta, residual=zz, out=out, **kw)

            def want(xx, zz):
                return ref.forward_eval(xx, mean, var, gamma, beta, residual=zz, **kw)

        y0 = call(x, z)
        assert_close(y0, want(x, z), dtype, f"{fn}")
        zi = z.copy()
        assert call(x, zi, out=zi) is zi
        assert_bits(zi, y0, f"{fn}: out=residual")
        xi = x.copy()
        assert call(xi, z, out=xi) is xi
        assert_bits(xi, y0, f"{fn}: out=x")
        xi = x.copy()
        assert call(xi, xi, out=xi) is xi
        assert_close(xi, want(x, x), dtype, f"{fn}: out=x=residual")
        # layouts without a strided (outer, C, inner) view, and strided ones
        xt = np.ascontiguousarray(np.moveaxis(x, 0, -1))
        xt = np.moveaxis(xt, -1, 0)
        zt = np.asfortranarray(z)
        zs = np.repeat(z, 2, axis=-1)[..., ::2]
        zr = np.ascontiguousarray(z[::-1])[::-1]
        for name, xx, zz in [("x moved", xt, z), ("z Fortran", x, zt), ("z strided", x, zs),
                             ("z reversed", x, zr), ("both", xt, zt)]:
            assert_close(call(xx, zz), want(x, z), dtype, f"{fn}: {name}")
            zc = zz.copy(order="K")
            assert call(xx, zc, out=zc) is zc
            assert_close(zc, want(x, z), dtype, f"{fn}: {name}, out=residual")
        # a broadcast residual, read in place
        zb = np.broadcast_to(z[:1], shape)
        assert_close(call(x, zb), want(x, zb), dtype, f"{fn}: broadcast residual")
        # out= overlapping the residual in part: staged, the residual read as it was
        buf = np.empty((shape[0] + 1,) + shape[1:], dtype)
        buf[:-1] = z
        out = buf[1:]
        assert call(x, buf[:-1], out=out) is out
        assert_close(out, want(x, z), dtype, f"{fn}: out overlapping the residual")


@pytest.mark.parametrize("dtype", [F32, F64], ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", OUT_CASES, ids=lambda v: str(v))
def test_backward_with_relu_gate(shape, axis, dtype):
    """dz = dy where y > 0 or y is NaN, +0 where y <= 0 (-0.0 included); out= dy and out= y
    give the bits of out=None; dz is the gradient the other outputs are taken from."""
    rng = np.random.default_rng(123)
    c = shape[axis]
    x = make_x(rng, shape, axis, dtype)
    dy = make_x(rng, shape, axis, dtype, loc=1.0)
    gamma = make_params(rng, c)[0]
    y, st = bn.forward_train(x, gamma, axis=axis, activation="relu")
    y = y.copy()
    y.flat[rng.choice(y.size, 6, replace=False)] = [np.nan, -0.0, 0.0, -1.0, np.inf, -np.inf]
    for training in (True, False):
        want_dz = np.where((y > 0) | np.isnan(y), dy, np.zeros((), dtype))
        dx, dg, db, dz = bn.backward(dy, x, st, gamma, axis=axis, training=training,
                                     activation="relu", y=y)
        assert_bits(dz, want_dz, "dz")
        pdx, pdg, pdb = bn.backward(want_dz, x, st, gamma, axis=axis, training=training)
        assert_bits(dx, pdx, "dx is the plain gradient of dz")
        assert_bits(dg, pdg)
        assert_bits(db, pdb)
        for which in ("dy", "y"):
            dyi, yi = dy.copy(), y.copy()
            out = dyi if which == "dy" else yi
            got = bn.backward(dyi, x, st, gamma, axis=axis, training=training,
                              activation="relu", y=yi, out=out)
            assert got[0] is out
            for a, b in zip(got, (dx, dg, db, dz)):
                assert_bits(a, b, f"out={which}")


# --- masks and epilogues combined; PyTorch autograd ------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64], ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis,mshape", MASK_CASES, ids=_mask_ids)
def test_mask_relu_and_residual_in_one_call(shape, axis, mshape, dtype):
    rng = np.random.default_rng(130)
    c = shape[axis]
    x = make_x(rng, shape, axis, dtype)
    dy = make_x(rng, shape, axis, dtype, loc=1.0)
    z = make_x(rng, shape, axis, dtype, loc=0.5)
    gamma, beta = make_params(rng, c)
    mask = random_mask(rng, mshape)
    full = full_mask(mask, shape, axis)
    x[~full] = (20.0 * rng.normal(size=int((~full).sum()))).astype(dtype)    # outliers
    y, st = bn.forward_train(x, gamma, beta, axis=axis, mask=mask, activation="relu",
                             residual=z)
    ry, rst = ref.forward_train(x, gamma, beta, axis=axis, mask=mask, activation="relu",
                                residual=z)
    assert_stats(st, rst)
    assert_close(y, ry, dtype, "y")
    # the same bits as the unfused masked call followed by the epilogue, where that is exact
    plain, _ = bn.forward_train(x, gamma, beta, axis=axis, mask=mask)
    assert_bits(y, _relu(plain + z), "relu(masked bn + z)")
    dx, dg, db, dz = bn.backward(dy, x, st, gamma, axis=axis, mask=mask, activation="relu", y=y)
    rdx, rdg, rdb, rdz = ref.backward(dy, x, rst, gamma, axis=axis, mask=mask,
                                      activation="relu", y=y)
    assert_bits(dz, rdz.astype(dtype), "dz")
    assert_grad(dx, rdx, dtype)
    assert_param_grads(dg, db, rdg, rdb, rdz, x, rst, axis, dtype)


def _torch_bn(torch, x, dy, gamma, beta, z, mask, axis, eps, stats=None):
    """relu(bn(x) + z) in PyTorch (masked statistics written out), and autograd's gradients
    (dx, dgamma, dbeta, dz); with `stats` (mean, var) the statistics are constants."""
    ax = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    cs = _cs(x.ndim, axis)
    t = lambda a: torch.tensor(np.ascontiguousarray(a))            # noqa: E731
    xt, zt = t(x).requires_grad_(True), t(z).requires_grad_(True)
    gt = t(np.asarray(gamma, x.dtype)).requires_grad_(True)
    bt = t(np.asarray(beta, x.dtype)).requires_grad_(True)
    if stats is not None:
        mu, var = (t(np.asarray(s, x.dtype)).view(cs) for s in stats)
    elif mask is None:
        mu = xt.mean(dim=red, keepdim=True)
        var = ((xt - mu) ** 2).mean(dim=red, keepdim=True)
    else:
        mt = t(full_mask(mask, x.shape, axis))
        n = mt.sum(dim=red, keepdim=True)
        mu = torch.where(mt, xt, 0).sum(dim=red, keepdim=True) / n
        var = (torch.where(mt, xt - mu, 0) ** 2).sum(dim=red, keepdim=True) / n
    y = torch.relu((xt - mu) / torch.sqrt(var + eps) * gt.view(cs) + bt.view(cs) + zt)
    y.backward(t(dy))
    return [a.detach().numpy() for a in (y, xt.grad, gt.grad, bt.grad, zt.grad)]


# the epilogue tests' cases: layouts, float32/float64, with and without a mask
def EPILOGUE_CASES(test):
    for mark in (pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"]),
                 pytest.mark.parametrize("dtype", [F32, F64], ids=lambda d: d.name),
                 pytest.mark.parametrize("shape,axis", [((8, 3, 5, 6), 1), ((6, 5, 4, 9), -1),
                                                        ((40, 7), 1)],
                                         ids=["nchw", "nhwc", "nd"])):
        test = mark(test)
    return test


@EPILOGUE_CASES
def test_epilogues_match_torch_autograd(shape, axis, dtype, masked):
    torch = require("torch", extra="torch")
    rng = np.random.default_rng(131)
    c = shape[axis]
    x = make_x(rng, shape, axis, dtype)
    dy = make_x(rng, shape, axis, dtype, loc=1.0)
    z = make_x(rng, shape, axis, dtype, loc=0.5)
    gamma, beta = make_params(rng, c)
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    mask = random_mask(rng, _rest(shape, axis)) if masked else None
    tol = 1e-12 if dtype == F64 else 1e-5
    # training: the gradient flows through the (masked) batch statistics
    y, st = bn.forward_train(x, gamma, beta, axis=axis, mask=mask, activation="relu",
                             residual=z)
    got = [y, *bn.backward(dy, x, st, gamma, axis=axis, mask=mask, activation="relu", y=y)]
    want = _torch_bn(torch, x, dy, gamma, beta, z, mask, axis, 1e-5)
    for name, a, b in zip(["y", "dx", "dgamma", "dbeta", "dz"], got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(1.0, np.abs(b).max()),
                                   err_msg=f"training {name}")
    # inference: constant statistics (a mask has nothing to do there)
    ye = bn.forward_eval(x, mean, var, gamma, beta, axis=axis, activation="relu", residual=z)
    got = [ye, *bn.backward(dy, x, (mean, var), gamma, axis=axis, training=False,
                            activation="relu", y=ye)]
    want = _torch_bn(torch, x, dy, gamma, beta, z, None, axis, 1e-5, stats=(mean, var))
    for name, a, b in zip(["y", "dx", "dgamma", "dbeta", "dz"], got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(1.0, np.abs(b).max()),
                                   err_msg=f"inference {name}")


# --- the layer: masks and epilogues ----------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 10, 5), (4, 6, 7, 3), (32, 4)])
def test_masked_layer_matches_keras_over_several_steps(shape):
    keras = require("keras", extra="test-frameworks")
    rng = np.random.default_rng(140)
    c = shape[-1]
    kl = keras.layers.BatchNormalization(axis=-1, momentum=0.99, epsilon=1e-3)
    kl.build(shape)
    layer = bn.BatchNorm(c, axis=-1, momentum=0.01, eps=1e-3, unbiased_running_var=False,
                         dtype=np.float32)
    weights = [rng.normal(1, 0.3, c), rng.normal(0, 0.5, c)]
    kl.set_weights(weights + kl.get_weights()[2:])
    layer.gamma, layer.beta = weights
    for step in range(4):       # a drifting distribution; padding NaN or huge (Keras reads
        x = (rng.normal(size=shape) * (1 + step) + step).astype(np.float32)  # neither)
        mask = random_mask(rng, shape[:-1])
        x[~mask] = np.nan if step % 2 else 1e30
        y = layer(x, mask=mask)
        np.testing.assert_allclose(y, np.asarray(kl(x, training=True, mask=mask)), rtol=2e-5,
                                   atol=2e-5, equal_nan=True, err_msg=f"step {step}")
        np.testing.assert_allclose(layer.running_mean, np.asarray(kl.moving_mean.value),
                                   rtol=2e-5, atol=2e-6, err_msg=f"moving_mean, step {step}")
        np.testing.assert_allclose(layer.running_var, np.asarray(kl.moving_variance.value),
                                   rtol=2e-5, atol=2e-6, err_msg=f"moving_var, step {step}")
    assert layer.num_batches_tracked == 4
    x = rng.normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(layer.eval()(x), np.asarray(kl(x, training=False)), rtol=2e-5,
                               atol=2e-5)


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_masked_running_statistics_use_the_masked_count(momentum, unbiased):
    rng = np.random.default_rng(141)
    layer = bn.BatchNorm(3, momentum=momentum, unbiased_running_var=unbiased, dtype=np.float64)
    rm, rv = np.zeros(3), np.ones(3)
    for step in range(3):
        x = rng.normal(step, 1 + step, (10, 3, 4))
        mask = random_mask(rng, (10, 4), 0.3)
        x[np.broadcast_to(~mask[:, None], x.shape)] = np.nan
        layer(x, mask=mask)
        st = ref.batch_stats(x, mask=mask)
        n = int(mask.sum())
        m = 1 / (step + 1) if momentum is None else momentum
        rm = (1 - m) * rm + m * st.mean
        rv = (1 - m) * rv + m * st.var * (n / (n - 1) if unbiased else 1)
        np.testing.assert_allclose(layer.running_mean, rm, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(layer.running_var, rv, rtol=1e-13)
        assert layer.num_batches_tracked == step + 1


@EPILOGUE_CASES
def test_layer_with_relu_and_residual_matches_the_reference(shape, axis, dtype, masked):
    rng = np.random.default_rng(142)
    c = shape[axis]
    layer = bn.BatchNorm(c, axis=axis, activation="relu", dtype=dtype)
    layer.gamma, layer.beta = make_params(rng, c)
    g, b = layer.gamma.astype(np.float64), layer.beta.astype(np.float64)
    mask = random_mask(rng, _rest(shape, axis)) if masked else None
    for step in range(2):
        x = make_x(rng, shape, axis, dtype)
        z = make_x(rng, shape, axis, dtype, loc=0.5)
        dy = make_x(rng, shape, axis, dtype, loc=1.0)
        y = layer(x, mask=mask, residual=z)
        ry, rst = ref.forward_train(x, g, b, axis=axis, mask=mask, activation="relu",
                                    residual=z)
        assert_close(y, ry, dtype, "layer y")
        dx, dz = layer.backward(dy)
        rdx, rdg, rdb, rdz = ref.backward(dy, x, rst, g, axis=axis, mask=mask,
                                          activation="relu", y=y)
        assert_bits(dz, rdz.astype(dtype), "dz")
        assert_grad(dx, rdx, dtype)
        assert layer.grad_gamma.dtype == dtype and layer.grad_beta.dtype == dtype
        sg, sb = param_grad_scales(rdz, x, rst.mean, rst.var, axis)
        np.testing.assert_allclose(layer.grad_gamma, rdg, rtol=2e-6 if dtype == F32 else 1e-12,
                                   atol=1e-12 * sg)
        np.testing.assert_allclose(layer.grad_beta, rdb, rtol=2e-6 if dtype == F32 else 1e-12,
                                   atol=1e-12 * sb)
    # the activation without a residual: dx alone; eval mode: the running statistics
    x = make_x(rng, shape, axis, dtype)
    y = layer(x, mask=mask)
    assert isinstance(layer.backward(dy), np.ndarray)
    layer.eval()
    z = make_x(rng, shape, axis, dtype, loc=0.5)
    rm, rv = layer.running_mean.astype(np.float64), layer.running_var.astype(np.float64)
    ye = layer(x, mask=mask, residual=z)            # a mask changes nothing in eval mode
    rye = ref.forward_eval(x, rm, rv, g, b, axis=axis, activation="relu", residual=z)
    assert_close(ye, rye, dtype, "eval y")
    dx, dz = layer.backward(dy)
    rdx, rdg, rdb, rdz = ref.backward(dy, x, (rm, rv), g, axis=axis, training=False,
                                      activation="relu", y=ye)
    assert_bits(dz, rdz.astype(dtype), "eval dz")
    assert_grad(dx, rdx, dtype, "eval dx")


def test_layer_residual_without_activation_returns_dy_as_its_gradient():
    rng = np.random.default_rng(143)
    layer = bn.BatchNorm(3, dtype=np.float64)
    x, z, dy = (rng.normal(size=(10, 3, 4)) for _ in range(3))
    y = layer(x, residual=z)
    np.testing.assert_allclose(y, ref.forward_train(x)[0] + z, rtol=1e-13, atol=1e-14)
    dx, dz = layer.backward(dy)
    assert np.array_equal(dz, dy)
    np.testing.assert_allclose(dx, ref.backward(dy, x, ref.batch_stats(x))[0], rtol=1e-12,
                               atol=1e-14)
    y = layer(x)
    assert isinstance(layer.backward(dy), np.ndarray)


def test_layer_keeps_its_output_for_the_relu_gradient():
    rng = np.random.default_rng(144)
    x, z, dy = (rng.normal(size=(10, 3, 4)).astype(np.float32) for _ in range(3))
    layer = bn.BatchNorm(3, activation="relu")
    y = layer(x, residual=z)
    y[0, 0, 0] += 1.0                               # reused before backward
    with pytest.raises(RuntimeError, match="forward output"):
        layer.backward(dy)
    zi = z.copy()                                   # the output written into the residual
    y = layer(x, residual=zi, out=zi)
    assert y is zi
    dx, dz = layer.backward(dy)
    assert np.array_equal(dz, np.where(y > 0, dy, 0))
    zi[:] = 0.0
    with pytest.raises(RuntimeError, match="forward output"):
        layer.backward(dy)
    xi = x.copy()
    layer(xi, out=xi)
    with pytest.raises(RuntimeError, match="out=x"):
        layer.backward(dy)


@pytest.mark.parametrize("mask_kind", ["full", "broadcast", "none"])
@pytest.mark.parametrize("shape,axis,k", [((12, 3, 5), 1, 4), ((11, 4, 3, 2), -1, 3)])
def test_ghost_batches_with_mask_and_epilogue_are_successive_calls(shape, axis, k, mask_kind):
    """The mask (broadcast to x's shape first) and the residual split with the rows: outputs,
    running statistics, dx, dz and the parameters' gradients of the successive calls."""
    rng = np.random.default_rng(145)
    c = shape[axis]
    ghost = bn.BatchNorm(c, axis=axis, dtype=np.float64, virtual_batch_size=k,
                         activation="relu")
    plain = bn.BatchNorm(c, axis=axis, dtype=np.float64, activation="relu")
    gamma, beta = make_params(rng, c)
    for layer in (ghost, plain):
        layer.gamma, layer.beta = gamma, beta
    ms = _rest(shape, axis)
    mask = {"full": random_mask(rng, ms, 0.7), "broadcast": random_mask(rng, ms[1:], 0.7),
            "none": None}[mask_kind]
    groups = [slice(i, i + k) for i in range(0, shape[0], k)]
    fm = None if mask is None else np.broadcast_to(mask, ms)
    for step in range(2):
        x = make_x(rng, shape, axis, np.float64)
        z = make_x(rng, shape, axis, np.float64, loc=0.5)
        y = ghost(x, mask=mask, residual=z)
        want = [plain(x[r], mask=None if fm is None else fm[r], residual=z[r]) for r in groups]
        assert np.array_equal(y, np.concatenate(want))
        state_equal(ghost, plain)
        assert ghost.num_batches_tracked == (step + 1) * len(groups)
    dy = make_x(rng, shape, axis, np.float64)
    dx, dz = ghost.backward(dy)
    wdx, wdz, wdg, wdb = [], [], 0.0, 0.0
    for r in groups:
        m = None if fm is None else fm[r]
        st = bn.batch_stats(x[r], axis=axis, mask=m)
        gdx, gdg, gdb, gdz = bn.backward(dy[r], x[r], st, ghost.gamma, axis=axis, mask=m,
                                         activation="relu", y=y[r])
        wdx.append(gdx)
        wdz.append(gdz)
        wdg, wdb = wdg + gdg, wdb + gdb
    assert np.array_equal(dx, np.concatenate(wdx))
    assert np.array_equal(dz, np.concatenate(wdz))
    assert np.array_equal(ghost.grad_gamma, wdg) and np.array_equal(ghost.grad_beta, wdb)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("clip", CLIPS[:2])
def test_renorm_with_a_mask_matches_a_manual_computation(clip, unbiased, activation):
    """Batch renormalization on the masked statistics: r, d, the output, the four averages
    (the unbiased factor from the masked count) and the gradients (r, d constant)."""
    rng = np.random.default_rng(146)
    eps, m, rm_m = 1e-3, 0.1, 0.01
    layer = bn.BatchNorm(4, renorm=True, renorm_clipping=clip, dtype=np.float64, eps=eps,
                         momentum=m, unbiased_running_var=unbiased, activation=activation)
    layer.gamma, layer.beta = rng.normal(1, 0.3, 4), rng.normal(0, 0.5, 4)
    layer.renorm_mean, layer.renorm_std = rng.normal(0, 1, 4), rng.uniform(0.5, 2, 4)
    layer.running_std = rng.uniform(0.5, 2, 4)
    before = layer.state_dict()
    x = rng.normal(2, 3, (16, 4, 3))
    mask = random_mask(rng, (16, 3), 0.5)
    x[np.broadcast_to(~mask[:, None], x.shape)] = 40.0 + rng.normal(size=int((~mask).sum()) * 4)
    z = rng.normal(size=x.shape) if activation else None
    y = layer(x, mask=mask, residual=z)

    st = ref.batch_stats(x, mask=mask)
    n = int(mask.sum())
    s = np.maximum(before["renorm_std"], np.sqrt(eps))
    r = np.sqrt(st.var + eps) / s
    d = (st.mean - before["renorm_mean"]) / s
    r = np.clip(r, clip.get("rmin", -np.inf), clip.get("rmax", np.inf))
    d = np.clip(d, -clip.get("dmax", np.inf), clip.get("dmax", np.inf))
    g, b = before["gamma"], before["beta"]
    xhat = ref.forward_eval(x, st.mean, st.var, eps=eps)
    cs = (1, -1, 1)
    want = (xhat * r.reshape(cs) + d.reshape(cs)) * g.reshape(cs) + b.reshape(cs)
    if activation:
        want = np.maximum(want + z, 0.0)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)

    var_r = st.var * (n / (n - 1) if unbiased else 1.0)
    running_std = (1 - m) * before["running_std"] + m * np.sqrt(var_r + eps)
    np.testing.assert_allclose(layer.running_mean, (1 - m) * before["running_mean"] + m * st.mean,
                               rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(layer.running_std, running_std, rtol=1e-13)
    np.testing.assert_allclose(layer.running_var, np.maximum(running_std ** 2 - eps, 0),
                               rtol=1e-12)
    np.testing.assert_allclose(layer.renorm_mean,
                               (1 - rm_m) * before["renorm_mean"] + rm_m * st.mean,
                               rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(layer.renorm_std,
                               (1 - rm_m) * before["renorm_std"] + rm_m * np.sqrt(st.var + eps),
                               rtol=1e-13)

    dy = rng.normal(size=x.shape)
    got = layer.backward(dy)
    gated = np.where(y > 0, dy, 0.0) if activation else dy
    rdx, rdg, rdb = ref.backward(gated, x, st, g * r, eps=eps, mask=mask)
    dx = got[0] if activation else got
    np.testing.assert_allclose(dx, rdx, rtol=1e-10, atol=1e-12 * np.abs(rdx).max())
    np.testing.assert_allclose(layer.grad_beta, rdb, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grad_gamma, r * rdg + d * rdb, rtol=1e-10, atol=1e-11)


# --- errors: bad masks, activations, residuals, y; nothing changed ---------------------------

_X = np.random.default_rng(150).normal(2, 3, (6, 3, 5)).astype(np.float32)
_ST = bn.batch_stats(_X)
_NONE = np.zeros((6, 5), bool)
_ONE = _NONE.copy()
_ONE[2, 3] = True


def _bad_calls():
    x, st = _X, _ST
    z = np.ones_like(x)
    return [
        # masks
        ("all False", lambda o: bn.forward_train(x, mask=_NONE, out=o), ValueError, "unmasked"),
        ("one set", lambda o: bn.forward_train(x, mask=_ONE, out=o), ValueError, "unmasked"),
        ("all False, broadcast", lambda o: bn.forward_train(x, mask=np.zeros((6, 1), bool),
                                                            out=o), ValueError, "unmasked"),
        ("backward all False", lambda o: bn.backward(x, x, st, mask=_NONE, out=o), ValueError,
         "unmasked"),
        ("backward one set", lambda o: bn.backward(x, x, st, mask=_ONE, out=o), ValueError,
         "unmasked"),
        ("int mask", lambda o: bn.forward_train(x, mask=np.ones((6, 5), int), out=o), TypeError,
         "mask"),
        ("float mask", lambda o: bn.forward_train(x, mask=np.ones((6, 5)), out=o), TypeError,
         "mask"),
        ("str mask", lambda o: bn.forward_train(x, mask="yes", out=o), TypeError, "mask"),
        ("int mask, stats", lambda o: bn.batch_stats(x, mask=np.ones((6, 5), np.uint8)),
         TypeError, "mask"),
        ("int mask, backward", lambda o: bn.backward(x, x, st, mask=np.ones((6, 5), int), out=o),
         TypeError, "mask"),
        ("numpy.ma mask", lambda o: bn.forward_train(
            x, mask=np.ma.masked_array(np.ones((6, 5), bool)), out=o), TypeError, "mask"),
        ("wrong shape", lambda o: bn.forward_train(x, mask=np.ones((6, 4), bool), out=o),
         ValueError, "mask"),
        ("with the channel axis", lambda o: bn.forward_train(x, mask=np.ones((6, 3, 5), bool),
                                                             out=o), ValueError, "mask"),
        ("wrong shape, stats", lambda o: bn.batch_stats(x, mask=np.ones((5, 6), bool)),
         ValueError, "mask"),
        ("wrong shape, backward", lambda o: bn.backward(x, x, st, mask=np.ones(4, bool), out=o),
         ValueError, "mask"),
        # activations
        ("gelu", lambda o: bn.forward_train(x, activation="gelu", out=o), ValueError,
         "activation"),
        ("RELU", lambda o: bn.forward_train(x, activation="RELU", out=o), ValueError,
         "activation"),
        ("activation=1", lambda o: bn.forward_eval(x, st.mean, st.var, activation=1, out=o),
         ValueError, "activation"),
        ("eval tanh", lambda o: bn.forward_eval(x, st.mean, st.var, activation="tanh",
                                                residual=z, out=o), ValueError, "activation"),
        ("backward gelu", lambda o: bn.backward(x, x, st, activation="gelu", y=x, out=o),
         ValueError, "activation"),
        # y
        ("relu without y", lambda o: bn.backward(x, x, st, activation="relu", out=o), TypeError,
         "y="),
        ("y without relu", lambda o: bn.backward(x, x, st, y=x, out=o), TypeError, "y="),
        ("y of another shape", lambda o: bn.backward(x, x, st, activation="relu", y=x[:3],
                                                     out=o), ValueError, "y must have"),
        ("y of another dtype", lambda o: bn.backward(x, x, st, activation="relu",
                                                     y=x.astype(np.float64), out=o),
         TypeError, "y must have"),
        # residuals
        ("residual of another shape", lambda o: bn.forward_train(x, residual=z[:, :2], out=o),
         ValueError, "residual"),
        ("residual of another dtype", lambda o: bn.forward_train(
            x, residual=z.astype(np.float64), out=o), TypeError, "residual"),
        ("residual as a list", lambda o: bn.forward_eval(x, st.mean, st.var, residual=z.tolist(),
                                                         out=o), TypeError, "residual"),
        ("numpy.ma residual", lambda o: bn.forward_train(
            x, residual=np.ma.masked_array(z), activation="relu", out=o), TypeError,
         "residual"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())),
                         ids=[c[0] for c in _bad_calls()])
def test_bad_variant_arguments_raise_and_write_nothing(case):
    name, call, error, match = _bad_calls()[case]
    before = _X.copy()
    out = np.full_like(_X, 7.0)
    with pytest.raises(error, match=match):
        call(out)
    assert np.array_equal(_X, before) and (out == 7.0).all(), name


def _layer_failures():
    rng = np.random.default_rng(151)
    x = rng.normal(2, 3, (6, 3, 5)).astype(np.float32)
    one = _ONE.copy()
    ghost_mask = np.ones((6, 5), bool)
    ghost_mask[4:] = False
    ghost_mask[5, 0] = True                 # the last group (rows 4, 5) has one value
    return [
        (lambda: bn.BatchNorm(3), dict(mask=_NONE), ValueError, "unmasked"),
        (lambda: bn.BatchNorm(3), dict(mask=one), ValueError, "unmasked"),
        (lambda: bn.BatchNorm(3), dict(mask=np.ones((6, 5), int)), TypeError, "mask"),
        (lambda: bn.BatchNorm(3), dict(mask=np.ones((6, 4), bool)), ValueError, "mask"),
        (lambda: bn.BatchNorm(3).eval(), dict(mask=np.ones((6, 4), bool)), ValueError, "mask"),
        (lambda: bn.BatchNorm(3, activation="relu"), dict(residual=x[:, :2]), ValueError,
         "residual"),
        (lambda: bn.BatchNorm(3, activation="relu"), dict(residual=x.astype(np.float64)),
         TypeError, "residual"),
        (lambda: bn.BatchNorm(3, activation="relu").eval(), dict(residual=x[:2]), ValueError,
         "residual"),
        (lambda: bn.BatchNorm(3, virtual_batch_size=2), dict(mask=ghost_mask), ValueError,
         "unmasked"),
        (lambda: bn.BatchNorm(3, virtual_batch_size=2, activation="relu"),
         dict(residual=x[:4]), ValueError, "residual"),
        (lambda: bn.BatchNorm(3, renorm=True), dict(mask=_NONE), ValueError, "unmasked"),
        (lambda: bn.BatchNorm(3, renorm=True, activation="relu"), dict(mask=one, residual=x),
         ValueError, "unmasked"),
    ], x


@pytest.mark.parametrize("case", range(len(_layer_failures()[0])))
def test_a_failing_variant_call_changes_no_layer_state(case):
    cases, x = _layer_failures()
    make, kwargs, error, match = cases[case]
    layer = make()
    layer.gamma = [1.5, 0.5, 2.0]
    layer(x * 2)                              # a state worth keeping, and a saved forward
    before = layer.state_dict()
    dx_before = layer.backward(np.ones_like(x))
    xc = x.copy()
    out = np.full_like(x, 7.0)
    with pytest.raises(error, match=match):
        layer(xc, out=out, **kwargs)
    state_equal_dict(layer.state_dict(), before)
    assert np.array_equal(xc, x)
    # backward still refers to the last call that succeeded
    assert np.array_equal(layer.backward(np.ones_like(x)), dx_before)


def test_bad_layer_activations():
    for bad, error in [("gelu", ValueError), ("RELU", ValueError), (True, ValueError),
                       (1, ValueError)]:
        with pytest.raises(error, match="activation"):
            bn.BatchNorm(3, activation=bad)


class _OneRank:
    """An mpi4py-like communicator of one process."""

    def Get_size(self):
        return 1

    def Get_rank(self):
        return 0

    def Allgather(self, send, recv):
        recv[0] = send


def test_sync_batchnorm_refuses_masks_residuals_and_activations():
    comm = _OneRank()
    x = np.random.default_rng(152).normal(size=(8, 3)).astype(np.float32)
    layer = bn.SyncBatchNorm(3, comm)
    before = layer.state_dict()
    for kwargs in ({"mask": np.ones(8, bool)}, {"residual": x}):
        for mode in (True, False):
            layer.train(mode)
            with pytest.raises(NotImplementedError, match="mask or a residual"):
                layer(x, **kwargs)
    state_equal_dict(layer.state_dict(), before)
    with pytest.raises(NotImplementedError, match="activation"):
        bn.SyncBatchNorm(3, comm, activation="relu")
    # converting a layer with an activation must not drop it silently
    with pytest.raises(NotImplementedError, match="activation"):
        bn.SyncBatchNorm.from_batchnorm(bn.BatchNorm(3, activation="relu"), comm)
