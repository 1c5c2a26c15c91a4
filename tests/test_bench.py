"""`python -m batchnorm bench` and its naive NumPy peer. No timing is asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _bench, reference
from batchnorm.__main__ import main

TINY = ["--shapes", "4x3x5x5", "--repeat", "2", "--no-progress"]
OPS = ("train", "eval", "backward", "stats")


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except Exception:
        return False
    return True


def _table(out: str) -> tuple[list[str], list[list[str]]]:
    """The two header lines and the rows (split on whitespace) of the printed table."""
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line and set(line) == {"-"})
    rows = []
    for line in lines[rule + 1:]:
        if not line.strip() or line.startswith(("note:", "wrote ")):
            break
        rows.append(line.split())
    return lines[rule - 2:rule], rows


# --- the command --------------------------------------------------------------------------


def test_bench_prints_a_table_with_the_expected_columns(capsys):
    assert main(["bench", *TINY]) == 0
    out = capsys.readouterr().out
    (head1, head2), rows = _table(out)
    for column in ("floor", "batchnorm out=", "batchnorm (alloc)", "numpy (naive)", "torch /"):
        assert column in head1
    for column in ("shape", "layout", "op", "ms", "by", "x floor", "batchnorm"):
        assert column in head2
    assert ("torch" in head1.replace("torch /", "")) == _has_torch()
    # both layouts of the one shape, every op
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (shape, layout, op)
        for shape, layout in (("4x3x5x5", "nchw"), ("4x5x5x3", "nhwc"))
        for op in OPS
    ]
    impls = 4 if _has_torch() else 3
    for r in rows:
        assert len(r) == 5 + 2 * impls + 1
        floor_ms = float(r[3])
        assert floor_ms > 0
        if r[2] == "stats":  # batch_stats has no out=
            assert r[5:7] == ["-", "-"]
        else:
            assert float(r[5]) > 0 and float(r[6]) > 0
    assert "median of 2 interleaved rounds" in out


def test_times_keep_their_digits():
    from batchnorm._bench import _fmt_ms
    assert _fmt_ms(4.4e-7) == "0.00044"  # a tiny copy on a fast machine is not 0.000 ms
    assert _fmt_ms(2.5e-5) == "0.025" and _fmt_ms(0.2) == "200.0"
    assert _fmt_ms(float("nan")) == "-"


def test_bench_without_torch_and_one_layout(capsys):
    argv = ["bench", "--shapes", "6x4x3x3,5x7", "--layout", "nhwc", "--ops", "train,backward",
            "--dtype", "float64", "--repeat", "1", "--no-torch", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    (head1, _), rows = _table(out)
    assert "torch left out" in out.splitlines()[0]
    assert "torch /" in head1 and "torch " not in head1.replace("torch /", "")
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("6x3x3x4", "nhwc", "train"), ("6x3x3x4", "nhwc", "backward"),
        ("5x7", "2d", "train"), ("5x7", "2d", "backward"),
    ]
    assert "float64" in out.splitlines()[0]
    for r in rows:
        assert r[-1] == "-"  # no torch, no speed-up column


def test_bench_json_output_parses(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--ops", "eval,backward", "--json", str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert set(data) == {"meta", "rows", "detail"}
    meta = data["meta"]
    assert meta["dtype"] == "float32" and meta["repeat"] == 2
    assert meta["ops"] == ["eval", "backward"]
    assert meta["isa"] == bn.config()["isa"]
    assert len(data["rows"]) == 4 and len(data["detail"]) == 2
    for row in data["rows"]:
        assert row["floor_ms"] > 0
        assert row["floor_by"] in data["detail"][0]["floors"]["add" if row["op"] == "backward"
                                                             else "copy"]
        for impl in ("batchnorm out=", "batchnorm", "numpy"):
            assert row[impl]["ms"] > 0
            assert math.isclose(row[impl]["ratio"], row[impl]["ms"] / row["floor_ms"])
    detail = data["detail"][0]
    assert detail["shape"] == [4, 3, 5, 5] and detail["layout"] == "nchw"
    assert set(detail["floors"]) == {"copy", "add"}
    timing = detail["ops"]["eval"]["batchnorm"]
    assert len(timing["samples_ms"]) == 2 and timing["number"] >= 1
    assert timing["min_ms"] <= timing["median_ms"]


def test_bench_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    argv = ["bench", "--shapes", "4x3x5x5", "--layout", "nchw", "--ops", "train,stats",
            "--repeat", "1", "--no-torch", "--no-progress", "--plot", str(path)]
    assert main(argv) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_restores_the_thread_count(capsys):
    before = bn.get_num_threads()
    argv = ["bench", "--shapes", "8x4", "--threads", "1", "--ops", "eval", "--repeat", "1",
            "--no-torch", "--no-progress"]
    assert main(argv) == 0
    assert "1 threads" in capsys.readouterr().out
    assert bn.get_num_threads() == before


def test_bench_plain_progress_counter(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    argv = ["bench", "--shapes", "8x4", "--ops", "eval", "--repeat", "2", "--no-torch",
            "--progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "bench 3/3 8x4 2d" in err


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "32xfoo"], "cannot read a shape"),
    (["--shapes", "7"], "at least 2 dimensions"),
    (["--ops", "train,forward"], "unknown op"),
    (["--repeat", "0"], "--repeat"),
])
def test_bench_rejects_bad_arguments(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["bench", "--no-progress", *argv])


def test_bench_runs_as_a_module():
    cmd = [sys.executable, "-m", "batchnorm", "bench", "--shapes", "3x2x2x2", "--layout",
           "nchw", "--ops", "train", "--repeat", "1", "--no-torch"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "3x2x2x2" in proc.stdout and "batchnorm out=" in proc.stdout
    assert "bench 1/" not in proc.stderr  # no progress when stderr is not a terminal
    assert "it/s" not in proc.stderr and "round/s" not in proc.stderr


# --- shape sets ---------------------------------------------------------------------------


def test_default_shape_set_is_the_peer_table():
    cases = _bench.select_cases("peer")
    assert [(c.label, c.layout) for c in cases] == [
        ("32x64x56x56", "nchw"), ("32x56x56x64", "nhwc"), ("32x256x14x14", "nchw"),
        ("32x14x14x256", "nhwc"), ("64x128x56x56", "nchw"), ("256x1024", "2d"),
        ("8x32x8x8", "nchw"),
    ]
    from batchnorm.__main__ import build_parser

    args = build_parser().parse_args(["bench"])
    assert args.shapes == "peer" and args.layout is None and args.dtype == "float32"


def test_shape_sets():
    resnet = _bench.select_cases("resnet")
    assert len(resnet) == 18 and {c.layout for c in resnet} == {"nchw", "nhwc"}
    assert all(c.shape[0] == 32 for c in resnet)
    assert len(_bench.select_cases("resnet", "nchw", batch=[1, 256])) == 18
    edge = _bench.select_cases("edge", "nchw")
    assert {c.channels for c in edge} >= {251, 3, 1}
    assert any(c.shape[0] * math.prod(c.shape[2:]) == 2 for c in edge)
    every = _bench.select_cases("all")
    assert len(every) == len(set(every))
    assert {c.label for c in _bench.select_cases("peer")} <= {c.label for c in every}
    nhwc = _bench.select_cases("2x3x4x5", "nhwc")[0]
    assert nhwc.shape == (2, 4, 5, 3) and nhwc.axis == -1 and nhwc.channels == 3


# --- the naive NumPy peer matches the float64 reference -----------------------------------

LAYOUT_CASES = [((6, 5, 4, 3), "nchw"), ((6, 5, 4, 3), "nhwc"), ((40, 7), "2d")]


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("shape, layout", LAYOUT_CASES)
def test_numpy_peer_matches_reference(shape, layout, dtype, rtol):
    case = _bench.Case.from_logical(shape, layout)
    rng = np.random.default_rng(7)
    x = (rng.normal(3.0, 2.0, case.shape)).astype(dtype)
    dy = rng.normal(0.0, 1.0, case.shape).astype(dtype)
    c, ax = case.channels, case.axis
    gamma = rng.uniform(0.5, 1.5, c).astype(dtype)
    beta = rng.uniform(-1, 1, c).astype(dtype)

    mean, var = _bench.numpy_batch_stats(x, axis=ax)
    ref = reference.batch_stats(x, axis=ax)
    assert mean.dtype == dtype and var.dtype == dtype
    np.testing.assert_allclose(mean, ref.mean, rtol=rtol, atol=rtol * 3)
    np.testing.assert_allclose(var, ref.var, rtol=rtol)

    y, m2, v2 = _bench.numpy_forward_train(x, gamma, beta, axis=ax)
    y_ref, _ = reference.forward_train(x, gamma, beta, axis=ax)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(y, y_ref, rtol=rtol, atol=rtol * 4)

    y_eval = _bench.numpy_forward_eval(x, ref.mean, ref.var, gamma, beta, axis=ax)
    y_eval_ref = reference.forward_eval(x, ref.mean, ref.var, gamma, beta, axis=ax)
    np.testing.assert_allclose(y_eval, y_eval_ref, rtol=rtol, atol=rtol * 4)

    dx, dgamma, dbeta = _bench.numpy_backward(dy, x, ref.mean, ref.var, gamma, axis=ax)
    dx_ref, dgamma_ref, dbeta_ref = reference.backward(dy, x, ref, gamma, axis=ax)
    assert dx.dtype == dtype
    scale = np.abs(dx_ref).max()
    np.testing.assert_allclose(dx, dx_ref, rtol=rtol * 10, atol=rtol * 10 * scale)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=rtol * 10,
                               atol=rtol * 10 * np.abs(dgamma_ref).max())
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=rtol * 10,
                               atol=rtol * 10 * np.abs(dbeta_ref).max())


def test_numpy_peer_without_gamma_beta():
    x = np.random.default_rng(1).normal(size=(10, 3, 2, 2))
    y, _, _ = _bench.numpy_forward_train(x)
    y_ref, st = reference.forward_train(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = np.ones_like(x)
    dx, _, dbeta = _bench.numpy_backward(dy, x, st.mean, st.var)
    np.testing.assert_allclose(dx, 0.0, atol=1e-10)
    np.testing.assert_allclose(dbeta, 40.0)


# --- measurement --------------------------------------------------------------------------


def test_measure_interleaves_and_reports_failures():
    calls = []
    cands = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"),
             "bad": lambda: 1 / 0}
    timings = _bench.measure(cands, repeat=3, min_sample=0.0, settle=0.0)
    assert timings["bad"].error.startswith("ZeroDivisionError")
    assert not timings["bad"].samples
    assert len(timings["a"].samples) == 3 and len(timings["b"].samples) == 3
    assert timings["a"].number == 1
    # warm-up and calibration (2 calls each), then rounds that rotate the start
    assert calls[4:] == ["a", "b", "b", "a", "a", "b"]


def test_measure_settles_with_an_untimed_call_before_each_sample():
    calls = []
    cands = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    timings = _bench.measure(cands, repeat=2, min_sample=0.0, settle=1e-4)
    assert len(timings["a"].samples) == 2
    # after warm-up and calibration, each sample is one untimed call and the timed one
    assert calls[4:] == ["a", "a", "b", "b", "b", "b", "a", "a"]
