"""The compiled layers: ISA dispatch, threads, the environment, and the Cython wrappers.

The numerical sweep of every ISA path is in test_api.py (its ``isa`` fixture); here: the
dispatch itself, determinism across thread counts, OpenMP as threadpoolctl sees it, and the
Cython layer called directly and cimported from freshly compiled Cython code.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sysconfig
import textwrap

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _kernels
from batchnorm import reference as ref
from conftest import (
    assert_grad_close,
    assert_out_close,
    assert_stat_close,
    make_layout,
    make_params,
    make_x,
    python_cmd,
)


def run_python(code, env_extra=None, args=None, timeout=300, stderr=False):
    """Run `python -c code` (or `python args...`) in a clean subprocess; returns stdout.

    Every child imports batchnorm afresh (with an editable install that means a rebuild
    check), so the suite starts as few of them as it can.
    """
    env = dict(os.environ)
    for key in ("BATCHNORM_ISA", "OMP_NUM_THREADS"):
        env.pop(key, None)
    env.update(env_extra or {})
    cmd = python_cmd() + (args if args is not None else ["-c", code])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return (proc.stdout, proc.stderr) if stderr else proc.stdout


# --- ISA paths -----------------------------------------------------------------------------


def test_available_isas():
    isas = _kernels.available_isas()
    assert isas[0] == "baseline"
    assert set(isas) <= {"baseline", "avx2", "avx512", "neon"}
    assert bn.available_isas() == isas
    cfg = bn.config()
    assert cfg["isa"] in isas and cfg["available_isas"] == isas
    assert isinstance(cfg["openmp"], bool)
    assert cfg["threads"] == bn.get_num_threads()
    assert cfg["version"] == bn.__version__


def _linux_cpu_flags():
    """The CPU's feature names as Linux lists them ("flags" on x86, "Features" on arm64)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _expected_isas(flags, machine):
    """The kernel sets a CPU with these features runs, best last (meson.options' default
    build compiles every set of its CPU family)."""
    expected = ["baseline"]
    if machine in ("x86_64", "AMD64", "i686", "i386"):
        if {"avx", "avx2", "fma", "f16c"} <= flags:
            expected.append("avx2")
            if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
                expected.append("avx512")
    elif machine in ("aarch64", "arm64") and {"fp", "asimd"} <= flags:
        expected.append("neon")
    return expected


def test_expected_isas_by_cpu():
    assert _expected_isas({"avx", "avx2", "fma", "f16c"}, "x86_64") == ["baseline", "avx2"]
    assert _expected_isas({"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq",
                           "avx512vl"}, "x86_64") == ["baseline", "avx2", "avx512"]
    assert _expected_isas({"avx", "avx2", "fma"}, "x86_64") == ["baseline"]  # no F16C
    assert _expected_isas({"fp", "asimd", "fphp"}, "aarch64") == ["baseline", "neon"]
    assert _expected_isas({"avx2"}, "aarch64") == ["baseline"]


@pytest.mark.skipif(_linux_cpu_flags() is None, reason="needs Linux's /proc/cpuinfo")
def test_the_best_set_the_cpu_has_is_chosen():
    """The C core reads the CPU itself (cpuid and xgetbv on x86, the auxiliary vector on
    arm64); the kernel's own reading of the CPU (which hides what the OS does not save, such
    as AVX-512 state) must agree, set by set, and the best set is the one a fresh process
    runs."""
    expected = _expected_isas(_linux_cpu_flags(), platform.machine())
    assert _kernels.available_isas() == tuple(expected)
    assert run_python("import batchnorm as bn; print(bn.config()['isa'])").strip() == expected[-1]


def test_set_isa_switches_and_rejects_unknown_names(isa):
    assert _kernels.active_isa() == isa
    for name in ("avx512", "avx2", "neon"):
        if name not in _kernels.available_isas():
            with pytest.raises(ValueError, match=f"ISA '{name}' is not available"):
                _kernels.set_isa(name)
    with pytest.raises(ValueError, match="is not available"):
        _kernels.set_isa("sse9")
    assert _kernels.active_isa() == isa  # a refused switch changes nothing


def test_isa_paths_agree():
    """All kernel sets compute the same thing (to rounding) on a large problem."""
    rng = np.random.default_rng(20)
    x = make_x(rng, (64, 7, 19, 19), 1, np.float32)
    dy = make_x(rng, x.shape, 1, np.float32)
    gamma, beta = make_params(rng, 7)
    ry, rst = ref.forward_train(x, gamma, beta)
    rdx, rdg, rdb = ref.backward(dy, x, rst, gamma)
    original = _kernels.active_isa()
    try:
        for name in _kernels.available_isas():
            _kernels.set_isa(name)
            y, st = bn.forward_train(x, gamma, beta)
            dx, dg, db = bn.backward(dy, x, st, gamma)
            assert_out_close(y, ry, np.float32, what=f"{name} y")
            assert_grad_close(dx, rdx, np.float32, what=f"{name} dx")
            assert_stat_close(st.var, rst.var, f"{name} var")
    finally:
        _kernels.set_isa(original)


def test_environment_variable_forces_baseline():
    out = run_python(
        "import batchnorm as bn, numpy as np\n"
        "print(bn._kernels.__file__)\n"
        "print(bn.config()['isa'])\n"
        "print(bn.batch_stats(np.arange(12.0).reshape(4, 3)).mean.tolist())",
        {"BATCHNORM_ISA": "baseline"},
    )
    module, isa, mean = out.splitlines()[:3]
    assert os.path.samefile(module, _kernels.__file__)  # the child ran this very build
    assert isa == "baseline"
    assert mean == "[4.5, 5.5, 6.5]"


@pytest.mark.parametrize("name", [n for n in _kernels.available_isas() if n != "baseline"])
def test_environment_variable_forces_the_other_isas(name):
    out = run_python("import batchnorm as bn; print(bn.config()['isa'])", {"BATCHNORM_ISA": name})
    assert out.strip() == name


def test_info_command_runs():
    # an unknown BATCHNORM_ISA is said (a RuntimeWarning), and the best available path runs
    out, err = run_python(None, {"BATCHNORM_ISA": "no-such-isa"},
                          args=["-m", "batchnorm", "info"], stderr=True)
    assert "RuntimeWarning: BATCHNORM_ISA='no-such-isa' is not a kernel set" in err
    lines = dict(line.split(":", 1) for line in out.strip().splitlines())
    lines = {k.strip(): v.strip() for k, v in lines.items()}
    assert lines["isa"] == _kernels.available_isas()[-1]
    assert lines["version"] == bn.__version__
    assert lines["available_isas"] == ", ".join(_kernels.available_isas())
    assert lines["openmp"] == str(bn.config()["openmp"])
    assert int(lines["threads"]) >= 1


def test_info_via_main(capsys):
    from batchnorm.__main__ import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"isa: {_kernels.active_isa()}" in out


# --- threads -------------------------------------------------------------------------------

THREAD_CASES = [
    ((32, 8, 24, 24), 1),  # NCHW, 147456 elements
    ((2, 3, 129, 129), 1),  # NCHW with inner longer than a unit
    ((16, 24, 24, 12), -1),  # NHWC
    ((20000, 7), 1),  # (N, D)
    ((300, 600), 1),  # (N, D) with two channel blocks
    ((20, 50, 33, 33), 1),  # NCHW over several cache-sized chunks of channels
    ((16500, 70), 1),  # (N, D) over several chunks
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape, axis", THREAD_CASES, ids=lambda v: str(v))
def test_results_are_bit_identical_for_any_thread_count(shape, axis, dtype, isa, threads):
    rng = np.random.default_rng(21)
    x = make_x(rng, shape, axis, dtype)
    dy = make_x(rng, shape, axis, dtype)
    xs = make_layout(rng, shape, axis, dtype, "sliced")
    c = shape[axis]
    gamma, beta = make_params(rng, c)
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)

    def everything():
        st = bn.batch_stats(x, axis=axis)
        y, st2 = bn.forward_train(x, gamma, beta, axis=axis)
        ys, sts = bn.forward_train(xs, gamma, beta, axis=axis)
        ye = bn.forward_eval(x, mean, var, gamma, beta, axis=axis)
        dx, dg, db = bn.backward(dy, x, st, gamma, axis=axis)
        fx, fg, fb = bn.backward(dy, x, st, gamma, axis=axis, training=False)
        return [st.mean, st.var, y, st2.mean, st2.var, ys, sts.mean, sts.var, ye,
                dx, dg, db, fx, fg, fb]

    bn.set_num_threads(1)
    assert bn.get_num_threads() == 1
    expected = everything()
    ry, _ = ref.forward_train(x, gamma, beta, axis=axis)
    assert_out_close(expected[2], ry, dtype)  # and it is the right answer
    for n in (2, 3, 8):
        bn.set_num_threads(n)
        got = everything()
        for i, (a, b) in enumerate(zip(got, expected)):
            assert np.array_equal(a, b), f"result {i} differs with {n} threads"


# Shapes whose runs end in every kind of tail: planar runs (inner) of 1 to 100 elements, and
# channels-last rows of 1 to 251 channels (flat runs, row loops, 512-channel blocks).
SIMD_CASES = [((6, 5, 7, 7), 1), ((3, 4, 1, 17), 1), ((2, 3, 100), 1), ((2, 9, 15, 1), 1),
              ((40, 3), 1), ((33, 17), 1), ((5, 6, 7, 33), -1), ((9, 251), 1), ((3, 700), 1),
              ((64, 16), 1), ((2, 2, 130, 80), 1)]
SIMD_ISAS = [name for name in _kernels.available_isas() if name not in ("baseline", "avx2")]


@pytest.mark.skipif(not SIMD_ISAS, reason="this CPU has no kernel set wider than AVX2")
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("name", SIMD_ISAS or ["avx512"])
def test_wider_simd_gives_the_same_bits_as_avx2(name, dtype):
    """AVX-512 kernels (512-bit vectors, masked tails, 16 double accumulators in two
    registers) give the bits of the AVX2 kernels: every lane does the same arithmetic."""
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dtype = ml_dtypes.bfloat16
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(44)
    for shape, axis in SIMD_CASES:  # the autouse fixture restores the ISA afterwards
        x = make_x(rng, shape, axis, dtype)
        dy = make_x(rng, shape, axis, dtype, loc=1.0)
        c = shape[axis]
        gamma, beta = make_params(rng, c)
        mean, var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
        results = {}
        for isa in ("avx2", name):
            _kernels.set_isa(isa)
            st = bn.batch_stats(x, axis=axis)
            y, st2 = bn.forward_train(x, gamma, beta, axis=axis)
            ye = bn.forward_eval(x, mean, var, gamma, beta, axis=axis)
            grads = bn.backward(dy, x, st, gamma, axis=axis)
            frozen = bn.backward(dy, x, (mean, var), gamma, axis=axis, training=False)
            results[isa] = [st.mean, st.var, y, st2.mean, ye, *grads, *frozen]
        for i, (a, b) in enumerate(zip(results["avx2"], results[name])):
            assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), (
                f"result {i} of {shape} axis={axis} differs between avx2 and {name}")


def test_num_threads_semantics(threads):
    bn.set_num_threads(None)
    default = bn.get_num_threads()
    assert default >= 1
    openmp = bn.config()["openmp"]
    for n in (1, 3, np.int64(2)):
        bn.set_num_threads(n)
        assert bn.get_num_threads() == (int(n) if openmp else 1)
        assert bn.config()["threads"] == bn.get_num_threads()
    bn.set_num_threads(None)
    assert bn.get_num_threads() == default
    bn.set_num_threads(2)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="positive integer number of threads or None"):
            bn.set_num_threads(bad)
        assert bn.get_num_threads() == (2 if openmp else 1)  # unchanged
    with pytest.raises(TypeError):
        bn.set_num_threads(1.5)


def test_omp_num_threads_and_threadpoolctl():
    """The default thread count is OpenMP's, and threadpoolctl sees and limits the pool.

    In a process that loads nothing else with OpenMP (torch would), the pool is ours.
    """
    out = run_python(
        textwrap.dedent(
            """
            import batchnorm as bn
            from threadpoolctl import threadpool_info, threadpool_limits
            print(bn.config()["openmp"], bn.get_num_threads())
            pools = [p for p in threadpool_info() if p["user_api"] == "openmp"]
            print(len(pools))
            with threadpool_limits(limits=1, user_api="openmp"):
                print(bn.get_num_threads())
            """
        ),
        {"OMP_NUM_THREADS": "3"},
    )
    first, npools, limited = out.splitlines()[:3]
    openmp, default = first.split()
    assert openmp == str(bn.config()["openmp"])
    if openmp == "True":
        assert int(default) == 3  # OMP_NUM_THREADS
        assert int(npools) >= 1  # a build without OpenMP has no pool to see
    else:
        assert int(default) == 1
    # threadpoolctl's limit reaches the kernels' default thread count (always 1 without OpenMP)
    assert int(limited) == 1


# --- the Cython layer called directly -------------------------------------------------------


def test_cython_layer_exports_its_typed_functions():
    capi = getattr(_kernels, "__pyx_capi__", {})
    for op in ("stats", "forward_train", "forward_eval", "backward"):
        for t in ("f32", "f64", "f16", "bf16"):
            assert f"{op}_{t}" in capi


CIMPORT_SOURCE = """
# cython: language_level=3
from batchnorm cimport _kernels

def stats_f64(const double[:, :, :] x, double[::1] mean, double[::1] var):
    cdef int rc
    with nogil:
        rc = _kernels.stats_f64(x, mean, var)
    return rc

def forward_train_f32(const float[:, :, :] x, float[:, :, :] y, double[::1] gamma,
                      double[::1] beta, double eps, double[::1] mean, double[::1] var):
    cdef int rc
    with nogil:
        rc = _kernels.forward_train_f32(x, y, gamma, beta, eps, mean, var)
    return rc

def backward_f64(const double[:, :, :] dy, const double[:, :, :] x, double[:, :, :] dx,
                 double[::1] mean, double[::1] var, double eps,
                 double[::1] dgamma, double[::1] dbeta):
    cdef int rc
    with nogil:
        rc = _kernels.backward_f64(dy, x, dx, mean, var, None, eps, True, dgamma, dbeta)
    return rc
"""


def test_cimport_from_other_cython_code(tmp_path):
    """`from batchnorm cimport _kernels` works in a separately compiled module, without the GIL."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the cimporting module")
    pytest.importorskip("Cython")
    pxd_root = os.path.dirname(os.path.dirname(os.path.abspath(bn.__file__)))
    assert os.path.exists(os.path.join(pxd_root, "batchnorm", "_kernels.pxd"))
    pyx = tmp_path / "bn_cimport_user.pyx"
    pyx.write_text(CIMPORT_SOURCE)
    c_file = tmp_path / "bn_cimport_user.c"
    subprocess.run(
        python_cmd() + ["-m", "cython", "-3", "-I", pxd_root, str(pyx), "-o", str(c_file)],
        check=True, capture_output=True, timeout=120,
    )
    so = tmp_path / ("bn_cimport_user" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O0", "-I", sysconfig.get_paths()["include"], str(c_file),
         "-o", str(so)],
        check=True, capture_output=True, timeout=120,
    )
    spec = importlib.util.spec_from_file_location("bn_cimport_user", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    rng = np.random.default_rng(23)
    x = make_x(rng, (6, 3, 5), 1, np.float64)
    mean, var = np.empty(3), np.empty(3)
    assert mod.stats_f64(x, mean, var) == 0
    rst = ref.batch_stats(x)
    assert_stat_close(mean, rst.mean)
    assert_stat_close(var, rst.var)

    x32 = x.astype(np.float32)
    y = np.empty_like(x32)
    gamma, beta = make_params(rng, 3)
    m32, v32 = np.empty(3), np.empty(3)
    assert mod.forward_train_f32(x32, y, gamma, beta, 1e-5, m32, v32) == 0
    assert_out_close(y, ref.forward_train(x32, gamma, beta)[0], np.float32)

    dy = make_x(rng, x.shape, 1, np.float64)
    dx, dg, db = np.empty_like(x), np.empty(3), np.empty(3)
    assert mod.backward_f64(dy, x, dx, mean, var, 1e-5, dg, db) == 0
    rdx, rdg, rdb = ref.backward(dy, x, rst)
    assert_grad_close(dx, rdx, np.float64)
    assert_stat_close(dg, rdg)
    assert_stat_close(db, rdb)
    # dx=None: only the parameter gradients (the C core takes dx == NULL)
    dg2, db2 = np.empty(3), np.empty(3)
    assert mod.backward_f64(dy, x, None, mean, var, 1e-5, dg2, db2) == 0
    assert np.array_equal(dg2, dg) and np.array_equal(db2, db)


# Outputs of 16 MB or more are written with non-temporal stores (bn_c/src/internal.h,
# BN_STREAM_MIN_BYTES) on runs that are long or aligned whole vectors; everything else with
# ordinary stores. Both must give the same bits.
STREAM_CASES = [((2, 8, 512, 520), 1), ((2, 520, 512, 8), -1), ((2, 150, 256, 56), -1)]


def _out_at(shape, offset_bytes):
    """An uninitialised float32 array whose data starts offset_bytes past a 64-byte boundary."""
    n = int(np.prod(shape))
    buf = np.empty(n + 32, np.float32)
    start = (-buf.ctypes.data % 64 + offset_bytes) // 4
    return buf[start:start + n].reshape(shape)


@pytest.mark.parametrize("shape, axis", STREAM_CASES, ids=["nchw", "nhwc-c8", "nhwc-c56"])
def test_streamed_outputs_match_cached_ones(shape, axis, isa, threads):
    """Elementwise passes give the same bits on a large output (streamed where the runs allow)
    as on each half of it (too small to stream), into aligned and misaligned out= (heads
    written with ordinary stores), for 1 and 2 threads."""
    rng = np.random.default_rng(30)
    x = (rng.normal(size=shape) + 2.0).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    assert x.nbytes >= 16 << 20 and x[:1].nbytes < 16 << 20
    c = shape[axis]
    mean, var = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    halves_y = np.concatenate([bn.forward_eval(x[k:k + 1], mean, var, gamma, beta, axis=axis)
                               for k in range(2)])
    halves_dx = np.concatenate([bn.backward(dy[k:k + 1], x[k:k + 1], (mean, var), gamma,
                                            axis=axis, training=False)[0] for k in range(2)])
    for offset in (0, 4, 16, 32):  # 32: aligned for 256-bit stores, not for 512-bit ones
        out = _out_at(shape, offset)
        for nthreads in (1, 2):
            bn.set_num_threads(nthreads)
            bn.forward_eval(x, mean, var, gamma, beta, axis=axis, out=out)
            assert np.array_equal(out, halves_y)
            dx = bn.backward(dy, x, (mean, var), gamma, axis=axis, training=False, out=out)[0]
            assert np.array_equal(dx, halves_dx)
            # training: the forward equals inference with the batch's own statistics, and the
            # backward matches the float64 reference
            y, st = bn.forward_train(x, gamma, beta, axis=axis, out=out)
            assert np.array_equal(y, bn.forward_eval(x, st.mean, st.var, gamma, beta,
                                                     axis=axis))
            dx, _, _ = bn.backward(dy, x, st, gamma, axis=axis, out=out)
            dx_ref, _, _ = ref.backward(dy, x, st, gamma, axis=axis)
            assert np.abs(dx - dx_ref).max() < 1e-5 * np.abs(dx_ref).max()
