"""``out=`` at every page offset: the slowest over the fastest (issue 12).

A load whose address agrees with a pending store's in its low 12 bits waits for that store
(4K aliasing), and where a 512-bit access straddles two cache lines it costs two. So the same
call into a preallocated ``out=`` can take different times depending only on where ``out``
lies relative to ``x`` within a page: the rest of the suite puts every output half a page
from x (common.apart) to keep that out of its figures; this one measures it. Target:
the slowest offset within 1.10x of the fastest.

OutPageOffsets: the operation with ``out`` at each offset 0, 64, ..., 4032 bytes from x
(modulo 4096; x where NumPy put it, 16 bytes into a page for these sizes), one thread,
interleaved rounds, the fastest sample per offset; tracked: slowest over fastest. The
shapes are the issue's cache-resident ones, (256, 1024) and (32, 64, 28, 28) in both
layouts, float32.
"""

from __future__ import annotations

import numpy as np

import batchnorm as bn

from .common import LAYOUTS, at_offset, inputs, interleaved_samples

OPS = ["forward_train", "forward_eval", "backward"]
STEP = 64


class OutPageOffsets:
    params = [["256x1024", "32x64x28x28"], LAYOUTS, OPS]
    param_names = ["shape", "layout", "op"]
    unit = "slowest / fastest"
    timeout = 300

    def setup(self, shape, layout, op):
        self.x, self.dy, self.axis, self.gamma, self.beta = inputs(shape, layout, "float32",
                                                                   param_dtype="float32")
        self.st = bn.batch_stats(self.x, axis=self.axis)
        self.buf = np.zeros(self.x.nbytes + 8192, np.uint8)
        bn.set_num_threads(1)

    def teardown(self, *params):
        bn.set_num_threads(None)

    def times(self, op):
        """The fastest seconds per call at each offset (a dict offset -> seconds)."""
        x, dy, ax, g, b, st = self.x, self.dy, self.axis, self.gamma, self.beta, self.st
        calls = {
            "forward_train": lambda out: (lambda: bn.forward_train(x, g, b, axis=ax, out=out)),
            "forward_eval": lambda out: (
                lambda: bn.forward_eval(x, st.mean, st.var, g, b, axis=ax, out=out)),
            "backward": lambda out: (lambda: bn.backward(dy, x, st, g, axis=ax, out=out)),
        }
        cands = {off: calls[op](at_offset(self.buf, x, off)) for off in range(0, 4096, STEP)}
        # one thread, so no OpenMP threads to let settle; few rounds: 64 candidates
        samples = interleaved_samples(cands, rounds=3, min_sample=0.002, settle=0.0,
                                      seconds=0.0)
        return {off: min(s) for off, s in samples.items()}

    def track_slowest_over_fastest(self, shape, layout, op):
        t = self.times(op)
        return max(t.values()) / min(t.values())


if __name__ == "__main__":
    # python -m benchmarks.bench_offsets (from benchmarks/): every offset's time, for a look
    # at where the slow ones lie
    import sys

    bench = OutPageOffsets()
    for shape in ["256x1024", "32x64x28x28"]:
        for layout in LAYOUTS:
            for op in OPS:
                try:
                    bench.setup(shape, layout, op)
                except NotImplementedError:  # a 2-D shape has one layout (asv's skip)
                    continue
                t = bench.times(op)
                best = min(t.values())
                slow = ", ".join(f"+{o}: {v / best:.2f}" for o, v in t.items() if v > 1.1 * best)
                print(f"{shape} {layout} {op}: fastest {best * 1e6:.1f} us, slowest "
                      f"{max(t.values()) / best:.2f}x ({slow or 'none over 1.10x'})")
                sys.stdout.flush()
                bench.teardown()
