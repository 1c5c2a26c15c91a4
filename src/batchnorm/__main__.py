"""Command line: ``python -m batchnorm {explain,info,bench}``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m batchnorm",
        description="Batch normalization for NumPy: see what it computes, and how fast.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from ._explain import add_arguments as explain_arguments

    explain_arguments(
        sub.add_parser("explain", help="walk through batch normalization on a small example")
    )
    sub.add_parser("info", help="show the ISA path, threads and OpenMP of this build")
    from ._bench import add_arguments as bench_arguments

    bench_arguments(
        sub.add_parser(
            "bench",
            help="time batchnorm, plain NumPy, PyTorch and ONNX Runtime against the "
            "memory-copy floor",
            description="Time batchnorm (with out= and allocating), a naive NumPy "
            "implementation, PyTorch and ONNX Runtime (eval only; each when installed) on a "
            "set of shapes, with parameter vectors in the input's dtype, as ratios to the "
            "fastest memory copy (x + dy -> dx for backward) measured in the same run.",
        )
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from ._config import show_config

        show_config()
        return 0
    if args.command == "bench":
        from ._bench import run as bench

        return bench(args)
    from ._explain import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
