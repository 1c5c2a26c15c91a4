"""What the suites share: performance.md's shapes, inputs, thread settings, the copy floor.

Shapes are written (N, C, spatial...) or (N, C); the layout says how they lie in memory:
nchw keeps that order (axis=1), nhwc moves C last (axis=-1). A 2-D shape has one layout, so
its "nhwc" variant is skipped (NotImplementedError in setup is asv's "skip").
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import batchnorm as bn

# performance.md: ResNet-50 shapes (the peer table's, one with many channels and few pixels),
# one larger than the last-level cache, the 2-D and small peer shapes, and C = 251.
SHAPES = [
    "32x64x56x56", "32x256x14x14", "64x128x56x56", "256x1024", "8x32x8x8", "32x251x7x7",
]
# The kernels' part of the regression set: the same channel counts and layouts, at sizes that
# stay in one core's cache (x and its output under 3.2 MB). Arrays that spill into the shared
# last-level cache or to memory time the other tenants as much as the code: their ratios moved
# by up to 1.44x between processes with identical code (benchmarks/README.md).
REGRESSION_SHAPES = ["4x64x56x56", "4x256x14x14", "256x1024", "8x32x8x8", "32x251x7x7"]
LAYOUTS = ["nchw", "nhwc"]
DTYPES = ["float32", "float64"]
THREADS = ["1", "all"]
EPS = 1e-5


def case(shape: str, layout: str) -> tuple[tuple[int, ...], int]:
    """(the array's shape, the channel axis) of a shape label in a layout."""
    dims = tuple(int(d) for d in shape.split("x"))
    if len(dims) == 2:
        if layout != "nchw":
            raise NotImplementedError("a 2-D shape has one layout, benchmarked as nchw")
        return dims, 1
    if layout == "nhwc":
        return dims[:1] + dims[2:] + dims[1:2], -1
    return dims, 1


def inputs(shape: str, layout: str, dtype: str, *, loc: float = 3.0, scale: float = 2.0,
           seed: int = 0, param_dtype: str = "float64"):
    """x (loc + scale * normal), dy (normal), the axis, gamma and beta ((C,), param_dtype).

    The same seed gives the same values whatever param_dtype (gamma and beta are drawn in
    float64 and rounded).
    """
    phys, axis = case(shape, layout)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(phys, dtype=np.float32).astype(dtype)
    x *= scale
    x += loc
    dy = rng.standard_normal(phys, dtype=np.float32).astype(dtype)
    c = phys[axis]
    gamma = rng.uniform(0.5, 1.5, c).astype(param_dtype, copy=False)
    beta = rng.uniform(-0.5, 0.5, c).astype(param_dtype, copy=False)
    return x, dy, axis, gamma, beta


def apart(x: np.ndarray, offset: int = 2048) -> np.ndarray:
    """An uninitialised array like x (C order) whose data starts ``offset`` bytes after x's,
    modulo 4096.

    Where the allocator puts a destination relative to its source decides whether their
    addresses alias modulo 4 KB, which can slow a copy or a kernel's stream of loads and stores
    severalfold (the 64x128 copy here: 1.4x from one process to the next). Half a page apart,
    always, takes that out of the figures the suite compares.
    """
    return at_offset(np.empty(x.nbytes + 8192, np.uint8), x, offset)


def at_offset(buf: np.ndarray, x: np.ndarray, offset: int) -> np.ndarray:
    """A view into buf (uint8, x.nbytes + 8192 bytes) like x (C order), starting ``offset``
    bytes after x's data modulo 4096: one buffer serves every offset."""
    shift = (x.ctypes.data + offset - buf.ctypes.data) % 4096
    return buf[shift:shift + x.nbytes].view(x.dtype).reshape(x.shape)


def set_threads(threads: str) -> None:
    """'1' or 'all' (batchnorm's default: OMP_NUM_THREADS, or every core)."""
    bn.set_num_threads(None if threads == "all" else int(threads))


class Floor:
    """The memory floor: the fastest of a NumPy op on one thread and over T slices in T threads.

    copy: ``np.copyto(y, x)``; add: ``np.add(x, dy, out=dx)`` (backward's floor). PyTorch's
    ``Tensor.copy_``, which ``python -m batchnorm bench`` adds when installed, is left out
    here so that the suite needs NumPy only and its numbers do not depend on the environment.
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.pool = ThreadPoolExecutor(max_workers=threads - 1) if threads > 1 else None

    def _threaded(self, fn, *arrays):
        flats = [a.reshape(-1) for a in arrays]
        n = flats[0].size
        bounds = [n * i // self.threads for i in range(self.threads + 1)]
        parts = [tuple(f[lo:hi] for f in flats) for lo, hi in zip(bounds, bounds[1:])]

        def run():
            futures = [self.pool.submit(fn, *p) for p in parts[1:]]
            fn(*parts[0])
            for f in futures:
                f.result()

        return run

    def candidates(self, kind: str, x, y_or_dy, dx=None) -> dict:
        """Floor candidates for 'copy' (x -> y) or 'add' (x + dy -> dx)."""
        if kind == "copy":
            y = y_or_dy
            cands = {"numpy 1 thread": lambda: np.copyto(y, x)}
            if self.pool:
                cands["numpy threads"] = self._threaded(np.copyto, y, x)
        else:
            dy = y_or_dy
            cands = {"numpy 1 thread": lambda: np.add(x, dy, out=dx)}
            if self.pool:
                cands["numpy threads"] = self._threaded(
                    lambda a, b, o: np.add(a, b, out=o), x, dy, dx)
        return cands

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown()


# The settle rule of ``python -m batchnorm bench`` (batchnorm._bench.SETTLE_SECONDS): idle
# time, then one untimed call, before each sample. OpenMP threads spin for milliseconds after
# a parallel region; without the pause they take the cores from the next candidate, and which
# candidate loses depends on the order. Copied rather than imported: the suite runs against
# old commits too, whose package may not have it.
SETTLE_SECONDS = 0.02
# Rounds of a tracked ratio: at least RATIO_ROUNDS, and more until RATIO_SECONDS have passed
# (the host's slow spells last a second or more; a ratio taken over a few seconds rides them
# out). benchmarks/README.md gives the spread this reaches.
RATIO_ROUNDS = 15
RATIO_SECONDS = 2.5


def interleaved_samples(cands: dict, rounds: int = RATIO_ROUNDS, min_sample: float = 0.005,
                        settle: float = SETTLE_SECONDS,
                        seconds: float = RATIO_SECONDS) -> dict:
    """Seconds per call of each candidate in each round, timed round-robin.

    Every candidate is called twice to warm up (the second call sizes its samples to last
    ``min_sample``); then each round takes one sample of each candidate, the start rotating,
    each sample after ``settle`` seconds idle and one untimed call. A first round is run and
    discarded (caches, page faults, thread pools), then rounds are kept until there are
    ``rounds`` of them and ``seconds`` have passed (at most 20 times ``rounds``).
    """
    number = {}
    for name, fn in cands.items():
        fn()
        t0 = time.perf_counter()
        fn()
        number[name] = max(1, math.ceil(min_sample / max(time.perf_counter() - t0, 1e-9)))
    samples = {name: [] for name in cands}
    names = list(cands)
    start, r = time.perf_counter(), 0
    while r <= rounds or (time.perf_counter() - start < seconds and r <= 20 * rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn, n = cands[name], number[name]
            if settle > 0:
                time.sleep(settle)
                fn()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            if r > 0:       # round 0 is the warm-up
                samples[name].append((time.perf_counter() - t0) / n)
        r += 1
    return samples


def interleaved_ratio(op, references: dict, **kwargs) -> float:
    """op's fastest sample over the fastest sample of the fastest reference.

    On a shared machine noise only ever adds time (another tenant's work, a migrated vCPU), so
    the fastest of some thirty samples, each of many calls, is the steadiest estimate of what
    the code costs. Measured on the 2-core VM over five processes (benchmarks/README.md): the
    ratio of minimums moved by at most 1.09x on in-cache shapes, where the median of per-round
    ratios moved by up to 1.34x.
    """
    samples = interleaved_samples({"op": op, **references}, **kwargs)
    return min(samples["op"]) / min(min(samples[name]) for name in references)
