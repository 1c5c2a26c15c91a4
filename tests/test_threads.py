"""Calls from Python threads: correct, bit-identical to serial calls, and the GIL released.

What is guaranteed (and tested here):

* the functions keep no state: concurrent calls on different arrays (and on the same
  read-only inputs) give exactly the results of serial calls, whatever the sizes (small ones
  run on the calling thread, large ones start an OpenMP team from each Python thread);
* different BatchNorm layers used from different threads do not interact;
* one layer in eval mode may be called from several threads at once (it only reads its
  parameters and running statistics);
* the kernels run without the GIL, so other Python threads run meanwhile.

Not guaranteed: training calls, ``backward`` or state changes of one layer from several
threads at once (the running-statistics update is a read-modify-write, and ``backward`` uses
the input of the layer's last forward call, whichever thread made it). See the docs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _kernels, _validation
from conftest import python_cmd

FLOAT_DTYPES = tuple(np.dtype(d) for d in _validation.FLOAT_DTYPES)
WORKERS = 4


def _bitwise_equal(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_bitwise_equal(u, v) for u, v in zip(a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b


def _problems(seed: int):
    """(x, dy, axis, gamma, beta) of several sizes and layouts; some large enough for the
    OpenMP path (>= 65536 elements), the rest small."""
    rng = np.random.default_rng(seed)
    specs = [
        ((64, 16, 9, 9), 1),  # 83k elements, NCHW
        ((32, 7, 7, 32), -1),  # 50k, channels-last
        ((300, 24), 1),
        ((5, 3, 4), 1),
        ((2, 33, 17), 1),
    ]
    out = []
    for k, (shape, axis) in enumerate(specs):
        dt = FLOAT_DTYPES[(seed + k) % len(FLOAT_DTYPES)]
        c = shape[axis]
        x = (rng.standard_normal(shape) * 2 + 3).astype(dt)
        dy = rng.standard_normal(shape).astype(dt)
        out.append((x, dy, axis, rng.uniform(0.5, 2, c), rng.uniform(-1, 1, c)))
    return out


def _all_functions(x, dy, axis, gamma, beta):
    """Every public function on one problem; returns all results."""
    st = bn.batch_stats(x, axis=axis)
    y, st2 = bn.forward_train(x, gamma, beta, axis=axis)
    ye = bn.forward_eval(x, st.mean, st.var * 1.5 + 0.1, gamma, beta, axis=axis)
    grads = bn.backward(dy, x, st2, gamma, axis=axis)
    frozen = bn.backward(dy, x, st2, gamma, axis=axis, training=False)
    out = np.empty_like(x)
    bn.forward_train(x, gamma, beta, axis=axis, out=out)
    return (st.mean, st.var, y, st2.mean, st2.var, ye) + tuple(grads) + tuple(frozen) + (out,)


def test_concurrent_function_calls_match_serial_calls():
    problems = [p for seed in range(3) for p in _problems(seed)]
    serial = [_all_functions(*p) for p in problems]
    for _ in range(2):
        with ThreadPoolExecutor(WORKERS) as pool:
            futures = [pool.submit(_all_functions, *p) for p in problems]
            results = [f.result() for f in futures]
        for i, (got, want) in enumerate(zip(results, serial)):
            assert _bitwise_equal(got, want), f"problem {i}: threaded result differs"


def test_concurrent_calls_on_the_same_inputs():
    """Many threads reading the same arrays at once (inputs are never written)."""
    x, dy, axis, gamma, beta = _problems(7)[0]
    x.flags.writeable = False
    dy.flags.writeable = False
    want = _all_functions(x, dy, axis, gamma, beta)
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda _: _all_functions(x, dy, axis, gamma, beta), range(8)))
    assert all(_bitwise_equal(r, want) for r in results)


def _train_layer(seed: int, steps: int = 4):
    rng = np.random.default_rng(seed)
    c = 8 + seed % 5
    layer = bn.BatchNorm(c, momentum=None if seed % 2 else 0.1,
                         dtype=np.float64 if seed % 3 else np.float32)
    layer.gamma = rng.uniform(0.5, 2, c)
    layer.beta = rng.uniform(-1, 1, c)
    outs = []
    for k in range(steps):
        shape = (32, c, 24, 24) if k % 2 else (16, c, 5)
        x = (rng.standard_normal(shape) + seed).astype(np.float32)
        y = layer(x)
        dx = layer.backward(np.ones_like(y) * 0.5 + x * 0.01)
        outs += [y, dx, layer.grad_gamma, layer.grad_beta]
    layer.eval()
    outs.append(layer(np.full((3, c, 2), float(seed), np.float32)))
    state = layer.state_dict()
    return outs + [state[k] for k in sorted(state)]


def test_different_layers_in_different_threads():
    seeds = list(range(8))
    serial = [_train_layer(s) for s in seeds]
    with ThreadPoolExecutor(WORKERS) as pool:
        threaded = list(pool.map(_train_layer, seeds))
    for s, got, want in zip(seeds, threaded, serial):
        assert _bitwise_equal(got, want), f"layer {s}: threaded training differs"


def test_shared_layer_in_eval_mode():
    """Concurrent inference through one layer: each call gets its own, correct result."""
    rng = np.random.default_rng(3)
    layer = bn.BatchNorm(12)
    for _ in range(3):
        layer(rng.standard_normal((16, 12, 6, 6)).astype(np.float32) * 2 + 1)
    layer.eval()
    before = layer.state_dict()
    inputs = [rng.standard_normal((n, 12, 40, 40)).astype(np.float32) for n in (1, 2, 5, 9) * 4]
    serial = [layer(x) for x in inputs]
    with ThreadPoolExecutor(WORKERS) as pool:
        threaded = list(pool.map(layer, inputs))
    assert all(_bitwise_equal(a, b) for a, b in zip(threaded, serial))
    after = layer.state_dict()
    assert all(_bitwise_equal(before[k], after[k]) for k in before)


@pytest.fixture
def no_gil_switching():
    """The interpreter never takes the GIL from a running thread on its own (a switch
    interval far longer than the test): another thread runs only if the GIL is released."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _runs_meanwhile(call) -> bool:
    """Whether another Python thread got to run during call(), with no GIL switching.

    A witness thread is woken up, given time to queue for the GIL (which this thread keeps
    meanwhile), then call() runs: the witness can only run if call() lets the GIL go.
    """
    go = threading.Event()
    ran = []

    def witness():
        go.wait()  # blocks without the GIL
        ran.append(True)  # needs the GIL: only while the main thread has let it go

    t = threading.Thread(target=witness)
    t.start()  # from here on the witness needs the GIL to make any progress
    go.set()  # the witness wakes up and queues for the GIL, which this thread holds
    until = time.perf_counter() + 0.05
    while time.perf_counter() < until:  # pure Python: keeps the GIL
        pass
    assert not ran
    call()
    during = bool(ran)
    t.join()  # releases the GIL: the witness finishes in any case
    return during


def _ever_runs_meanwhile(call, tries: int = 5) -> bool:
    # A call that holds the GIL can never let the witness run, however often it is tried; a
    # call that releases it might, on a busy machine, end before the witness thread is even
    # scheduled: a few tries make that a non-issue.
    return any(_runs_meanwhile(call) for _ in range(tries))


@pytest.mark.parametrize("name", ["batch_stats", "forward_train", "forward_eval", "backward",
                                  "layer"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_kernels_release_the_gil(name, dtype, no_gil_switching):
    rng = np.random.default_rng(5)
    # Large enough that a call lasts long enough (~0.5 ms serial) for the witness thread to
    # be scheduled: with 131K values a serial float16 batch_stats once ended first 5 times
    # in a row on a loaded CI machine.
    x = rng.standard_normal((8, 16, 64, 64)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    st = bn.batch_stats(x)
    layer = bn.BatchNorm(16)
    calls = {
        "batch_stats": lambda: bn.batch_stats(x),
        "forward_train": lambda: bn.forward_train(x),
        "forward_eval": lambda: bn.forward_eval(x, st.mean, st.var),
        "backward": lambda: bn.backward(dy, x, st),
        "layer": lambda: layer(x),
    }
    # Control: pure Python work holding the GIL does not let the witness run.
    assert not _ever_runs_meanwhile(lambda: sum(range(200_000)), tries=2)
    assert _ever_runs_meanwhile(calls[name], tries=20), f"{name} held the GIL for the whole call"


# --- processes: fork ------------------------------------------------------------------------

FORK_SCRIPT = r"""
import multiprocessing as mp, os, sys
import numpy as np
import batchnorm as bn

x = np.random.default_rng(5).normal(2.0, 3.0, (32, 16, 32, 32)).astype(np.float32)

def work(seed):
    y, st = bn.forward_train(x)          # large enough for a thread team in the parent
    dx = bn.backward(x, x, st)[0]
    return y.tobytes() == want_y and dx.tobytes() == want_dx, bn.get_num_threads()

bn.set_num_threads(2)
y, st = bn.forward_train(x)              # the parent has started its OpenMP team
want_y, want_dx = y.tobytes(), bn.backward(x, x, st)[0].tobytes()
pid = os.fork()
if pid == 0:
    same, threads = work(0)
    os._exit(0 if same and threads == 1 else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
with mp.get_context("fork").Pool(2) as pool:
    results = pool.map(work, range(4))
assert all(same and threads == 1 for same, threads in results), results
print("fork ok", bn.get_num_threads())
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork exists on POSIX systems only")
def test_children_of_fork_compute_on_one_thread():
    """After a threaded call in the parent, a forked child (os.fork, a multiprocessing pool
    in the "fork" context) gets the same bits on one thread instead of hanging in OpenMP."""
    proc = subprocess.run(python_cmd() + ["-c", FORK_SCRIPT], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["fork", "ok", "2" if bn.config()["openmp"] else "1"]


def test_thread_requests_are_checked_and_capped(threads):
    for bad in (True, np.bool_(True), 2.0, "2"):
        with pytest.raises(TypeError, match="n must be a positive integer"):
            bn.set_num_threads(bad)
    with pytest.raises(ValueError, match="positive integer number of threads"):
        bn.set_num_threads(0)
    bn.set_num_threads(10**6)
    cap = bn.get_num_threads()
    assert cap == (_kernels.max_threads() if bn.config()["openmp"] else 1)
    assert cap <= max(16, 4 * (os.cpu_count() or 1))
    bn.set_num_threads(2**70)           # no OverflowError: capped the same way
    assert bn.get_num_threads() == cap
    x = np.broadcast_to(np.float32(1.0), (4096, 64, 64))   # a large input, read 0-strided
    y, st = bn.forward_train(x, axis=1)
    assert np.all(y == 0) and np.all(st.var == 0)


MEMORY_SCRIPT = r"""
import resource
import numpy as np
import batchnorm as bn
x = np.empty((8192, 4096, 2), np.float16)       # 128 MiB; one partial result per row
x[...] = 1.5
x[::2] = 0.5
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
st = bn.batch_stats(x, axis=1)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
assert np.all(st.mean == 1.0) and np.all(st.var == 0.25), (st.mean[:3], st.var[:3])
print(grown)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_batch_statistics_scratch_is_bounded_by_the_partition_not_the_rows():
    """Tall inputs: the partial results of batch_stats (16 bytes per row and channel here,
    512 MiB) are taken chunk of channels by chunk, so scratch stays a few MiB."""
    proc = subprocess.run(python_cmd() + ["-c", MEMORY_SCRIPT], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) < 48, f"batch_stats grew the peak memory by {proc.stdout} MiB"


def test_chunked_batch_statistics_give_the_same_bits(threads):
    """(200, 8192, 2): one partial per row and channel, 26 MB of them, so batch_stats goes
    chunk of channels by chunk; the bits are those of forward_train's statistics (chunked
    by bytes of data instead) and the same on 1 and 2 threads."""
    x = np.random.default_rng(1).normal(3, 2, (200, 8192, 2)).astype(np.float32)
    st = bn.batch_stats(x)
    _, st_train = bn.forward_train(x)
    assert np.array_equal(st.mean, st_train.mean) and np.array_equal(st.var, st_train.var)
    bn.set_num_threads(1)
    st1 = bn.batch_stats(x)
    assert np.array_equal(st1.mean, st.mean) and np.array_equal(st1.var, st.var)
