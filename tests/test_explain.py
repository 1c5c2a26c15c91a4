"""``python -m batchnorm explain``: the walkthrough prints the right numbers.

The numbers are those of the seed batch of conventions.md: mean (8/3, 13/3, 5, 10/3), biased
variance (14/9, 2/9, 14/3, 146/9), and the next vector (3, 5, 7, 9) normalized with exactly
those statistics is (1/sqrt(14), sqrt(2), sqrt(6/7), 17/sqrt(146)) = (0.267, 1.41, 0.926, 1.41).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from batchnorm.__main__ import main

EXACT = [1 / math.sqrt(14), math.sqrt(2), math.sqrt(6 / 7), 17 / math.sqrt(146)]
NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def _cumulative_inference_values(text: str):
    """The numbers printed for the cumulative convention at inference, and their decimals."""
    lines = [ln for ln in text.splitlines()
             if re.match(r"\s*cumulative\b", ln) and "->" in ln]
    assert len(lines) == 1, f"expected one cumulative inference line, got {lines}"
    vector = re.search(r"->\s*\(([^)]*)\)", lines[0])
    assert vector, lines[0]
    printed = [v.strip() for v in vector.group(1).split(",")]
    assert all(re.fullmatch(NUMBER, p) for p in printed), printed
    return lines[0], printed


def _check(text: str):
    line, printed = _cumulative_inference_values(text)
    assert len(printed) == 4, line
    for p, exact in zip(printed, EXACT):
        decimals = len(p.split(".")[1]) if "." in p else 0
        # right to the last printed digit (eps = 1e-5 moves the values by < 1e-4)
        assert abs(float(p) - exact) <= 0.5 * 10.0**-decimals + 1e-4, (p, exact, line)
        assert decimals >= 2, f"{p} has too few digits to show the answer: {line}"
    # with 3 significant digits the line reads 0.267, 1.41, 0.926, 1.41
    assert [f"{float(p):.3g}" for p in printed] in (
        ["0.267", "1.41", "0.926", "1.41"],
        ["0.27", "1.41", "0.93", "1.41"],  # printed with 2 decimals, as conventions.md does
    ), line
    for fraction in ("8/3", "13/3", "14/9", "146/9"):
        assert re.search(rf"(?<![\d/]){re.escape(fraction)}(?![\d/])", text), fraction


def test_explain_via_main(capsys):
    assert main(["explain"]) == 0
    _check(capsys.readouterr().out)


def test_explain_as_a_command():
    proc = subprocess.run([sys.executable, "-m", "batchnorm", "explain"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _check(proc.stdout)


def test_unknown_command_fails():
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code != 0
