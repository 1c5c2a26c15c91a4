"""SyncBatchNorm on the processes of mpiexec: ``mpiexec -n 2 python sync_batchnorm.py``.

Each process holds part of a batch (here of different sizes); the layer normalizes every
part with the statistics of the whole batch, and its gradient is the whole batch's.
Needs ``pip install batchnorm mpi4py mpich`` (mpich brings mpiexec).
"""

import numpy as np
from mpi4py import MPI

import batchnorm as bn

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

# The whole batch (N, C, H, W) exists here only to check the result; each rank takes rows.
whole = np.random.default_rng(0).normal(5.0, 2.0, size=(10, 3, 4, 4)).astype(np.float32)
rows = np.array_split(np.arange(len(whole)), size)[rank]
x = whole[rows]

layer = bn.SyncBatchNorm(3, comm)              # every rank builds it, with the same C
y = layer(x)                                   # one collective: (count, mean, var) per rank
dx = layer.backward(np.ones_like(y))           # one collective: sums of dy and dy * xhat

# The same rows of one process's BatchNorm on the whole batch:
single = bn.BatchNorm(3)
y_whole = single(whole)
print(f"rank {rank}: rows {rows.min()}-{rows.max()}, "
      f"max |y - y(whole batch)| = {np.abs(y - y_whole[rows]).max():.1e}, "
      f"running_mean = {np.round(layer.running_mean, 4)}")
assert np.allclose(y, y_whole[rows], atol=1e-5)
assert np.allclose(layer.running_mean, single.running_mean, atol=1e-6)
