"""Run by test_sync.py under ``mpiexec -n <ranks> python mpi_sync_ranks.py <sizes>``.

Every rank builds the same global batch, takes its rows (sizes: comma-separated rows per
rank, any of them 0), runs SyncBatchNorm for two training steps and checks, against one
process running BatchNorm in float64 on the whole batch: its rows of y and dx, the running
statistics and num_batches_tracked (and that they are identical on every rank), and the
sum over ranks of grad_gamma and grad_beta. Then a rank with the wrong channel count must
make every rank raise. Prints "rank ok <rank>"; any failure aborts all ranks (exit != 0).
"""

import sys
import traceback

import numpy as np
from mpi4py import MPI

import batchnorm as bn

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def check_layout(sizes, row, axis, dtype):
    rng = np.random.default_rng(sum(sizes) + len(row))
    X = rng.normal(1e3, 3.0, size=(sum(sizes),) + row).astype(dtype)
    DY = rng.normal(size=X.shape).astype(dtype)
    C = X.shape[axis]
    kw = dict(axis=axis, momentum=0.25, dtype=np.float64)
    ref = bn.BatchNorm(C, **kw)
    layer = bn.SyncBatchNorm(C, comm, **kw)
    gamma = rng.normal(size=C)
    ref.gamma = layer.gamma = gamma
    lo = sum(sizes[:rank])
    part = slice(lo, lo + sizes[rank])
    tol = 1e-12 if dtype == np.float64 else 2e-6
    for step in (1, 2):
        Xs = X * step
        y_ref, y = ref(Xs.astype(np.float64)), layer(Xs[part])
        dx_ref, dx = ref.backward(DY.astype(np.float64)), layer.backward(DY[part])
        assert y.dtype == dtype and dx.dtype == dtype
        assert np.abs(y - y_ref[part]).max(initial=0) <= tol * np.abs(y_ref).max(), "y"
        assert np.abs(dx - dx_ref[part]).max(initial=0) <= tol * np.abs(dx_ref).max(), "dx"
        gg = comm.allreduce(layer.grad_gamma)
        gb = comm.allreduce(layer.grad_beta)
        np.testing.assert_allclose(gg, ref.grad_gamma, rtol=1e-6, atol=1e-6 * np.abs(gg).max())
        np.testing.assert_allclose(gb, ref.grad_beta, rtol=1e-6, atol=1e-6 * np.abs(gb).max())
    state = layer.state_dict()
    for other in comm.allgather(state):
        for key, value in state.items():
            np.testing.assert_array_equal(other[key], value)   # bit-identical on all ranks
    assert state["num_batches_tracked"] == 2
    np.testing.assert_allclose(state["running_mean"], ref.running_mean, rtol=1e-9)
    np.testing.assert_allclose(state["running_var"], ref.running_var, rtol=1e-6)


def check_bad_rank():
    layer = bn.SyncBatchNorm(3, comm)
    x = np.ones((4, 2 if rank == size - 1 else 3), np.float32)
    try:
        layer(x)
    except ValueError as e:
        assert rank == size - 1 and "num_features=3" in str(e), e
    except RuntimeError as e:
        assert rank != size - 1 and f"rank(s) {size - 1} of {size}" in str(e), e
    else:
        raise AssertionError("a rank with 2 channels did not make every rank raise")
    assert layer.num_batches_tracked == 0


def main():
    sizes = [int(s) for s in sys.argv[1].split(",")]
    assert len(sizes) == size, f"{len(sizes)} sizes for {size} ranks"
    for dtype in (np.float64, np.float32):
        for row, axis in [((5,), 1), ((4, 3, 3), 1), ((3, 3, 4), -1)]:
            check_layout(sizes, row, axis, dtype)
    if size > 1:
        check_bad_rank()
    comm.Barrier()
    print(f"rank ok {rank}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        comm.Abort(1)
