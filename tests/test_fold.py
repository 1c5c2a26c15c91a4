"""bn.fold: a batch norm folded into the linear or convolution layer before it.

The oracle is the unfused pair (the layer, then the batch norm in eval mode); PyTorch's own
fusion utilities are checked against where they apply (torch 2.13's fuse_conv_bn_eval raises
for grouped transposed convolutions: it scales axis 1 as if there were one group).
"""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from conftest import require

RNG = np.random.default_rng(7)


def eval_layer(c, *, dtype=np.float64, affine=True, eps=1e-5) -> bn.BatchNorm:
    layer = bn.BatchNorm(c, dtype=dtype, affine=affine, eps=eps).eval()
    layer.running_mean = RNG.normal(0, 2, c)
    layer.running_var = RNG.uniform(0.1, 4, c)
    if affine:
        layer.gamma, layer.beta = RNG.normal(1, 0.5, c), RNG.normal(0, 1, c)
    return layer


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_the_unfused_pair(affine, with_bias):
    w = RNG.normal(size=(6, 4))
    b = RNG.normal(size=6) if with_bias else None
    layer = eval_layer(6, affine=affine)
    x = RNG.normal(size=(10, 4))
    z = x @ w.T + (0 if b is None else b)
    wf, bf = bn.fold(w, b, layer)
    np.testing.assert_allclose(x @ wf.T + bf, layer(z), rtol=1e-12, atol=1e-12)


def test_keras_dense_kernel_layout():
    w = RNG.normal(size=(4, 6))                      # Keras Dense: (in, out)
    b = RNG.normal(size=6)
    layer = eval_layer(6)
    x = RNG.normal(size=(10, 4))
    wf, bf = bn.fold(w, b, layer, out_axis=-1)
    np.testing.assert_allclose(x @ wf + bf, layer(x @ w + b), rtol=1e-12, atol=1e-12)


def test_keras_conv_kernel_layout_equals_the_torch_layout():
    w = RNG.normal(size=(6, 3, 3, 2))                # PyTorch Conv2d: (out, in, kh, kw)
    layer, b = eval_layer(6), RNG.normal(size=6)
    wt, bt = bn.fold(w, b, layer, kind="conv")
    wk, bk = bn.fold(w.transpose(2, 3, 1, 0), b, layer, kind="conv", out_axis=-1)  # (kh, kw, in, out)
    assert np.array_equal(wk, wt.transpose(2, 3, 1, 0)) and np.array_equal(bk, bt)


def test_result_in_the_weight_dtype_and_arguments_unchanged():
    w = RNG.normal(size=(5, 3)).astype(np.float32)
    b = RNG.normal(size=5).astype(np.float32)
    copies = w.copy(), b.copy()
    layer = eval_layer(5, dtype=np.float32)
    wf, bf = bn.fold(w, b, layer)
    assert wf.dtype == bf.dtype == np.float32
    assert np.array_equal(w, copies[0]) and np.array_equal(b, copies[1])
    # computed in float64, rounded once
    s = layer.gamma.astype(np.float64) / np.sqrt(layer.running_var.astype(np.float64) + 1e-5)
    assert np.array_equal(wf, (w.astype(np.float64) * s[:, None]).astype(np.float32))


@pytest.mark.parametrize("call,error,match", [
    (lambda w, l: bn.fold(w, None, bn.BatchNorm(6, track_running_stats=False)), ValueError,
     "track_running_stats=False"),
    (lambda w, l: bn.fold(w, None, bn.BatchNorm(6, activation="relu").eval()), ValueError,
     "activation='relu'"),
    (lambda w, l: bn.fold(w, None, l, kind="dense"), ValueError, "kind must be one of"),
    (lambda w, l: bn.fold(w[:5], None, l), ValueError, "5 output channels.*num_features=6"),
    (lambda w, l: bn.fold(w.astype(int), None, l), TypeError, "floating-point"),
    (lambda w, l: bn.fold(w, np.ones(5), l), ValueError, r"bias must have shape \(C,\) = \(6,\)"),
    (lambda w, l: bn.fold(w, None, l, groups=2), ValueError, "groups must be 1 for a linear"),
    (lambda w, l: bn.fold(w, None, l, out_axis=2), ValueError, "axis 2 is out of range"),
    (lambda w, l: bn.fold(w[..., None], None, l, kind="conv", groups=4), ValueError,
     "not divisible by groups=4"),
    (lambda w, l: bn.fold(w[..., None], None, l, kind="conv_transpose", groups=2, out_axis=0),
     ValueError, "out_axis 1"),
    (lambda w, l: bn.fold(w, None, "bn"), TypeError, "batchnorm.BatchNorm"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(RNG.normal(size=(6, 4)), eval_layer(6))


# --- against PyTorch -------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("affine", [True, False])
def test_conv_matches_torch_fusion_and_the_unfused_pair(groups, affine):
    torch = require("torch", extra="torch")
    conv = torch.nn.Conv2d(6, 6, 3, groups=groups, bias=affine, dtype=torch.float64).eval()
    layer = eval_layer(6, affine=affine)
    tbn = torch.nn.BatchNorm2d(6, affine=affine, dtype=torch.float64).eval()
    sd, _ = bn.convert.to_torch(layer)
    tbn.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    w = conv.weight.detach().numpy()
    b = conv.bias.detach().numpy() if conv.bias is not None else None
    wf, bf = bn.fold(w, b, layer, kind="conv", groups=groups)
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, tbn)
    np.testing.assert_allclose(wf, fused.weight.detach().numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(bf, fused.bias.detach().numpy(), rtol=1e-13, atol=1e-15)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        unfused = tbn(conv(x)).numpy()
        ours = torch.nn.functional.conv2d(x, torch.from_numpy(wf), torch.from_numpy(bf),
                                          groups=groups).numpy()
    np.testing.assert_allclose(ours, unfused, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_conv_transpose_matches_the_unfused_pair(groups, dtype_name):
    torch = require("torch", extra="torch")
    tdtype = getattr(torch, dtype_name)
    conv = torch.nn.ConvTranspose2d(4, 6, 3, groups=groups if groups != 6 else 2,
                                    dtype=tdtype).eval()
    if groups == 6:       # depthwise: in = out = groups
        conv = torch.nn.ConvTranspose2d(6, 6, 3, groups=6, dtype=tdtype).eval()
    g = conv.groups
    layer = eval_layer(6, dtype=np.dtype(dtype_name))
    w, b = conv.weight.detach().numpy(), conv.bias.detach().numpy()
    wf, bf = bn.fold(w, b, layer, kind="conv_transpose", groups=g)
    x = torch.randn(2, conv.in_channels, 5, 5, dtype=tdtype)
    tbn = torch.nn.BatchNorm2d(6, dtype=tdtype).eval()
    sd, _ = bn.convert.to_torch(layer)
    tbn.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    with torch.no_grad():
        unfused = tbn(conv(x)).numpy()
        ours = torch.nn.functional.conv_transpose2d(x, torch.from_numpy(wf),
                                                    torch.from_numpy(bf), groups=g).numpy()
    tol = 1e-5 if dtype_name == "float32" else 1e-11
    np.testing.assert_allclose(ours, unfused, rtol=tol, atol=tol)


def test_linear_matches_torch_fusion():
    torch = require("torch", extra="torch")
    lin = torch.nn.Linear(5, 3, dtype=torch.float64).eval()
    layer = eval_layer(3)
    tbn = torch.nn.BatchNorm1d(3, dtype=torch.float64).eval()
    sd, _ = bn.convert.to_torch(layer)
    tbn.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    fused = torch.nn.utils.fusion.fuse_linear_bn_eval(lin, tbn)
    wf, bf = bn.fold(lin.weight.detach().numpy(), lin.bias.detach().numpy(), layer)
    np.testing.assert_allclose(wf, fused.weight.detach().numpy(), rtol=1e-13)
    np.testing.assert_allclose(bf, fused.bias.detach().numpy(), rtol=1e-13, atol=1e-15)
