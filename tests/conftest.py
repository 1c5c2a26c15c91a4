"""Shared fixtures and helpers for the batchnorm test suite.

Helpers are plain functions (import them with ``from conftest import ...``); fixtures:

* ``isa``: runs the test once per kernel set this machine has, restoring the original one.
* ``threads``: restores the thread count after a test that changes it.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _kernels

# Keras picks its backend once, at import: the tests use the NumPy backend, the one that
# batchnorm.keras.install() serves (set before any test module imports keras).
os.environ["KERAS_BACKEND"] = "numpy"

DTYPES = (np.float32, np.float64)

# Output tolerances, as max|got - ref| / max(1, max|ref|) (float32 rounding of a O(1) output
# is ~6e-8; the kernels' own error is well below these).
OUT_TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
# Statistics and parameter gradients are accumulated in float64 for both storage types.
STAT_TOL = 1e-12


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(params=_kernels.available_isas())
def isa(request):
    """Each ISA path this CPU and build can run; the active one is restored afterwards."""
    original = _kernels.active_isa()
    _kernels.set_isa(request.param)
    assert bn.config()["isa"] == request.param
    try:
        yield request.param
    finally:
        _kernels.set_isa(original)


@pytest.fixture
def threads():
    """Restore the default thread count after the test."""
    try:
        yield
    finally:
        bn.set_num_threads(None)


@pytest.fixture(autouse=True)
def _restore_global_state():
    """No test leaks a forced ISA or thread count into the next one."""
    isa_before = _kernels.active_isa()
    yield
    if _kernels.active_isa() != isa_before:
        _kernels.set_isa(isa_before)
    bn.set_num_threads(None)


# --- subprocesses -------------------------------------------------------------------------


def python_cmd() -> list:
    """The interpreter running the tests, with the flags that change what it imports.

    A child started with plain ``sys.executable`` could pick up another build of batchnorm
    (e.g. when the suite runs under ``python -S`` with a PYTHONPATH of its own).
    """
    flags = []
    if sys.flags.no_site:
        flags.append("-S")
    if sys.flags.no_user_site:
        flags.append("-s")
    if sys.flags.isolated:
        flags.append("-I")
    return [sys.executable] + flags


# --- data ---------------------------------------------------------------------------------


def channel_shape(ndim: int, axis: int, c: int = -1) -> list:
    shape = [1] * ndim
    shape[axis % ndim] = c
    return shape


def make_x(rng, shape, axis, dtype, loc=3.0):
    """Random data whose channels differ in mean and spread (a channel mix-up shows)."""
    c = shape[axis % len(shape)]
    cs = channel_shape(len(shape), axis)
    means = rng.uniform(-loc, loc, c).reshape(cs)
    scales = rng.uniform(0.5, 2.0, c).reshape(cs)
    return (rng.standard_normal(shape) * scales + means).astype(dtype)


def make_params(rng, c):
    """gamma (some entries negative) and beta, float64 vectors of length c."""
    gamma = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
    beta = rng.uniform(-1.0, 1.0, c)
    return gamma, beta


# --- layouts -------------------------------------------------------------------------------

LAYOUTS = ("C", "F", "sliced", "negative", "transposed", "readonly", "broadcast")


def _swappable_pair(shape, axis):
    """Two adjacent non-channel dims (both > 1) on the same side of the channel axis."""
    ax = axis % len(shape)
    for i in range(len(shape) - 1):
        if ax not in (i, i + 1) and shape[i] > 1 and shape[i + 1] > 1:
            return i
    return None


def layout_possible(shape, axis, kind) -> bool:
    if kind == "transposed":
        return _swappable_pair(shape, axis) is not None
    if kind == "broadcast":
        return _broadcast_dim(shape, axis) is not None
    return True


def _broadcast_dim(shape, axis):
    """A non-channel dim > 1 to broadcast along, leaving more than one value per channel."""
    ax = axis % len(shape)
    for i, n in enumerate(shape):
        if i != ax and n > 1 and count_per_channel(shape, axis) // n >= 2:
            return i
    return None


def make_layout(rng, shape, axis, dtype, kind):
    """Random data of `shape` in memory layout `kind` (see LAYOUTS)."""
    shape = tuple(shape)
    if kind == "C":
        x = make_x(rng, shape, axis, dtype)
        assert x.flags.c_contiguous
    elif kind == "F":
        x = np.asfortranarray(make_x(rng, shape, axis, dtype))
    elif kind == "sliced":
        base = make_x(rng, shape[:-1] + (2 * shape[-1],), axis, dtype)
        x = base[..., ::2]
    elif kind == "negative":
        x = make_x(rng, shape, axis, dtype)[::-1, ..., ::-1]
        assert min(x.strides) < 0
    elif kind == "transposed":
        i = _swappable_pair(shape, axis)
        perm = list(range(len(shape)))
        perm[i], perm[i + 1] = perm[i + 1], perm[i]
        base_shape = tuple(shape[p] for p in perm)
        base_axis = perm.index(axis % len(shape))
        x = make_x(rng, base_shape, base_axis, dtype).swapaxes(i, i + 1)
        # the point of this layout: no strided (outer, C, inner) view exists, the copy path runs
        assert _kernels.canonical_view(x, axis % len(shape)) is None
    elif kind == "readonly":
        x = make_x(rng, shape, axis, dtype)
        x.flags.writeable = False
    elif kind == "broadcast":
        d = _broadcast_dim(shape, axis)
        small = list(shape)
        small[d] = 1
        x = np.broadcast_to(make_x(rng, tuple(small), axis, dtype), shape)
        assert x.strides[d] == 0 and not x.flags.writeable
    else:
        raise AssertionError(kind)
    assert x.shape == shape and x.dtype == np.dtype(dtype)
    return x


# --- comparisons --------------------------------------------------------------------------


def rel_err(got, ref, scale=None) -> float:
    """max|got - ref| / scale, scale = max(1, max|ref|) unless given."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if ref.size == 0:
        return 0.0
    if scale is None:
        scale = max(1.0, float(np.abs(ref).max()))
    return float(np.abs(got - ref).max()) / scale


def assert_out_close(got, ref, dtype, *, scale=None, what="output", tol=None):
    """An array output of dtype `dtype` matches the float64 reference within its rounding."""
    assert got.dtype == np.dtype(dtype), f"{what}: dtype {got.dtype}, expected {dtype}"
    tol = OUT_TOL[np.dtype(dtype)] if tol is None else tol
    e = rel_err(got, ref, scale)
    assert e <= tol, f"{what}: relative error {e:.3g} > {tol:g}"


def assert_grad_close(got, ref, dtype, what="dx", tol=None):
    """dx normalized by max|ref dx| (it may be far below 1)."""
    scale = float(np.abs(np.asarray(ref)).max()) if np.size(ref) else 1.0
    assert_out_close(got, ref, dtype, scale=scale if scale > 0 else 1.0, what=what, tol=tol)


def assert_stat_close(got, ref, what="stat", tol=STAT_TOL, scale=None):
    """A float64 vector (statistic or parameter gradient) matches the reference."""
    got = np.asarray(got)
    assert got.dtype == np.float64, f"{what}: dtype {got.dtype}, expected float64"
    e = rel_err(got, ref, scale)
    assert e <= tol, f"{what}: relative error {e:.3g} > {tol:g}"


def param_grad_scales(dy, x, mean, var, axis, eps=1e-5):
    """Condition scales of dgamma and dbeta: the largest per-channel sum of |term|.

    A sum of many terms that cancel is only as accurate as the sum of their magnitudes.
    """
    dy = np.asarray(dy, np.float64)
    x = np.asarray(x, np.float64)
    cs = channel_shape(x.ndim, axis)
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    xhat = (x - np.reshape(mean, cs)) / np.sqrt(np.reshape(var, cs) + eps)
    sg = float(np.abs(dy * xhat).sum(axis=red).max()) if dy.size else 0.0
    sb = float(np.abs(dy).sum(axis=red).max()) if dy.size else 0.0
    return max(1.0, sg), max(1.0, sb)


def assert_unchanged(arrays, copies):
    for i, (a, c) in enumerate(zip(arrays, copies)):
        assert np.array_equal(a, c, equal_nan=True), f"input {i} was modified"


def count_per_channel(shape, axis) -> int:
    return math.prod(d for i, d in enumerate(shape) if i != axis % len(shape))


# --- optional integrations ----------------------------------------------------------------


def require(module: str, extra: str = "test"):
    """Import an optional test dependency (mpi4py, dask, ...), or skip the test without it.

    ``extra`` names the group it comes from (an extra of pyproject.toml, or "torch", which
    CI installs on its own). CI installs them and sets BATCHNORM_TEST_REQUIRE_EXTRAS, which
    turns a missing one into a failure, so the tests of an integration never skip silently
    there: "1" requires every group, a comma-separated list ("test") only those named.
    """
    import importlib

    if extra_required(extra):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"needs {module} (the {extra!r} extra)")


def extra_required(extra: str = "test") -> bool:
    """Whether CI requires the group ``extra`` here (see :func:`require`)."""
    import os

    required = os.environ.get("BATCHNORM_TEST_REQUIRE_EXTRAS", "")
    return required == "1" or extra in required.split(",")
