"""The regression check: asv continuous over the regression set, each flag confirmed by a rerun.

    cd benchmarks && python regressions.py A B          # A: the reference commit, B: the new one

On a shared machine a tracked ratio now and then moves by up to ~1.3x for the length of one
measurement (another tenant's burst), on one benchmark; a real slowdown moves the same
benchmarks every time. So every ratio that ``asv continuous`` flags is measured again on both
commits (the builds are cached), and each commit keeps the lower of its two figures (noise
only adds time, on either side): a slowdown is confirmed when B's best exceeds A's best by
the factor.
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


def asv_continuous(a: str, b: str, bench: str, factor: float, extra: list) -> None:
    """Run ``asv continuous``, echoing the end of its output. Its exit status only says
    whether something was flagged; what was is read from ``asv compare`` (figures)."""
    cmd = ["asv", "continuous", "--factor", str(factor), "--bench", bench, *extra, a, b]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-4000:])
    if proc.returncode not in (0, 1):      # 1: something flagged; anything else: asv failed
        sys.stderr.write(proc.stderr)
        raise SystemExit(2)


def figures(a: str, b: str, factor: float) -> dict:
    """Every benchmark of ``asv compare`` from a to b: {name with parameters: (mark, a's figure,
    b's figure)}; the mark is asv's ('+' worse by more than the factor, '!' newly failing,
    '-' better, ' ' neither), a figure None where it failed or is missing."""
    out = subprocess.run(["asv", "compare", "--factor", str(factor), a, b],
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and "." in cells[-1] and not cells[-1].startswith("Benchmark"):
            found[cells[-1]] = (cells[0], _figure(cells[1]), _figure(cells[2]))
    return found


def _figure(cell: str):
    match = re.match(r"[-+0-9.eE]+", cell)
    try:
        return float(match.group()) if match else None
    except ValueError:
        return None


def _best(x, y):
    """The lower of two figures (noise only adds time), ignoring a missing one."""
    known = [v for v in (x, y) if v is not None]
    return min(known) if known else None


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
    first = {name: (fa, fb) for name, (mark, fa, fb) in
             figures(args.a, args.b, args.factor).items() if mark in ("+", "!")}
    if not first:
        print(f"\nregressions: nothing flagged (factor {args.factor})")
        return 0
    print(f"\nregressions: {len(first)} flagged; measuring them again on both commits")
    again = "|".join("^" + re.escape(name) + "$" for name in first)
    asv_continuous(args.a, args.b, again, args.factor, extra)
    second = {name: (fa, fb) for name, (_, fa, fb) in figures(args.a, args.b, args.factor).items()}
    confirmed = []
    for name, (a1, b1) in first.items():
        a2, b2 = second.get(name, (None, None))
        a_best, b_best = _best(a1, a2), _best(b1, b2)
        # a figure that failed on b (None) is a regression whatever a did
        worse = b_best is None or (a_best is not None and b_best > args.factor * a_best)
        ratio = "failed" if b_best is None else (
            f"{b_best / a_best:.2f}x" if a_best else "n/a")
        print(f"  {'CONFIRMED' if worse else 'not confirmed':>13}  {ratio:>7}  {name}")
        if worse:
            confirmed.append(name)
    if confirmed:
        print(f"\nregressions: {len(confirmed)} slower by more than {args.factor}x (best of two "
              f"measurements of each commit)")
        return 1
    print(f"\nregressions: none confirmed (factor {args.factor})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
