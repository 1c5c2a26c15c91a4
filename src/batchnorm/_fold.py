"""Folding an inference-mode batch norm into the linear or convolution layer before it."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _validation
from ._layer import BatchNorm

__all__ = ["fold"]

# The output-channel axis of each kind's weight, in PyTorch's layouts: Linear (out, in),
# Conv (out, in/groups, *k), ConvTranspose (in, out/groups, *k).
_OUT_AXIS = {"linear": 0, "conv": 0, "conv_transpose": 1}


def fold(weight: Any, bias: Any, layer: BatchNorm, *, kind: str = "linear", groups: int = 1,
         out_axis: Optional[int] = None) -> tuple:
    """Fold ``layer`` (in inference mode) into the layer before it: ``(weight, bias)``.

    With ``s = gamma / sqrt(running_var + eps)`` per output channel, batch norm of
    ``z = W x + b`` is ``(s W) x + (s (b - running_mean) + beta)``: one layer instead of two,
    for inference. Computed in float64 and returned in the weight's dtype; the arguments are
    never modified.

    Parameters
    ----------
    weight : array_like
        The weight of a linear or convolution layer, in PyTorch's layout by default:
        ``(out, in)``, ``(out, in/groups, *kernel)`` or, transposed, ``(in, out/groups,
        *kernel)``.
    bias : array_like of shape (out,), or None (no bias: zeros)
    layer : BatchNorm
        Its running statistics are used (``track_running_stats=True`` is needed); gamma 1
        and beta 0 when it is not affine.
    kind : "linear", "conv" or "conv_transpose"
    groups : int, default 1
        Of a grouped convolution. For ``conv_transpose`` the output channels of group g are
        ``weight[g*in/groups:(g+1)*in/groups, :]``, each group's block of axis 1, so the
        scale is applied per group (a plain scale along axis 1 is wrong for groups > 1).
    out_axis : int, optional
        The output-channel axis where it is not the kind's default, e.g. ``-1`` for a Keras
        ``Dense`` kernel ``(in, out)`` or ``Conv2D`` kernel ``(kh, kw, in, out)``.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> rng = np.random.default_rng(0)
    >>> w, b = rng.normal(size=(3, 5)), rng.normal(size=3)          # y = x @ w.T + b
    >>> layer = bn.BatchNorm(3, dtype=np.float64).eval()
    >>> layer.running_mean, layer.running_var = [1.0, 2.0, 3.0], [4.0, 0.5, 9.0]
    >>> wf, bf = bn.fold(w, b, layer)
    >>> x = rng.normal(size=(8, 5))
    >>> bool(np.allclose(x @ wf.T + bf, layer(x @ w.T + b), rtol=1e-12))
    True
    """
    if not isinstance(layer, BatchNorm):
        raise TypeError(f"layer must be a batchnorm.BatchNorm, got {type(layer).__name__}")
    if not layer.track_running_stats:
        raise ValueError("fold needs running statistics: this layer has "
                         "track_running_stats=False, so it normalizes with each batch's own")
    if layer.activation:
        raise ValueError(f"fold gives the linear layer that replaces batch norm; this layer "
                         f"also applies activation={layer.activation!r}, which no linear layer "
                         f"can: apply it after the folded layer")
    if kind not in _OUT_AXIS:
        raise ValueError(f"kind must be one of {sorted(_OUT_AXIS)}, got {kind!r}")
    w = _validation.as_array(weight, "weight")
    if w.dtype.kind != "f":
        raise TypeError(f"weight must be a floating-point array, got dtype {w.dtype}")
    least = 2 if kind == "linear" else 3
    if w.ndim < least or (kind == "linear" and w.ndim != 2):
        raise ValueError(f"weight of a {kind} layer must have "
                         f"{'2' if kind == 'linear' else '>= 3'} dimensions, got shape {w.shape}")
    g = _validation.integer(groups, "groups", "an integer >= 1", low=1)
    if kind == "linear" and g != 1:
        raise ValueError(f"groups must be 1 for a linear layer, got {g}")
    axis = _OUT_AXIS[kind] if out_axis is None else _validation.channel_axis(out_axis, w.ndim)
    transposed_groups = kind == "conv_transpose" and g > 1
    if transposed_groups and axis != 1:
        raise ValueError("groups > 1 with conv_transpose needs PyTorch's weight layout "
                         "(in, out/groups, *kernel): out_axis 1")
    split = 0 if transposed_groups else axis     # the axis the groups divide
    if w.shape[split] % g:
        raise ValueError(f"weight axis {split} (size {w.shape[split]}) is not divisible by "
                         f"groups={g}")
    c = w.shape[axis] * (g if transposed_groups else 1)
    if c != layer.num_features:
        raise ValueError(f"weight {w.shape} has {c} output channels; the batch norm has "
                         f"num_features={layer.num_features}")
    b = np.zeros(c) if bias is None else _validation.vector(bias, c, "bias")

    gamma = 1.0 if layer.gamma is None else layer.gamma.astype(np.float64)
    beta = 0.0 if layer.beta is None else layer.beta.astype(np.float64)
    mean = layer.running_mean.astype(np.float64)
    s = gamma / np.sqrt(layer.running_var.astype(np.float64) + layer.eps)
    if transposed_groups:
        # (in, out/groups, *k) -> (groups, in/groups, out/groups, *k): group i's outputs are
        # channels i*out/groups ... (i+1)*out/groups - 1
        blocks = w.astype(np.float64).reshape(g, w.shape[0] // g, *w.shape[1:])
        per = s.reshape(g, 1, c // g, *(1,) * (w.ndim - 2))
        folded = (blocks * per).reshape(w.shape)
    else:
        shape = [1] * w.ndim
        shape[axis] = c
        folded = w.astype(np.float64) * s.reshape(shape)
    return folded.astype(w.dtype), ((b - mean) * s + beta).astype(w.dtype)
