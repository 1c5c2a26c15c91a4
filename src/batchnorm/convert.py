"""Exact state conversion between :class:`BatchNorm` and the frameworks' batch norms.

``from_torch`` / ``to_torch``, ``from_keras`` / ``to_keras``, ``from_flax`` / ``to_flax`` and
``from_onnx`` / ``to_onnx`` move the parameters, the running statistics and the settings that
decide what the layer computes, translating the conventions that differ (momentum as the
weight of a new batch or as a decay, biased or unbiased running variance, eps defaults,
channel axis, scale/shift flags; the guide page tabulates them).

A *decay* d is the weight ``1 - d`` of the new batch; it is converted in decimal (0.99 <->
0.01 exactly as typed, not ``1 - 0.99 = 0.010000000000000009``), so round trips are exact.
Values are never rounded: a float64 source gives a float64 layer, anything else float32
(float16 and bfloat16 widen exactly). A state is checked as :meth:`BatchNorm.load_state_dict`
checks it (finite running statistics, variances >= 0, lengths) before a layer is returned.

Where a target cannot express the layer (Keras and Flax keep no cumulative average and always
track running statistics; they and ONNX update the running variance with the *biased* batch
variance), ``to_*`` raises ValueError naming the setting instead of changing what the layer
computes. The frameworks are imported only when their objects are given (or, for ``to_onnx``,
when protos are built). See the guide page :doc:`convert` for examples.
"""

from __future__ import annotations

import decimal
from typing import Any, Mapping, Optional

import numpy as np

from . import _validation
from ._layer import BatchNorm

__all__ = ["from_flax", "from_keras", "from_onnx", "from_torch", "to_flax", "to_keras",
           "to_onnx", "to_torch"]


# --- shared ---------------------------------------------------------------------------------


def decay_to_momentum(decay: Any, name: str = "momentum") -> float:
    """The weight of the new batch, ``1 - decay``, computed in decimal on ``repr(decay)``.

    >>> decay_to_momentum(0.99), 1 - 0.99
    (0.01, 0.010000000000000009)
    """
    d = _validation.fraction(decay, name)
    return float(1 - decimal.Decimal(repr(d)))


def _array(value: Any) -> np.ndarray:
    """A framework's tensor or variable as a NumPy array, its values unchanged."""
    if hasattr(value, "get_value"):       # a flax.nnx Variable
        value = value.get_value()
    if hasattr(value, "detach"):          # a torch.Tensor (bfloat16 has no NumPy view)
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _layer_dtype(vectors: Mapping[str, np.ndarray]) -> type:
    """float64 when any parameter or statistic is float64, else float32 (exact widening)."""
    return np.float64 if any(v.dtype == np.float64 for v in vectors.values()) else np.float32


def _build(source: str, names: Mapping[str, str], vectors: Mapping[str, np.ndarray], *,
           num_features: Optional[int] = None, num_batches_tracked: int = 0,
           training: bool = True, **settings: Any) -> BatchNorm:
    """A BatchNorm with ``settings`` holding ``vectors`` (keyed by the layer's names), all
    checked before the layer is returned. ``names`` maps the layer's names to the source's,
    for error messages."""
    for key, v in vectors.items():
        if v.ndim != 1:
            raise ValueError(f"{source}: {names[key]!r} must have shape (C,), got {v.shape}")
    lengths = {v.shape[0] for v in vectors.values()}
    if len(lengths) > 1:
        shapes = ", ".join(f"{names[k]} {v.shape}" for k, v in vectors.items())
        raise ValueError(f"{source}: the parameters and statistics must all have shape (C,) "
                         f"for one C, got {shapes}")
    if num_features is None:
        if not vectors:
            raise ValueError(f"{source}: no parameters or running statistics to tell the "
                             f"number of channels from")
        num_features = next(iter(vectors.values())).shape[0]
    layer = BatchNorm(num_features, dtype=_layer_dtype(vectors), **settings)
    state = dict(vectors)
    if layer.track_running_stats:
        state["num_batches_tracked"] = num_batches_tracked
    for key in vectors:
        try:
            layer._checked_vector(vectors[key], key)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{source}: {names[key]!r}: {e}") from None
    layer.load_state_dict(state)
    return layer.train(training)


def _vectors(layer: BatchNorm) -> dict:
    """Copies of the layer's parameters and running statistics that exist, by its names."""
    _check_layer(layer)
    return {k: v for k, v in layer.state_dict().items() if k != "num_batches_tracked"}


def _check_layer(layer: Any) -> None:
    if not isinstance(layer, BatchNorm):
        raise TypeError(f"layer must be a batchnorm.BatchNorm, got {type(layer).__name__}")


def _refuse_activation(layer: BatchNorm, target: str) -> None:
    if layer.activation:
        raise ValueError(f"{target}'s batch normalization has no fused activation "
                         f"(activation={layer.activation!r}); set layer.activation = None to "
                         f"convert, and apply the activation after the converted layer")


def _refuse(layer: BatchNorm, target: str, *, cumulative: bool = True, untracked: bool = True,
            unbiased: bool = True, renorm: bool = True) -> None:
    """A ValueError for settings ``target`` cannot express (the checks that are True; no
    target has ghost batches or a fused activation)."""
    _refuse_activation(layer, target)
    if layer.virtual_batch_size:
        raise ValueError(f"{target} has no ghost batches (virtual_batch_size="
                         f"{layer.virtual_batch_size}); inference is the same: set "
                         f"layer.virtual_batch_size = None to convert")
    if renorm and layer.renorm:
        raise ValueError(f"{target} has no batch renormalization (renorm=True)")
    if untracked and not layer.track_running_stats:
        raise ValueError(f"{target} always normalizes with running statistics at inference; "
                         f"this layer has track_running_stats=False")
    if cumulative and layer.momentum is None:
        raise ValueError(f"{target} has no cumulative average (momentum=None); set "
                         f"layer.momentum to the weight of a new batch first")
    if unbiased and layer.track_running_stats and layer.unbiased_running_var:
        raise ValueError(
            f"{target} updates its running variance with the biased batch variance; this "
            f"layer uses the unbiased one (PyTorch's convention). Inference is the same "
            f"either way: set layer.unbiased_running_var = False to accept {target}'s "
            f"convention for further training, then convert")


# --- PyTorch --------------------------------------------------------------------------------

_TORCH = {"gamma": "weight", "beta": "bias", "running_mean": "running_mean",
          "running_var": "running_var"}
_NOT_GIVEN: Any = type("_NotGiven", (), {"__repr__": lambda self: "<from the source>"})()


def from_torch(module_or_state_dict: Any, *, eps: Any = _NOT_GIVEN,
               momentum: Any = _NOT_GIVEN, prefix: str = "") -> BatchNorm:
    """A BatchNorm holding a PyTorch batch norm's state: exact, in the same mode.

    Parameters
    ----------
    module_or_state_dict : torch.nn.BatchNorm1d/2d/3d/SyncBatchNorm, or a state dict
        A module gives everything, its mode (``training``) included. A state dict (tensors or
        NumPy arrays, as ``module.state_dict()`` or a checkpoint holds them) tells ``affine``
        by its ``weight``/``bias`` keys and ``track_running_stats`` by its ``running_*``
        keys, as PyTorch does; a missing ``num_batches_tracked`` (checkpoints from before
        PyTorch 0.4.1) is 0, as PyTorch loads it.
    eps, momentum : optional, state dicts only
        Not stored in a state dict: PyTorch's defaults (1e-5, 0.1) unless given.
        ``momentum=None`` is PyTorch's cumulative average.
    prefix : str
        Prefix of the keys in a model's state dict, e.g. ``"layer1.0.bn1."``.

    Returns
    -------
    BatchNorm with axis 1, unbiased running variance (PyTorch's), float64 when the state is
    float64 and float32 otherwise.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> sd = {"weight": np.array([2.0, 1.0], np.float32), "bias": np.zeros(2, np.float32),
    ...       "running_mean": np.array([0.5, -1.0], np.float32),
    ...       "running_var": np.array([4.0, 1.0], np.float32), "num_batches_tracked": 7}
    >>> layer = bn.convert.from_torch(sd)
    >>> layer.momentum, layer.num_batches_tracked, layer.running_var
    (0.1, 7, array([4., 1.], dtype=float32))
    """
    module = None
    if hasattr(module_or_state_dict, "state_dict") and hasattr(module_or_state_dict,
                                                               "num_features"):
        module = module_or_state_dict
        import torch

        if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"from_torch takes a batch norm module (BatchNorm1d/2d/3d, "
                            f"SyncBatchNorm) or a state dict, got {type(module).__name__}")
        if eps is not _NOT_GIVEN or momentum is not _NOT_GIVEN:
            raise TypeError("eps and momentum come from the module; pass them only with a "
                            "state dict")
        eps, momentum, state = module.eps, module.momentum, module.state_dict()
    elif isinstance(module_or_state_dict, Mapping):
        state = module_or_state_dict
    else:
        raise TypeError(f"from_torch takes a torch batch norm module or a state dict, got "
                        f"{type(module_or_state_dict).__name__}")
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    unknown = set(state) - {*_TORCH.values(), "num_batches_tracked"}
    if unknown:
        raise KeyError(f"from_torch: unexpected keys {sorted(unknown)} (a model's state "
                       f"dict? pass prefix= to pick one batch norm's entries)")
    for pair in (("weight", "bias"), ("running_mean", "running_var")):
        if (pair[0] in state) != (pair[1] in state):
            raise KeyError(f"from_torch: {pair[0]!r} and {pair[1]!r} come together; got "
                           f"only {pair[0] if pair[0] in state else pair[1]!r}")
    track = "running_mean" in state
    if "num_batches_tracked" in state and not track:
        raise KeyError("from_torch: 'num_batches_tracked' without running statistics")
    vectors = {ours: _array(state[theirs]) for ours, theirs in _TORCH.items()
               if theirs in state}
    count = _array(state.get("num_batches_tracked", 0))
    if count.shape != () or count.dtype.kind not in "iu":
        raise TypeError(f"from_torch: 'num_batches_tracked' must be an integer scalar, got "
                        f"dtype {count.dtype} shape {count.shape}")
    return _build(
        "from_torch", _TORCH, vectors,
        num_features=None if vectors or module is None else module.num_features,
        num_batches_tracked=int(count),
        training=True if module is None else bool(module.training),
        axis=1, eps=1e-5 if eps is _NOT_GIVEN else eps,
        momentum=0.1 if momentum is _NOT_GIVEN else momentum,
        affine="weight" in state, track_running_stats=track, unbiased_running_var=True)


def to_torch(layer: BatchNorm) -> tuple:
    """(state_dict, kwargs) for ``torch.nn.BatchNorm{1,2,3}d(C, **kwargs)``.

    ``state_dict`` holds NumPy arrays under the module's keys (``num_batches_tracked`` as a
    0-d int64 array); load it with tensors:
    ``module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``, strictly.
    ``kwargs`` are ``eps``, ``momentum``, ``affine`` and ``track_running_stats``; add
    ``dtype=torch.float64`` for a float64 layer. PyTorch's channel axis is 1.

    Examples
    --------
    >>> import batchnorm as bn
    >>> sd, kwargs = bn.convert.to_torch(bn.BatchNorm(3))
    >>> sorted(sd), kwargs["momentum"]
    (['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight'], 0.1)
    """
    vectors = _vectors(layer)
    _refuse(layer, "PyTorch", cumulative=False, untracked=False, unbiased=False)
    if layer.track_running_stats and not layer.unbiased_running_var:
        raise ValueError(
            "PyTorch updates its running variance with the unbiased batch variance; this "
            "layer uses the biased one. Inference is the same either way: set "
            "layer.unbiased_running_var = True to accept PyTorch's convention, then convert")
    sd = {_TORCH[k]: v for k, v in vectors.items()}
    if layer.track_running_stats:
        sd["num_batches_tracked"] = np.array(layer.num_batches_tracked, np.int64)
    return sd, dict(eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
                    track_running_stats=layer.track_running_stats)


# --- Keras 3 --------------------------------------------------------------------------------

_KERAS = {"gamma": "gamma", "beta": "beta", "running_mean": "moving_mean",
          "running_var": "moving_variance", "running_std": "moving_stddev",
          "renorm_mean": "renorm_mean", "renorm_std": "renorm_stddev"}
_KERAS_DEFAULTS = dict(axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True)


def _affine(vectors: dict, scale: bool, center: bool) -> bool:
    """affine for a source with separate scale and shift flags: a missing one is filled with
    its identity value (gamma 1, beta 0): the same output, now a trainable parameter."""
    if not (scale or center):
        return False
    c = vectors["running_mean"].shape[0]
    dtype = _layer_dtype(vectors)
    vectors.setdefault("gamma", np.ones(c, dtype))
    vectors.setdefault("beta", np.zeros(c, dtype))
    return True


def from_keras(layer_or_weights: Any, config: Optional[Mapping] = None) -> BatchNorm:
    """A BatchNorm holding a Keras 3 ``BatchNormalization``'s state: exact.

    Parameters
    ----------
    layer_or_weights : keras.layers.BatchNormalization (built), or its weights
        Weights in Keras' order, as ``get_weights()`` returns them: gamma (if ``scale``),
        beta (if ``center``), moving_mean, moving_variance, and with ``renorm``
        moving_stddev, renorm_mean, renorm_stddev.
    config : dict, optional
        ``layer.get_config()`` (for weights: Keras' defaults when None). ``renorm``,
        ``renorm_clipping`` and ``renorm_momentum`` (a decay) carry over.

    The layer gets ``momentum = 1 - config["momentum"]``, ``eps = epsilon``, the same axis and
    the biased running variance. With only one of ``center``/``scale`` the other parameter
    is filled with its identity value (beta 0 or gamma 1) and becomes trainable here.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> w = [np.ones(2), np.zeros(2), np.array([0.0, 3.0]), np.array([1.0, 4.0])]
    >>> layer = bn.convert.from_keras(w)
    >>> layer.momentum, layer.eps, layer.axis, layer.unbiased_running_var, layer.dtype.name
    (0.01, 0.001, -1, False, 'float64')
    """
    if hasattr(layer_or_weights, "get_weights") and hasattr(layer_or_weights, "get_config"):
        keras_layer = layer_or_weights
        if "BatchNormalization" not in type(keras_layer).__name__:
            raise TypeError(f"from_keras takes a keras.layers.BatchNormalization or its "
                            f"weights, got {type(keras_layer).__name__}")
        if not keras_layer.built:
            raise ValueError("from_keras: the Keras layer is not built (call it once, or "
                             "layer.build(input_shape)): it has no weights yet")
        weights = keras_layer.get_weights()
        config = keras_layer.get_config() if config is None else config
    elif isinstance(layer_or_weights, (list, tuple)):
        weights = list(layer_or_weights)
    else:
        raise TypeError(f"from_keras takes a keras BatchNormalization layer or a list of "
                        f"its weights, got {type(layer_or_weights).__name__}")
    cfg = {**_KERAS_DEFAULTS, **(config or {})}
    renorm = bool(cfg.get("renorm", False))
    if not isinstance(cfg["axis"], (int, np.integer)):
        raise ValueError(f"from_keras: axis must be one integer, got {cfg['axis']!r}")
    order = [k for k, on in (("gamma", cfg["scale"]), ("beta", cfg["center"])) if on]
    order += ["running_mean", "running_var"]
    order += ["running_std", "renorm_mean", "renorm_std"] if renorm else []
    if len(weights) != len(order):
        raise ValueError(f"from_keras: expected {len(order)} weights "
                         f"({', '.join(_KERAS[k] for k in order)}), got {len(weights)}")
    vectors = {k: _array(w) for k, w in zip(order, weights)}
    affine = _affine(vectors, cfg["scale"], cfg["center"])
    variant = {} if not renorm else dict(
        renorm=True, renorm_clipping=cfg.get("renorm_clipping"),
        renorm_momentum=decay_to_momentum(cfg.get("renorm_momentum", 0.99), "renorm_momentum"))
    return _build("from_keras", _KERAS, vectors, axis=int(cfg["axis"]),
                  eps=cfg["epsilon"], momentum=decay_to_momentum(cfg["momentum"]),
                  affine=affine, track_running_stats=True, unbiased_running_var=False,
                  **variant)


def to_keras(layer: BatchNorm) -> tuple:
    """(weights, config) for ``keras.layers.BatchNormalization.from_config(config)``.

    ``weights`` are in Keras' order (gamma, beta, moving_mean, moving_variance, and with
    renorm moving_stddev, renorm_mean, renorm_stddev; no gamma and beta when the layer is not
    affine), for ``set_weights`` once the Keras layer is built. ``config`` has axis,
    momentum (Keras' decay), epsilon, center, scale, dtype and the renorm settings.

    Examples
    --------
    >>> import batchnorm as bn
    >>> weights, config = bn.convert.to_keras(
    ...     bn.BatchNorm(3, axis=-1, momentum=0.01, eps=1e-3, unbiased_running_var=False))
    >>> len(weights), config["momentum"], config["axis"]
    (4, 0.99, -1)
    """
    vectors = _vectors(layer)
    _refuse(layer, "Keras", renorm=False)
    weights = [vectors[k] for k in _KERAS if k in vectors]    # (in Keras' order)
    config = dict(axis=layer.axis, momentum=decay_to_momentum(layer.momentum),
                  epsilon=layer.eps, center=layer.affine, scale=layer.affine,
                  dtype=layer.dtype.name)
    if layer.renorm:
        config.update(renorm=True, renorm_clipping=dict(layer.renorm_clipping),
                      renorm_momentum=decay_to_momentum(layer.renorm_momentum,
                                                        "renorm_momentum"))
    return weights, config


# --- Flax -----------------------------------------------------------------------------------

_FLAX = {"gamma": "params/scale", "beta": "params/bias", "running_mean": "batch_stats/mean",
         "running_var": "batch_stats/var"}
_FLAX_DEFAULTS = dict(axis=-1, momentum=0.99, epsilon=1e-5, use_scale=True, use_bias=True)
# Fields of flax.linen.BatchNorm that do not change what a converted layer computes.
_FLAX_IGNORED = {"dtype", "param_dtype", "axis_name", "axis_index_groups",
                 "use_fast_variance", "bias_init", "scale_init", "use_running_average"}


def from_flax(variables: Any, **module_fields: Any) -> BatchNorm:
    """A BatchNorm holding a Flax batch norm's state (linen or NNX): exact.

    Parameters
    ----------
    variables : linen variables, an NNX state, or an ``nnx.BatchNorm``
        ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}`` as
        ``module.init``/``apply`` give them for one ``flax.linen.BatchNorm``;
        ``nnx.state(module)`` (keys scale, bias, mean, var); or the ``nnx.BatchNorm`` itself,
        whose fields are then read from it.
    **module_fields
        linen's field names: ``axis`` (-1), ``momentum`` (0.99, a decay), ``epsilon``
        (1e-5), ``use_scale``, ``use_bias`` (True), and ``use_running_average`` (True gives
        an eval-mode layer). Flax's defaults where not given. Other fields of
        ``flax.linen.BatchNorm`` (dtype, axis_name, ...) do not change the result and are
        accepted.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> variables = {"params": {"scale": np.ones(2, np.float32), "bias": np.zeros(2, np.float32)},
    ...              "batch_stats": {"mean": np.zeros(2, np.float32), "var": np.ones(2, np.float32)}}
    >>> layer = bn.convert.from_flax(variables, momentum=0.9)
    >>> layer.momentum, layer.axis, layer.eps
    (0.1, -1, 1e-05)
    """
    fields = dict(module_fields)
    unknown = set(fields) - set(_FLAX_DEFAULTS) - _FLAX_IGNORED
    if unknown:
        raise TypeError(f"from_flax: unknown module fields {sorted(unknown)}; expected "
                        f"{sorted(_FLAX_DEFAULTS)} (linen's names)")
    if hasattr(variables, "mean") and hasattr(variables, "momentum"):   # an nnx.BatchNorm
        module = variables
        taken = dict(axis=module.axis, momentum=module.momentum, epsilon=module.epsilon,
                     use_scale=module.scale is not None, use_bias=module.bias is not None,
                     use_running_average=bool(module.use_running_average))
        variables = {"scale": module.scale, "bias": module.bias, "mean": module.mean,
                     "var": module.var}
        fields = {**taken, **fields}
    if not isinstance(variables, Mapping):
        raise TypeError(f"from_flax takes linen variables, an NNX state or an nnx.BatchNorm, "
                        f"got {type(variables).__name__}")
    if "batch_stats" in variables:      # linen: {"params": ..., "batch_stats": ...}
        flat = {**variables.get("params", {}), **variables["batch_stats"]}
    else:
        flat = dict(variables)
    flat = {k: v for k, v in flat.items() if v is not None}
    cfg = {**_FLAX_DEFAULTS, **fields}
    for key, flag in (("scale", "use_scale"), ("bias", "use_bias")):
        if (key in flat) != bool(cfg[flag]):
            raise ValueError(f"from_flax: {flag}={cfg[flag]} but the variables "
                             f"{'have' if key in flat else 'have no'} {key!r}")
    missing = {"mean", "var"} - set(flat)
    if missing:
        raise KeyError(f"from_flax: the variables have no batch statistics {sorted(missing)}")
    extra = set(flat) - {"scale", "bias", "mean", "var"}
    if extra:
        raise KeyError(f"from_flax: unexpected variables {sorted(extra)} (one BatchNorm's "
                       f"variables expected)")
    names = {ours: theirs.split("/")[1] for ours, theirs in _FLAX.items()}
    vectors = {ours: _array(flat[theirs]) for ours, theirs in names.items() if theirs in flat}
    affine = _affine(vectors, cfg["use_scale"], cfg["use_bias"])
    if not isinstance(cfg["axis"], (int, np.integer)):
        raise ValueError(f"from_flax: axis must be one integer, got {cfg['axis']!r}")
    return _build("from_flax", _FLAX, vectors,
                  training=not fields.get("use_running_average", False),
                  axis=int(cfg["axis"]), eps=cfg["epsilon"],
                  momentum=decay_to_momentum(cfg["momentum"]), affine=affine,
                  track_running_stats=True, unbiased_running_var=False)


def to_flax(layer: BatchNorm) -> tuple:
    """(variables, module_fields) for ``flax.linen.BatchNorm(**module_fields)``.

    ``variables`` is ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}`` (no
    params when the layer is not affine), NumPy arrays: pass it to ``module.apply``. For
    ``flax.nnx.BatchNorm(C, **module_fields, rngs=...)`` load it with
    ``nnx.update(module, {**variables["params"], **variables["batch_stats"]})``.

    Examples
    --------
    >>> import batchnorm as bn
    >>> variables, fields = bn.convert.to_flax(
    ...     bn.BatchNorm(3, axis=-1, momentum=0.1, unbiased_running_var=False))
    >>> sorted(variables["params"]), fields["momentum"], fields["use_scale"]
    (['bias', 'scale'], 0.9, True)
    """
    vectors = _vectors(layer)
    _refuse(layer, "Flax")
    variables = {"batch_stats": {"mean": vectors["running_mean"], "var": vectors["running_var"]}}
    if layer.affine:
        variables["params"] = {"scale": vectors["gamma"], "bias": vectors["beta"]}
    fields = dict(axis=layer.axis, momentum=decay_to_momentum(layer.momentum),
                  epsilon=layer.eps, use_scale=layer.affine, use_bias=layer.affine)
    return variables, fields


# --- ONNX -----------------------------------------------------------------------------------

_ONNX_INPUTS = ("gamma", "beta", "running_mean", "running_var")
_ONNX_ATTRIBUTES = {"epsilon", "momentum", "training_mode", "spatial"}
_ONNX_FIRST_OPSET = 9   # BatchNormalization-9: statistics per channel (no `spatial`)


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX conversion needs onnx: pip install onnx") from None
    return onnx


def _onnx_opset(opset: Any) -> int:
    newest = _onnx().defs.onnx_opset_version()
    return _validation.integer(opset, "opset", f"an ONNX opset in [{_ONNX_FIRST_OPSET}, "
                               f"{newest}]", _ONNX_FIRST_OPSET, newest + 1)


def from_onnx(node: Any, initializers: Any, *, opset: Optional[int] = None) -> BatchNorm:
    """A BatchNorm from an ONNX ``BatchNormalization`` node and its initializers: exact.

    Parameters
    ----------
    node : onnx.NodeProto
        Inputs X, scale, B, input_mean, input_var; attributes epsilon (1e-5), momentum (0.9,
        a decay) and, from opset 14, training_mode (a training-mode node gives a layer in
        training mode).
    initializers : ``graph.initializer``, a list of TensorProto, or a dict name -> array
        Must hold the node's scale, B, input_mean and input_var.
    opset : int, optional
        The model's opset, checked when given (the node itself does not say it).

    The layer has axis 1 (ONNX's channel axis), is affine (ONNX always scales and shifts)
    and keeps the biased running variance, as ONNX's training mode does.
    """
    onnx = _onnx()
    if not isinstance(node, onnx.NodeProto) or node.op_type != "BatchNormalization":
        what = getattr(node, "op_type", type(node).__name__)
        raise TypeError(f"from_onnx takes a BatchNormalization NodeProto, got {what}")
    if opset is not None:
        _onnx_opset(opset)
    # float attributes are float32: read back as the shortest decimal that gives them
    # (1e-05, not 9.99999974e-06), so that values written by to_onnx round-trip exactly
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: float(str(np.float32(v))) if isinstance(v, float) else v
             for k, v in attrs.items()}
    unknown = set(attrs) - _ONNX_ATTRIBUTES
    if unknown:
        raise ValueError(f"from_onnx: attributes {sorted(unknown)} belong to opsets before "
                         f"{_ONNX_FIRST_OPSET}, which are not supported")
    if attrs.get("spatial", 1) != 1:
        raise ValueError("from_onnx: spatial=0 (statistics per element, opset 7) is not "
                         "supported")
    if len(node.input) != 5:
        raise ValueError(f"from_onnx: BatchNormalization has 5 inputs, got {len(node.input)}")
    if isinstance(initializers, Mapping):
        arrays = {k: np.asarray(v) for k, v in initializers.items()}
    else:
        arrays = {t.name: onnx.numpy_helper.to_array(t) for t in initializers}
    names = dict(zip(_ONNX_INPUTS, node.input[1:]))
    missing = [n for n in names.values() if n not in arrays]
    if missing:
        raise KeyError(f"from_onnx: no initializer for input(s) {missing} of the node")
    vectors = {ours: arrays[theirs] for ours, theirs in names.items()}
    outputs = [o for o in node.output if o]
    training = attrs.get("training_mode", 0) == 1 or (
        "training_mode" not in attrs and len(outputs) > 1)   # opset 9: training outputs
    return _build("from_onnx", names, vectors, training=training, axis=1,
                  eps=attrs.get("epsilon", 1e-5),
                  momentum=decay_to_momentum(attrs.get("momentum", 0.9)), affine=True,
                  track_running_stats=True, unbiased_running_var=False)


def to_onnx(layer: BatchNorm, input: str, output: str, *, opset: int = 15,
            training_mode: bool = False, name: Optional[str] = None) -> tuple:
    """(node, initializers): an ONNX ``BatchNormalization`` node computing ``layer``.

    Parameters
    ----------
    layer : BatchNorm
        axis 1 (or -1 for (N, C) inputs, the same axis there); a layer that is not affine
        gets scale 1 and B 0, which ONNX requires.
    input, output : str
        Names of the node's X and Y.
    opset : int, default 15
        The model's opset, 9 or later (before 9 the statistics could be per element). At
        opsets before 15 X must have the layer's dtype.
    training_mode : bool, default False
        Normalize with the batch's statistics (opset 14 or later); a layer with
        ``track_running_stats=False`` always needs it.
    name : str, optional
        Prefix of the initializers' names (``{name}.scale``, ...); ``output`` by default.

    Returns
    -------
    (onnx.NodeProto, list of onnx.TensorProto): add them to ``graph.node`` and
    ``graph.initializer``.
    """
    onnx = _onnx()
    vectors = _vectors(layer)
    opset = _onnx_opset(opset)
    training = _validation.flag(training_mode, "training_mode") or not layer.track_running_stats
    if training and opset < 14:
        raise ValueError(f"normalizing with batch statistics in ONNX needs training_mode, "
                         f"opset 14 or later; got opset {opset}"
                         + ("" if training_mode else " (track_running_stats=False)"))
    _refuse_activation(layer, "ONNX")
    if training:
        _refuse(layer, "ONNX", untracked=False)
    if layer.axis not in (1, -1):
        raise ValueError(f"ONNX's BatchNormalization takes the channels at axis 1; this layer "
                         f"has axis={layer.axis}")
    c, dt = layer.num_features, layer.dtype
    vectors.setdefault("gamma", np.ones(c, dt))
    vectors.setdefault("beta", np.zeros(c, dt))
    vectors.setdefault("running_mean", np.zeros(c, dt))   # unused in training mode
    vectors.setdefault("running_var", np.ones(c, dt))
    prefix = output if name is None else name
    suffixes = {"gamma": "scale", "beta": "bias", "running_mean": "running_mean",
                "running_var": "running_var"}
    tensors = [onnx.numpy_helper.from_array(vectors[k], f"{prefix}.{suffixes[k]}")
               for k in _ONNX_INPUTS]
    attrs = {"epsilon": layer.eps}
    if layer.momentum is not None:
        attrs["momentum"] = decay_to_momentum(layer.momentum)
    if opset >= 14 and training:
        attrs["training_mode"] = 1
    node = onnx.helper.make_node("BatchNormalization", [input] + [t.name for t in tensors],
                                 [output], name=prefix, **attrs)
    return node, tensors
