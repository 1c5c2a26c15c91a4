"""The guide's figures, drawn at docs build time from numbers computed by batchnorm.

Run by conf.py (``draw_all``); also runnable by hand: ``python docs/figures.py OUTDIR``.
matplotlib is a docs-only dependency (the ``docs`` extra).
"""

from __future__ import annotations

import os
import sys

import numpy as np

import batchnorm as bn


def hidden_activations(seed: int = 0, n: int = 512) -> tuple:
    """Pre-activations of a 3-layer MLP's second hidden layer, before and after BN."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 20)) * rng.uniform(0.5, 3.0, 20) + rng.normal(0, 2, 20)
    w1 = rng.normal(0.0, 0.4, size=(20, 64))
    h1 = np.maximum(x @ w1 + rng.normal(0, 1, 64), 0.0)  # a layer without BN, then ReLU
    w2 = rng.normal(0.0, 0.3, size=(64, 32))
    z2 = h1 @ w2 + rng.normal(0, 1, 32)
    y2, st = bn.forward_train(z2)
    return z2, y2, st


def draw_activations(path: str) -> None:
    import matplotlib.pyplot as plt

    z, y, st = hidden_activations()
    features = np.argsort(st.mean)[[0, 10, 21, 31]]  # features with different means
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), constrained_layout=True)
    for j in features:
        axes[0].hist(z[:, j], bins=40, histtype="step", linewidth=1.5, label=f"feature {j}")
        axes[1].hist(y[:, j], bins=40, histtype="step", linewidth=1.5, label=f"feature {j}")
    axes[0].set_title("before BN: each feature has its own mean and spread")
    axes[1].set_title("after BN: mean 0, variance 1 per feature")
    for a in axes:
        a.set_xlabel("pre-activation value")
        a.set_yticks([])
    axes[0].legend(fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def running_means(steps: int = 300, batch_size: int = 32, seed: int = 0) -> dict:
    """running_mean of one feature (true mean 3) after each step, under three conventions."""
    rng = np.random.default_rng(seed)
    layers = {
        "PyTorch (momentum 0.1)": bn.BatchNorm(1, momentum=0.1, dtype=np.float64),
        "Keras (momentum 0.99 = 0.01 here)": bn.BatchNorm(1, momentum=0.01, dtype=np.float64),
        "cumulative (momentum=None)": bn.BatchNorm(1, momentum=None, dtype=np.float64),
    }
    curves = {name: [] for name in layers}
    batch_means = []
    for _ in range(steps):
        batch = rng.normal(3.0, 2.0, size=(batch_size, 1))
        batch_means.append(bn.batch_stats(batch).mean[0])
        for name, layer in layers.items():
            layer(batch)
            curves[name].append(float(layer.running_mean[0]))
    return dict(curves=curves, batch_means=np.array(batch_means))


def draw_running(path: str) -> None:
    import matplotlib.pyplot as plt

    r = running_means()
    steps = np.arange(1, len(r["batch_means"]) + 1)
    fig, ax = plt.subplots(figsize=(9, 3.2), constrained_layout=True)
    ax.plot(steps, r["batch_means"], ".", color="0.7", markersize=3, label="batch mean")
    for name, curve in r["curves"].items():
        ax.plot(steps, curve, linewidth=1.8, label=name)
    ax.axhline(3.0, color="k", linewidth=0.6, linestyle="--")
    ax.set_xlabel("training step")
    ax.set_ylabel("running_mean")
    ax.set_title("running mean of a feature whose true mean is 3 (batches of 32)")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_all(outdir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(outdir, exist_ok=True)
    draw_activations(os.path.join(outdir, "activations.png"))
    draw_running(os.path.join(outdir, "running_mean.png"))


if __name__ == "__main__":
    draw_all(sys.argv[1] if len(sys.argv) > 1 else "_generated")
