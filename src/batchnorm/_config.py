"""What this build of the package runs: instruction set path, threads, OpenMP."""

from __future__ import annotations

import os
import warnings

from . import _kernels


def _check_forced_isa() -> None:
    """BATCHNORM_ISA names a kernel set; one this build and CPU cannot run is said, not
    silently replaced by the best available one."""
    forced = os.environ.get("BATCHNORM_ISA", "")
    if forced and forced != _kernels.active_isa():
        warnings.warn(
            f"BATCHNORM_ISA={forced!r} is not a kernel set this build and CPU can run "
            f"(available: {', '.join(_kernels.available_isas())}); using "
            f"{_kernels.active_isa()!r}",
            RuntimeWarning,
            stacklevel=2,
        )


_check_forced_isa()


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
