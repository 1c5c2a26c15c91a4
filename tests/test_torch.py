"""Step by step against PyTorch: the BatchNorm layer must follow torch.nn.BatchNorm{1,2,3}d.

Several training steps with different batches (and an SGD update of gamma/beta in between),
then eval steps: outputs, running statistics, num_batches_tracked, and all gradients.
"""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from conftest import make_params, make_x, param_grad_scales, rel_err

torch = pytest.importorskip("torch")

TOL = {np.float32: 1e-5, np.float64: 1e-10}

# name, torch class, batch shapes of the training steps (channel axis 1 in torch's layout),
# our axis, and the permutation from torch's layout to ours (None: the same)
CASES = [
    ("1d-ND", "BatchNorm1d", [(16, 5), (9, 5), (32, 5)], 1, None),
    ("1d-NCL", "BatchNorm1d", [(8, 5, 7), (3, 5, 11), (6, 5, 7)], 1, None),
    ("2d-NCHW", "BatchNorm2d", [(4, 6, 5, 5), (2, 6, 7, 3), (8, 6, 4, 4)], 1, None),
    ("3d-NCDHW", "BatchNorm3d", [(2, 3, 4, 5, 6), (3, 3, 2, 3, 4), (2, 3, 5, 5, 5)], 1, None),
    ("2d-NHWC", "BatchNorm2d", [(4, 6, 5, 5), (2, 6, 7, 3), (8, 6, 4, 4)], -1, (0, 2, 3, 1)),
    ("3d-NDHWC", "BatchNorm3d", [(2, 3, 4, 5, 6), (3, 3, 2, 3, 4)], -1, (0, 2, 3, 4, 1)),
]


def _close(got, expected, dtype, what, scale=None):
    e = rel_err(got, expected, scale)
    assert e <= TOL[dtype], f"{what}: relative error {e:.3g} > {TOL[dtype]:g}"


def _to_ours(a, perm):
    return np.ascontiguousarray(a if perm is None else a.transpose(perm))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("momentum", [0.1, 0.25, None])
@pytest.mark.parametrize("name, cls, shapes, axis, perm", CASES, ids=[c[0] for c in CASES])
def test_layer_follows_torch(name, cls, shapes, axis, perm, momentum, dtype):
    rng = np.random.default_rng([len(name), len(shapes), 0 if momentum is None else 1])
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    c = shapes[0][1]
    tl = getattr(torch.nn, cls)(c, eps=1e-5, momentum=momentum, dtype=tdtype)
    ours = bn.BatchNorm(c, axis=axis, eps=1e-5, momentum=momentum, dtype=dtype)
    gamma, beta = make_params(rng, c)
    with torch.no_grad():
        tl.weight.copy_(torch.from_numpy(gamma))
        tl.bias.copy_(torch.from_numpy(beta))
    ours.gamma, ours.beta = gamma, beta
    lr = 0.05

    eval_shapes = [(1,) + shapes[0][1:], shapes[1]]
    for step, shape in enumerate(list(shapes) + eval_shapes):
        training = step < len(shapes)
        tl.train(training)
        ours.train(training)
        x_t = make_x(rng, shape, 1, dtype)  # in torch's layout (channel axis 1)
        w_t = rng.standard_normal(shape).astype(dtype)
        xt = torch.from_numpy(x_t.copy()).requires_grad_(True)
        tl.zero_grad()
        yt = tl(xt)
        (yt * torch.from_numpy(w_t)).sum().backward()

        x, w = _to_ours(x_t, perm), _to_ours(w_t, perm)
        y = ours(x)
        dx = ours.backward(w)
        what = f"{name} step {step} ({'train' if training else 'eval'})"

        assert y.dtype == dtype and dx.dtype == dtype
        _close(y, _to_ours(yt.detach().numpy(), perm), dtype, f"{what}: y")
        tdx = _to_ours(xt.grad.numpy(), perm)
        _close(dx, tdx, dtype, f"{what}: dx", scale=float(np.abs(tdx).max()))
        red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        if training:
            used = (x.astype(np.float64).mean(axis=red), x.astype(np.float64).var(axis=red))
        else:
            used = (ours.running_mean, ours.running_var)
        sg, sb = param_grad_scales(w, x, *used, axis)
        _close(ours.grad_gamma, tl.weight.grad.numpy(), dtype, f"{what}: dgamma", scale=sg)
        _close(ours.grad_beta, tl.bias.grad.numpy(), dtype, f"{what}: dbeta", scale=sb)
        _close(ours.running_mean, tl.running_mean.numpy(), dtype, f"{what}: running_mean")
        _close(ours.running_var, tl.running_var.numpy(), dtype, f"{what}: running_var")
        assert ours.num_batches_tracked == int(tl.num_batches_tracked) == min(step + 1, len(shapes))

        if training:  # one SGD step on gamma and beta, each side with its own gradients
            with torch.no_grad():
                tl.weight -= lr * tl.weight.grad
                tl.bias -= lr * tl.bias.grad
            ours.gamma = ours.gamma - lr * ours.grad_gamma
            ours.beta = ours.beta - lr * ours.grad_beta
            _close(ours.gamma, tl.weight.detach().numpy(), dtype, f"{what}: gamma after SGD")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_functions_match_torch_functional(dtype):
    """bn.forward_eval / forward_train against torch.nn.functional.batch_norm directly."""
    F = torch.nn.functional
    rng = np.random.default_rng(50)
    x = make_x(rng, (8, 6, 5, 7), 1, dtype)
    gamma, beta = make_params(rng, 6)
    mean, var = rng.standard_normal(6), rng.uniform(0.5, 2.0, 6)
    xt = torch.from_numpy(x)
    g, b = torch.from_numpy(gamma.astype(dtype)), torch.from_numpy(beta.astype(dtype))
    m, v = torch.from_numpy(mean.astype(dtype)), torch.from_numpy(var.astype(dtype))
    ye = F.batch_norm(xt, m, v, g, b, training=False, eps=1e-3).numpy()
    _close(bn.forward_eval(x, mean.astype(dtype), var.astype(dtype), gamma.astype(dtype),
                           beta.astype(dtype), eps=1e-3), ye, dtype, "forward_eval")
    yt = F.batch_norm(xt, None, None, g, b, training=True, eps=1e-5).numpy()
    _close(bn.forward_train(x, gamma.astype(dtype), beta.astype(dtype))[0], yt, dtype,
           "forward_train")
    # channels-last through our axis=-1
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    y_nhwc = bn.forward_train(x_nhwc, gamma.astype(dtype), beta.astype(dtype), axis=-1)[0]
    _close(y_nhwc.transpose(0, 3, 1, 2), yt, dtype, "forward_train NHWC")
