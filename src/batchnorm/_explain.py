"""``python -m batchnorm explain``: batch normalization step by step, with the numbers.

Everything printed is computed by the package's own API (batch_stats, forward_train and the
BatchNorm layer), so the walkthrough doubles as a check of it.
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from typing import Callable, List, Optional

import numpy as np

from ._api import batch_stats, forward_train
from ._layer import BatchNorm

DEFAULT_BATCH = "4,5,2,1; 3,4,6,0; 1,4,7,9"
DEFAULT_EXAMPLE = "3,5,7,9"

# (name, BatchNorm keyword arguments, eps, what it is)
CONVENTIONS = [
    ("PyTorch", dict(momentum=0.1, unbiased_running_var=True), 1e-5,
     "running = 0.9 * running + 0.1 * batch, unbiased variance"),
    ("Keras", dict(momentum=0.01, unbiased_running_var=False), 1e-3,
     "running = 0.99 * running + 0.01 * batch, biased variance"),
    ("cumulative", dict(momentum=None, unbiased_running_var=False), 1e-5,
     "running = average of all batches so far, biased variance"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", default=DEFAULT_BATCH,
                   help="the mini-batch: rows separated by ';', values by ',' "
                        f"(default: {DEFAULT_BATCH!r})")
    p.add_argument("--example", default=DEFAULT_EXAMPLE,
                   help=f"one example to run through at inference (default: {DEFAULT_EXAMPLE!r})")
    p.add_argument("--data", metavar="FILE",
                   help="read the mini-batch from a .npy or .csv file instead of --batch")
    p.add_argument("--axis", type=int, default=1,
                   help="channel axis of the batch (1: features of (N, D), or (N, C, H, W))")
    p.add_argument("--eps", type=float, default=None,
                   help="eps for the layer conventions (default: each framework's own)")
    p.add_argument("--momentum", type=float, default=None,
                   help="also show a layer with this momentum (PyTorch's meaning)")


def parse_matrix(text: str) -> np.ndarray:
    """'1,2; 3,4' -> [[1., 2.], [3., 4.]] (float64)."""
    rows = [r for r in text.replace("\n", ";").split(";") if r.strip()]
    try:
        data = [[float(v) for v in r.replace(" ", ",").split(",") if v.strip()] for r in rows]
    except ValueError as e:
        raise SystemExit(f"explain: cannot read numbers from {text!r}: {e}") from None
    if not data or len({len(r) for r in data}) != 1:
        raise SystemExit(f"explain: {text!r} is not a rectangle of numbers")
    return np.array(data, dtype=np.float64)


def load_batch(args: argparse.Namespace) -> np.ndarray:
    if args.data is None:
        return parse_matrix(args.batch)
    if args.data.endswith(".npy"):
        return np.asarray(np.load(args.data), dtype=np.float64)
    return np.loadtxt(args.data, delimiter=",", dtype=np.float64, ndmin=2)


def fmt(v: np.ndarray, digits: int = 4) -> str:
    return "(" + ", ".join(f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
                           for x in np.ravel(v)) + ")"


def frac(v: np.ndarray) -> str:
    return "(" + ", ".join(str(Fraction(float(x)).limit_denominator(1000)) for x in v) + ")"


def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    batch = load_batch(args)
    if batch.ndim == 2 and args.axis in (1, -1):
        return explain_features(batch, parse_matrix(args.example)[0], args, out)
    return explain_channels(batch, args, out)


def explain_features(batch: np.ndarray, example: np.ndarray, args: argparse.Namespace,
                     out: Callable[[str], None]) -> int:
    n, d = batch.shape
    if example.shape != (d,):
        raise SystemExit(f"explain: the example has {example.size} values, the batch rows {d}")
    out(f"A mini-batch of N={n} examples with D={d} features (one row per example):")
    for row in batch:
        out(f"  {fmt(row)}")
    out("")
    out("1. Training step. Statistics are taken per feature (column), over the N examples.")
    st = batch_stats(batch)
    out(f"   mean          = {fmt(st.mean)} = {frac(st.mean)}")
    out(f"   biased var    = {fmt(st.var)} = {frac(st.var)}")
    out(f"   unbiased var  = {fmt(st.unbiased_var())}  (n/(n-1) times the biased one)")
    out("   gamma, beta, mean and var are all vectors of length D: one number per feature.")
    y, _ = forward_train(batch, eps=0.0)
    out("   Every example of this batch is normalized with these statistics, from the very")
    out("   first batch on (there is no warm-up); with gamma=1, beta=0, eps=0:")
    for row in y:
        out(f"  {fmt(row, 3)}")
    out("   Each column now has mean 0 and (biased) variance 1.")
    out("")
    out("2. The running statistics are only accumulated during training, for later:")
    layers = _conventions(args)
    for name, layer, what in layers:
        layer(batch)
        out(f"   {name:<11} {what}")
        out(f"   {'':<11} running_mean = {fmt(layer.running_mean)}, "
            f"running_var = {fmt(layer.running_var)}")
    out("")
    out(f"3. Inference on the next example {fmt(example)}: one example has no batch")
    out("   statistics of its own, so the running statistics are used.")
    exact = (example - st.mean) / np.sqrt(st.var)
    for name, layer, _ in layers:
        layer.eval()
        yy = layer(example[None, :].astype(layer.dtype))[0]
        out(f"   {name:<11} eps={layer.eps:g}: {fmt(yy, 3)}")
    out(f"   with this batch's own biased statistics, eps=0: {fmt(exact, 3)}")
    out("")
    out("   The last line is what you get only when the running statistics equal the one")
    out("   batch's biased statistics: the cumulative average after a single batch, with a")
    out("   biased running variance. PyTorch's and Keras' defaults start from mean 0, var 1")
    out("   and move only a fraction (0.1, 0.01) towards each batch, so after one step their")
    out("   running statistics, and the inference outputs, are still far from the batch's.")
    return 0


def _conventions(args: argparse.Namespace) -> List[tuple]:
    layers = []
    for name, kw, eps, what in CONVENTIONS:
        e = eps if args.eps is None else args.eps
        layers.append((name, BatchNorm(_d(args), eps=e, dtype=np.float64, **kw), what))
    if args.momentum is not None:
        e = 1e-5 if args.eps is None else args.eps
        layers.append((f"momentum={args.momentum:g}",
                       BatchNorm(_d(args), eps=e, momentum=args.momentum, dtype=np.float64),
                       "PyTorch's rule with your momentum"))
    return layers


def _d(args: argparse.Namespace) -> int:
    return load_batch(args).shape[args.axis]


def explain_channels(batch: np.ndarray, args: argparse.Namespace,
                     out: Callable[[str], None]) -> int:
    ax = args.axis % batch.ndim
    c = batch.shape[ax]
    others = [i for i in range(batch.ndim) if i != ax]
    out(f"A batch of shape {batch.shape} with the channel axis {ax}: C={c} channels.")
    out(f"Statistics of each channel are taken over axes {tuple(others)}: "
        f"{batch.size // c} values per channel.")
    st = batch_stats(batch, axis=ax)
    out(f"  mean       = {fmt(st.mean)}")
    out(f"  biased var = {fmt(st.var)}")
    y, _ = forward_train(batch, axis=ax, eps=1e-5 if args.eps is None else args.eps)
    ym = batch_stats(y, axis=ax)
    out("After normalization each channel has mean ~0 and variance ~1:")
    out(f"  mean       = {fmt(ym.mean)}")
    out(f"  var        = {fmt(ym.var)}")
    out(f"gamma, beta, running_mean and running_var each have length C={c}.")
    return 0


def main(argv: Optional[List[str]] = None) -> int:  # for tests: the explain parser alone
    p = argparse.ArgumentParser()
    add_arguments(p)
    return run(p.parse_args(argv))
