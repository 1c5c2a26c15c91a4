"""``python -m batchnorm explain``: batch normalization step by step, with the numbers.

Everything printed is computed by the package's own API (``batch_stats``, ``forward_train``,
``forward_eval``, ``backward`` and the ``BatchNorm`` layer), so the walkthrough doubles as a
check of it. The computations are plain functions returning their numbers
(:func:`walkthrough`, :func:`deeper_layers`, :func:`parameter_counts`, :func:`bias_before_bn`),
so that tests and the user guide can use the same numbers the command prints.

Topics (``--topic``, all by default):

* ``walkthrough``: "mini-batch + 1" iterations: one or more training steps (batch mean and
  biased variance per feature, every vector normalized, gamma/beta applied, running statistics
  under PyTorch's, Keras' and the cumulative convention), then inference on the next vector.
  With a batch of images (ndim > 2) the statistics are per channel.
* ``layers``: deeper layers of other widths have statistics of their own width.
* ``params``: the 4C numbers a BN layer stores (2C trainable).
* ``bias``: a bias just before BN changes nothing and gets no gradient.
* ``processes``: the statistics of a batch split over processes, merged right and wrong.
* ``variants``: ghost batches (each group of rows its own statistics), batch
  renormalization (r and d, from the running statistics, correct the batch's), masks
  (padding left out of the statistics) and the fused ``relu(bn(x) + residual)``.
"""

from __future__ import annotations

import argparse
import os
from fractions import Fraction
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from ._api import Stats, backward, batch_stats, forward_eval, forward_train
from ._layer import BatchNorm
from ._stats import merge_stats
from . import reference

Out = Callable[[str], None]

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

TOPICS = ("walkthrough", "layers", "params", "bias", "processes", "variants")

MAX_ROWS = 6  # rows of a batch printed before "..."
MAX_VALUES = 8  # entries of a vector printed before "..."
MAX_STEPS = 4  # training steps printed in full (the rest in one line each)


# --- command line -------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Walk through batch normalization with the numbers: a training step on a mini-batch, "
        "the running statistics under PyTorch's, Keras' and the cumulative convention, and "
        "inference on the next example; then deeper layers, the parameter count, why a "
        "bias before BN is redundant, and the statistics of a batch split over processes "
        "(run under mpiexec with --processes to see SyncBatchNorm do it)."
    )
    p.add_argument("--batch", default=DEFAULT_BATCH, metavar="ROWS",
                   help="the data inline: rows separated by ';', values by ',' "
                        f"(default: {DEFAULT_BATCH!r})")
    p.add_argument("--example", default=None, metavar="VALUES",
                   help="one example to run through at inference (default: "
                        f"{DEFAULT_EXAMPLE!r} with the default data; otherwise the rows left "
                        "over after the last full mini-batch, or the last row)")
    p.add_argument("--data", metavar="FILE",
                   help="read the data from a .npy or .csv file (or inline numbers, as "
                        "--batch) instead of --batch; a .npy may be an image batch (N, C, H, W)")
    p.add_argument("--random", metavar="SHAPE",
                   help="use random integer data of this shape, e.g. 4,3,2,2 for a small "
                        "(N, C, H, W) image batch")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="split the data (along its first axis) into mini-batches of B and run "
                        "one training step per full mini-batch (default: all of it is one "
                        "mini-batch)")
    p.add_argument("--axis", type=int, default=1,
                   help="the channel (feature) axis: 1 for (N, D) and (N, C, H, W), -1 for "
                        "channels-last (N, H, W, C) (default: 1)")
    p.add_argument("--eps", type=float, default=None,
                   help="eps everywhere (default: 0 for the exact training-step numbers, each "
                        "framework's own for its layer)")
    p.add_argument("--momentum", type=float, default=None,
                   help="also show a layer with this momentum (PyTorch's meaning: the weight "
                        "of the new batch)")
    p.add_argument("--gamma", default=None, metavar="VALUES",
                   help="scale: one number or one per feature (default: 1, its initial value)")
    p.add_argument("--beta", default=None, metavar="VALUES",
                   help="shift: one number or one per feature (default: 0, its initial value)")
    p.add_argument("--topic", choices=("all",) + TOPICS, default="all",
                   help="what to show (default: all)")
    p.add_argument("--processes", action="store_true",
                   help="run SyncBatchNorm on the processes of mpiexec (needs mpi4py): "
                        "`mpiexec -n 2 python -m batchnorm explain --processes`; each process "
                        "takes some rows of the data")


def _fail(msg: str) -> "SystemExit":
    return SystemExit(f"explain: {msg}")


def parse_matrix(text: str) -> np.ndarray:
    """'1,2; 3,4' -> [[1., 2.], [3., 4.]] (float64)."""
    rows = [r for r in text.replace("\n", ";").split(";") if r.strip()]
    try:
        data = [[float(v) for v in r.replace(" ", ",").split(",") if v.strip()] for r in rows]
    except ValueError as e:
        raise _fail(f"cannot read numbers from {text!r}: {e}") from None
    if not data or len({len(r) for r in data}) != 1 or not data[0]:
        raise _fail(f"{text!r} is not a rectangle of numbers")
    return _finite(np.array(data, dtype=np.float64), repr(text))


def _finite(data: np.ndarray, what: str) -> np.ndarray:
    """The walk-through shows exact numbers: NaN or inf in the data is refused up front."""
    if not np.isfinite(data).all():
        raise _fail(f"{what} holds NaN or inf; the walk-through needs finite numbers")
    return data


def load_batch(args: argparse.Namespace) -> np.ndarray:
    """The data: --random, --data (a file, or inline numbers) or --batch, as float64."""
    if getattr(args, "random", None):
        try:
            shape = tuple(int(s) for s in args.random.replace("x", ",").split(",") if s.strip())
        except ValueError:
            raise _fail(f"--random wants a shape like 4,3,2,2, got {args.random!r}") from None
        if len(shape) < 2 or min(shape) < 1:
            raise _fail(f"--random wants at least 2 positive dimensions, got {args.random!r}")
        return np.random.default_rng(0).integers(0, 10, size=shape).astype(np.float64)
    if args.data is None:
        return parse_matrix(args.batch)
    if not os.path.exists(args.data):
        if any(ch.isdigit() for ch in args.data) and not args.data.endswith((".npy", ".csv")):
            return parse_matrix(args.data)
        raise _fail(f"no such file: {args.data}")
    try:
        if args.data.endswith(".npy"):
            data = np.asarray(np.load(args.data, allow_pickle=False), dtype=np.float64)
        else:
            data = np.loadtxt(args.data, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as e:
        raise _fail(f"cannot read {args.data}: {e}") from None
    if data.ndim < 2:
        raise _fail(f"{args.data} holds an array of shape {data.shape}; at least 2-D is needed")
    return _finite(data, args.data)


def _param(text: Optional[str], c: int, name: str, default: float) -> np.ndarray:
    if text is None:
        return np.full(c, default)
    v = parse_matrix(text).ravel()
    if v.size == 1:
        return np.full(c, v[0])
    if v.size != c:
        raise _fail(f"--{name} has {v.size} values; the data has {c} features/channels")
    return v


# --- formatting -----------------------------------------------------------------------------


def _num(x: float, digits: int) -> str:
    if x == 0:
        return "0"
    if abs(x) < 1e-3:
        return f"{x:.1e}"
    return f"{x:.{digits}g}"


def fmt(v: np.ndarray, digits: int = 4) -> str:
    """A vector as '(a, b, c)' with `digits` significant digits (long ones cut with '...')."""
    v = np.ravel(v)
    parts = [_num(float(x), digits) for x in v[:MAX_VALUES]]
    if v.size > MAX_VALUES:
        parts.append(f"... {v.size - MAX_VALUES} more")
    return "(" + ", ".join(parts) + ")"


def fmt2(v: np.ndarray) -> str:
    """A vector with 2 decimals, as the answer (0.27, 1.41, 0.93, 1.41) is written."""
    v = np.ravel(v)
    parts = [f"{float(x):.2f}" for x in v[:MAX_VALUES]]
    if v.size > MAX_VALUES:
        parts.append(f"... {v.size - MAX_VALUES} more")
    return "(" + ", ".join(p if p != "-0.00" else "0.00" for p in parts) + ")"


def frac(v: np.ndarray) -> Optional[str]:
    """Exact small fractions, e.g. '(8/3, 13/3, 5, 10/3)', or None when they are not."""
    out = []
    for x in np.ravel(v)[:MAX_VALUES]:
        f = Fraction(float(x)).limit_denominator(1000)
        if abs(float(f) - float(x)) > 1e-9 * max(1.0, abs(float(x))):
            return None
        out.append(str(f))
    if np.size(v) > MAX_VALUES:
        return None
    return "(" + ", ".join(out) + ")"


def _with_frac(v: np.ndarray) -> str:
    f = frac(v)
    return fmt(v) if f is None or f == fmt(v) else f"{fmt(v)} = {f}"


# --- the computations (used by the printing below, by tests and by the guide) --------------


class Step(NamedTuple):
    """One training step: its mini-batch, the batch statistics, the output, running stats."""

    batch: np.ndarray
    stats: Stats
    y: np.ndarray
    running: Dict[str, tuple]  # convention name -> (running_mean, running_var) after the step


class Walkthrough(NamedTuple):
    steps: List[Step]
    layers: Dict[str, BatchNorm]  # convention name -> layer, in eval mode after the steps
    example: np.ndarray  # shape (K, ...) : the examples run at inference
    inference: Dict[str, np.ndarray]  # convention name -> output on `example`
    target: np.ndarray  # `example` normalized with the last batch's own biased statistics
    eps: float  # eps of the training-step outputs and of `target`
    gamma: np.ndarray
    beta: np.ndarray
    axis: int


def conventions(c: int, *, axis: int = 1, eps: Optional[float] = None,
                momentum: Optional[float] = None) -> Dict[str, tuple]:
    """name -> (fresh float64 BatchNorm layer of C channels, what its rule is)."""
    layers = {}
    for name, kw, own_eps, what in CONVENTIONS:
        e = own_eps if eps is None else eps
        layers[name] = (BatchNorm(c, axis=axis, eps=e, dtype=np.float64, **kw), what)
    if momentum is not None:
        e = 1e-5 if eps is None else eps
        layers[f"momentum={momentum:g}"] = (
            BatchNorm(c, axis=axis, eps=e, momentum=momentum, dtype=np.float64),
            f"running = {1 - momentum:g} * running + {momentum:g} * batch, unbiased variance",
        )
    return layers


def split_batches(data: np.ndarray, batch_size: Optional[int]) -> tuple:
    """(full mini-batches along axis 0, the rows left over)."""
    n = data.shape[0]
    b = n if batch_size is None else batch_size
    if b < 1:
        raise _fail(f"--batch-size must be >= 1, got {b}")
    if b > n:
        raise _fail(f"--batch-size {b} is larger than the data ({n} rows)")
    k = n // b
    return [data[i * b:(i + 1) * b] for i in range(k)], data[k * b:]


def walkthrough(batches: Sequence[np.ndarray], example: np.ndarray, *, axis: int = 1,
                eps: Optional[float] = None, momentum: Optional[float] = None,
                gamma: Optional[np.ndarray] = None,
                beta: Optional[np.ndarray] = None) -> Walkthrough:
    """Train on `batches` (one step each) under every convention, then infer on `example`.

    `example` has the shape of one batch with any number of rows (a single vector is one row).
    The training-step outputs and `target` use ``eps`` (0 when None, for exact numbers); the
    layers use their framework's own eps unless ``eps`` is given.
    """
    first = np.asarray(batches[0], dtype=np.float64)
    ax = axis % first.ndim
    c = first.shape[ax]
    g = np.ones(c) if gamma is None else np.asarray(gamma, dtype=np.float64)
    b = np.zeros(c) if beta is None else np.asarray(beta, dtype=np.float64)
    e = 0.0 if eps is None else eps
    named = conventions(c, axis=ax, eps=eps, momentum=momentum)
    layers = {name: layer for name, (layer, _) in named.items()}
    for layer in layers.values():
        layer.gamma, layer.beta = g, b
    steps = []
    for batch in batches:
        batch = np.asarray(batch, dtype=np.float64)
        y, st = forward_train(batch, g, b, axis=ax, eps=e)
        running = {}
        for name, layer in layers.items():
            layer.train()(batch)
            running[name] = (layer.running_mean.copy(), layer.running_var.copy())
        steps.append(Step(batch, st, y, running))
    example = np.asarray(example, dtype=np.float64)
    inference = {name: layer.eval()(example) for name, layer in layers.items()}
    last = steps[-1].stats
    target = forward_eval(example, last.mean, last.var, g, b, axis=ax, eps=e)
    return Walkthrough(steps, layers, example, inference, target, e, g, b, ax)


def converged(batch: np.ndarray, example: np.ndarray, *, unbiased: bool, axis: int = 1,
              steps: int = 500, gamma=None, beta=None, eps: float = 1e-5) -> tuple:
    """PyTorch's rule (momentum 0.1) trained on the same batch `steps` times.

    Returns (running_mean, running_var, output on `example`): the running statistics tend to
    the batch mean and its unbiased (or, with ``unbiased=False``, biased) variance.
    """
    c = batch.shape[axis % batch.ndim]
    layer = BatchNorm(c, axis=axis, eps=eps, momentum=0.1, unbiased_running_var=unbiased,
                      dtype=np.float64)
    if gamma is not None:
        layer.gamma = gamma
    if beta is not None:
        layer.beta = beta
    for _ in range(steps):
        layer(batch)
    return layer.running_mean, layer.running_var, layer.eval()(example)


def deeper_layers(x: np.ndarray, widths: Sequence[int] = (5, 3), seed: int = 0) -> List[dict]:
    """A small MLP x -> Linear -> BN -> ReLU -> ... with fixed random weights.

    For each hidden layer: its width, the shape of its pre-activations, and the per-feature
    batch statistics and the BN parameter shapes (all of that layer's width).
    """
    rng = np.random.default_rng(seed)
    h = np.asarray(x, dtype=np.float64)
    out = []
    for width in widths:
        w = rng.normal(0.0, 1.0 / np.sqrt(h.shape[1]), size=(h.shape[1], width))
        z = h @ w
        layer = BatchNorm(width, dtype=np.float64)
        y = layer(z)
        st = batch_stats(z)
        out.append(dict(width=width, weight_shape=w.shape, z_shape=z.shape, stats=st,
                        y=y, gamma_shape=layer.gamma.shape, beta_shape=layer.beta.shape,
                        running_mean_shape=layer.running_mean.shape))
        h = np.maximum(y, 0.0)
    return out


def parameter_counts(c: int) -> dict:
    """What a BN layer of C features/channels stores: 4C numbers, 2C of them trainable."""
    layer = BatchNorm(c)
    state = layer.state_dict()
    sizes = {k: int(np.size(v)) for k, v in state.items() if isinstance(v, np.ndarray)}
    trainable = sizes["gamma"] + sizes["beta"]
    return dict(sizes=sizes, total=sum(sizes.values()), trainable=trainable,
                non_trainable=sum(sizes.values()) - trainable)


def bias_before_bn(x: np.ndarray, width: int = 3, seed: int = 1) -> dict:
    """z = x W (+ b), then BN in training mode: the bias changes nothing and gets no gradient.

    Returns the outputs with and without the bias, their largest difference, the gradient of
    a loss with respect to b (the column sums of dL/dz from :func:`backward`) and, for
    contrast, with respect to W.
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    w = rng.normal(size=(x.shape[1], width))
    bias = rng.normal(0.0, 3.0, size=width)
    gamma, beta = rng.uniform(0.5, 2.0, width), rng.normal(size=width)
    z_without, z_with = x @ w, x @ w + bias
    y_without, _ = forward_train(z_without, gamma, beta)
    y_with, st = forward_train(z_with, gamma, beta)
    dy = rng.normal(size=y_with.shape)  # dL/dy for some loss L
    dz, _, _ = backward(dy, z_with, st, gamma)
    return dict(bias=bias, y_with=y_with, y_without=y_without,
                max_diff=float(np.abs(y_with - y_without).max()),
                mean_shift=st.mean - batch_stats(z_without).mean,
                grad_bias=dz.sum(axis=0), grad_w=x.T @ dz)


# --- printing -----------------------------------------------------------------------------


def split_statistics(parts: Sequence[np.ndarray]) -> dict:
    """The statistics of a batch split into parts (one per process), computed the right way
    (merge_stats: Chan's formula) and the two wrong ways people use: the unweighted mean of
    the per-part means (and variances), and E[x^2] - E[x]^2 from summed moments in float32
    (on the same parts moved 1e4 away from zero)."""
    stats = [batch_stats(p) for p in parts]
    whole = batch_stats(np.concatenate(parts))
    merged = merge_stats(*stats)
    offset = [(np.asarray(p, np.float64) + 1e4).astype(np.float32) for p in parts]
    n = np.float32(sum(len(p) for p in offset))
    ex = sum(p.sum(axis=0, dtype=np.float32) for p in offset) / n
    ex2 = sum((p * p).sum(axis=0, dtype=np.float32) for p in offset) / n
    return dict(stats=stats, whole=whole, merged=merged,
                mean_of_means=np.mean([st.mean for st in stats], axis=0),
                mean_of_vars=np.mean([st.var for st in stats], axis=0),
                moments_var=(ex2 - ex * ex).astype(np.float64),
                merged_offset_var=merge_stats(*map(batch_stats, offset)).var)


def explain_processes(out: Out = print) -> dict:
    x = parse_matrix(DEFAULT_BATCH)
    parts = [x[:1], x[1:]]
    r = split_statistics(parts)
    out("MANY PROCESSES: THE STATISTICS OF THE WHOLE BATCH")
    out(f"Data-parallel training splits each batch over processes. The default mini-batch "
        f"{x.shape},")
    out("split unevenly: process 0 holds row 1, process 1 rows 2-3. Per process:")
    for i, (p, st) in enumerate(zip(parts, r["stats"])):
        out(f"  process {i} ({len(p)} row(s)): mean {fmt(st.mean, 3)}  var {fmt(st.var, 3)}")
    out(f"  whole batch:          mean {fmt(r['whole'].mean, 3)}  var {fmt(r['whole'].var, 3)}")
    out("Wrong ways to combine them:")
    out(f"  mean of the means     {fmt(r['mean_of_means'], 3)}   (unweighted: process 0's "
        "one row counts as much as two)")
    out(f"  mean of the variances {fmt(r['mean_of_vars'], 3)}   (leaves out how far the "
        "processes' means lie apart)")
    out(f"  E[x^2] - E[x]^2 in float32, data 1e4 away from zero: var {fmt(r['moments_var'], 3)}")
    out("Right: merge (count, mean, var) with Chan's formula (batchnorm.merge_stats):")
    out(f"  merged                mean {fmt(r['merged'].mean, 3)}  var {fmt(r['merged'].var, 3)}")
    out(f"  the same merge on the float32 data 1e4 away: var {fmt(r['merged_offset_var'], 3)}")
    out("bn.SyncBatchNorm(C, comm) does this merge on every training step, with one MPI")
    out("collective per forward and one per backward; see it on real processes with")
    out("  mpiexec -n 2 python -m batchnorm explain --processes")
    return r


def variant_numbers() -> dict:
    """Ghost batches and batch renormalization on the default batch plus the example row
    (4 rows), eps 0: the numbers of ``--topic variants`` and of the guide's variants page."""
    x = np.vstack([parse_matrix(DEFAULT_BATCH), parse_matrix(DEFAULT_EXAMPLE)])
    ghost = BatchNorm(4, eps=0.0, dtype=np.float64, virtual_batch_size=2)
    y_ghost = ghost(x)
    whole, _ = forward_train(x, eps=0.0)
    groups = [batch_stats(x[:2]), batch_stats(x[2:])]
    renorm = BatchNorm(4, eps=0.0, dtype=np.float64, renorm=True, renorm_momentum=0.5,
                       renorm_clipping={"rmax": 1.5, "dmax": 1.0})
    first, second = x[[1, 3]], x[[0, 2]]
    renorm(first)                       # the first batch moves the renorm statistics
    before = (renorm.renorm_mean.copy(), renorm.renorm_std.copy())
    # r and d as the float64 reference computes them from the same renorm statistics
    _, _, r, d = reference.renorm_forward_train(second, None, None, *before, eps=0.0,
                                                rmax=1.5, dmax=1.0)
    y_renorm = renorm(second)
    y_plain, _ = forward_train(second, eps=0.0)
    # a mask: row 4 taken as padding, left out of the statistics but still normalized
    mask = np.array([True, True, True, False])
    y_masked, st_masked = forward_train(x, eps=0.0, mask=mask)
    st_padded = batch_stats(x)
    # the fused epilogue relu(bn(x) + z), and the gradient the relu lets through
    z = np.full_like(x, 0.5)
    y_fused, st_fused = forward_train(x, eps=0.0, activation="relu", residual=z)
    dz = backward(np.ones_like(x), x, st_fused, eps=0.0, activation="relu", y=y_fused)[3]
    return dict(x=x, groups=groups, y_ghost=y_ghost, y_whole=whole,
                tracked=ghost.num_batches_tracked, renorm_mean=before[0],
                renorm_std=before[1], r=r, d=d, y_renorm=y_renorm, y_plain=y_plain,
                mask=mask, st_masked=st_masked, st_padded=st_padded, y_masked=y_masked,
                y_fused=y_fused, dz=dz)


def explain_variants(out: Out = print) -> dict:
    v = variant_numbers()
    out("VARIANTS: GHOST BATCHES, BATCH RENORMALIZATION, MASKS, FUSED EPILOGUES")
    out(f"The default mini-batch plus the example row, {v['x'].shape}, eps = 0.")
    out("Ghost batch norm, BatchNorm(4, virtual_batch_size=2): each group of 2 rows is "
        "normalized")
    out("with its own statistics, exactly as two training calls would be:")
    for i, st in enumerate(v["groups"]):
        out(f"  rows {2 * i + 1}-{2 * i + 2}: mean {fmt(st.mean, 3)}  var {fmt(st.var, 3)}")
    out(f"  row 1 normalized in its group {fmt(v['y_ghost'][0], 3)}, in the whole batch "
        f"{fmt(v['y_whole'][0], 3)}")
    out(f"  num_batches_tracked after one call: {v['tracked']} (one update per group)")
    out("Batch renormalization, BatchNorm(4, renorm=True, renorm_clipping={'rmax': 1.5, "
        "'dmax': 1}):")
    out("after a first batch (rows 2 and 4) the renorm statistics are")
    out(f"  renorm_mean {fmt(v['renorm_mean'], 3)}  renorm_std {fmt(v['renorm_std'], 3)}")
    out("and the next batch (rows 1 and 3) is corrected towards them: y = (xhat * r + d) * "
        "gamma + beta,")
    out(f"  r = std / renorm_std, at most 1.5:               {fmt(v['r'], 3)}")
    out(f"  d = (mean - renorm_mean) / renorm_std, in [-1, 1]: {fmt(v['d'], 3)}")
    out(f"  row 1: plain BN {fmt(v['y_plain'][0], 3)}, renorm {fmt(v['y_renorm'][0], 3)}")
    out("(this early the renorm statistics are far from the batch's: r and d sit at their "
        "limits,")
    out("which is why training starts with loose limits and widens them.)")
    out("r and d are constants for the gradient; inference uses running_mean and running_var")
    out("as always (running_var = running_std^2 - eps, from the averaged standard deviation).")
    out("Masked batch norm, forward_train(x, mask=[True, True, True, False]): row 4 is "
        "padding;")
    out(f"  statistics of rows 1-3 only: mean {fmt(v['st_masked'].mean, 3)}  var "
        f"{fmt(v['st_masked'].var, 3)}")
    out(f"  (with the padding counted: mean {fmt(v['st_padded'].mean, 3)}), count "
        f"{fmt(v['st_masked'].count, 3)} per channel;")
    out(f"  every row is normalized with them, the padding too: row 4 {fmt(v['y_masked'][3], 3)}")
    out("  backward(..., mask=) gives the padding no gradient through the statistics.")
    out("Fused epilogue, forward_train(x, activation='relu', residual=z) with z = 0.5: "
        "relu(bn(x) + z)")
    out(f"  in the pass that writes y: row 1 {fmt(v['y_fused'][0], 3)}, row 3 "
        f"{fmt(v['y_fused'][2], 3)}")
    out(f"  backward(dy = 1, ..., activation='relu', y=y) passes dy where y > 0: dz row 1 "
        f"{fmt(v['dz'][0], 3)}")
    return v


def explain_on_processes(args: argparse.Namespace, out: Out = print) -> int:
    """SyncBatchNorm on the processes of COMM_WORLD: each takes some rows of the data; rank
    0 prints what each holds and the result, checked against one process."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise _fail("--processes needs mpi4py and an MPI (pip install mpi4py mpich), and is "
                    "run as: mpiexec -n 2 python -m batchnorm explain --processes") from None
    from ._sync import SyncBatchNorm

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    data = load_batch(args)
    ax = args.axis % data.ndim
    rows = np.array_split(np.arange(len(data)), size)[rank]
    eps = 0.0 if args.eps is None else args.eps
    layer = SyncBatchNorm(data.shape[ax], comm, axis=ax, eps=eps, dtype=np.float64)
    y = layer(data[rows])
    local = batch_stats(data[rows], axis=ax)
    report = comm.gather((rank, rows.tolist(), local, y), root=0)
    if rank != 0:
        return 0
    library = " ".join(MPI.Get_library_version().splitlines()[0].split())
    out(f"SYNCBATCHNORM ON {size} PROCESS(ES) (mpi4py, {library})")
    for r, rws, st, _ in report:
        out(f"  process {r}: rows {rws}: count {st.count}, mean {fmt(st.mean, 3)}, "
            f"var {fmt(st.var, 3)}")
    out(f"  the layer's running_mean {fmt(layer.running_mean, 3)} on every process, from the "
        "union's")
    out(f"  statistics, merged in one collective: count {sum(st.count for _, _, st, _ in report)}")
    y_all = np.concatenate([yy for _, _, _, yy in report])
    y_one, _ = forward_train(data, axis=ax, eps=eps)
    out(f"  max |y(processes) - y(one process, whole batch)| = "
        f"{np.abs(y_all - y_one).max():.1e}")
    return 0


def run(args: argparse.Namespace, out: Out = print) -> int:
    """Print the topics `args` asks for; returns the exit status (0)."""
    if getattr(args, "processes", False):
        return explain_on_processes(args, out)
    topic = getattr(args, "topic", "all")
    shown = TOPICS if topic == "all" else (topic,)
    first = True
    for t in shown:
        if not first:
            out("")
        first = False
        if t == "walkthrough":
            explain_walkthrough(args, out)
        elif t == "layers":
            explain_layers(out)
        elif t == "params":
            explain_params(out)
        elif t == "bias":
            explain_bias(out)
        elif t == "processes":
            explain_processes(out)
        elif t == "variants":
            explain_variants(out)
    return 0


def _is_default_data(args: argparse.Namespace) -> bool:
    return (args.data is None and not getattr(args, "random", None)
            and args.batch == DEFAULT_BATCH)


def _rows(out: Out, rows: np.ndarray, indent: str = "     ", digits: int = 4) -> None:
    for row in rows[:MAX_ROWS]:
        out(f"{indent}{fmt(row, digits)}")
    if len(rows) > MAX_ROWS:
        out(f"{indent}... {len(rows) - MAX_ROWS} more rows")


def explain_walkthrough(args: argparse.Namespace, out: Out = print) -> Walkthrough:
    data = load_batch(args)
    ax = args.axis
    if not -data.ndim <= ax < data.ndim:
        raise _fail(f"--axis {ax} is out of range for data of shape {data.shape}")
    ax %= data.ndim
    if ax == 0:
        raise _fail("--axis 0 is the batch axis; the channel axis is 1 or -1 (or another)")
    batches, left = split_batches(data, getattr(args, "batch_size", None))
    if args.example is not None:
        example = parse_matrix(args.example)
        if data.ndim == 2:
            example = example.reshape(-1, data.shape[1]) if example.size % data.shape[1] == 0 \
                else example
        if example.shape[1:] != data.shape[1:]:
            raise _fail(f"the example has shape {example.shape[1:]} per row; "
                        f"the data rows have {data.shape[1:]}")
        source = "the example given"
    elif _is_default_data(args) and getattr(args, "batch_size", None) in (None, 3):
        example = parse_matrix(DEFAULT_EXAMPLE)
        source = "the next vector"
    elif len(left):
        example = left
        what = "vector" if data.ndim == 2 else "example"
        source = (f"the {what} left over after the last full mini-batch" if len(left) == 1
                  else f"the {len(left)} {what}s left over after the last full mini-batch")
    else:
        example = data[-1:]
        what = "vector" if data.ndim == 2 else "example"
        source = f"the last {what} of the data (seen in training too)"
    c = data.shape[ax]
    for i, batch in enumerate(batches):
        if batch.size // c < 2:
            what = "feature" if data.ndim == 2 else "channel"
            raise _fail(f"mini-batch {i + 1} has one value per {what}: training needs at least "
                        "2 (use a larger --batch-size)")
    gamma = _param(getattr(args, "gamma", None), c, "gamma", 1.0)
    beta = _param(getattr(args, "beta", None), c, "beta", 0.0)
    w = walkthrough(batches, example, axis=ax, eps=args.eps, momentum=args.momentum,
                    gamma=gamma, beta=beta)
    if data.ndim == 2:
        _print_features(w, data, batches, left, source, args, out)
    else:
        _print_channels(w, data, batches, left, source, args, out)
    return w


def _print_features(w: Walkthrough, data, batches, left, source, args, out: Out) -> None:
    n_rows, d = data.shape
    bsz = len(batches[0])
    out("BATCH NORMALIZATION, STEP BY STEP")
    out(f"Data: {n_rows} vectors of D={d} features (the outputs of some layer, one row per "
        "example):")
    _rows(out, data, "  ")
    out(f"Mini-batch size {bsz}: {len(batches)} training step(s)"
        + (f", {len(left)} row(s) left over" if len(left) else "")
        + f", then inference on {source}.")
    out("During training the network does not see one vector per iteration but a whole")
    out(f"mini-batch at once: iterations 1-{bsz} of the question 'mini-batch + 1' are one")
    out("training step, and every vector in it is normalized, from the very first batch on.")
    names = list(w.layers)
    default_gb = np.all(w.gamma == 1) and np.all(w.beta == 0)
    for i, step in enumerate(w.steps):
        out("")
        first_row = i * bsz + 1
        out(f"Training step {i + 1}: mini-batch of rows {first_row}-{first_row + bsz - 1}")
        if i >= MAX_STEPS and i != len(w.steps) - 1:
            out(f"  mean = {fmt(step.stats.mean)}, biased var = {fmt(step.stats.var)}")
            continue
        _rows(out, step.batch)
        st = step.stats
        out(f"  a. statistics per feature (column), over the {st.count} examples of the batch:")
        out(f"     mean         = {_with_frac(st.mean)}")
        out(f"     biased var   = {_with_frac(st.var)}   (divided by n = {st.count})")
        if st.count > 1:
            out(f"     unbiased var = {_with_frac(st.unbiased_var())}   (divided by n-1)")
            out("     (the unbiased one is used only by PyTorch's running average, never to "
                "normalize)")
        out(f"     mean and var are vectors of length D = {d}: one number per feature.")
        out(f"  b. every vector normalized with them: xhat = (x - mean) / sqrt(var + eps), "
            f"eps = {w.eps:g}")
        xhat, _ = forward_train(step.batch, eps=w.eps)
        _rows(out, xhat, digits=3)
        out("     Each column now has mean 0 and (biased) variance 1.")
        out(f"  c. scale and shift: y = gamma * xhat + beta, gamma = {fmt(w.gamma)}, "
            f"beta = {fmt(w.beta)}")
        if default_gb:
            out("     (their initial values, so y = xhat; training learns them by gradient "
                "descent,")
            out("     and they let the layer undo the normalization where that helps)")
        else:
            _rows(out, step.y, digits=3)
        out("     These, not the raw vectors, are what the next layer receives for this batch.")
        out("  d. running statistics after the step (accumulated for inference, not used now):")
        for name in names:
            rm, rv = step.running[name]
            out(f"     {name:<{_width(w)}} running_mean = {fmt(rm)}, running_var = {fmt(rv)}")
    out("")
    out("  The rules behind the running statistics (initial running_mean 0, running_var 1):")
    named = conventions(d, eps=args.eps, momentum=args.momentum)
    for name in names:
        out(f"     {name:<11} {named[name][1]}, eps = {w.layers[name].eps:g}")
    _print_inference(w, source, out)
    if len(w.steps) == 1:
        _print_converged(w, out)
    _print_conclusion(w, out)
    _print_single_batch(data, out)


def _width(w: Walkthrough) -> int:
    return max(11, max(len(name) for name in w.layers))


def _print_inference(w: Walkthrough, source: str, out: Out) -> None:
    k = len(w.example)
    out("")
    out(f"Inference on {source}: "
        + (fmt(w.example[0]) if k == 1 else f"{k} examples"))
    out("  In eval mode there are no batch statistics (one example has none worth the name), so")
    out("  each layer normalizes with its running statistics:")
    matches = {}
    for name, y in w.inference.items():
        same = bool(np.all(np.abs(y - w.target) < 5e-3))
        matches[name] = same
        eps = w.layers[name].eps
        out(f"     {name:<11} (eps={eps:g}) -> {fmt2(y[0])}"
            + ("   = the answer below" if same else "   differs"))
        for row in y[1:MAX_ROWS]:
            out(f"     {'':<11}             {fmt2(row)}")
    which = "this batch's" if len(w.steps) == 1 else "the last batch's"
    out(f"  Normalized with {which} own mean and biased variance (eps = {w.eps:g}):")
    out(f"     {'':<11}             {fmt2(w.target[0])}")
    out("  Why:")
    st = w.steps[-1].stats
    for name, layer in w.layers.items():
        rm = layer.running_mean
        if name == "cumulative":
            if len(w.steps) == 1:
                out(f"   - {name}: after one batch the average of all batches IS that batch: "
                    "running_mean = mean,")
                out("     running_var = biased var; only eps (tiny here) separates it from the "
                    "answer above.")
            else:
                out(f"   - {name}: the average of the {len(w.steps)} batches' statistics, not "
                    "those of any one batch.")
        elif name == "PyTorch" or name.startswith("momentum="):
            m = layer.momentum
            out(f"   - {name}: each step moves the running statistics only {m:g} of the way "
                "towards the")
            out("     batch's, starting from mean 0 and var 1:")
            out(f"     running_mean = {fmt(rm)}, batch mean {fmt(st.mean)};")
            out("     and it averages the unbiased variance (n/(n-1) times larger).")
        elif name == "Keras":
            out(f"   - {name}: momentum 0.99 means only 0.01 of the way per step "
                f"(running_mean =")
            out(f"     {fmt(rm)}), and eps = 1e-3 by default.")
    return matches


def _print_conclusion(w: Walkthrough, out: Out) -> None:
    if len(w.steps) == 1:
        out("  So: the example maps to the answer above only when the running statistics equal")
        out("  this one batch's mean and BIASED variance, i.e. the cumulative average after a")
        out("  single batch with a biased running variance (and a small eps). Under PyTorch's or")
        out("  Keras' defaults it does not, after one step or after many.")
    else:
        out("  So: at inference an example is normalized with running averages over the batches")
        out("  seen, never with the statistics of the batch it happens to follow.")


def _print_converged(w: Walkthrough, out: Out) -> None:
    batch = w.steps[0].batch
    kw = dict(axis=w.axis, gamma=w.gamma, beta=w.beta)
    rm, rv, y = converged(batch, w.example, unbiased=True, **kw)
    _, rvb, yb = converged(batch, w.example, unbiased=False, **kw)
    out("  Even training on this same batch over and over does not make PyTorch give it:")
    out(f"  after 500 steps running_mean = {fmt(rm)} (the batch mean), but")
    out(f"  running_var = {fmt(rv)}, the UNBIASED variance, so the example maps to")
    out(f"  {fmt2(y[0])}. With a biased running variance (unbiased_running_var=False) it")
    out(f"  would converge to {fmt2(yb[0])}.")


def _print_single_batch(data: np.ndarray, out: Out) -> None:
    out("")
    out("And if that next vector arrived during training? It would belong to the NEXT")
    out("mini-batch and be normalized with that batch's own statistics, never with the")
    out("previous batch's. Alone it cannot be trained on: one value per feature has no spread.")
    try:
        forward_train(data[:1])
    except ValueError as e:
        out(f"  batchnorm.forward_train(one row) -> ValueError: {e}")


def _print_channels(w: Walkthrough, data, batches, left, source, args, out: Out) -> None:
    ax = w.axis
    c = data.shape[ax]
    others = tuple(i for i in range(data.ndim) if i != ax)
    bsz = len(batches[0])
    out("BATCH NORMALIZATION OF AN IMAGE BATCH, PER CHANNEL")
    out(f"Data of shape {data.shape}, channel axis {ax}: C = {c} channels.")
    out(f"Mini-batches of {bsz}: {len(batches)} training step(s), then inference on {source}.")
    out(f"The statistics of channel c are taken over axes {others} of the batch: every "
        "example AND")
    out(f"every position, {w.steps[0].stats.count} values per channel for a mini-batch of "
        f"shape {batches[0].shape}.")
    out(f"Shapes: x {batches[0].shape}; mean, var, gamma, beta, running_mean, running_var "
        f"all ({c},); y {batches[0].shape}.")
    for i, step in enumerate(w.steps):
        if i >= MAX_STEPS and i != len(w.steps) - 1:
            continue
        out("")
        out(f"Training step {i + 1}:")
        out(f"  mean per channel       = {fmt(step.stats.mean)}")
        out(f"  biased var per channel = {fmt(step.stats.var)}")
        ym = batch_stats(step.y, axis=ax)
        out(f"  after y = gamma * (x - mean) / sqrt(var + eps) + beta (eps = {w.eps:g}):")
        out(f"     mean of y per channel = {fmt(ym.mean, 3)}, var = {fmt(ym.var, 3)}")
        for name, (rm, rv) in step.running.items():
            out(f"  {name:<{_width(w)}} running_mean = {fmt(rm)}, running_var = {fmt(rv)}")
    out("")
    k = len(w.example)
    out(f"Inference on {source} ({k} of shape {w.example.shape[1:]}):")
    out("every value of channel c is normalized with running_mean[c] and running_var[c]:")
    for name, y in w.inference.items():
        yb = batch_stats(y, axis=ax) if y.size // c > 1 else None
        what = f"mean of its output per channel = {fmt(yb.mean, 3)}" if yb else fmt(y.ravel(), 3)
        out(f"  {name:<{_width(w)}} {what}")
    t = batch_stats(w.target, axis=ax).mean if w.target.size // c > 1 else w.target.ravel()
    out(f"  {'':<{_width(w)}} with the last batch's own statistics instead: {fmt(t, 3)}")


def explain_layers(out: Out = print) -> List[dict]:
    x = parse_matrix(DEFAULT_BATCH)
    layers = deeper_layers(x, (5, 3))
    out("DEEPER LAYERS OF OTHER WIDTHS")
    out(f"A network 4 -> 5 -> 3 fed the default mini-batch (shape {x.shape}), with BN after "
        "each")
    out("hidden Linear layer. Every BN layer takes statistics over the batch axis of ITS OWN")
    out("input, one mean and one variance per feature of that layer:")
    for i, layer in enumerate(layers):
        st = layer["stats"]
        out(f"  layer {i + 1}: W {layer['weight_shape']}, pre-activations z {layer['z_shape']}: "
            f"{layer['width']} features")
        out(f"     mean of z = {fmt(st.mean, 3)}  shape {st.mean.shape}")
        out(f"     var of z  = {fmt(st.var, 3)}  shape {st.var.shape}")
        out(f"     gamma {layer['gamma_shape']}, beta {layer['beta_shape']}, running_mean "
            f"{layer['running_mean_shape']}: the layer's width, whatever the input's.")
    out("The width changes from layer to layer, the batch size N does not: each BN normalizes")
    out("the N values of each of its features. In a conv layer (N, C, H, W) they are per "
        "channel,")
    out("over N*H*W values, so its vectors have length C.")
    return layers


def explain_params(out: Out = print) -> Dict[int, dict]:
    out("PARAMETERS: 4 NUMBERS PER FEATURE OR CHANNEL")
    counts = {}
    for c, what in ((50, "after a Dense(50) layer: 50 features"),
                    (30, "after a conv layer with 30 channels")):
        p = parameter_counts(c)
        counts[c] = p
        sizes = ", ".join(f"{k} {v}" for k, v in p["sizes"].items())
        out(f"  BatchNorm({c}) {what}: {sizes}")
        out(f"     = {p['total']} numbers: {p['trainable']} trainable (gamma, beta), "
            f"{p['non_trainable']} not (the running statistics)")
    out("A Keras summary counts all four vectors (200 and 120 here); PyTorch's parameters()")
    out("lists only the two trainable ones (the running statistics are buffers).")
    return counts


def explain_bias(out: Out = print) -> dict:
    x = parse_matrix(DEFAULT_BATCH)
    r = bias_before_bn(x)
    out("A BIAS JUST BEFORE BN IS REDUNDANT")
    out(f"z = x W + b with x the default mini-batch {x.shape}, W of shape (4, 3) and")
    out(f"b = {fmt(r['bias'], 3)}; then BN in training mode:")
    out(f"  the batch mean of z shifts by exactly b: {fmt(r['mean_shift'], 3)},")
    out("  and BN subtracts it again, so the output is the same with or without b:")
    out(f"  max |y(with b) - y(without b)| = {r['max_diff']:.1e}   (rounding only)")
    out(f"  dL/db = column sums of dL/dz from batchnorm.backward = {fmt(r['grad_bias'], 2)}")
    out("        (zero up to rounding: the gradient of BN's output sums to 0 over the batch)")
    out(f"  (for contrast, |dL/dW| reaches {np.abs(r['grad_w']).max():.3g})")
    out("b never changes the output and never learns: leave it out (use_bias=False, "
        "bias=False);")
    out("beta plays its role.")
    return r


def main(argv: Optional[List[str]] = None) -> int:  # for tests: the explain parser alone
    p = argparse.ArgumentParser(prog="python -m batchnorm explain")
    add_arguments(p)
    return run(p.parse_args(argv))
