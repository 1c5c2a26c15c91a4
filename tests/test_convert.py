"""batchnorm.convert: state conversion to and from PyTorch, Keras 3, Flax and ONNX.

Against the real libraries: framework -> ours -> framework matches the framework's own
inference and one more training step (outputs and running statistics); ours -> framework ->
ours is bit-exact. The framework tests skip without the framework, and fail in CI (see
conftest.require). The conventions themselves (decay vs weight, biased vs unbiased) are
tested without any framework, on plain arrays.
"""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.convert import decay_to_momentum
from conftest import require

RNG = np.random.default_rng(20261201)


def random_layer(c=5, *, dtype=np.float32, **kwargs) -> bn.BatchNorm:
    """A layer with random parameters and running statistics."""
    layer = bn.BatchNorm(c, dtype=dtype, **kwargs)
    state = {}
    if layer.affine:
        state["gamma"], state["beta"] = RNG.normal(1, 0.3, c), RNG.normal(0, 0.5, c)
    if layer.track_running_stats:
        state["running_mean"], state["running_var"] = RNG.normal(0, 1, c), RNG.uniform(0.2, 3, c)
        state["num_batches_tracked"] = int(RNG.integers(0, 1000))
    layer.load_state_dict(state)
    return layer


def assert_same_layer(a: bn.BatchNorm, b: bn.BatchNorm) -> None:
    """Same settings and bit-identical state."""
    for attr in ("num_features", "axis", "eps", "momentum", "affine", "track_running_stats",
                 "unbiased_running_var", "dtype", "training"):
        assert getattr(a, attr) == getattr(b, attr), attr
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert np.array_equal(sa[k], sb[k]) and np.asarray(sa[k]).dtype == np.asarray(sb[k]).dtype, k


def close(got, want, dtype=np.float32):
    tol = 2e-5 if np.dtype(dtype) != np.float64 else 1e-12
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               rtol=tol, atol=tol)


# --- conventions, no framework ---------------------------------------------------------------


@pytest.mark.parametrize("decay,weight", [(0.99, 0.01), (0.9, 0.1), (0.999, 0.001), (0.0, 1.0),
                                          (1.0, 0.0), (0.5, 0.5), (0.997, 0.003)])
def test_decay_converts_in_decimal_both_ways(decay, weight):
    assert decay_to_momentum(decay) == weight
    assert decay_to_momentum(weight) == decay


@pytest.mark.parametrize("bad,error", [(1.5, ValueError), (-0.1, ValueError), (None, TypeError),
                                       (True, TypeError)])
def test_decay_out_of_range(bad, error):
    with pytest.raises(error, match="momentum"):
        decay_to_momentum(bad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("to,back,kwargs", [
    (bn.convert.to_torch, bn.convert.from_torch, {}),
    (bn.convert.to_keras, bn.convert.from_keras, {"axis": -1, "unbiased_running_var": False,
                                                  "momentum": 0.01, "eps": 1e-3}),
    (bn.convert.to_flax, bn.convert.from_flax, {"axis": -1, "unbiased_running_var": False}),
])
def test_round_trip_through_plain_arrays_is_exact(dtype, to, back, kwargs):
    layer = random_layer(dtype=dtype, **kwargs)
    state, settings = to(layer)
    if back is bn.convert.from_torch:
        again = back(state, **{k: settings[k] for k in ("eps", "momentum")})
    elif back is bn.convert.from_keras:
        again = back(state, settings)
        layer.num_batches_tracked = 0    # Keras keeps no count
    else:
        again = back(state, **settings)
        layer.num_batches_tracked = 0    # nor does Flax
    assert_same_layer(layer, again)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_torch_state_dict_keys_tell_affine_and_tracking(affine, track):
    layer = random_layer(affine=affine, track_running_stats=track)
    sd, kwargs = bn.convert.to_torch(layer)
    assert kwargs == {"eps": 1e-5, "momentum": 0.1, "affine": affine,
                      "track_running_stats": track}
    expected = ({"weight", "bias"} if affine else set()) | (
        {"running_mean", "running_var", "num_batches_tracked"} if track else set())
    assert set(sd) == expected
    if track:
        assert sd["num_batches_tracked"].dtype == np.int64 and sd["num_batches_tracked"].shape == ()
    if sd:
        assert_same_layer(layer, bn.convert.from_torch(sd))


def test_torch_state_dict_defaults_prefix_and_old_checkpoints():
    layer = random_layer(momentum=None, eps=1e-3)
    sd, _ = bn.convert.to_torch(layer)
    model = {f"features.3.{k}": v for k, v in sd.items()} | {"features.0.weight": np.ones((2, 2))}
    got = bn.convert.from_torch(model, prefix="features.3.", eps=1e-3, momentum=None)
    assert_same_layer(layer, got)
    plain = bn.convert.from_torch(sd)                     # PyTorch's defaults
    assert (plain.eps, plain.momentum) == (1e-5, 0.1)
    del sd["num_batches_tracked"]                         # before PyTorch 0.4.1
    assert bn.convert.from_torch(sd).num_batches_tracked == 0


@pytest.mark.parametrize("mutate,error,match", [
    (lambda sd: sd.__setitem__("running_var", np.array([1, np.nan, 1, 1, 1], np.float32)),
     ValueError, "running_var.*finite"),
    (lambda sd: sd.__setitem__("running_var", -sd["running_var"]), ValueError,
     "running_var.*non-negative"),
    (lambda sd: sd.__setitem__("weight", np.ones(4, np.float32)), ValueError, r"one C, got weight \(4,\), bias \(5,\)"),
    (lambda sd: sd.__setitem__("weight", np.ones((5, 1), np.float32)), ValueError, "weight.*shape"),
    (lambda sd: sd.pop("bias"), KeyError, "come together"),
    (lambda sd: sd.__setitem__("conv.weight", np.ones(3)), KeyError, "prefix"),
    (lambda sd: sd.__setitem__("num_batches_tracked", np.ones(2)), TypeError, "num_batches"),
])
def test_torch_state_dict_refused_like_load_state_dict(mutate, error, match):
    sd, _ = bn.convert.to_torch(random_layer())
    mutate(sd)
    with pytest.raises(error, match=match):
        bn.convert.from_torch(sd)


@pytest.mark.parametrize("to", [bn.convert.to_keras, bn.convert.to_flax])
def test_keras_and_flax_refuse_what_they_cannot_express(to):
    with pytest.raises(ValueError, match="unbiased_running_var = False"):
        to(random_layer(axis=-1))
    with pytest.raises(ValueError, match="cumulative"):
        to(random_layer(axis=-1, momentum=None, unbiased_running_var=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        to(random_layer(axis=-1, track_running_stats=False, unbiased_running_var=False))
    with pytest.raises(TypeError, match="batchnorm.BatchNorm"):
        to({"gamma": np.ones(3)})


def test_torch_refuses_a_biased_running_variance():
    with pytest.raises(ValueError, match="unbiased_running_var = True"):
        bn.convert.to_torch(random_layer(unbiased_running_var=False))


def test_keras_weights_follow_center_and_scale():
    mean, var = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    beta_only = bn.convert.from_keras([np.array([0.5, -0.5]), mean, var], {"scale": False})
    assert beta_only.affine and np.array_equal(beta_only.gamma, [1, 1])
    assert np.array_equal(beta_only.beta, [0.5, -0.5])
    neither = bn.convert.from_keras([mean, var], {"scale": False, "center": False})
    assert not neither.affine
    weights, config = bn.convert.to_keras(neither)
    assert len(weights) == 2 and not config["center"] and not config["scale"]
    with pytest.raises(ValueError, match="expected 4 weights.*got 2"):
        bn.convert.from_keras([mean, var])
    with pytest.raises(ValueError, match="renorm"):
        bn.convert.from_keras([mean, var], {"renorm": True, "scale": False, "center": False})


def test_flax_fields_checked():
    variables = {"params": {"scale": np.ones(2)}, "batch_stats": {"mean": np.zeros(2),
                                                                 "var": np.ones(2)}}
    with pytest.raises(ValueError, match="use_bias=True but the variables have no 'bias'"):
        bn.convert.from_flax(variables)
    layer = bn.convert.from_flax(variables, use_bias=False)
    assert layer.affine and np.array_equal(layer.beta, [0, 0])
    with pytest.raises(TypeError, match="unknown module fields.*eps"):
        bn.convert.from_flax(variables, use_bias=False, eps=1e-3)
    with pytest.raises(KeyError, match="batch statistics"):
        bn.convert.from_flax({"params": {}, "batch_stats": {"mean": np.zeros(2)}},
                             use_scale=False, use_bias=False)
    assert not bn.convert.from_flax(variables, use_bias=False,
                                    use_running_average=True).training


# --- PyTorch ---------------------------------------------------------------------------------


def torch_module(torch, shape, dtype, **kwargs):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}[len(shape)]
    m = cls(shape[1], dtype=dtype, **kwargs)
    with torch.no_grad():
        if m.affine:
            m.weight.normal_(1, 0.3)
            m.bias.normal_(0, 0.5)
    for _ in range(3):    # running statistics away from their initial values
        m(torch.randn(*shape, dtype=dtype) * 2 + 1)
    return m


TORCH_CASES = [
    ((16, 6), {}),
    ((8, 4, 7), {"momentum": None}),
    ((4, 3, 5, 5), {"eps": 1e-3, "momentum": 0.3}),
    ((2, 3, 3, 4, 4), {"affine": False}),
    ((4, 3, 5, 5), {"track_running_stats": False}),
]


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("shape,kwargs", TORCH_CASES)
def test_from_torch_matches_torch_inference_and_a_training_step(dtype_name, shape, kwargs):
    torch = require("torch", extra="torch")
    tdtype = getattr(torch, dtype_name)
    module = torch_module(torch, shape, tdtype, **kwargs)
    x = (RNG.normal(size=shape) * 2 + 1).astype(dtype_name)

    layer = bn.convert.from_torch(module.eval())
    assert layer.dtype == np.dtype(dtype_name) and not layer.training
    with torch.no_grad():
        close(layer(x), module(torch.from_numpy(x)).numpy(), dtype_name)

    layer.train(), module.train()
    with torch.no_grad():
        close(layer(x), module(torch.from_numpy(x)).numpy(), dtype_name)
    back = bn.convert.from_torch(module)
    for k in ("running_mean", "running_var"):
        if back.track_running_stats:
            close(getattr(layer, k), getattr(back, k), dtype_name)
    assert layer.num_batches_tracked == back.num_batches_tracked


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_ours_to_torch_and_back_is_exact(dtype_name, affine, track):
    torch = require("torch", extra="torch")
    layer = random_layer(6, dtype=np.dtype(dtype_name), affine=affine, track_running_stats=track,
                         momentum=0.25, eps=1e-4)
    sd, kwargs = bn.convert.to_torch(layer)
    module = torch.nn.BatchNorm2d(6, **kwargs, dtype=getattr(torch, dtype_name))
    module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    if not (affine or track):     # no tensors, so no dtype to keep: float32
        layer = random_layer(6, affine=False, track_running_stats=False, momentum=0.25, eps=1e-4)
        with pytest.raises(ValueError, match="number of channels"):
            bn.convert.from_torch(module.state_dict())
    else:
        assert_same_layer(layer, bn.convert.from_torch(module.state_dict(), eps=1e-4,
                                                       momentum=0.25))
    assert_same_layer(layer, bn.convert.from_torch(module))


def test_from_torch_half_precision_module_widens_exactly():
    torch = require("torch", extra="torch")
    for tdtype in (torch.float16, torch.bfloat16):
        module = torch.nn.BatchNorm1d(4).to(tdtype)
        with torch.no_grad():
            module.running_var.copy_(torch.tensor([0.1, 0.2, 3.0, 7.5]))
        layer = bn.convert.from_torch(module)
        assert layer.dtype == np.float32
        assert np.array_equal(layer.running_var, module.running_var.float().numpy())


def test_from_torch_refuses_other_modules_and_overrides():
    torch = require("torch", extra="torch")
    with pytest.raises(TypeError, match="batch norm module"):
        bn.convert.from_torch(torch.nn.InstanceNorm2d(3, track_running_stats=True))
    with pytest.raises(TypeError, match="only with a state dict"):
        bn.convert.from_torch(torch.nn.BatchNorm2d(3), eps=1e-3)


# --- Keras 3 ---------------------------------------------------------------------------------


def keras_layer(keras, shape, **config):
    layer = keras.layers.BatchNormalization(**config)
    layer.build(shape)
    weights = layer.get_weights()
    c = weights[0].shape[0]
    new = [w + RNG.normal(0, 0.3, c).astype(w.dtype) if i < len(weights) - 1
           else RNG.uniform(0.3, 3, c).astype(w.dtype) for i, w in enumerate(weights)]
    layer.set_weights(new)
    return layer


KERAS_CASES = [
    ((16, 6), {}),
    ((4, 5, 5, 3), {"momentum": 0.9, "epsilon": 1e-5}),
    ((4, 3, 5, 5), {"axis": 1}),
    ((8, 7, 4), {"scale": False}),
    ((8, 7, 4), {"center": False, "scale": False}),
    ((6, 4), {"dtype": "float64"}),
]


@pytest.mark.parametrize("shape,config", KERAS_CASES)
def test_from_keras_matches_keras_inference_and_a_training_step(shape, config):
    keras = require("keras", extra="test-frameworks")
    kl = keras_layer(keras, shape, **config)
    dtype = kl.get_weights()[-1].dtype
    x = (RNG.normal(size=shape) * 2 + 1).astype(dtype)
    layer = bn.convert.from_keras(kl)
    assert layer.dtype == dtype and layer.unbiased_running_var is False
    # (Keras' NumPy backend computes float64 layers to about float32 accuracy)
    close(layer.eval()(x), kl(x, training=False))
    close(layer.train()(x), kl(x, training=True))
    back = bn.convert.from_keras(kl)
    close(layer.running_mean, back.running_mean)
    close(layer.running_var, back.running_var)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_ours_to_keras_and_back_is_exact(dtype, affine):
    keras = require("keras", extra="test-frameworks")
    layer = random_layer(4, dtype=dtype, axis=-1, affine=affine, momentum=0.03, eps=2e-3,
                         unbiased_running_var=False)
    layer.num_batches_tracked = 0
    weights, config = bn.convert.to_keras(layer)
    kl = keras.layers.BatchNormalization.from_config(config)
    kl.build((3, 4))
    kl.set_weights(weights)
    assert_same_layer(layer, bn.convert.from_keras(kl))
    x = RNG.normal(size=(7, 4)).astype(dtype)
    close(layer.eval()(x), kl(x, training=False))


def test_from_keras_refuses_unbuilt_layers_and_other_layers():
    keras = require("keras", extra="test-frameworks")
    with pytest.raises(ValueError, match="not built"):
        bn.convert.from_keras(keras.layers.BatchNormalization())
    with pytest.raises(TypeError, match="BatchNormalization"):
        bn.convert.from_keras(keras.layers.LayerNormalization())


# --- Flax ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,fields", [((16, 6), {}),
                                           ((4, 5, 5, 3), {"momentum": 0.9, "epsilon": 1e-3}),
                                           ((4, 3, 5, 5), {"axis": 1}),
                                           ((8, 4), {"use_scale": False, "use_bias": False})])
def test_from_flax_linen_matches_flax_inference_and_a_training_step(shape, fields):
    jax = require("jax", extra="test-frameworks")
    linen = require("flax.linen", extra="test-frameworks")
    module = linen.BatchNorm(**fields)
    x = (RNG.normal(size=shape) * 2 + 1).astype(np.float32)
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    for _ in range(2):   # statistics away from their initial values
        _, upd = module.apply(variables, x * 1.5 - 0.5, use_running_average=False,
                              mutable=["batch_stats"])
        variables = {**variables, **upd}
    layer = bn.convert.from_flax(variables, **fields)
    close(layer.eval()(x), module.apply(variables, x, use_running_average=True))
    y, upd = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    close(layer.train()(x), y)
    close(layer.running_mean, upd["batch_stats"]["mean"])
    close(layer.running_var, upd["batch_stats"]["var"])


def test_flax_nnx_module_state_and_round_trip():
    require("jax", extra="test-frameworks")
    nnx = require("flax.nnx", extra="test-frameworks")
    layer = random_layer(3, axis=-1, momentum=0.05, unbiased_running_var=False)
    layer.num_batches_tracked = 0
    variables, fields = bn.convert.to_flax(layer)
    module = nnx.BatchNorm(3, **fields, rngs=nnx.Rngs(0))
    nnx.update(module, {**variables["params"], **variables["batch_stats"]})
    module.eval()
    x = RNG.normal(size=(10, 3)).astype(np.float32)
    close(layer.eval()(x), np.asarray(module(x)))
    from_module = bn.convert.from_flax(module)
    assert not from_module.training
    assert_same_layer(layer, from_module)
    assert_same_layer(layer, bn.convert.from_flax(nnx.state(module), **fields)
                      .train(False))
    module.train()                               # one training step in both
    close(layer.train()(x), np.asarray(module(x)))
    close(layer.running_mean, np.asarray(module.mean[...]))
    close(layer.running_var, np.asarray(module.var[...]))


# --- ONNX ------------------------------------------------------------------------------------


def onnx_model(onnx, node, tensors, shape, dtype, opset, n_outputs=1):
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = onnx.helper.make_graph(
        [node], "bn", [onnx.helper.make_tensor_value_info(node.input[0], elem, list(shape))],
        [onnx.helper.make_tensor_value_info(o, elem, list(shape)) for o in node.output[:n_outputs]],
        tensors)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("opset", [9, 14, 15])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(8, 5), (4, 5, 3, 3)])
def test_to_onnx_matches_onnxruntime_and_round_trips(opset, dtype, shape):
    onnx = require("onnx")
    ort = require("onnxruntime")
    layer = random_layer(5, dtype=dtype, unbiased_running_var=False, momentum=0.2,
                         eps=1e-3).eval()
    node, tensors = bn.convert.to_onnx(layer, "x", "y", opset=opset)
    model = onnx_model(onnx, node, tensors, shape, dtype, opset)
    x = RNG.normal(size=shape).astype(dtype)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    # ONNX stores epsilon as float32: for float64 the results agree to that rounding of eps
    np.testing.assert_allclose(layer(x), session.run(None, {"x": x})[0], rtol=2e-5 if
                               dtype == np.float32 else 1e-9, atol=2e-5)
    again = bn.convert.from_onnx(node, model.graph.initializer, opset=opset)
    layer.num_batches_tracked = 0
    assert_same_layer(layer, again)
    assert_same_layer(layer, bn.convert.from_onnx(node, {t.name: onnx.numpy_helper.to_array(t)
                                                         for t in tensors}))


def test_to_onnx_training_mode_matches_the_reference_evaluator():
    onnx = require("onnx")
    from onnx.reference import ReferenceEvaluator

    layer = random_layer(4, track_running_stats=False)       # always batch statistics
    node, tensors = bn.convert.to_onnx(layer, "x", "y", opset=15)
    model = onnx_model(onnx, node, tensors, (6, 4, 3), np.float32, 15)
    x = (RNG.normal(size=(6, 4, 3)) * 3 + 2).astype(np.float32)
    close(layer(x), ReferenceEvaluator(model).run(None, {"x": x})[0])
    assert bn.convert.from_onnx(node, tensors).training
    with pytest.raises(ValueError, match="opset 14 or later"):
        bn.convert.to_onnx(layer, "x", "y", opset=13)


def test_onnx_errors():
    onnx = require("onnx")
    layer = random_layer(3, unbiased_running_var=False)
    with pytest.raises(ValueError, match="opset"):
        bn.convert.to_onnx(layer, "x", "y", opset=7)
    with pytest.raises(ValueError, match="axis 1"):
        bn.convert.to_onnx(random_layer(3, axis=2), "x", "y")
    with pytest.raises(ValueError, match="unbiased"):
        bn.convert.to_onnx(random_layer(3), "x", "y", training_mode=True)
    node, tensors = bn.convert.to_onnx(layer, "x", "y")
    with pytest.raises(KeyError, match="no initializer"):
        bn.convert.from_onnx(node, tensors[:3])
    old = onnx.helper.make_node("BatchNormalization", list(node.input), ["y"], spatial=0)
    with pytest.raises(ValueError, match="spatial=0"):
        bn.convert.from_onnx(old, tensors)
    bad = {t.name: onnx.numpy_helper.to_array(t) for t in tensors}
    bad[node.input[4]] = np.array([1.0, -1.0, 1.0], np.float32)
    with pytest.raises(ValueError, match="input_var|running_var.*non-negative"):
        bn.convert.from_onnx(node, bad)
    with pytest.raises(TypeError, match="BatchNormalization"):
        bn.convert.from_onnx(onnx.helper.make_node("Relu", ["x"], ["y"]), tensors)


@pytest.mark.parametrize("opset", [14, 15])
def test_from_onnx_training_node_matches_a_training_step(opset):
    onnx = require("onnx")
    from onnx.reference import ReferenceEvaluator

    c, shape = 4, (8, 4, 3)
    tensors = [onnx.numpy_helper.from_array(v.astype(np.float32), n) for n, v in [
        ("s", RNG.normal(1, 0.3, c)), ("b", RNG.normal(0, 1, c)), ("m", RNG.normal(0, 1, c)),
        ("v", RNG.uniform(0.5, 2, c))]]
    node = onnx.helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"],
                                 ["y", "rm", "rv"], training_mode=1, momentum=0.8,
                                 epsilon=1e-3)
    elem = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        [node], "bn", [onnx.helper.make_tensor_value_info("x", elem, list(shape))],
        [onnx.helper.make_tensor_value_info("y", elem, list(shape))]
        + [onnx.helper.make_tensor_value_info(n, elem, [c]) for n in ("rm", "rv")], tensors)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    layer = bn.convert.from_onnx(node, tensors, opset=opset)
    assert layer.training and layer.momentum == 0.2 and layer.eps == 1e-3
    x = (RNG.normal(size=shape) * 2 + 1).astype(np.float32)
    y, rm, rv = ReferenceEvaluator(model).run(None, {"x": x})
    close(layer(x), y)
    close(layer.running_mean, rm)
    close(layer.running_var, rv)


def test_converted_layer_names_a_channel_axis_the_input_lacks():
    layer = bn.convert.from_keras([np.zeros(3), np.ones(3)], {"axis": 3, "scale": False,
                                                              "center": False})
    with pytest.raises(ValueError, match="axis 3 is out of range for an input with 2"):
        layer(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="one integer"):
        bn.convert.from_keras([np.zeros(3), np.ones(3)], {"axis": [1, 2], "scale": False,
                                                          "center": False})


def test_keras_renorm_layer_converts_both_ways():
    keras = require("keras", extra="test-frameworks")
    clip = {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}
    kl = keras.layers.BatchNormalization(renorm=True, renorm_clipping=clip, renorm_momentum=0.9,
                                         momentum=0.8)
    kl.build((12, 3))
    for step in range(3):
        kl(RNG.normal(step, 1 + step, (12, 3)).astype(np.float32), training=True)
    layer = bn.convert.from_keras(kl)
    assert layer.renorm and layer.renorm_clipping == clip and layer.renorm_momentum == 0.1
    x = RNG.normal(2, 3, (12, 3)).astype(np.float32)
    close(layer(x), kl(x, training=True))                 # one more step in both
    back = bn.convert.from_keras(kl)
    for k in ("running_mean", "running_var", "running_std", "renorm_mean", "renorm_std"):
        close(getattr(layer, k), getattr(back, k))
    weights, config = bn.convert.to_keras(layer)
    again = keras.layers.BatchNormalization.from_config(config)
    again.build((12, 3))
    again.set_weights(weights)
    layer.num_batches_tracked = 0
    assert_same_layer(layer, bn.convert.from_keras(again))


def test_a_fused_activation_is_refused_by_onnx_too():
    require("onnx")
    with pytest.raises(ValueError, match="no fused activation"):
        bn.convert.to_onnx(random_layer(activation="relu").eval(), "x", "y")


@pytest.mark.parametrize("to", [bn.convert.to_torch, bn.convert.to_flax, bn.convert.to_keras])
def test_variants_no_framework_has_are_refused(to):
    with pytest.raises(ValueError, match="ghost batches"):
        to(random_layer(axis=-1, unbiased_running_var=False, virtual_batch_size=4))
    with pytest.raises(ValueError, match="no fused activation"):
        to(random_layer(axis=-1, unbiased_running_var=False, activation="relu"))
    if to is not bn.convert.to_keras:
        with pytest.raises(ValueError, match="batch renormalization"):
            to(bn.BatchNorm(3, renorm=True, unbiased_running_var=False))
