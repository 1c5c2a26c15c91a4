"""Latency of one SyncBatchNorm training step (forward + backward), per rank.

Run as ``mpiexec -n 2 python benchmarks/sync_step.py``. Every rank holds the batch shape
given (the global batch is ranks times as large); rank 0 prints the median step time of
SyncBatchNorm next to a BatchNorm step on the same local batch (what the synchronisation
costs) and on the whole batch in one process, float32 everything, interleaved rounds.
"""

import sys
import time

import numpy as np
from mpi4py import MPI

import batchnorm as bn

comm = MPI.COMM_WORLD
SHAPES = [(32, 64), (32, 64, 28, 28)]


def median_step(layer, x, dy, rounds):
    times = []
    for _ in range(rounds):
        comm.Barrier()
        t0 = time.perf_counter()
        layer(x)
        layer.backward(dy)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[rounds // 5:]))   # warm-up rounds left out


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rows = []
    for shape in SHAPES:
        rng = np.random.default_rng(comm.Get_rank())
        x = rng.normal(size=shape).astype(np.float32)
        dy = rng.normal(size=shape).astype(np.float32)
        whole = np.concatenate([x] * comm.Get_size())
        sync, local, single = (bn.SyncBatchNorm(shape[1], comm), bn.BatchNorm(shape[1]),
                               bn.BatchNorm(shape[1]))
        t = {"sync": [], "local": [], "whole": []}
        for _ in range(5):      # interleaved: the machine's noise falls on all three alike
            t["sync"].append(median_step(sync, x, dy, rounds // 5 + 2))
            t["local"].append(median_step(local, x, dy, rounds // 5 + 2))
            # every rank times the whole batch too: one core each, as a lone process has
            t["whole"].append(median_step(single, whole, np.concatenate([dy] * comm.Get_size()),
                                          rounds // 5 + 2))
        rows.append((shape, {k: float(np.median(v)) * 1e6 for k, v in t.items()}))
    if comm.Get_rank() == 0:
        n = comm.Get_size()
        print(f"{n} ranks, {bn.get_num_threads()} thread(s) per rank, float32, "
              f"{bn.config()['isa']}; median us per training step (forward + backward)")
        print(f"{'per-rank shape':<20} {'SyncBatchNorm':>14} {'BatchNorm, same':>16} "
              f"{'BatchNorm, whole':>17}")
        for shape, t in rows:
            print(f"{str(shape):<20} {t['sync']:>14.1f} {t['local']:>16.1f} {t['whole']:>17.1f}")


if __name__ == "__main__":
    main()
