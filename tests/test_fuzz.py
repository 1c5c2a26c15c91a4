"""Property-based fuzzing of the public functions and the BatchNorm layer (hypothesis).

Each example draws a shape (ndim 2..5, size-0 batch/spatial extents and C = 0 included, C up
to 40, SIMD tails), a channel axis (positive or negative), a memory layout (transposes, slices
with positive and negative steps, Fortran order, non-native byte order, unaligned data,
broadcast and read-only arrays), a dtype from ``batchnorm._validation.FLOAT_DTYPES`` (dtypes added
there are fuzzed automatically), the kernel set (every ISA path this CPU has), eps,
gamma/beta present or not (float64 contiguous, strided or unaligned, float32, integer arrays
or lists), an ``out=`` (none, fresh, the input itself, an overlapping view) and at most
one deliberately bad argument (a ``numpy.ma`` masked input among them; bad ``mask=`` and
``activation=`` arguments of the variants too). Data styles reach
the extremes of each dtype (values near its largest, both signs, so that ``x - mean``
overflows the compute type; 1e150 for float64, the documented limit of its statistics).
Layer steps run under ``np.errstate(all="raise")`` with warnings as errors one time in four,
and the layer fuzz runs again in a child forked after a threaded call. The contract checked:

* a call either matches ``batchnorm.reference`` (fed statistics from correctly rounded
  sums) within a bound derived from the dtype's precision and the problem's condition, or raises ValueError/TypeError whose message names
  an offending argument; which of the two is predicted from the arguments, never guessed;
* never a crash and never a silent wrong answer: where the float64 reference is finite the
  result is close (or an inf of the right sign beyond the output type's range), where it is
  not finite the result is not finite either (no exception: where gamma / sqrt(var + eps)
  does not fit the compute type the kernels take their exact path, see test_numerics.py);
* inputs are never modified (unless they are ``out``), and a call that raises leaves ``out``
  untouched; a layer call that raises (the non-finite-statistics warning as an error
  included) leaves the layer's state untouched, and none trips NumPy's error state.

Runs are reproducible (``derandomize=True``, no example database). For a longer hunt set
``BATCHNORM_FUZZ_SCALE`` (a multiplier of the example counts) and, optionally,
``BATCHNORM_FUZZ_RANDOM=1`` to draw fresh examples instead of the fixed ones.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _kernels, _validation
from batchnorm import reference as ref

# --- dtypes and their precision --------------------------------------------------------------

FLOAT_DTYPES = tuple(np.dtype(d) for d in _validation.FLOAT_DTYPES)
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


def _finfo(dt):
    try:
        return np.finfo(dt)
    except ValueError:  # bfloat16 and friends (ml_dtypes) are not known to np.finfo
        import ml_dtypes

        return ml_dtypes.finfo(dt)


def dt_eps(dt) -> float:
    return float(_finfo(dt).eps)


def dt_max(dt) -> float:
    return float(_finfo(dt).max)


EPS64 = dt_eps(F64)


def compute_eps(dt) -> float:
    """Unit roundoff of the arithmetic on `dt` elements: the storage type's, but at least
    float32's (half-precision storage is computed in float32)."""
    return max(dt_eps(dt), dt_eps(F32)) if dt.itemsize < 4 else dt_eps(dt)


def stat_eps(dt) -> float:
    """Statistics and parameter gradients are accumulated in float64 from the stored values
    (half precision: from float32 products, so allow float32's roundoff there)."""
    return EPS64 if dt.itemsize >= 4 else dt_eps(F32)


# Slack on the rounding bounds below. The bounds are first-order error analyses (one unit
# of roundoff per operation, times the size of the terms that cancel); the largest ratio
# error / bound seen over a long random run is well below 1, so 16 leaves room without
# letting a mixed-up channel, a lost tail element or a wrong stride (errors of order the
# data itself) through.
SLACK = 16.0

BAD_DTYPES = [np.dtype(d) for d in (np.int32, np.int64, np.complex128, np.bool_, np.float16,
                                    np.longdouble, np.uint8)]
BAD_DTYPES = [d for d in BAD_DTYPES if d not in FLOAT_DTYPES]

# Unaligned arrays (a NumPy array's data need not be aligned to its item size) are copied or
# staged by the API before they reach C, where they would be undefined behaviour; the fuzzer
# draws them everywhere, under the sanitizers too (BATCHNORM_FUZZ_UNALIGNED=0 leaves them out).
UNALIGNED = os.environ.get("BATCHNORM_FUZZ_UNALIGNED", "1") == "1"

SCALE = float(os.environ.get("BATCHNORM_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("BATCHNORM_FUZZ_RANDOM", "") not in ("", "0")


def fuzz_settings(n: int):
    return hypothesis.settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        print_blob=True,
        suppress_health_check=list(hypothesis.HealthCheck),
    )


# --- shapes --------------------------------------------------------------------------------

DIM_SIZES = [0, 1, 1, 2, 2, 3, 3, 4, 5, 7, 8, 9, 16, 17, 33, 129]
MAX_ELEMS = 40_000


@st.composite
def shapes(draw, min_c=0):
    """(shape, axis as passed, axis index): ndim 2..5, C in min_c..40, sizes with tails."""
    ndim = draw(st.integers(2, 5))
    ax = draw(st.integers(0, ndim - 1))
    axis = ax - ndim if draw(st.booleans()) else ax
    c = draw(st.integers(min_c, 40))
    shape = [draw(st.sampled_from(DIM_SIZES)) for _ in range(ndim)]
    shape[ax] = c
    while math.prod(shape) > MAX_ELEMS:  # keep examples fast: halve the largest batch dim
        i = max((i for i in range(ndim) if i != ax), key=lambda i: shape[i])
        shape[i] //= 2
    return tuple(shape), axis, ax


# --- memory layouts ------------------------------------------------------------------------


@dataclass
class Layout:
    perm: tuple = ()  # order of the dims in memory (outermost first)
    steps: tuple = ()  # slice step of each memory dim (negative: reversed)
    order: str = "C"
    swapped: bool = False  # non-native byte order
    unaligned: bool = False  # data pointer not a multiple of the item size
    broadcast: Optional[int] = None  # a dim with stride 0
    readonly: bool = False


@st.composite
def layouts(draw, ndim: int, allow_readonly=True, allow_swapped=True):
    kind = draw(st.sampled_from(["C", "C", "F", "strided", "strided", "odd"]))
    lay = Layout(perm=tuple(range(ndim)), steps=(1,) * ndim)
    if kind == "F":
        lay.order = "F"
    elif kind in ("strided", "odd"):
        lay.perm = tuple(draw(st.permutations(range(ndim))))
        lay.steps = tuple(draw(st.sampled_from([1, 1, 2, 3, -1, -2])) for _ in range(ndim))
        lay.order = draw(st.sampled_from("CF"))
    if kind == "odd":
        lay.swapped = allow_swapped and draw(st.booleans())
        lay.unaligned = draw(st.booleans()) and UNALIGNED
        lay.broadcast = draw(st.none() | st.integers(0, ndim - 1))
        lay.readonly = allow_readonly and draw(st.booleans())
    return lay


def materialize(values: np.ndarray, dtype, lay: Layout, axis_index: int) -> np.ndarray:
    """`values` (float64, the final shape) stored as `dtype` in layout `lay`."""
    shape = values.shape
    ndim = len(shape)
    dt = np.dtype(dtype)
    swapped = lay.swapped and dt.isbuiltin == 1  # (ml_dtypes' types have one byte order)
    bdim = lay.broadcast
    if bdim is not None and (
        bdim == axis_index or shape[bdim] < 2 or swapped or lay.unaligned
    ):
        bdim = None  # only a batch dim of size > 1 is broadcast
    if bdim is not None:
        values = values.take([0], axis=bdim)
    perm = lay.perm or tuple(range(ndim))
    steps = lay.steps or (1,) * ndim
    src_shape = values.shape
    mem_shape = tuple(src_shape[p] * abs(s) for p, s in zip(perm, steps))
    mdt = dt.newbyteorder("S") if swapped else dt
    if lay.unaligned and dt.itemsize > 1:
        nbytes = max(1, math.prod(mem_shape)) * dt.itemsize
        buf = np.zeros(nbytes + dt.itemsize, np.uint8)
        mem = np.ndarray(mem_shape, mdt, buffer=buf, offset=1, order=lay.order)
        assert not mem.flags.aligned or mem.size == 0
    else:
        mem = np.zeros(mem_shape, mdt, order=lay.order)
    view = mem[tuple(slice(None, None, s) for s in steps)]
    x = view.transpose(np.argsort(perm))
    assert x.shape == src_shape, (x.shape, src_shape)
    x[...] = values.astype(dt)
    if bdim is not None:
        x = np.broadcast_to(x, shape)
    if lay.readonly:
        x.flags.writeable = False
    assert x.shape == shape
    return x


# --- data ----------------------------------------------------------------------------------

STYLES = ["normal", "normal", "offset", "wide", "constant", "integers", "tiny", "nonfinite",
          "extreme"]

# "extreme" data reaches this magnitude: near the top of each type (x - mean overflows the
# compute type on both signs), and for float64 the documented limit of its statistics
# (docs/numerics.rst: beyond about 1e150 the float64 sums of squares overflow).
def extreme_magnitude(dt) -> float:
    return 1e150 if np.dtype(dt) == F64 else dt_max(dt) * 0.75


def make_values(rng, shape, ax, dt, style) -> np.ndarray:
    """float64 values (exactly representable in `dt`) whose channels differ."""
    c = shape[ax]
    cs = [1] * len(shape)
    cs[ax] = -1
    top = dt_max(dt) / 64
    z = rng.standard_normal(shape)
    if style == "offset":
        mags = [m for m in (1e2, 1e3, 1e4, 1e6) if m * 2 < top]
        loc = rng.choice(mags, c) * rng.choice([-1.0, 1.0], c)
        v = z + loc.reshape(cs)
    elif style == "wide":
        scale = 10.0 ** rng.uniform(-4, min(4, math.log10(top) - 2), c)
        v = z * scale.reshape(cs) + rng.uniform(-1, 1, c).reshape(cs) * scale.reshape(cs)
    elif style == "integers":
        v = rng.integers(-4, 5, shape).astype(np.float64)
    elif style == "tiny":
        v = z * 1e-20
    elif style == "extreme":
        top_x = extreme_magnitude(dt)
        v = np.sign(z) * top_x * rng.uniform(0.25, 1.0, shape)
    else:
        v = z * rng.uniform(0.5, 2.0, c).reshape(cs) + rng.uniform(-3, 3, c).reshape(cs)
    if style == "constant" and c:
        consts = rng.choice([0.0, 0.1, -3.25, 1.0, 7e3], c)
        which = rng.random(c) < 0.5
        v = np.where(which.reshape(cs), consts.reshape(cs), v)
    if style == "nonfinite" and v.size:
        k = max(1, v.size // 50)
        idx = rng.integers(0, v.size, k)
        v.reshape(-1)[idx] = rng.choice([np.nan, np.inf, -np.inf], k)
    with np.errstate(over="ignore"):
        return np.asarray(v.astype(dt), np.float64)


# --- per-channel vectors -------------------------------------------------------------------


def as_kind(v: Optional[np.ndarray], kind: str) -> Any:
    """A float64 vector passed as float64 (contiguous, strided or unaligned) / float32 /
    integer array or list (or None)."""
    if v is None or kind == "none":
        return None
    if kind == "f32":
        return v.astype(np.float32)
    if kind == "int":
        return np.rint(v).astype(np.int64)
    if kind == "list":
        return [float(a) for a in v]
    if kind == "strided":  # every other element of a longer array
        return np.repeat(v, 2)[::2]
    if kind == "unaligned" and UNALIGNED:  # float64 data at an odd address
        buf = np.zeros(v.size * 8 + 1, np.uint8)
        u = np.ndarray(v.shape, np.float64, buffer=buf, offset=1)
        u[...] = v
        return u
    return v.copy()


def as_f64(v) -> Optional[np.ndarray]:
    return None if v is None else np.asarray(v, np.float64)


VEC_KINDS = ["none", "f64", "f64", "f32", "int", "list", "strided", "unaligned"]


# --- tolerance bounds ----------------------------------------------------------------------


def _red(ndim, ax):
    return tuple(i for i in range(ndim) if i != ax)


def _cshape(ndim, ax):
    s = [1] * ndim
    s[ax] = -1
    return s


def _finite_abs(a):
    a = np.asarray(a, np.float64)
    return np.where(np.isfinite(a), np.abs(a), 0.0)


def _chan_max(a, ax):
    a = _finite_abs(a)
    return a.max(axis=_red(a.ndim, ax), initial=0.0)


def _vec(v, c, default):
    return np.full(c, default) if v is None else np.asarray(v, np.float64)


def _acc_eps(x, ax, dt) -> float:
    """Relative error of a float64 accumulation over one channel of x (blocked or naive
    sums: a few units of roundoff per level of a log2(n)-deep tree, with slack)."""
    n = max(1, math.prod(s for i, s in enumerate(x.shape) if i != ax))
    return SLACK * stat_eps(dt) * (1 + math.log2(n))


def forward_bound(x, ax, mean, var, gamma, beta, eps, dt, own_stats=False):
    """Per-element bound on |y - y_ref|: roundoff of (x - m) * a + b in the compute type,
    where (x - m) may lose digits relative to the spread (kappa), and the output's own
    rounding; with `own_stats` (training) also the error of the kernel's float64 statistics
    (the variance's relative error is up to acc_eps * (1 + kappa))."""
    c = x.shape[ax]
    cs = _cshape(x.ndim, ax)
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = 1.0 / np.sqrt(var + eps)
        g = np.abs(_vec(gamma, c, 1.0))
        kappa = (_chan_max(x, ax) + np.abs(mean)) * inv  # how much x - mean cancels
        s = g * kappa + np.abs(_vec(beta, c, 0.0))
        bound = SLACK * compute_eps(dt) * s
        if own_stats:
            bound = bound + g * kappa * (1 + kappa) * _acc_eps(x, ax, dt)
    return np.where(np.isfinite(bound), bound, np.inf).reshape(cs)


def backward_bound(dy, x, ax, mean, var, gamma, eps, dt, training):
    """Per-element bound on |dx - dx_ref|: roundoff of a*dy + b*(x - m) + c (whose terms are
    up to g*inv*max|dy|*(1 + kappa)**2) and of the float64 sums behind b and c."""
    c = x.shape[ax]
    cs = _cshape(x.ndim, ax)
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = 1.0 / np.sqrt(var + eps)
        g = np.abs(_vec(gamma, c, 1.0))
        kappa = (_chan_max(x, ax) + np.abs(mean)) * inv
        mdy = _chan_max(dy, ax)
        if training:
            terms = (1.0 + kappa) ** 2
            bound = g * inv * mdy * terms * (SLACK * compute_eps(dt) + _acc_eps(x, ax, dt))
        else:
            bound = SLACK * compute_eps(dt) * g * inv * mdy
    return np.where(np.isfinite(bound), bound, np.inf).reshape(cs)


def stats_bounds(x, ax, dt):
    """Bounds on the float64 mean and variance (relative to the data's magnitude)."""
    n = max(1, math.prod(s for i, s in enumerate(x.shape) if i != ax))
    mx = _chan_max(x, ax)
    e = SLACK * stat_eps(dt) * (1 + math.log2(n))
    return e * mx, e * mx * mx * 4


def param_grad_bounds(dy, x, ax, mean, var, eps, dt):
    red = _red(x.ndim, ax)
    cs = _cshape(x.ndim, ax)
    n = max(1, math.prod(s for i, s in enumerate(x.shape) if i != ax))
    e = SLACK * stat_eps(dt) * (1 + math.log2(n))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
        dev = (_finite_abs(x) + np.abs(np.asarray(mean, np.float64)).reshape(cs))
        sg = (_finite_abs(dy) * dev).sum(axis=red) * inv * e
        sb = _finite_abs(dy).sum(axis=red) * e
    return np.where(np.isfinite(sg), sg, np.inf), sb


def check_close(got, expected, bound, what, dtype=None):
    """got matches expected within bound where expected is finite; elsewhere got is not
    finite either (a NaN/inf is never turned into a plausible number)."""
    got = np.asarray(got)
    if dtype is not None:
        assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    expected = np.asarray(expected, np.float64)
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, expected {expected.shape}"
    g = np.asarray(got, np.float64)
    fin = np.isfinite(expected)
    bad_nonfinite = ~fin & np.isfinite(g)
    assert not bad_nonfinite.any(), (
        f"{what}: finite result where the reference is not finite at "
        f"{np.argwhere(bad_nonfinite)[:5].tolist()}"
    )
    tiny = np.finfo(np.float64).tiny
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(fin, np.abs(g - expected), 0.0)
        if dtype is not None:  # below the normal range the output's spacing is absolute
            fi = _finfo(dtype)
            tiny = max(tiny, float(getattr(fi, "smallest_subnormal", fi.tiny * fi.eps)))
        lim = np.broadcast_to(bound, expected.shape) + tiny
        bad = fin & ~(err <= lim)
        if dtype is not None:
            # a value beyond the output type's range rightly becomes an inf of its sign
            over = fin & ~np.isfinite(expected.astype(dtype))
            bad &= ~(over & np.isinf(g) & (np.sign(g) == np.sign(expected)))
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} values off; at {i}: got {g[i]!r}, "
            f"expected {expected[i]!r}, bound {lim[i]:.3g}"
        )


def quiet_reference(fn, *args, **kw):
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def constant_channels(x, ax) -> np.ndarray:
    """Channels whose values are all equal (and finite)."""
    red = _red(x.ndim, ax)
    with np.errstate(invalid="ignore"):
        return (x.max(axis=red) == x.min(axis=red)) & np.isfinite(x).all(axis=red)


def exact_stats(x, ax):
    """Per-channel mean and biased variance with correctly rounded sums (math.fsum).

    NumPy's mean over several or strided axes sums naively, with errors growing like n * eps:
    in float64 that is as large as the kernels' own error, too loose an oracle. Channels with
    non-finite values fall back to the reference's (non-finite) statistics.
    """
    x = np.asarray(x, np.float64)
    c = x.shape[ax]
    rows = np.moveaxis(x, ax, 0).reshape(c, -1)
    n = rows.shape[1]
    st = quiet_reference(ref.batch_stats, x, ax)
    mean, var = st.mean.copy(), st.var.copy()
    for k in range(c):
        r = rows[k]
        if n and np.isfinite(r).all():
            m = math.fsum(r) / n
            d = r - m
            mean[k] = m + math.fsum(d) / n
            var[k] = max(0.0, math.fsum(d * d) / n - (math.fsum(d) / n) ** 2)
    return bn.Stats(mean, var, n)


# --- the error contract --------------------------------------------------------------------


def names_one_of(msg: str, names) -> bool:
    return any(re.search(rf"(?<![A-Za-z_]){re.escape(n)}(?![A-Za-z_])", msg) for n in names)


def call_expecting(call, errors: set, what: str):
    """Run call(); if `errors` (argument names) is not empty it must raise ValueError or
    TypeError naming one of them; otherwise it must succeed. Returns the result or None."""
    if errors:
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        msg = str(info.value)
        assert names_one_of(msg, errors), f"{what}: error {msg!r} names none of {sorted(errors)}"
        return None
    return call()


def snapshot(arrays: dict) -> dict:
    return {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else v)
            for k, v in arrays.items() if isinstance(v, np.ndarray)}


def same(a, b) -> bool:
    """Bit for bit the same array (NaNs included, any dtype, any layout)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_unchanged(arrays: dict, before: dict, skip=()):
    for k, old in before.items():
        if k in skip:
            continue
        assert same(arrays[k], old), f"input {k} was modified"


# --- one fuzz case for the functions ---------------------------------------------------------

EPS_VALUES = [0.0, 1e-5, 1e-5, 1e-3, 0.1, 1, np.float32(1e-3), 1e-300]

# The variants' arguments, one of them bad: a mask of the wrong shape (more axes than x
# without its channel axis: it broadcasts to nothing), one that is not boolean, one that
# sets no position (an error in training, where every channel needs two unmasked values;
# the empty Stats from batch_stats; nothing at all to a frozen backward), and an activation
# that is not None or "relu".
MASK_CORRUPTIONS = ["mask_shape", "mask_dtype", "mask_empty"]
BAD_ACTIVATIONS = ["gelu", "RELU", "relu ", 1, True]

@dataclass
class Case:
    shape: tuple
    axis: Any
    ax: int
    dtype: np.dtype
    layout: Layout
    style: str
    eps: Any
    gamma_kind: str
    beta_kind: str
    out_kind: str
    out_layout: Layout
    corrupt: Optional[str]
    seed: int
    extra: dict = field(default_factory=dict)


@st.composite
def cases(draw, fn: str):
    shape, axis, ax = draw(shapes())
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    out_kinds = ["none", "none", "fresh", "input", "alias"]
    if fn == "backward":
        out_kinds += ["dy", "dy_alias"]
    if fn == "batch_stats":
        out_kinds = ["none"]
    allowed = {
        "batch_stats": ["x_dtype", "axis_range", "axis_type", "x_masked"] + MASK_CORRUPTIONS,
        "forward_train": ["x_dtype", "axis_range", "axis_type", "gamma_shape", "gamma_dtype",
                          "beta_shape", "eps", "out_shape", "out_dtype", "out_type", "x_masked",
                          "activation"] + MASK_CORRUPTIONS,
        "forward_eval": ["x_dtype", "axis_range", "axis_type", "gamma_shape", "beta_shape",
                         "eps", "out_shape", "out_dtype", "out_type", "mean_shape",
                         "var_negative", "x_masked", "activation"],
        "backward": ["x_dtype", "axis_range", "axis_type", "gamma_shape", "gamma_dtype", "eps",
                     "out_shape", "out_dtype", "out_type", "mean_shape", "var_negative",
                     "dy_shape", "dy_dtype", "st_type", "x_masked",
                     "activation"] + MASK_CORRUPTIONS,
    }[fn]
    corrupt = draw(st.none() | st.none() | st.none() | st.sampled_from(allowed))
    return Case(
        shape=shape,
        axis=axis,
        ax=ax,
        dtype=dtype,
        layout=draw(layouts(len(shape))),
        style=draw(st.sampled_from(STYLES)),
        eps=draw(st.sampled_from(EPS_VALUES)),
        gamma_kind=draw(st.sampled_from(VEC_KINDS)),
        beta_kind=draw(st.sampled_from(VEC_KINDS)),
        out_kind=draw(st.sampled_from(out_kinds)),
        out_layout=draw(layouts(len(shape), allow_readonly=False, allow_swapped=False)),
        corrupt=corrupt,
        seed=draw(st.integers(0, 2**32 - 1)),
        extra={
            "training": draw(st.booleans()),
            "st_form": draw(st.sampled_from(["stats", "tuple", "list", "pair", "object"])),
            "dy_layout": draw(layouts(len(shape))),
            "bad_dtype": draw(st.sampled_from(BAD_DTYPES)),
            "other_dtype": draw(st.sampled_from([d for d in FLOAT_DTYPES if d != dtype])),
            "bad_eps": draw(st.sampled_from([-1e-5, float("nan"), float("inf"), -float("inf")])),
            "bad_activation": draw(st.sampled_from(BAD_ACTIVATIONS)),
            "mask_dtype": draw(st.sampled_from([np.int8, np.uint8, np.float32, np.int64])),
        },
    )


class _StatsObject:
    def __init__(self, mean, var):
        self.mean, self.var = mean, var


def run_case(fn: str, case: Case) -> None:
    rng = np.random.default_rng(case.seed)
    shape, ax, dt, bad = case.shape, case.ax, case.dtype, case.corrupt
    c = shape[ax]
    n = math.prod(s for i, s in enumerate(shape) if i != ax)
    axis = case.axis
    errors: set = set()

    # x, and dy for backward
    xv = make_values(rng, shape, ax, dt, case.style)
    x = materialize(xv, dt, case.layout, ax)
    xv = np.array(x, np.float64)  # the values as stored (a broadcast layout repeats some)
    dy = None
    if fn == "backward":
        dyv = make_values(rng, shape, ax, dt, rng.choice(["normal", "integers", "wide"]))
        dy = materialize(dyv, dt, case.extra["dy_layout"], ax)

    if bad == "x_dtype":
        bd = case.extra["bad_dtype"]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = np.asarray(x).astype(bd)
        errors.add("x")
    if bad == "x_masked":       # numpy.ma: the mask would be ignored, so refused
        x = np.ma.masked_array(np.asarray(x), mask=rng.random(shape) < 0.3)
        errors.add("x")
    if bad == "axis_range":
        axis = len(shape) + int(rng.integers(0, 3)) if rng.random() < 0.5 else -len(shape) - 1
        errors.add("axis")
    if bad == "axis_type":
        axis = float(case.ax)
        errors.add("axis")
    if bad == "dy_shape":
        wrong = shape + (1,) if rng.random() < 0.5 else shape[:-1] + (shape[-1] + 1,)
        dy = np.zeros(wrong, dt)
        errors.add("dy")
    if bad == "dy_dtype":
        other = case.extra["other_dtype"] if rng.random() < 0.5 else case.extra["bad_dtype"]
        dy = np.asarray(dy).astype(other)
        errors.add("dy")

    # per-channel vectors
    g64 = rng.uniform(-2, 2, c) * (rng.random(c) > 0.1)
    b64 = rng.uniform(-2, 2, c)
    gamma = as_kind(g64, case.gamma_kind)
    beta = as_kind(b64, case.beta_kind)
    if bad == "gamma_shape":
        gamma = np.ones(c + 1) if rng.random() < 0.5 else np.ones((c, 1))
        errors.add("gamma")
    if bad == "gamma_dtype":
        gamma = np.ones(c, complex) if rng.random() < 0.5 else np.array(["a"] * c, dtype=str)
        errors.add("gamma")
    if bad == "beta_shape":
        beta = np.ones(max(c - 1, 0) if c > 1 else 2)
        errors.add("beta")
    eps = case.eps
    if bad == "eps":
        eps = case.extra["bad_eps"]
        errors.add("eps")

    # the variants' arguments (passed only when corrupted)
    variant = {}
    mask_shape = tuple(s for i, s in enumerate(shape) if i != ax)
    if bad == "mask_shape":
        variant["mask"] = np.ones(mask_shape + (2,) if rng.random() < 0.5 else shape, bool)
        errors.add("mask")
    if bad == "mask_dtype":
        variant["mask"] = np.ones(mask_shape, case.extra["mask_dtype"])
        errors.add("mask")
    if bad == "mask_empty":
        variant["mask"] = np.zeros(mask_shape, bool)
        if fn == "forward_train" or (fn == "backward" and case.extra["training"]):
            errors.add("mask")
    if bad == "activation":
        variant["activation"] = case.extra["bad_activation"]
        errors.add("activation")

    rst = exact_stats(xv, ax) if c and n else None
    mean = var = None
    if fn in ("forward_eval", "backward"):
        if fn == "backward" and case.extra["training"]:
            mean, var = (rst.mean, rst.var) if rst is not None else (np.zeros(c), np.ones(c))
        else:
            base_m = np.zeros(c) if rst is None else np.where(np.isfinite(rst.mean), rst.mean, 0)
            base_v = np.ones(c) if rst is None else np.where(np.isfinite(rst.var), rst.var, 1)
            mean = base_m + rng.standard_normal(c) * 0.1
            var = base_v * rng.uniform(0.5, 2.0, c) * (rng.random(c) > 0.1)
        mean, var = np.array(mean, np.float64), np.array(var, np.float64)
        if bad == "mean_shape":
            mean = np.zeros(c + 1)
            errors.add("mean")
        if bad == "var_negative":
            var = var.copy()
            if c:
                var[int(rng.integers(0, c))] = -1e-3
            else:
                var = np.ones(1)  # wrong shape instead
            errors.add("var")

    st_arg = None
    if fn == "backward":
        form = case.extra["st_form"]
        st_arg = {
            "stats": lambda: bn.Stats(mean, var, n),
            "tuple": lambda: (mean, var, n),
            "list": lambda: [mean, var],
            "pair": lambda: (mean, var),
            "object": lambda: _StatsObject(mean, var),
        }[form]()
        if bad == "st_type":
            st_arg = 5 if rng.random() < 0.5 else (mean,)
            errors.add("st")

    # natural errors, predicted from the (valid) arguments
    x_ok = "x" not in errors and "axis" not in errors
    if x_ok:
        if fn == "forward_train" and n < 2:
            errors.add("x")
        if fn == "backward" and case.extra["training"] and n < 2:
            errors.add("x")

    # out=
    out = None
    out_is = None
    if fn != "batch_stats":
        like_dt = dt
        kind = case.out_kind
        if kind == "fresh":
            ov = np.full(shape, 7.0)
            out = materialize(ov, like_dt, case.out_layout, ax)
        elif kind == "input":
            out, out_is = x, "x"
        elif kind == "alias":
            out, out_is = (x[::-1] if isinstance(x, np.ndarray) else x), "x"
        elif kind == "dy":
            out, out_is = dy, "dy"
        elif kind == "dy_alias":
            out, out_is = dy[::-1], "dy"
        if bad == "out_shape":
            out, out_is = np.full(shape + (2,), 7.0, like_dt), None
            errors.add("out")
        elif bad == "out_dtype":
            out, out_is = np.full(shape, 7.0, case.extra["other_dtype"]), None
            errors.add("out")
        elif bad == "out_type":
            out, out_is = np.full(shape, 7.0).tolist(), None
            errors.add("out")
        elif isinstance(out, np.ndarray):
            # a valid-looking out may still be unusable: read-only or non-native
            if out.shape == shape and (not out.flags.writeable or out.dtype != dt):
                errors.add("out")
            if out_is is not None and out.shape != shape:
                errors.add("out")
            if out_is == "dy" and (not isinstance(dy, np.ndarray) or dy.dtype != dt):
                errors.add("out")

    inputs = {"x": x, "dy": dy, "gamma": gamma, "beta": beta, "mean": mean, "var": var}
    inputs = {k: v for k, v in inputs.items() if isinstance(v, np.ndarray)}
    before = snapshot(inputs)
    out_before = np.array(out, copy=True) if isinstance(out, np.ndarray) else None

    call = {
        "batch_stats": lambda: bn.batch_stats(x, axis=axis, **variant),
        "forward_train": lambda: bn.forward_train(x, gamma, beta, axis=axis, eps=eps, out=out,
                                                  **variant),
        "forward_eval": lambda: bn.forward_eval(x, mean, var, gamma, beta, axis=axis, eps=eps,
                                                out=out, **variant),
        "backward": lambda: bn.backward(dy, x, st_arg, gamma, axis=axis, eps=eps,
                                        training=case.extra["training"], out=out, **variant),
    }[fn]
    with np.errstate(all="ignore"):
        result = call_expecting(call, errors, fn)

    if errors:
        assert_unchanged(inputs, before)
        if out_before is not None:
            assert same(out, out_before), "out changed on an error"
        return

    # the call succeeded: inputs untouched (except what out overwrote)
    skip = {out_is} if out_is else set()
    assert_unchanged(inputs, before, skip=skip)
    xr = before["x"]  # the input values as they were
    g = as_f64(gamma)
    b = as_f64(beta)
    eps_f = float(eps)

    if fn == "batch_stats" and bad == "mask_empty":    # no position counts: the empty Stats
        s = result
        assert isinstance(s, bn.Stats) and s.mean.shape == (c,) and s.var.shape == (c,)
        assert not s.mean.any() and not s.var.any()
        assert s.count.dtype == np.int64 and np.array_equal(s.count, np.zeros(c, np.int64))
        return
    if fn == "batch_stats":
        s = result
        assert isinstance(s, bn.Stats) and s.count == n
        assert s.mean.dtype == F64 and s.var.dtype == F64 and s.mean.shape == (c,)
        if n == 0:      # an empty batch: the neutral element of merge_stats
            assert not s.mean.any() and not s.var.any()
        elif c:
            bm, bv = stats_bounds(xr, ax, dt)
            check_close(s.mean, rst.mean, bm, "mean")
            check_close(s.var, rst.var, bv, "var")
            assert not (s.var < 0).any(), "negative variance"
            if n:  # docs/numerics.rst: a constant channel has variance exactly 0
                const = constant_channels(xr, ax)
                assert (s.var[const] == 0).all(), "a constant channel has a non-zero variance"
        return

    if fn == "forward_train":
        y, s = result
        assert out is None or y is out
        assert s.count == n and s.mean.shape == (c,) and s.var.shape == (c,)
        if c == 0:
            assert y.shape == shape and y.dtype == dt
            return
        bm, bv = stats_bounds(xr, ax, dt)
        check_close(s.mean, rst.mean, bm, "mean")
        check_close(s.var, rst.var, bv, "var")
        ry = quiet_reference(ref.forward_eval, xr, rst.mean, rst.var, g, b, axis=ax, eps=eps_f)
        # A constant channel has variance exactly 0 and gives beta exactly (conventions.md,
        # docs/numerics.rst), eps = 0 included.
        cs = _cshape(len(shape), ax)
        const = constant_channels(xr, ax)
        assert (s.var[const] == 0).all(), "a constant channel has a non-zero variance"
        if const.any():
            m = np.broadcast_to(const.reshape(cs), shape)
            beta_t = np.broadcast_to(_vec(b, c, 0.0).astype(dt).reshape(cs), shape)
            yy = np.asarray(y, np.float64)
            bb = np.asarray(beta_t, np.float64)
            bad = m & ~(yy == bb)
            assert not bad.any(), (
                f"a constant channel does not give beta exactly: {yy[bad][:3]} "
                f"instead of {bb[bad][:3]}"
            )
            ry = np.where(m, 0.0, ry)
            y = np.where(m, 0.0, yy).astype(dt)
        check_close(y, ry, forward_bound(xr, ax, rst.mean, rst.var, g, b, eps_f, dt, True), "y",
                    dtype=dt)
        return

    if fn == "forward_eval":
        y = result
        assert out is None or y is out
        if c == 0:
            assert y.shape == shape and y.dtype == dt
            return
        ry = quiet_reference(ref.forward_eval, xr, mean, var, g, b, axis=ax, eps=eps_f)
        check_close(y, ry, forward_bound(xr, ax, mean, var, g, b, eps_f, dt), "y", dtype=dt)
        return

    # backward
    dx, dg, db = result
    training = case.extra["training"]
    assert out is None or dx is out
    assert dg.dtype == F64 and db.dtype == F64 and dg.shape == (c,) and db.shape == (c,)
    dyr = before["dy"]
    if c == 0:
        assert dx.shape == shape and dx.dtype == dt
        return
    rdx, rdg, rdb = quiet_reference(ref.backward, dyr, xr, (mean, var), g, axis=ax, eps=eps_f,
                                    training=training)
    check_close(dx, rdx, backward_bound(dyr, xr, ax, mean, var, g, eps_f, dt, training), "dx",
                dtype=dt)
    sg, sb = param_grad_bounds(dyr, xr, ax, mean, var, eps_f, dt)
    check_close(dg, rdg, sg, "dgamma")
    check_close(db, rdb, sb, "dbeta")


# --- the function fuzz tests -----------------------------------------------------------------

ISAS = _kernels.available_isas()


def on_isa(isa: str, run, *args) -> None:
    """Run on one kernel set (baseline, avx2, ...), restoring the active one afterwards."""
    before = _kernels.active_isa()
    _kernels.set_isa(isa)
    try:
        run(*args)
    finally:
        _kernels.set_isa(before)



@fuzz_settings(300)
@hypothesis.given(case=cases("batch_stats"), isa=st.sampled_from(ISAS))
def test_fuzz_batch_stats(case, isa):
    on_isa(isa, run_case, "batch_stats", case)


@fuzz_settings(500)
@hypothesis.given(case=cases("forward_train"), isa=st.sampled_from(ISAS))
def test_fuzz_forward_train(case, isa):
    on_isa(isa, run_case, "forward_train", case)


@fuzz_settings(400)
@hypothesis.given(case=cases("forward_eval"), isa=st.sampled_from(ISAS))
def test_fuzz_forward_eval(case, isa):
    on_isa(isa, run_case, "forward_eval", case)


@fuzz_settings(600)
@hypothesis.given(case=cases("backward"), isa=st.sampled_from(ISAS))
def test_fuzz_backward(case, isa):
    on_isa(isa, run_case, "backward", case)


# --- the layer: a few steps against a float64 model --------------------------------------------


def _layer_accepts(dt) -> bool:
    try:
        bn.BatchNorm(1, dtype=dt)
    except TypeError:
        return False
    return True


LAYER_DTYPES = tuple(dt for dt in FLOAT_DTYPES if _layer_accepts(dt))


@st.composite
def layer_steps(draw, ndim: int, ax: int, c: int):
    shape = [draw(st.sampled_from(DIM_SIZES[:-2])) for _ in range(ndim)]
    corrupt_c = draw(st.integers(0, 15)) == 0
    shape[ax] = c + 1 if corrupt_c else c
    while math.prod(shape) > MAX_ELEMS // 4:
        i = max((i for i in range(ndim) if i != ax), key=lambda i: shape[i])
        shape[i] //= 2
    return {
        "train": draw(st.booleans()),
        "shape": tuple(shape),
        "dtype": draw(st.sampled_from(FLOAT_DTYPES)),
        "layout": draw(layouts(ndim)),
        "style": draw(st.sampled_from(["normal", "normal", "offset", "constant", "nonfinite",
                                       "extreme"])),
        # under np.errstate(all="raise") and warnings turned into errors
        "strict": draw(st.integers(0, 3)) == 0,
        "in_place": draw(st.integers(0, 5)) == 0,
        "backward": draw(st.integers(0, 3)) > 0,
        "dy_layout": draw(layouts(ndim)),
    }


@st.composite
def layer_cases(draw):
    c = draw(st.integers(1, 24))
    ndim = draw(st.integers(2, 5))
    ax = draw(st.integers(0, ndim - 1))
    return {
        "c": c,
        "ndim": ndim,
        "ax": ax,
        "axis": ax - ndim if draw(st.booleans()) else ax,
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.1, 0.0])),
        "momentum": draw(st.sampled_from([None, 0.0, 0.1, 0.5, 1.0])),
        "affine": draw(st.booleans()),
        "track": draw(st.booleans()),
        "unbiased": draw(st.booleans()),
        "dtype": draw(st.sampled_from(LAYER_DTYPES)),
        "steps": draw(st.lists(layer_steps(ndim, ax, c), min_size=1, max_size=4)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _state_same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(
        same(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a
    )


def update_warns(state: dict, rst, n: int, momentum, unbiased: bool, ldt) -> bool:
    """Whether a training step warns and keeps its running statistics: the batch statistics
    are not finite, or the new running values overflow the layer's dtype (computed as the
    kernel does: in double, rounded once)."""
    if not (np.isfinite(rst.mean).all() and np.isfinite(rst.var).all()):
        return True
    m = 1.0 / (state["num_batches_tracked"] + 1) if momentum is None else momentum
    factor = n / (n - 1) if unbiased else 1.0
    with np.errstate(over="ignore"):
        new_mean = ((1.0 - m) * state["running_mean"].astype(np.float64) + m * rst.mean)
        new_var = ((1.0 - m) * state["running_var"].astype(np.float64)
                   + m * (rst.var * factor))
        return not (np.isfinite(new_mean.astype(ldt)).all()
                    and np.isfinite(new_var.astype(ldt)).all())


def run_layer_case(case: dict) -> None:
    import pickle

    rng = np.random.default_rng(case["seed"])
    c, ax, eps, ldt = case["c"], case["ax"], case["eps"], case["dtype"]
    layer = bn.BatchNorm(c, axis=case["axis"], eps=eps, momentum=case["momentum"],
                         affine=case["affine"], track_running_stats=case["track"],
                         unbiased_running_var=case["unbiased"], dtype=ldt)
    if case["affine"]:
        layer.gamma = rng.uniform(-2, 2, c)
        layer.beta = rng.uniform(-1, 1, c)
    lstat = max(EPS64, dt_eps(ldt))  # the layer stores its vectors in its dtype
    for step in case["steps"]:
        layer.train(step["train"])
        shape, dt = step["shape"], step["dtype"]
        xv = make_values(rng, shape, ax, dt, step["style"])
        x = materialize(xv, dt, step["layout"], ax)
        xr = np.array(x, copy=True)
        n = math.prod(s for i, s in enumerate(shape) if i != ax)
        state = layer.state_dict()
        g = None if layer.gamma is None else layer.gamma.astype(np.float64)
        b = None if layer.beta is None else layer.beta.astype(np.float64)
        batch_mode = layer.training or not case["track"]
        out = x if step["in_place"] else None
        errors = set()
        if shape[ax] != c:
            errors |= {"x", "num_features"}
        elif batch_mode and n < 2:
            errors.add("x")
        elif out is not None and (not x.flags.writeable or x.dtype != dt):
            errors.add("out")
        update = (not errors and layer.training and case["track"] and n >= 2)
        warns = update and update_warns(state, exact_stats(np.asarray(xr, np.float64), ax), n,
                                        case["momentum"], case["unbiased"], ldt)
        if step["strict"]:
            # nothing in the call may trip NumPy's error state; the one warning (non-finite
            # statistics) raised as an error leaves the whole state as it was
            with warnings.catch_warnings(), np.errstate(all="raise"):
                warnings.simplefilter("error")
                if warns:
                    with pytest.raises(RuntimeWarning, match="not finite"):
                        layer(x, out=out)
                    assert _state_same(layer.state_dict(), state), "a failed call changed the state"
                    continue
                y = call_expecting(lambda: layer(x, out=out), errors, "layer")
            caught = []
        else:
            with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
                warnings.simplefilter("always")
                y = call_expecting(lambda: layer(x, out=out), errors, "layer")
        if errors:
            assert _state_same(layer.state_dict(), state), "a failed call changed the state"
            if out is None:
                assert same(x, xr), "a failed call modified x"
            continue
        if out is None:
            assert same(x, xr), "the layer modified its input"
        else:
            assert y is out
        xf = np.asarray(xr, np.float64)
        if batch_mode:
            rst = exact_stats(xf, ax)
            mean, var = rst.mean, rst.var
        else:
            mean = state["running_mean"].astype(np.float64)
            var = state["running_var"].astype(np.float64)
        ry = quiet_reference(ref.forward_eval, xf, mean, var, g, b, axis=ax, eps=eps)
        check_close(y, ry, forward_bound(xf, ax, mean, var, g, b, eps, dt, batch_mode),
                    "layer y", dtype=dt)
        # running statistics: updated from finite batch statistics only, in the layer's dtype
        non_finite = warns
        warned = any(issubclass(w.category, RuntimeWarning) for w in caught)
        new = layer.state_dict()
        if layer.training and case["track"]:
            assert step["strict"] or warned == non_finite, (warned, non_finite)
            if non_finite:
                assert _state_same(new, state), "non-finite statistics entered the state"
            else:
                assert new["num_batches_tracked"] == state["num_batches_tracked"] + 1
                m = case["momentum"]
                m = 1.0 / new["num_batches_tracked"] if m is None else m
                bvar = var * (n / (n - 1)) if case["unbiased"] else var
                for key, bval in (("running_mean", mean), ("running_var", bvar)):
                    old = state[key].astype(np.float64)
                    want = (1 - m) * old + m * bval
                    got = new[key]
                    assert got.dtype == ldt
                    bm, _ = stats_bounds(xf, ax, dt)
                    tol = SLACK * lstat * (np.abs(old) + np.abs(bval)) + bm * (
                        1 if key == "running_mean" else 4 * _chan_max(xf, ax) * n / max(n - 1, 1)
                    )
                    check_close(got, want, tol, key)
                assert (new["running_var"] >= 0).all()
        else:
            assert _state_same(new, state), "the state changed outside training"
        if not step["backward"]:
            continue
        dyv = make_values(rng, shape, ax, dt, "normal")
        dy = materialize(dyv, dt, step["dy_layout"], ax)
        if out is not None and x.size:  # the forward overwrote its input: said so
            with pytest.raises(RuntimeError, match="out=x"):
                layer.backward(dy)
            continue
        dyr = np.array(dy, copy=True)
        with np.errstate(all="ignore"):
            dx = layer.backward(dy)
        assert same(dy, dyr) and same(x, xr), "backward modified its inputs"
        dyf = np.asarray(dyr, np.float64)
        rdx, rdg, rdb = quiet_reference(ref.backward, dyf, xf, (mean, var), g, axis=ax,
                                        eps=eps, training=batch_mode)
        check_close(dx, rdx, backward_bound(dyf, xf, ax, mean, var, g, eps, dt, batch_mode),
                    "layer dx", dtype=dt)
        if case["affine"]:
            sg, sb = param_grad_bounds(dyf, xf, ax, mean, var, eps, dt)
            assert layer.grad_gamma.dtype == ldt and layer.grad_beta.dtype == ldt
            with np.errstate(all="ignore"):
                check_close(layer.grad_gamma, rdg, sg + SLACK * dt_eps(ldt) * np.abs(rdg),
                            "grad_gamma", dtype=ldt)
                check_close(layer.grad_beta, rdb, sb + SLACK * dt_eps(ldt) * np.abs(rdb),
                            "grad_beta", dtype=ldt)
    # the state survives a pickle round trip
    clone = pickle.loads(pickle.dumps(layer))
    assert _state_same(clone.state_dict(), layer.state_dict())


@fuzz_settings(250)
@hypothesis.given(case=layer_cases(), isa=st.sampled_from(ISAS))
def test_fuzz_layer(case, isa):
    on_isa(isa, run_layer_case, case)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork exists on POSIX systems only")
def test_fuzz_layer_in_a_forked_child(threads):
    """The layer fuzz, run in a child forked after a threaded call in the parent (what data
    loaders do): the child computes (on one thread, see test_threads.py) and every case
    holds there too."""
    import time
    import traceback

    bn.set_num_threads(2)
    bn.forward_train(np.ones((256, 1024), np.float32))     # a threaded call in the parent
    pid = os.fork()
    if pid == 0:                                            # the child
        status = 1
        try:
            @fuzz_settings(40)
            @hypothesis.given(case=layer_cases(), isa=st.sampled_from(ISAS))
            def child(case, isa):
                on_isa(isa, run_layer_case, case)

            child()
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    deadline = time.monotonic() + 300
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.05)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "a case failed in the child"
