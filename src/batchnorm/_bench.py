"""``python -m batchnorm bench``: batchnorm, NumPy, PyTorch, ONNX Runtime against the memory floor.

Batch normalization is memory-bound, so every time is quoted as a ratio to the fastest memory
operation that moves the same bytes, measured in the same process, in the same loop
(see shared/design/performance.md):

* forward-train, forward-eval and batch statistics: the fastest copy ``x -> y`` among
  ``np.copyto`` on one thread, ``np.copyto`` over T slices in T Python threads (NumPy releases
  the GIL), and PyTorch's ``Tensor.copy_`` when PyTorch is installed. Statistics only read
  ``x``, so their ideal ratio is below 1;
* backward: the fastest ``x + dy -> dx`` among the same three (``np.add(x, dy, out=dx)``,
  threaded, ``torch.add(out=)``).

All candidates of one shape (floors included) run round-robin, one sample of each per round,
the start of the round rotating; the figure kept is the median of the rounds. Absolute times
on a shared machine move a lot; ratios taken this way do not.

Candidates, all given the same input buffers and the same parameter vectors (gamma, beta, and
for eval the mean and var), in the input's dtype (float32 by default), as a user holds them: a
``BatchNorm`` layer's parameters and running statistics, or weights loaded from PyTorch or
ONNX. Backward gets the statistics as ``forward_train`` returns them (``Stats``, float64):

* ``batchnorm out=``: the package writing into a preallocated output;
* ``batchnorm``: the package allocating its output (what a plain call does);
* ``numpy``: the naive NumPy implementation below (mean, var, subtract, divide) in the input
  dtype, the peer a NumPy user would write;
* ``torch``: ``torch.nn.functional.batch_norm`` on ``torch.from_numpy`` tensors (no copy;
  channels-last strides for NHWC), training=True with running statistics for train,
  training=False for eval; backward through ``torch.ops.aten.native_batch_norm_backward``
  (no autograd graph), or through autograd (a forward included) where that op is missing;
  statistics through ``torch.var_mean``. PyTorch allocates its outputs;
* ``onnxruntime``: eval only. ONNX Runtime's ``BatchNormalization`` (a one-node model, opset
  15, epsilon 1e-5, inputs x, scale, B, input_mean, input_var in the input's dtype, built
  with ``onnx.helper`` per shape) in an ``InferenceSession`` on the CPUExecutionProvider with
  ``intra_op_num_threads`` the benchmarked thread count; ``sess.run(None, feeds)`` is timed
  (it allocates its output). ONNX takes the channel as axis 1, so nhwc (channels-last) cases
  have no onnxruntime candidate; nchw and 2-D cases do. Present when ``onnxruntime`` and
  ``onnx`` import (``--no-onnxruntime`` leaves it out).

The layer ops (``--ops layer``, or layer-train, layer-eval, layer-step by name) time the
``BatchNorm`` layer as training code calls it, against ``torch.nn.BatchNorm1d/2d/3d`` given
the same parameters and running statistics: a training call, an inference call, and a
training step (the training call, then ``layer.backward(dy)``; for PyTorch, autograd's
backward of the module's output with x requiring a fresh gradient). The calls are quoted
against the copy floor, the step against the add floor.

PyTorch, onnxruntime and onnx are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from . import _api

OPS = ("train", "eval", "backward", "stats")
# The layer against the framework's module: a training call, an inference call, and a
# training step (training call, then backward). Asked for by name, or all three as "layer".
LAYER_OPS = ("layer-train", "layer-eval", "layer-step")
ALL_OPS = OPS + LAYER_OPS


def floor_kind(op: str) -> str:
    """The floor an op is quoted against: "add" (x + dy -> dx) for ops that produce a
    gradient, else "copy"."""
    return "add" if op in ("backward", "layer-step") else "copy"

IMPLS = ("batchnorm out=", "batchnorm", "numpy", "torch", "onnxruntime")
LAYOUTS = ("nchw", "nhwc")
EPS = 1e-5

# --- shapes -------------------------------------------------------------------------------
# Shapes are written (N, C, spatial...) or (N, C); the layout says how they lie in memory:
# nchw keeps that order, nhwc moves C last (axis=-1). 2-D shapes are one layout, "2d".

RESNET50_CHW = (
    (64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28),
    (256, 14, 14), (1024, 14, 14), (512, 7, 7), (2048, 7, 7),
)
PEER_CASES = (  # performance.md's peer table, in its layouts
    ((32, 64, 56, 56), "nchw"), ((32, 64, 56, 56), "nhwc"),
    ((32, 256, 14, 14), "nchw"), ((32, 256, 14, 14), "nhwc"),
    ((64, 128, 56, 56), "nchw"), ((256, 1024), "2d"), ((8, 32, 8, 8), "nchw"),
)
SMALL_CASES = (  # the per-call shapes users pass, where fixed overhead shows
    ((4, 4), None), ((64, 128), None), ((8, 32, 8, 8), None), ((256, 1024), None),
)
TWO_D = ((256, 1024), (4096, 64), (128, 8192))
EDGE = (  # C not a multiple of the vector width, N*H*W = 2, C = 1
    (32, 251, 14, 14), (32, 3, 56, 56), (2, 64, 1, 1), (2, 1024), (32, 1, 56, 56),
)
SHAPE_SETS = {
    "peer": "performance.md's peer table, 7 cases (the default)",
    "small": "per-call shapes where fixed overhead shows: 4x4, 64x128, 8x32x8x8 (both "
             "layouts), 256x1024",
    "resnet": "ResNet-50's 9 BN shapes, N from --batch (default 32), both layouts",
    "2d": "(N, C) inputs: 256x1024, 4096x64, 128x8192",
    "edge": "C=251, C=3, N*H*W=2, C=1, both layouts",
    "all": "resnet (N=1 and 32, or --batch), peer, 2d and edge",
}


@dataclass(frozen=True)
class Case:
    """One input: its shape as passed to the functions, its layout and channel axis."""

    shape: Tuple[int, ...]
    layout: str

    @property
    def axis(self) -> int:
        return -1 if self.layout == "nhwc" else 1

    @property
    def channels(self) -> int:
        return self.shape[self.axis]

    @property
    def label(self) -> str:
        return "x".join(str(d) for d in self.shape)

    @classmethod
    def from_logical(cls, shape: Sequence[int], layout: str) -> "Case":
        """A case from an (N, C, spatial...) shape; nhwc moves C to the end."""
        shape = tuple(int(d) for d in shape)
        if len(shape) == 2:
            return cls(shape, "2d")
        if layout == "nhwc":
            return cls(shape[:1] + shape[2:] + shape[1:2], "nhwc")
        return cls(shape, "nchw")


def parse_shape(text: str) -> Tuple[int, ...]:
    """'32x64x56x56' -> (32, 64, 56, 56)."""
    try:
        shape = tuple(int(d) for d in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise ValueError(f"cannot read a shape from {text!r}: write it as 32x64x56x56") from None
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape {text!r} needs at least 2 dimensions, (N, C, ...), all >= 1")
    return shape


def select_cases(
    spec: str, layout: Optional[str] = None, batch: Optional[Sequence[int]] = None
) -> List[Case]:
    """The cases named by ``--shapes`` (comma-separated set names and NxCxHxW shapes).

    ``layout`` None keeps each set's own layouts (the peer table's, both elsewhere); "nchw",
    "nhwc" or "both" applies to every shape with spatial dimensions.
    """
    layouts_all = LAYOUTS if layout in (None, "both") else (layout,)
    entries: List[Tuple[Tuple[int, ...], Tuple[str, ...]]] = []

    def add(shapes: Iterable[Tuple[int, ...]], own: Optional[str] = None) -> None:
        for s in shapes:
            lay = (own,) if (own is not None and layout is None) else layouts_all
            entries.append((tuple(s), lay))

    for word in [w.strip() for w in spec.split(",") if w.strip()]:
        name = word.lower()
        if name == "peer":
            for s, own in PEER_CASES:
                add([s], own)
        elif name == "small":
            add(s for s, _ in SMALL_CASES)
        elif name == "resnet":
            for n in batch or (32,):
                add((n,) + chw for chw in RESNET50_CHW)
        elif name == "2d":
            add(TWO_D)
        elif name == "edge":
            add(EDGE)
        elif name == "all":
            for n in batch or (1, 32):
                add((n,) + chw for chw in RESNET50_CHW)
            for s, own in PEER_CASES:
                add([s], own)
            add(TWO_D)
            add(EDGE)
        else:
            add([parse_shape(word)])
    cases: List[Case] = []
    for shape, lays in entries:
        for lay in lays:
            case = Case.from_logical(shape, lay)
            if case not in cases:
                cases.append(case)
    if not cases:
        raise ValueError(f"--shapes {spec!r} names no shape")
    return cases


# --- the naive NumPy peer, in the input dtype ---------------------------------------------


def _axes(ndim: int, axis: int) -> Tuple[int, ...]:
    axis %= ndim
    return tuple(i for i in range(ndim) if i != axis)


def _bcast(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return v.reshape(shape)


def numpy_batch_stats(x: np.ndarray, axis: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance per channel, the way NumPy code usually does it."""
    axes = _axes(x.ndim, axis)
    return x.mean(axis=axes), x.var(axis=axes)


def numpy_forward_eval(x, mean, var, gamma=None, beta=None, *, axis: int = 1, eps: float = EPS):
    """(x - mean) / sqrt(var + eps) * gamma + beta, in the dtype of x."""
    dt, nd = x.dtype, x.ndim
    y = (x - _bcast(np.asarray(mean, dt), nd, axis)) / np.sqrt(
        _bcast(np.asarray(var, dt), nd, axis) + dt.type(eps)
    )
    if gamma is not None:
        y *= _bcast(np.asarray(gamma, dt), nd, axis)
    if beta is not None:
        y += _bcast(np.asarray(beta, dt), nd, axis)
    return y


def numpy_forward_train(x, gamma=None, beta=None, *, axis: int = 1, eps: float = EPS):
    """Batch statistics, then normalize: returns (y, mean, var)."""
    mean, var = numpy_batch_stats(x, axis)
    return numpy_forward_eval(x, mean, var, gamma, beta, axis=axis, eps=eps), mean, var


def numpy_backward(dy, x, mean, var, gamma=None, *, axis: int = 1, eps: float = EPS):
    """Training-mode gradients (dx, dgamma, dbeta), in the dtype of x."""
    dt, nd = x.dtype, x.ndim
    axes = _axes(nd, axis)
    n = x.size // x.shape[axis]
    inv = 1 / np.sqrt(_bcast(np.asarray(var, dt), nd, axis) + dt.type(eps))
    xhat = (x - _bcast(np.asarray(mean, dt), nd, axis)) * inv
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    scale = inv if gamma is None else inv * _bcast(np.asarray(gamma, dt), nd, axis)
    dx = scale * (dy - _bcast(dbeta, nd, axis) / n - xhat * (_bcast(dgamma, nd, axis) / n))
    return dx, dgamma, dbeta


# --- the floor ----------------------------------------------------------------------------


class _Threaded:
    """Run a NumPy ufunc over T slices of flat buffers in T threads (the caller is one)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.pool = ThreadPoolExecutor(max_workers=threads - 1)

    def split(self, *arrays: np.ndarray) -> List[Tuple[np.ndarray, ...]]:
        flats = [a.reshape(-1) for a in arrays]
        n = flats[0].size
        bounds = [n * i // self.threads for i in range(self.threads + 1)]
        return [tuple(f[lo:hi] for f in flats) for lo, hi in zip(bounds, bounds[1:])]

    def call(self, fn: Callable, parts: List[Tuple[np.ndarray, ...]]) -> Callable[[], None]:
        head, rest = parts[0], parts[1:]

        def run() -> None:
            futures = [self.pool.submit(fn, *p) for p in rest]
            fn(*head)
            for f in futures:
                f.result()

        return run

    def close(self) -> None:
        self.pool.shutdown()


def _copyto(dst: np.ndarray, src: np.ndarray) -> None:
    np.copyto(dst, src)


def _add(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    np.add(a, b, out=out)


# --- timing -------------------------------------------------------------------------------


@dataclass
class Timing:
    """Median and min seconds per call over the rounds, and calls per sample."""

    samples: List[float] = field(default_factory=list)
    number: int = 1
    error: Optional[str] = None

    @property
    def median(self) -> float:
        return float(np.median(self.samples)) if self.samples else math.nan

    @property
    def best(self) -> float:
        return float(min(self.samples)) if self.samples else math.nan


# Idle time before each sample, then one untimed call. OpenMP runtimes keep their threads
# spinning for a few milliseconds after a parallel region (libgomp: GOMP_SPINCOUNT), and
# PyTorch brings its own runtime: without a pause, the previous candidate's spinning threads
# take the cores from the next candidate's first calls, and which one loses depends on the
# order. After the pause the threads sleep, and on a virtual machine the first call that
# wakes them can take milliseconds longer (measured: median 7.8 ms, best 1.9 ms for a 26 MB
# inference after 20 ms idle): the untimed call pays that.
SETTLE_SECONDS = 0.02


def measure(
    candidates: Dict[Any, Callable[[], Any]],
    repeat: int,
    min_sample: float = 0.01,
    tick: Optional[Callable[[], None]] = None,
    settle: float = SETTLE_SECONDS,
) -> Dict[Any, Timing]:
    """Time every candidate round-robin: one sample each per round, the start rotating.

    A candidate is called once to warm up (one that raises is recorded with its error and
    left out), then its calls per sample are chosen so that a sample lasts ``min_sample``.
    Each sample starts after ``settle`` seconds of idle time and one untimed call (see
    SETTLE_SECONDS).
    """
    timings = {k: Timing() for k in candidates}
    live = []
    for key, fn in candidates.items():
        try:
            fn()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a peer that cannot run this case is reported
            timings[key].error = f"{type(e).__name__}: {e}"
            continue
        timings[key].number = max(1, min(100_000, math.ceil(min_sample / max(dt, 1e-9))))
        live.append(key)
    if tick:
        tick()
    for r in range(repeat):
        k = r % len(live) if live else 0
        for key in live[k:] + live[:k]:
            fn, number = candidates[key], timings[key].number
            if settle > 0:
                time.sleep(settle)
                fn()
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            timings[key].samples.append((time.perf_counter() - t0) / number)
        if tick:
            tick()
    return timings


# --- one case -----------------------------------------------------------------------------


def _torch_backward_fn(torch: Any, tx, tdy, w, b, rm, rv) -> Tuple[Callable[[], Any], str]:
    """Training-mode backward in PyTorch, without autograd if the aten op is usable."""
    try:
        op_fwd = torch.ops.aten.native_batch_norm
        op_bwd = torch.ops.aten.native_batch_norm_backward
        _, save_mean, save_invstd = op_fwd(tx, w, b, rm.clone(), rv.clone(), True, 0.1, EPS)
        mask = [True, True, True]

        def fn() -> Any:
            return op_bwd(tdy, tx, w, rm, rv, save_mean, save_invstd, True, EPS, mask)

        fn()
        return fn, "aten.native_batch_norm_backward"
    except Exception:  # noqa: BLE001 - fall back to autograd, and say so
        F = torch.nn.functional
        wg = w.detach().clone().requires_grad_()
        bg = b.detach().clone().requires_grad_()

        def fn_autograd() -> Any:
            with torch.enable_grad():
                xg = tx.detach().requires_grad_()
                y = F.batch_norm(xg, None, None, wg, bg, training=True, eps=EPS)
                return torch.autograd.grad(y, (xg, wg, bg), tdy)

        return fn_autograd, "autograd (forward included)"


ONNX_OPSET = 15
ONNX_IR_VERSION = 8  # the IR version of opset 15, so that an older onnxruntime reads the model


def onnx_eval_session(ort: Tuple[Any, Any], shape: Sequence[int], dtype: Any,
                      threads: int) -> Any:
    """An ONNX Runtime session of a one-node BatchNormalization (inference) for x of ``shape``.

    ``ort`` is the (onnxruntime, onnx) pair. The model takes x (channel on axis 1, as ONNX
    requires), scale, B, input_mean and input_var in ``dtype`` and returns y; epsilon is EPS
    (stored as float32, as every ONNX float attribute is), opset ONNX_OPSET. The session runs
    on the CPUExecutionProvider with ``threads`` intra-op threads.
    """
    onnxruntime, onnx = ort
    helper = onnx.helper
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    shape = [int(d) for d in shape]
    c = shape[1]
    names = ["x", "scale", "B", "input_mean", "input_var"]
    inputs = [helper.make_tensor_value_info("x", elem, shape)]
    inputs += [helper.make_tensor_value_info(n, elem, [c]) for n in names[1:]]
    node = helper.make_node("BatchNormalization", names, ["y"], epsilon=EPS)
    graph = helper.make_graph([node], "batchnorm_eval", inputs,
                              [helper.make_tensor_value_info("y", elem, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              ir_version=ONNX_IR_VERSION)
    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(model.SerializeToString(), sess_options=so,
                                        providers=["CPUExecutionProvider"])


@dataclass
class CaseResult:
    case: Case
    dtype: str
    floors: Dict[str, Dict[str, Timing]]  # "copy"/"add" -> floor name -> timing
    ops: Dict[str, Dict[str, Timing]]  # op -> impl -> timing

    def floor(self, op: str) -> Tuple[float, str]:
        kind = floor_kind(op)
        times = {k: t.median for k, t in self.floors.get(kind, {}).items() if t.samples}
        if not times:
            return math.nan, "-"
        name = min(times, key=times.get)
        return times[name], name


def run_case(
    case: Case,
    dtype: np.dtype,
    ops: Sequence[str],
    threads: int,
    repeat: int,
    torch: Any = None,
    tick: Optional[Callable[[], None]] = None,
    seed: int = 0,
    ort: Optional[Tuple[Any, Any]] = None,
) -> Tuple[CaseResult, Dict[str, str]]:
    """Allocate the buffers of one case and time every candidate of every op interleaved.

    ``ort``: the (onnxruntime, onnx) modules, for the onnxruntime eval candidate (not for
    nhwc cases: ONNX's BatchNormalization takes the channel on axis 1).
    """
    rng = np.random.default_rng(seed)
    ax = case.axis
    c = case.channels
    x = rng.standard_normal(case.shape, dtype=np.float32).astype(dtype, copy=False)
    x = x * dtype.type(2) + dtype.type(3)
    dy = rng.standard_normal(case.shape, dtype=np.float32).astype(dtype, copy=False)
    y = np.empty_like(x)
    dx = np.empty_like(x)
    y.fill(0)
    dx.fill(0)  # touch the output pages once, as a reused buffer would be
    # Every candidate gets its vectors in the input's dtype, as a user holds them (a layer's
    # parameters and running statistics, weights loaded from PyTorch or ONNX); backward gets
    # the statistics as forward_train returns them (Stats, float64).
    g_dt = rng.uniform(0.5, 1.5, c).astype(dtype)
    b_dt = rng.uniform(-0.5, 0.5, c).astype(dtype)
    st = _api.batch_stats(x, axis=ax)
    mean_dt, var_dt = st.mean.astype(dtype), st.var.astype(dtype)
    notes: Dict[str, str] = {}

    cands: Dict[Tuple[str, str], Callable[[], Any]] = {}
    need_copy = any(floor_kind(op) == "copy" for op in ops)
    need_add = any(floor_kind(op) == "add" for op in ops)
    split = _Threaded(threads) if threads > 1 else None
    tname = f"numpy {threads} threads"
    if need_copy:
        cands[("copy", "numpy copyto")] = lambda: np.copyto(y, x)
        if split:
            cands[("copy", tname)] = split.call(_copyto, split.split(y, x))
    if need_add:
        cands[("add", "numpy add")] = lambda: np.add(x, dy, out=dx)
        if split:
            cands[("add", tname)] = split.call(_add, split.split(x, dy, dx))

    tx = tdy = None
    if torch is not None:
        def tview(a: np.ndarray) -> Any:
            t = torch.from_numpy(a)
            return torch.movedim(t, -1, 1) if case.layout == "nhwc" else t

        tx, tdy, ty, tdx = tview(x), tview(dy), tview(y), tview(dx)
        tw, tb = torch.from_numpy(g_dt.copy()), torch.from_numpy(b_dt.copy())
        trm, trv = torch.from_numpy(mean_dt.copy()), torch.from_numpy(var_dt.copy())
        if need_copy:
            cands[("copy", "torch copy_")] = lambda: ty.copy_(tx)
        if need_add:
            cands[("add", "torch add")] = lambda: torch.add(tx, tdy, out=tdx)

    F = torch.nn.functional if torch is not None else None
    tdims = tuple(i for i in range(x.ndim) if i != 1)
    for op in ops:
        if op == "train":
            cands[(op, "batchnorm out=")] = lambda: _api.forward_train(
                x, g_dt, b_dt, axis=ax, out=y)
            cands[(op, "batchnorm")] = lambda: _api.forward_train(x, g_dt, b_dt, axis=ax)
            cands[(op, "numpy")] = lambda: numpy_forward_train(x, g_dt, b_dt, axis=ax)
            if torch is not None:
                trm_t, trv_t = trm.clone(), trv.clone()
                cands[(op, "torch")] = lambda: F.batch_norm(
                    tx, trm_t, trv_t, tw, tb, training=True, momentum=0.1, eps=EPS)
        elif op == "eval":
            cands[(op, "batchnorm out=")] = lambda: _api.forward_eval(
                x, mean_dt, var_dt, g_dt, b_dt, axis=ax, out=y)
            cands[(op, "batchnorm")] = lambda: _api.forward_eval(
                x, mean_dt, var_dt, g_dt, b_dt, axis=ax)
            cands[(op, "numpy")] = lambda: numpy_forward_eval(
                x, mean_dt, var_dt, g_dt, b_dt, axis=ax)
            if torch is not None:
                cands[(op, "torch")] = lambda: F.batch_norm(
                    tx, trm, trv, tw, tb, training=False, eps=EPS)
            if ort is not None and case.layout != "nhwc":
                try:
                    sess = onnx_eval_session(ort, x.shape, dtype, threads)
                except Exception as e:  # noqa: BLE001 - e.g. a dtype the runtime lacks
                    notes[f"{op} onnxruntime"] = f"{type(e).__name__}: {e}"
                else:
                    feeds = {"x": x, "scale": g_dt, "B": b_dt, "input_mean": mean_dt,
                             "input_var": var_dt}
                    cands[(op, "onnxruntime")] = lambda: sess.run(None, feeds)
        elif op == "backward":
            cands[(op, "batchnorm out=")] = lambda: _api.backward(
                dy, x, st, g_dt, axis=ax, out=dx)
            cands[(op, "batchnorm")] = lambda: _api.backward(dy, x, st, g_dt, axis=ax)
            cands[(op, "numpy")] = lambda: numpy_backward(dy, x, mean_dt, var_dt, g_dt, axis=ax)
            if torch is not None:
                fn, how = _torch_backward_fn(torch, tx, tdy, tw, tb, trm, trv)
                cands[(op, "torch")] = fn
                notes["torch backward"] = how
        elif op == "stats":
            cands[(op, "batchnorm")] = lambda: _api.batch_stats(x, axis=ax)
            cands[(op, "numpy")] = lambda: numpy_batch_stats(x, axis=ax)
            if torch is not None:
                cands[(op, "torch")] = lambda: torch.var_mean(tx, dim=tdims, correction=0)
        elif op in LAYER_OPS:
            for impl, fn in _layer_candidates(op, x, dy, y, dx, ax, g_dt, b_dt, mean_dt, var_dt,
                                              torch, tx, tdy).items():
                cands[(op, impl)] = fn
        else:
            raise ValueError(f"unknown op {op!r}; choose from {', '.join(ALL_OPS)}")

    try:
        timings = measure(cands, repeat, tick=tick)
    finally:
        if split:
            split.close()
    floors: Dict[str, Dict[str, Timing]] = {}
    per_op: Dict[str, Dict[str, Timing]] = {op: {} for op in ops}
    for (group, name), t in timings.items():
        if t.error:
            notes[f"{group} {name}"] = t.error
        if group in ("copy", "add"):
            floors.setdefault(group, {})[name] = t
        else:
            per_op[group][name] = t
    return CaseResult(case, str(np.dtype(dtype)), floors, per_op), notes


def _layer_candidates(op: str, x, dy, y, dx, ax: int, g_dt, b_dt, mean_dt, var_dt, torch: Any,
                      tx, tdy) -> Dict[str, Callable[[], Any]]:
    """The layer ops' candidates: ``batchnorm.BatchNorm`` (into ``out=`` and allocating)
    and PyTorch's ``BatchNorm1d/2d/3d`` module with the same parameters (and, for
    layer-eval, running statistics), in the input's dtype. layer-step is a training call
    then the gradient: ``layer.backward(dy)``, and for PyTorch autograd's backward of the
    module's output with ``x`` requiring its gradient (a fresh one each step, as after
    ``zero_grad``)."""
    from ._layer import BatchNorm

    layer = BatchNorm(x.shape[ax], axis=ax, dtype=x.dtype)
    layer.gamma, layer.beta = g_dt, b_dt
    if op == "layer-eval":
        layer.running_mean, layer.running_var = mean_dt, var_dt
        layer.eval()
    cands: Dict[str, Callable[[], Any]] = {}
    if op == "layer-step":
        def step_out() -> Any:
            layer(x, out=y)
            return layer.backward(dy, out=dx)

        def step() -> Any:
            layer(x)
            return layer.backward(dy)

        cands["batchnorm out="], cands["batchnorm"] = step_out, step
    else:
        cands["batchnorm out="] = lambda: layer(x, out=y)
        cands["batchnorm"] = lambda: layer(x)
    if torch is None:
        return cands
    kind = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
            5: torch.nn.BatchNorm3d}.get(x.ndim)
    if kind is None:
        return cands
    module = kind(x.shape[ax], eps=EPS, momentum=0.1).to(dtype=tx.dtype)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(g_dt))
        module.bias.copy_(torch.from_numpy(b_dt))
        module.running_mean.copy_(torch.from_numpy(mean_dt))
        module.running_var.copy_(torch.from_numpy(var_dt))
    if op == "layer-eval":
        module.eval()
    if op == "layer-step":
        txg = tx.detach().requires_grad_(True)

        def torch_step() -> Any:
            txg.grad = None
            with torch.enable_grad():
                module(txg).backward(tdy)
            return txg.grad

        cands["torch"] = torch_step
    else:
        cands["torch"] = lambda: module(tx)
    return cands


# --- output -------------------------------------------------------------------------------

_IMPL_HEAD = {"batchnorm out=": "batchnorm out=", "batchnorm": "batchnorm (alloc)",
              "numpy": "numpy (naive)", "torch": "torch", "onnxruntime": "onnxruntime"}


def _fmt_ms(t: float) -> str:
    if not math.isfinite(t):
        return "-"
    ms = t * 1e3
    # sub-microsecond times keep their digits (a fast machine copies a tiny shape in 0.4 us)
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.3f}" if ms >= 0.01 else f"{ms:.5f}"


def _fmt_ratio(r: float) -> str:
    if not math.isfinite(r):
        return "-"
    return f"{r:.2f}" if r < 10 else f"{r:.1f}"


def table_rows(results: Sequence[CaseResult], impls: Sequence[str]) -> List[Dict[str, Any]]:
    """One dict per (case, op): floor and each implementation's median and ratio."""
    rows = []
    for res in results:
        for op, per_impl in res.ops.items():
            floor_t, floor_by = res.floor(op)
            row: Dict[str, Any] = {
                "shape": res.case.label, "layout": res.case.layout, "axis": res.case.axis,
                "dtype": res.dtype, "op": op, "floor_ms": floor_t * 1e3, "floor_by": floor_by,
            }
            for impl in impls:
                t = per_impl.get(impl)
                med = t.median if t is not None else math.nan
                row[impl] = {"ms": med * 1e3, "ratio": med / floor_t}
            bn_t, torch_t = row["batchnorm"]["ms"], row.get("torch", {}).get("ms", math.nan)
            row["torch/batchnorm"] = torch_t / bn_t
            rows.append(row)
    return rows


def format_table(rows: Sequence[Dict[str, Any]], impls: Sequence[str]) -> str:
    """The table the command prints: ms and x floor per implementation."""
    w_shape = max([len("shape")] + [len(r["shape"]) for r in rows])
    w_op = max([8] + [len(r["op"]) for r in rows])
    head1 = f"{'':{w_shape}} {'':6} {'':{w_op}} {'floor':>19}"
    head2 = f"{'shape':{w_shape}} {'layout':6} {'op':{w_op}} {'ms':>8} {'by':>10}"
    for impl in impls:
        head1 += f"  {_IMPL_HEAD[impl]:>17}"
        head2 += f"  {'ms':>8} {'x floor':>8}"
    head1 += f"  {'torch /':>9}"
    head2 += f"  {'batchnorm':>9}"
    lines = [head1, head2, "-" * len(head2)]
    short = {"numpy copyto": "np-1t", "numpy add": "np-1t", "torch copy_": "torch",
             "torch add": "torch"}
    for r in rows:
        by = short.get(r["floor_by"], r["floor_by"].replace("numpy ", "np-").replace(
            " threads", "t"))
        line = (f"{r['shape']:{w_shape}} {r['layout']:6} {r['op']:{w_op}} "
                f"{_fmt_ms(r['floor_ms'] / 1e3):>8} {by:>10}")
        for impl in impls:
            cell = r[impl]
            line += f"  {_fmt_ms(cell['ms'] / 1e3):>8} {_fmt_ratio(cell['ratio']):>8}"
        line += f"  {_fmt_ratio(r['torch/batchnorm']):>9}"
        lines.append(line)
    return "\n".join(lines)


def _json_clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_clean(x) for x in v]
    return v


def to_json(meta: Dict[str, Any], results: Sequence[CaseResult], rows) -> Dict[str, Any]:
    def timing(t: Timing) -> Dict[str, Any]:
        return {"median_ms": t.median * 1e3, "min_ms": t.best * 1e3, "number": t.number,
                "samples_ms": [s * 1e3 for s in t.samples], "error": t.error}

    detail = []
    for res in results:
        detail.append({
            "shape": list(res.case.shape), "layout": res.case.layout, "axis": res.case.axis,
            "dtype": res.dtype,
            "floors": {g: {n: timing(t) for n, t in d.items()} for g, d in res.floors.items()},
            "ops": {op: {n: timing(t) for n, t in d.items()} for op, d in res.ops.items()},
        })
    return _json_clean({"meta": meta, "rows": list(rows), "detail": detail})


def plot(rows: Sequence[Dict[str, Any]], impls: Sequence[str], path: str, title: str) -> None:
    """Bar chart of each implementation's ratio to the floor, one panel per op."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in ALL_OPS if any(r["op"] == op for r in rows)]
    cases = []
    for r in rows:
        key = f"{r['shape']}\n{r['layout']}"
        if key not in cases:
            cases.append(key)
    fig, axes = plt.subplots(len(ops), 1, figsize=(max(6.0, 1.2 * len(cases) + 2),
                                                   3.2 * len(ops)), squeeze=False)
    width = 0.8 / len(impls)
    for ax, op in zip(axes[:, 0], ops):
        by_case = {f"{r['shape']}\n{r['layout']}": r for r in rows if r["op"] == op}
        for i, impl in enumerate(impls):
            vals = [by_case[c][impl]["ratio"] if c in by_case else math.nan for c in cases]
            xs = [j + (i - (len(impls) - 1) / 2) * width for j in range(len(cases))]
            ax.bar(xs, vals, width, label=_IMPL_HEAD[impl])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        floor = "x + dy -> dx" if floor_kind(op) == "add" else "copy"
        ax.set_ylabel(f"{op}\ntime / {floor} floor")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=len(impls))
    axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- progress -----------------------------------------------------------------------------


class _Progress:
    """tqdm when installed, else a one-line counter on stderr; silent when disabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled, self.bar = total, 0, enabled, None
        self.desc = ""
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, file=sys.stderr, unit="round", leave=False,
                        dynamic_ncols=True)

    def describe(self, desc: str) -> None:
        self.desc = desc
        if self.bar is not None:
            self.bar.set_description(desc, refresh=True)
        else:
            self._plain()

    def tick(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        else:
            self._plain()

    def _plain(self) -> None:
        if self.enabled:
            sys.stderr.write(f"\rbench {self.done}/{self.total} {self.desc}\x1b[K")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


# --- command line -------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    sets = "; ".join(f"{k}: {v}" for k, v in SHAPE_SETS.items())
    p.add_argument("--shapes", default="peer",
                   help="comma-separated shape sets and shapes written N x C x H x W (or NxC), "
                        f"e.g. 'small,32x64x56x56'. Sets: {sets}")
    p.add_argument("--layout", choices=("nchw", "nhwc", "both"), default=None,
                   help="memory layout of shapes with spatial axes: nchw (axis=1) or nhwc "
                        "(C last, axis=-1); default: the peer table's own, both elsewhere")
    p.add_argument("--batch", default=None,
                   help="N for the resnet set, comma-separated (default 32; 'all': 1,32)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="dtype of the inputs (default float32)")
    p.add_argument("--ops", default=",".join(OPS),
                   help=f"comma-separated, from {','.join(ALL_OPS)}, or 'layer' for the last "
                        f"three: the BatchNorm layer against PyTorch's module (a training "
                        f"call, an inference call, a training call then backward); default: "
                        f"{','.join(OPS)}")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for batchnorm, PyTorch, ONNX Runtime and the threaded copy "
                        "floor (default: batchnorm's default, all cores)")
    p.add_argument("--repeat", type=int, default=7,
                   help="rounds; the median is reported (default 7)")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out even if installed")
    p.add_argument("--no-onnxruntime", action="store_true",
                   help="leave ONNX Runtime (eval, nchw and 2-D cases) out even if installed")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart of the ratios (matplotlib)")
    p.add_argument("--json", metavar="FILE", help="write every sample and the table as JSON")
    prog = p.add_mutually_exclusive_group()
    prog.add_argument("--progress", dest="progress", action="store_true", default=None,
                      help="show progress on stderr (default: when stderr is a terminal)")
    prog.add_argument("--no-progress", dest="progress", action="store_false")


def _import_torch(disabled: bool) -> Any:
    if disabled:
        return None
    try:
        import torch
    except Exception:  # noqa: BLE001 - not installed, or broken: bench without it
        return None
    return torch


def _import_onnxruntime(disabled: bool) -> Optional[Tuple[Any, Any]]:
    """(onnxruntime, onnx), or None when disabled or either does not import."""
    if disabled:
        return None
    try:
        import onnx
        import onnx.helper  # noqa: F401
        import onnxruntime
    except Exception:  # noqa: BLE001 - not installed, or broken: bench without it
        return None
    return onnxruntime, onnx


def run(args: argparse.Namespace) -> int:
    try:
        batch = [int(b) for b in args.batch.split(",")] if args.batch else None
        cases = select_cases(args.shapes, args.layout, batch)
    except ValueError as e:
        raise SystemExit(f"bench: {e}") from None
    ops = []
    for o in (o.strip() for o in args.ops.split(",")):
        for op in LAYER_OPS if o == "layer" else (o,) if o else ():
            if op not in ops:
                ops.append(op)
    bad = [o for o in ops if o not in ALL_OPS]
    if bad or not ops:
        raise SystemExit(f"bench: unknown op(s) {bad}; choose from {', '.join(ALL_OPS)} "
                         "or layer")
    if args.repeat < 1:
        raise SystemExit("bench: --repeat must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise SystemExit("bench: --threads must be >= 1")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("bench: --plot needs matplotlib: pip install 'batchnorm[bench]'")
    dtype = np.dtype(args.dtype)
    torch = _import_torch(args.no_torch)
    ort = _import_onnxruntime(getattr(args, "no_onnxruntime", False))
    # onnxruntime's only op is eval, and it has no nhwc candidate: no column without a case
    ort_used = ort is not None and "eval" in ops and any(c.layout != "nhwc" for c in cases)
    impls = [i for i in IMPLS
             if (i != "torch" or torch is not None) and (i != "onnxruntime" or ort_used)]

    from ._config import config

    prev_bn = _api.get_num_threads()
    threads = args.threads or prev_bn
    prev_torch = torch.get_num_threads() if torch is not None else None
    progress = _Progress(len(cases) * (args.repeat + 1),
                         sys.stderr.isatty() if args.progress is None else args.progress)
    results: List[CaseResult] = []
    notes: Dict[str, str] = {}
    grad_state = None
    try:
        _api.set_num_threads(threads)
        if torch is not None:
            torch.set_num_threads(threads)
            grad_state = torch.is_grad_enabled()
            torch.set_grad_enabled(False)
        for i, case in enumerate(cases):
            progress.describe(f"{case.label} {case.layout}")
            res, case_notes = run_case(case, dtype, ops, threads, args.repeat, torch,
                                       tick=progress.tick, seed=i,
                                       ort=ort if ort_used else None)
            results.append(res)
            for k, v in case_notes.items():
                if k == "torch backward":
                    notes[k] = v
                else:
                    notes[f"{case.label} {case.layout} {k}"] = v
    finally:
        progress.close()
        _api.set_num_threads(prev_bn)
        if torch is not None:
            torch.set_num_threads(prev_torch)
            if grad_state is not None:
                torch.set_grad_enabled(grad_state)

    cfg = config()
    meta = {
        "batchnorm": cfg["version"], "isa": cfg["isa"], "openmp": cfg["openmp"],
        "threads": threads, "dtype": str(dtype), "repeat": args.repeat, "ops": ops,
        "numpy": np.__version__, "torch": getattr(torch, "__version__", None),
        "onnxruntime": ort[0].__version__ if ort_used else None,
        "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "notes": notes,
    }
    rows = table_rows(results, impls)
    if torch is None:
        torch_desc = "torch left out (--no-torch)" if args.no_torch else "torch not installed"
    else:
        torch_desc = f"torch {torch.__version__} ({threads} threads)"
    if ort_used:
        torch_desc += (f"; onnxruntime {ort[0].__version__} ({threads} intra-op threads, "
                       "eval, not nhwc)")
    print(f"batchnorm {cfg['version']} (isa {cfg['isa']}, OpenMP "
          f"{'on' if cfg['openmp'] else 'off'}), {dtype}, {threads} threads; "
          f"numpy {np.__version__}; {torch_desc}")
    floor_names = ["np-1t (numpy, 1 thread)"]
    floor_names += [f"np-{threads}t (numpy, {threads} threads)"] if threads > 1 else []
    floor_names += ["torch (copy_, add)"] if torch is not None else []
    print(f"floor: fastest of {', '.join(floor_names)}; copy x -> y for train, eval and "
          "stats, x + dy -> dx for backward" +
          ("; the layer's calls against the same (layer-step: training call then backward)"
           if any(op in LAYER_OPS for op in ops) else ""))
    print(f"ms: median of {args.repeat} interleaved rounds; x floor = ms / floor ms; "
          "torch / batchnorm = torch ms / batchnorm (alloc) ms")
    if "torch backward" in notes:
        print(f"torch backward: {notes['torch backward']}")
    print()
    print(format_table(rows, impls))
    for k, v in notes.items():
        if k != "torch backward":
            print(f"note: {k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(meta, results, rows), f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        title = (f"batchnorm {cfg['version']} ({cfg['isa']}), {dtype}, {threads} threads: "
                 "time / memory floor (lower is better, 1 = floor)")
        plot(rows, impls, args.plot, title)
        print(f"wrote {args.plot}")
    return 0
