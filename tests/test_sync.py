"""SyncBatchNorm (batchnorm._sync): the statistics and gradients of a batch split over ranks.

Two kinds of ranks: threads of this process joined by a small in-process communicator
(``ThreadComm``: mpi4py's Allgather, Get_size and Get_rank over a barrier, and a count of
the collectives), which lets every case run fast and shows hangs as barrier timeouts; and
real MPI processes started with the ``mpiexec`` of the ``mpich`` wheel, running
``mpi_sync_ranks.py`` (every rank checks its rows against one process on the whole batch).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import batchnorm as bn
from conftest import extra_required, python_cmd, require

HERE = Path(__file__).resolve().parent


class _Shared:
    def __init__(self, size):
        self.size = size
        self.slots = [None] * size
        self.barrier = threading.Barrier(size)
        self.calls = [0] * size


class ThreadComm:
    """Rank `rank` of `shared.size` threads: mpi4py's buffer Allgather, in process."""

    def __init__(self, shared, rank):
        self.shared, self.rank = shared, rank

    def Get_size(self):
        return self.shared.size

    def Get_rank(self):
        return self.rank

    def Allgather(self, send, recv):
        sh = self.shared
        sh.calls[self.rank] += 1
        sh.slots[self.rank] = np.array(send, copy=True)
        sh.barrier.wait(timeout=20)     # a rank that never comes: BrokenBarrierError
        for r in range(sh.size):
            recv[r] = sh.slots[r]
        sh.barrier.wait(timeout=20)


def run_ranks(size, fn):
    """fn(comm) on `size` threads; returns ([result or exception per rank], calls per rank)."""
    shared, results = _Shared(size), [None] * size

    def run(rank):
        try:
            results[rank] = fn(ThreadComm(shared, rank))
        except BaseException as e:  # noqa: BLE001 (reported per rank)
            results[rank] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, shared.calls


def ok(results):
    for r, res in enumerate(results):
        if isinstance(res, BaseException):
            raise AssertionError(f"rank {r} raised {res!r}") from res
    return results


def _rows(sizes):
    edges = np.cumsum([0] + list(sizes))
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


LAYOUTS = [((4,), 1), ((3, 2, 2), 1), ((2, 3, 3), -1)]   # per-row shape, channel axis


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("sizes", [(6,), (4, 4), (5, 0, 6), (1, 1), (0, 3, 1, 2)])
@pytest.mark.parametrize("row, axis", LAYOUTS)
def test_sync_equals_one_process_on_the_whole_batch(dtype, sizes, row, axis):
    rng = np.random.default_rng(len(sizes))
    X = rng.normal(2.0, 3.0, size=(sum(sizes),) + row).astype(dtype)
    DY = rng.normal(size=X.shape).astype(dtype)
    C = X.shape[axis]
    kw = dict(axis=axis, momentum=0.3, dtype=np.float64)
    gamma, beta = rng.normal(size=C), rng.normal(size=C)
    ref = bn.BatchNorm(C, **kw)
    ref.gamma, ref.beta = gamma, beta
    steps = []
    for step in range(2):                  # two steps: the running statistics compound
        Xs = X * (step + 1)
        steps.append((Xs, ref(Xs), ref.backward(DY), ref.grad_gamma, ref.grad_beta))

    def rank(comm):
        layer = bn.SyncBatchNorm(C, comm, **kw)
        layer.gamma, layer.beta = gamma, beta
        part = _rows(sizes)[comm.Get_rank()]
        out = []
        for Xs, *_ in steps:
            y = layer(Xs[part])
            out.append((y, layer.backward(DY[part]), layer.grad_gamma, layer.grad_beta))
        return out, layer.state_dict()

    results, calls = run_ranks(len(sizes), rank)
    ok(results)
    assert calls == [1 + 2 * 2] * len(sizes)      # the constructor, then one per call
    tol = 1e-12 if dtype == np.float64 else 2e-6
    for k, (Xs, y_ref, dx_ref, gg_ref, gb_ref) in enumerate(steps):
        scale = max(1.0, np.abs(y_ref).max())
        for r, part in enumerate(_rows(sizes)):
            y, dx, _, _ = results[r][0][k]
            assert y.dtype == dtype and y.shape == y_ref[part].shape
            assert np.abs(y - y_ref[part]).max(initial=0) <= tol * scale
            dx_scale = max(1.0, np.abs(dx_ref).max())
            assert np.abs(dx - dx_ref[part]).max(initial=0) <= tol * dx_scale
        gg = sum(results[r][0][k][2] for r in range(len(sizes)))
        gb = sum(results[r][0][k][3] for r in range(len(sizes)))
        np.testing.assert_allclose(gg, gg_ref, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(gb, gb_ref, rtol=1e-10, atol=1e-10)
    states = [results[r][1] for r in range(len(sizes))]
    for st in states[1:]:                      # bit-identical on every rank
        for key, value in states[0].items():
            np.testing.assert_array_equal(st[key], value)
    want = ref.state_dict()
    assert states[0]["num_batches_tracked"] == want["num_batches_tracked"] == 2
    np.testing.assert_allclose(states[0]["running_mean"], want["running_mean"], rtol=1e-13,
                               atol=1e-13)
    np.testing.assert_allclose(states[0]["running_var"], want["running_var"], rtol=1e-12)


def test_half_precision_inputs():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(13)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        X = rng.normal(2.0, 3.0, size=(9, 3, 2)).astype(dtype)
        DY = rng.normal(size=X.shape).astype(dtype)
        ref = bn.BatchNorm(3)
        y_ref, dx_ref = ref(X), ref.backward(DY)

        def rank(comm, X=X, DY=DY):
            part = _rows((4, 5))[comm.Get_rank()]
            layer = bn.SyncBatchNorm(3, comm)
            y = layer(X[part])
            return y, layer.backward(DY[part])

        results = ok(run_ranks(2, rank)[0])
        for r, part in enumerate(_rows((4, 5))):
            y, dx = results[r]
            assert y.dtype == dtype and dx.dtype == dtype
            tol = 2e-2 if dtype == np.float16 else 1e-1     # a few units in the last place
            np.testing.assert_allclose(y.astype(np.float32), y_ref[part].astype(np.float32),
                                       rtol=tol, atol=tol)
            np.testing.assert_allclose(dx.astype(np.float32), dx_ref[part].astype(np.float32),
                                       rtol=tol, atol=tol)


def test_offset_data_float64_within_1e12():
    rng = np.random.default_rng(7)
    X = rng.normal(1e4, 1.0, size=(40, 3, 5))
    ref = bn.BatchNorm(3, dtype=np.float64)
    y_ref = ref(X)

    def rank(comm):
        return bn.SyncBatchNorm(3, comm, dtype=np.float64)(X[_rows((13, 27))[comm.Get_rank()]])

    ys = ok(run_ranks(2, rank)[0])
    assert np.abs(np.concatenate(ys) - y_ref).max() < 1e-11   # y ~ 3; x's own ulp is 2e-12


def test_eval_communicates_nothing_and_uses_running_stats():
    X = np.random.default_rng(8).normal(size=(6, 3)).astype(np.float32)

    def rank(comm):
        layer = bn.SyncBatchNorm(3, comm)
        layer.train()(X)
        layer.eval()
        y = layer(X[:1])
        dx = layer.backward(np.ones_like(y))
        plain = bn.BatchNorm(3)
        plain.load_state_dict(layer.state_dict())
        plain.eval()
        np.testing.assert_array_equal(y, plain(X[:1]))
        np.testing.assert_array_equal(dx, plain.backward(np.ones_like(y)))
        return True

    results, calls = run_ranks(2, rank)
    ok(results)
    assert calls == [2, 2]      # the constructor and the one training forward


def test_eval_without_running_stats_uses_this_ranks_batch():
    X = np.random.default_rng(9).normal(size=(6, 3))

    def rank(comm):
        layer = bn.SyncBatchNorm(3, comm, track_running_stats=False, dtype=np.float64).eval()
        x = X[3 * comm.Get_rank():3 * comm.Get_rank() + 3]
        np.testing.assert_array_equal(layer(x), bn.forward_train(x)[0])
        return True

    results, calls = run_ranks(2, rank)
    ok(results)
    assert calls == [1, 1]


def test_a_rank_with_the_wrong_channel_count_raises_everywhere():
    X = np.random.default_rng(10).normal(size=(8, 3)).astype(np.float32)

    def rank(comm):
        layer = bn.SyncBatchNorm(3, comm)
        layer(X)                                   # one good step first
        before = layer.state_dict()
        x = X[:, :2] if comm.Get_rank() == 1 else X
        try:
            layer(x)
        except (ValueError, RuntimeError) as e:
            after = layer.state_dict()
            for key, value in before.items():
                np.testing.assert_array_equal(after[key], value)
            return e
        return None

    results, _ = run_ranks(3, rank)
    assert isinstance(results[1], ValueError) and "num_features=3" in str(results[1])
    for r in (0, 2):
        assert isinstance(results[r], RuntimeError), results[r]
        assert "rank(s) 1 of 3" in str(results[r])


@pytest.mark.parametrize("bad", ["shape", "dtype", "modified"])
def test_a_bad_backward_on_one_rank_raises_everywhere(bad):
    X = np.random.default_rng(11).normal(size=(8, 3))

    def rank(comm):
        layer = bn.SyncBatchNorm(3, comm, dtype=np.float64)
        x = X.copy()
        layer(x)
        dy = np.ones_like(x)
        if comm.Get_rank() == 0:
            if bad == "shape":
                dy = dy[:, :2]
            elif bad == "dtype":
                dy = dy.astype(np.float32)
            else:
                x[0, 0] += 1.0
        try:
            layer.backward(dy)
        except (TypeError, ValueError, RuntimeError) as e:
            assert layer.grad_gamma is None
            return e
        return None

    results, _ = run_ranks(2, rank)
    assert isinstance(results[0], (TypeError, ValueError, RuntimeError))
    assert isinstance(results[1], RuntimeError) and "rank(s) 0 of 2" in str(results[1])


@pytest.mark.parametrize("bad, match", [
    ("ragged x", "rectangular"),
    ("out of another shape", "out must have shape"),   # checked before the exchange
])
def test_a_bad_forward_argument_on_one_rank_raises_everywhere(bad, match):
    def rank(comm):
        layer = bn.SyncBatchNorm(2, comm)
        x, out = np.ones((4, 2), np.float32), None
        if comm.Get_rank() == 0:
            if bad == "ragged x":
                x = [[1.0, 2.0], [3.0]]
            else:
                out = np.empty((4, 3), np.float32)
        try:
            layer(x, out=out)
        except (ValueError, RuntimeError) as e:
            return e

    results, _ = run_ranks(2, rank)
    assert isinstance(results[0], ValueError) and match in str(results[0])
    assert isinstance(results[1], RuntimeError) and "rank(s) 0 of 2" in str(results[1])


def test_too_few_values_over_all_ranks():
    def rank(comm):
        layer = bn.SyncBatchNorm(2, comm)
        n = 1 if comm.Get_rank() == 0 else 0
        with pytest.raises(ValueError, match="over all ranks"):
            layer(np.ones((n, 2), np.float32))
        assert layer.num_batches_tracked == 0
        return True

    ok(run_ranks(3, rank)[0])


def test_ranks_that_disagree_on_num_features_raise_at_construction():
    def rank(comm):
        return bn.SyncBatchNorm(3 + comm.Get_rank(), comm)

    results, _ = run_ranks(2, rank)
    for res in results:
        assert isinstance(res, ValueError) and "disagree on num_features" in str(res)


@pytest.mark.parametrize("comm", [None, object(), "COMM_WORLD", np.zeros(2)])
def test_not_a_communicator(comm):
    with pytest.raises(TypeError, match="comm must be an MPI communicator"):
        bn.SyncBatchNorm(3, comm)


def test_from_batchnorm_keeps_the_state_and_the_configuration():
    plain = bn.BatchNorm(3, momentum=0.2, eps=1e-3, dtype=np.float64)
    plain(np.random.default_rng(12).normal(size=(5, 3)))

    def rank(comm):
        sync = bn.SyncBatchNorm.from_batchnorm(plain, comm)
        assert (sync.momentum, sync.eps, sync.dtype) == (0.2, 1e-3, np.float64)
        for key, value in plain.state_dict().items():
            np.testing.assert_array_equal(sync.state_dict()[key], value)
        assert "ranks=2" in repr(sync)
        return True

    ok(run_ranks(2, rank)[0])


# --- real processes: mpiexec from the mpich wheel -----------------------------------------


def _mpiexec():
    require("mpi4py")
    bindir = os.path.dirname(sys.executable)
    exe = shutil.which("mpiexec", path=bindir) or shutil.which("mpiexec")
    if exe is None:
        if extra_required("test"):
            pytest.fail("mpiexec not found (pip install mpich)")
        pytest.skip("mpiexec not found (pip install mpich)")
    return exe


def run_mpi(n, *args, timeout=180):
    cmd = [_mpiexec(), "-n", str(n)] + python_cmd() + [str(a) for a in args]
    env = dict(os.environ, OMP_NUM_THREADS="1")   # n ranks on a 2-core machine
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("n, sizes", [(1, "9"), (2, "7,12"), (3, "5,0,8")])
def test_mpi_ranks_match_one_process(n, sizes):
    out = run_mpi(n, HERE / "mpi_sync_ranks.py", sizes)
    assert out.count("rank ok") == n, out


def test_mpi_guide_example():
    script = HERE.parent / "docs" / "examples" / "sync_batchnorm.py"
    if not script.is_file():
        pytest.skip("docs/ not found next to tests/")
    out = run_mpi(2, script)
    assert "rank 0" in out and "rank 1" in out


def test_mpi_explain_processes():
    out = run_mpi(3, "-m", "batchnorm", "explain", "--processes", "--random", "7,3,2")
    assert out.count("SYNCBATCHNORM ON 3 PROCESS(ES)") == 1     # rank 0 prints
    err = float(out.split("one process, whole batch)| = ")[1].split()[0])
    assert err < 1e-12, out


def test_importing_batchnorm_imports_no_integration():
    code = ("import sys, batchnorm, batchnorm.dask; "
            "bad = [m for m in ('mpi4py', 'dask', 'distributed', 'torch') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run(python_cmd() + ["-c", code], check=True, timeout=120)
