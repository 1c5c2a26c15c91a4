"""``python -m batchnorm explain``: the walkthrough prints the right numbers.

The numbers are those of the seed batch of conventions.md: mean (8/3, 13/3, 5, 10/3), biased
variance (14/9, 2/9, 14/3, 146/9), and the next vector (3, 5, 7, 9) normalized with exactly
those statistics is (1/sqrt(14), sqrt(2), sqrt(6/7), 17/sqrt(146)) = (0.267, 1.41, 0.926, 1.41).
"""

from __future__ import annotations

import math
import re

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


def test_explain(capsys):
    """What ``python -m batchnorm explain`` prints (__main__.main is the command's body)."""
    assert main(["explain"]) == 0
    _check(capsys.readouterr().out)


def test_unknown_command_fails():
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code != 0


# --- the extended walkthrough and topics (numbers recomputed here from the definitions) -------

import numpy as np  # noqa: E402

import batchnorm as bn  # noqa: E402
from batchnorm import reference  # noqa: E402
from batchnorm import _explain  # noqa: E402

BATCH = np.array([[4, 5, 2, 1], [3, 4, 6, 0], [1, 4, 7, 9]], dtype=np.float64)
EXAMPLE = np.array([3.0, 5, 7, 9])


def _explain_out(capsys, *argv) -> str:
    assert main(["explain", *argv]) == 0
    return capsys.readouterr().out


def _by_hand(momentum, unbiased, eps, steps=1):
    """Running statistics after `steps` steps on BATCH, then inference on EXAMPLE."""
    n = len(BATCH)
    mean, var = BATCH.mean(axis=0), BATCH.var(axis=0)
    rm, rv = np.zeros(4), np.ones(4)
    for t in range(1, steps + 1):
        m = 1.0 / t if momentum is None else momentum
        rm = (1 - m) * rm + m * mean
        rv = (1 - m) * rv + m * (var * n / (n - 1) if unbiased else var)
    return rm, rv, (EXAMPLE - rm) / np.sqrt(rv + eps)


def test_walkthrough_numbers():
    w = _explain.walkthrough([BATCH], EXAMPLE[None, :])
    st = w.steps[0].stats
    np.testing.assert_allclose(st.mean * 3, [8, 13, 15, 10], rtol=1e-14)
    np.testing.assert_allclose(st.var * 9, [14, 2, 42, 146], rtol=1e-14)
    np.testing.assert_allclose(w.steps[0].y, (BATCH - BATCH.mean(0)) / BATCH.std(0), atol=1e-14)
    np.testing.assert_allclose(w.target[0], EXACT, rtol=1e-14)
    expected = {"PyTorch": (0.1, True, 1e-5), "Keras": (0.01, False, 1e-3),
                "cumulative": (None, False, 1e-5)}
    for name, (m, unbiased, eps) in expected.items():
        rm, rv, y = _by_hand(m, unbiased, eps)
        np.testing.assert_allclose(w.steps[0].running[name][0], rm, rtol=1e-14)
        np.testing.assert_allclose(w.steps[0].running[name][1], rv, rtol=1e-14)
        np.testing.assert_allclose(w.inference[name][0], y, rtol=1e-12)
    # only the cumulative convention gives the batch-statistics answer (to 2 decimals)
    assert np.array_equal(np.round(w.inference["cumulative"][0], 2), np.round(EXACT, 2))
    assert not np.allclose(w.inference["PyTorch"][0], EXACT, atol=0.05)
    assert not np.allclose(w.inference["Keras"][0], EXACT, atol=0.05)


def test_walkthrough_prints_each_convention(capsys):
    out = _explain_out(capsys, "--topic", "walkthrough")
    for name, (m, unbiased, eps) in {"PyTorch": (0.1, True, 1e-5), "Keras": (0.01, False, 1e-3),
                                      "cumulative": (None, False, 1e-5)}.items():
        _, _, y = _by_hand(m, unbiased, eps)
        line = next(ln for ln in out.splitlines() if re.match(rf"\s*{name}\b.*->", ln))
        assert _explain.fmt2(y) in line, line
        assert ("= the answer" in line) == (name == "cumulative"), line
    # PyTorch's rule on the same batch forever: the unbiased variance, never the answer
    rm, rv, y = _by_hand(0.1, True, 1e-5, steps=500)
    assert _explain.fmt2(y) in out and _explain.fmt2(y) != _explain.fmt2(EXACT)
    _, _, y_biased = _by_hand(0.1, False, 1e-5, steps=500)
    assert _explain.fmt2(y_biased) == "(0.27, 1.41, 0.93, 1.41)"
    # a mini-batch of one is refused, by the package itself
    assert "ValueError" in out and "more than one value per channel" in out


def test_batch_size_runs_several_steps(capsys):
    data = "1,2; 3,5; 2,2; 8,1; 4,4"
    out = _explain_out(capsys, "--batch", data, "--batch-size", "2", "--topic", "walkthrough")
    rows = _explain.parse_matrix(data)
    assert "Training step 1" in out and "Training step 2" in out and "step 3" not in out
    w = _explain.walkthrough([rows[:2], rows[2:4]], rows[4:])
    mean1, mean2 = rows[:2].mean(0), rows[2:4].mean(0)
    np.testing.assert_allclose(w.layers["cumulative"].running_mean, (mean1 + mean2) / 2)
    np.testing.assert_allclose(w.layers["PyTorch"].running_mean, 0.09 * mean1 + 0.1 * mean2)
    assert "left over" in out
    cum = next(ln for ln in out.splitlines() if re.match(r"\s*cumulative\b.*->", ln))
    assert _explain.fmt2(w.inference["cumulative"][0]) in cum


def test_options_momentum_eps_gamma_beta(capsys):
    out = _explain_out(capsys, "--momentum", "0.5", "--eps", "0.001", "--gamma", "2",
                       "--beta", "0.5", "--topic", "walkthrough")
    rm, rv, _ = _by_hand(0.5, True, 1e-3)
    assert (f"momentum=0.5 running_mean = {_explain.fmt(rm)}, "
            f"running_var = {_explain.fmt(rv)}") in out
    target = 2 * (EXAMPLE - BATCH.mean(0)) / np.sqrt(BATCH.var(0) + 1e-3) + 0.5
    assert _explain.fmt2(target) in out
    assert "eps = 0.001" in out


def test_image_batch_per_channel(tmp_path, capsys):
    rng = np.random.default_rng(3)
    nhwc = rng.normal(2.0, 3.0, size=(6, 4, 4, 3))
    path = tmp_path / "images.npy"
    np.save(path, nhwc)
    out = _explain_out(capsys, "--data", str(path), "--axis", "-1", "--batch-size", "3",
                       "--topic", "walkthrough")
    assert "C = 3 channels" in out and "48 values per channel" in out
    assert _explain.fmt(nhwc[:3].mean(axis=(0, 1, 2))) in out
    assert _explain.fmt(nhwc[3:].mean(axis=(0, 1, 2))) in out
    assert "all (3,)" in out
    out = _explain_out(capsys, "--random", "4,3,2,2", "--batch-size", "2",
                       "--topic", "walkthrough")
    assert "C = 3 channels" in out and "8 values per channel" in out


def test_csv_data(tmp_path, capsys):
    path = tmp_path / "batch.csv"
    np.savetxt(path, BATCH, delimiter=",")
    out = _explain_out(capsys, "--data", str(path), "--example", "3,5,7,9",
                       "--topic", "walkthrough")
    _check(out)


def test_bad_arguments_fail_cleanly():
    for argv in (["--batch-size", "1"], ["--example", "1,2,3"], ["--data", "/no/such.npy"],
                 ["--axis", "0"], ["--gamma", "1,2"], ["--batch", "nan,1;2,3"],
                 ["--batch", "1,inf;2,3"], ["--data", "1,2;nan,4"]):
        with pytest.raises(SystemExit) as info:
            main(["explain", "--topic", "walkthrough", *argv])
        assert "explain:" in str(info.value.code), argv


def test_topic_layers(capsys):
    out = _explain_out(capsys, "--topic", "layers")
    layers = _explain.deeper_layers(BATCH, (5, 3))
    assert [layer["z_shape"] for layer in layers] == [(3, 5), (3, 3)]
    for layer in layers:
        assert layer["stats"].mean.shape == layer["gamma_shape"] == (layer["width"],)
        np.testing.assert_allclose(layer["y"].mean(axis=0), 0, atol=1e-9)
    assert "shape (5,)" in out and "shape (3,)" in out


def test_topic_params(capsys):
    out = _explain_out(capsys, "--topic", "params")
    for c, total, trainable in ((50, 200, 100), (30, 120, 60)):
        p = _explain.parameter_counts(c)
        assert (p["total"], p["trainable"]) == (total, trainable)
        assert f"= {total} numbers: {trainable} trainable" in out


def test_topic_bias(capsys):
    out = _explain_out(capsys, "--topic", "bias")
    r = _explain.bias_before_bn(BATCH)
    assert r["max_diff"] < 1e-12
    assert np.abs(r["grad_bias"]).max() < 1e-12
    assert np.abs(r["grad_w"]).max() > 1e-3
    np.testing.assert_allclose(r["mean_shift"], r["bias"], atol=1e-12)
    assert "max |y(with b) - y(without b)|" in out and "dL/db" in out


# --- many processes -------------------------------------------------------------------------


def test_split_statistics_right_and_wrong():
    from batchnorm._explain import split_statistics

    x = np.array([[4, 5, 2, 1], [3, 4, 6, 0], [1, 4, 7, 9]], dtype=np.float64)
    r = split_statistics([x[:1], x[1:]])
    np.testing.assert_allclose(r["merged"].mean, x.mean(axis=0), rtol=1e-15)
    np.testing.assert_allclose(r["merged"].var, x.var(axis=0), rtol=1e-14)
    np.testing.assert_allclose(r["merged_offset_var"], x.var(axis=0), rtol=1e-6)
    assert np.abs(r["mean_of_means"] - x.mean(axis=0)).max() > 0.3
    assert np.abs(r["mean_of_vars"] - x.var(axis=0)).max() > 1.0
    assert np.abs(r["moments_var"] - x.var(axis=0)).max() > 1.0


@pytest.mark.parametrize("topic,lines", [
    ("processes", ["mean of the means     (3, 4.5, 4.25, 2.75)",
                   "merged                mean (2.67, 4.33, 5, 3.33)  var (1.56, 0.222, 4.67, "
                   "16.2)",
                   "mpiexec -n 2 python -m batchnorm explain --processes"]),
    ("variants", ["rows 1-2: mean (3.5, 4.5, 4, 0.5)  var (0.25, 0.25, 4, 0.25)",
                  "num_batches_tracked after one call: 2",
                  "d = (mean - renorm_mean) / renorm_std, in [-1, 1]: (1, 1, 1, 1)",
                  "statistics of rows 1-3 only: mean (2.67, 4.33, 5, 3.33)",
                  "dz row 1 (1, 1, 0, 0)"]),
])
def test_topic_prints_the_numbers(capsys, topic, lines):
    from batchnorm._explain import main

    assert main(["--topic", topic]) == 0
    text = capsys.readouterr().out
    for line in lines:
        assert line in text


# --- variants -------------------------------------------------------------------------------


def test_variant_numbers_are_the_layers():
    from batchnorm._explain import variant_numbers

    v = variant_numbers()
    x = v["x"]
    # ghost batches: each pair of rows normalized with its own statistics
    for i, rows in enumerate((slice(0, 2), slice(2, 4))):
        y, st = bn.forward_train(x[rows], eps=0.0)
        assert np.array_equal(v["y_ghost"][rows], y)
        np.testing.assert_allclose(v["groups"][i].var, st.var)
    assert v["tracked"] == 2 and not np.allclose(v["y_ghost"], v["y_whole"])
    # the mask: the statistics of the unmasked rows; every row normalized with them
    m = v["mask"]
    want = reference.batch_stats(x[m])
    np.testing.assert_allclose(v["st_masked"].mean, want.mean, rtol=1e-15)
    np.testing.assert_allclose(v["st_masked"].var, want.var, rtol=1e-14)
    assert v["st_masked"].count.tolist() == [m.sum()] * x.shape[1]
    np.testing.assert_allclose(v["y_masked"], reference.forward_eval(x, want.mean, want.var,
                                                                     eps=0.0), rtol=1e-14)
    # the epilogue: relu(bn(x) + 0.5), and the relu's gradient gate
    y_plain, _ = reference.forward_train(x, eps=0.0)
    np.testing.assert_allclose(v["y_fused"], np.maximum(y_plain + 0.5, 0.0), rtol=1e-14,
                               atol=1e-15)
    assert np.array_equal(v["dz"], (v["y_fused"] > 0).astype(float))
    # renorm: within its limits, and y = (xhat * r + d) for gamma 1, beta 0
    assert v["r"].max() <= 1.5 and np.abs(v["d"]).max() <= 1.0
    np.testing.assert_allclose(v["y_renorm"], v["y_plain"] * v["r"] + v["d"], rtol=1e-14)
