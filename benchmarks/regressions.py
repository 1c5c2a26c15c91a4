"""The regression check: asv continuous over the regression set, each flag confirmed by a rerun.

    cd benchmarks && python regressions.py A B          # A: the reference commit, B: the new one

On a shared machine a tracked ratio now and then moves by up to ~1.3x for the length of one
measurement (another tenant's burst), on one benchmark; a real slowdown moves the same
benchmarks every time. So every ratio that ``asv continuous`` flags is measured again, on
both commits (the builds are cached), and only a ratio flagged both times is reported.
Exit status: 0 when nothing is confirmed, 1 when something is, 2 when asv failed.
See README.md ("Regressions: the workflow") for the spread, the factor and the timings.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

# The kernels on one thread over in-cache shapes, the user-style calls, the per-call overhead.
REGRESSION_SET = "RatioToFloorOneThread|UserRatios|CallOverhead.track"
FACTOR = 1.3


def asv_continuous(a: str, b: str, bench: str, factor: float, extra: list) -> str:
    """Run ``asv continuous``; its output (also echoed). Its exit status only says whether
    something was flagged, so that is read from ``asv compare`` instead."""
    cmd = ["asv", "continuous", "--factor", str(factor), "--bench", bench, *extra, a, b]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-4000:])
    if proc.returncode not in (0, 1):      # 1: something flagged; anything else: asv failed
        sys.stderr.write(proc.stderr)
        raise SystemExit(2)
    return proc.stdout


def flagged(a: str, b: str, factor: float) -> list:
    """Names (with parameters) of the benchmarks ``asv compare`` marks worse ('+') or newly
    failing ('!') from a to b."""
    out = subprocess.run(["asv", "compare", "--only-changed", "--factor", str(factor), a, b],
                         capture_output=True, text=True, check=True).stdout
    names = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0] in ("+", "!"):
            names.append(cells[-1])
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="the reference commit (e.g. main)")
    parser.add_argument("b", help="the commit to check (e.g. HEAD)")
    parser.add_argument("--factor", type=float, default=FACTOR,
                        help=f"flag a ratio that got worse by more than this (default {FACTOR})")
    parser.add_argument("--bench", default=REGRESSION_SET,
                        help="asv's benchmark regex (default: the regression set)")
    args, extra = parser.parse_known_args(argv)

    asv_continuous(args.a, args.b, args.bench, args.factor, extra)
    first = flagged(args.a, args.b, args.factor)
    if not first:
        print(f"\nregressions: nothing flagged (factor {args.factor})")
        return 0
    print(f"\nregressions: {len(first)} flagged; measuring them again on both commits")
    again = "|".join("^" + re.escape(name) + "$" for name in first)
    asv_continuous(args.a, args.b, again, args.factor, extra)
    second = set(flagged(args.a, args.b, args.factor))
    confirmed = [name for name in first if name in second]
    for name in first:
        print(f"  {'CONFIRMED' if name in confirmed else 'not repeated (noise)':>20}  {name}")
    if confirmed:
        print(f"\nregressions: {len(confirmed)} slower by more than {args.factor}x, twice")
        return 1
    print(f"\nregressions: none confirmed (factor {args.factor})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
