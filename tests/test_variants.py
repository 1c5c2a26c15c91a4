"""The layer's variants: ghost batches (virtual_batch_size) and batch renormalization.

Oracles: for ghost batches, the successive plain training calls on the groups (outputs and
running statistics bit-identical, gradients from the functional backward of each group);
for renorm, ``batchnorm.reference.renorm_forward_train`` in float64, Keras 3's
``BatchNormalization(renorm=True)`` over several steps, and PyTorch autograd of the same
formula with r and d held constant.
"""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import reference
from conftest import require

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
