"""What this build of the package runs: instruction set path, threads, OpenMP."""

from __future__ import annotations

from . import _kernels


def available_isas() -> tuple:
    """The kernel sets compiled in that this CPU can run, best last."""
    return _kernels.available_isas()


def config() -> dict:
    """The active ISA path, the ones available, threads and OpenMP, as a dict.

    >>> import batchnorm as bn
    >>> cfg = bn.config()
    >>> cfg["isa"] in cfg["available_isas"]
    True
    """
    from . import __version__

    return {
        "version": __version__,
        "isa": _kernels.active_isa(),
        "available_isas": available_isas(),
        "openmp": _kernels.has_openmp(),
        "threads": _kernels.get_num_threads(),
    }


def show_config() -> None:
    """Print :func:`config` (what ``python -m batchnorm info`` shows)."""
    for key, value in config().items():
        if isinstance(value, tuple):
            value = ", ".join(value)
        print(f"{key:>15}: {value}")
