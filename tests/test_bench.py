"""`python -m batchnorm bench` and its naive NumPy peer. No timing is asserted."""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from types import SimpleNamespace

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


def _has_onnxruntime() -> bool:
    return _bench._import_onnxruntime(False) is not None


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
    assert ("onnxruntime" in head1) == _has_onnxruntime()
    # both layouts of the one shape, every op
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (shape, layout, op)
        for shape, layout in (("4x3x5x5", "nchw"), ("4x5x5x3", "nhwc"))
        for op in OPS
    ]
    impls = 3 + _has_torch() + _has_onnxruntime()
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


# --- user-style calls: the small set, float32 vectors, ONNX Runtime -------------------------

USER_SHAPES = [(4, 4), (64, 128), (8, 32, 8, 8), (256, 1024)]


def test_small_shape_set_is_the_per_call_shapes():
    assert [s for s, _ in _bench.SMALL_CASES] == USER_SHAPES
    cases = _bench.select_cases("small")
    assert [(c.label, c.layout) for c in cases] == [
        ("4x4", "2d"), ("64x128", "2d"), ("8x32x8x8", "nchw"), ("8x8x8x32", "nhwc"),
        ("256x1024", "2d"),
    ]
    assert [c.label for c in _bench.select_cases("small", "nchw")] == [
        "4x4", "64x128", "8x32x8x8", "256x1024"]
    assert "4x4" in _bench.SHAPE_SETS["small"]


def _run_case_once(monkeypatch, case, dtype, ops, **kw):
    """run_case with every candidate called once instead of timed."""
    def once(cands, repeat, tick=None, **_):
        for fn in cands.values():
            fn()
        return {k: _bench.Timing(samples=[1e-6]) for k in cands}

    monkeypatch.setattr(_bench, "measure", once)
    return _bench.run_case(case, np.dtype(dtype), ops, threads=1, repeat=1, **kw)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_candidates_receive_vectors_in_the_input_dtype(monkeypatch, layout, dtype):
    """gamma, beta, mean and var reach every candidate in the input's dtype (float32 by
    default), as a user passes them; backward gets forward_train's Stats."""
    seen = []  # (candidate, function, [vector dtypes])

    def recording(who, name, fn, vector_args):
        def wrapper(*args, **kwargs):
            seen.append((who, name, [np.asarray(args[i]).dtype for i in vector_args]))
            return fn(*args, **kwargs)
        return wrapper

    api = SimpleNamespace(
        batch_stats=_bench._api.batch_stats,
        forward_train=recording("batchnorm", "forward_train", bn.forward_train, (1, 2)),
        forward_eval=recording("batchnorm", "forward_eval", bn.forward_eval, (1, 2, 3, 4)),
        backward=recording("batchnorm", "backward", bn.backward, (3,)),
    )
    monkeypatch.setattr(_bench, "_api", api)
    monkeypatch.setattr(_bench, "numpy_forward_train", recording(
        "numpy", "forward_train", _bench.numpy_forward_train, (1, 2)))
    monkeypatch.setattr(_bench, "numpy_forward_eval", recording(
        "numpy", "forward_eval", _bench.numpy_forward_eval, (1, 2, 3, 4)))
    monkeypatch.setattr(_bench, "numpy_backward", recording(
        "numpy", "backward", _bench.numpy_backward, (2, 3, 4)))
    backward_stats = []
    real_backward = api.backward
    api.backward = lambda *a, **k: (backward_stats.append(a[2]), real_backward(*a, **k))[1]

    torch = None
    if _has_torch():
        import torch
        real_bn = torch.nn.functional.batch_norm

        def torch_bn(x, rm, rv, w, b, **kw):
            seen.append(("torch", "batch_norm", [t.numpy().dtype for t in (rm, rv, w, b)]))
            return real_bn(x, rm, rv, w, b, **kw)

        monkeypatch.setattr(torch.nn.functional, "batch_norm", torch_bn)
    ort = _bench._import_onnxruntime(False)
    if ort is not None:
        real_session = _bench.onnx_eval_session

        def session(*args):
            sess = real_session(*args)

            def run(names, feeds):
                seen.append(("onnxruntime", "run", [feeds[k].dtype for k in (
                    "x", "scale", "B", "input_mean", "input_var")]))
                return sess.run(names, feeds)
            return SimpleNamespace(run=run)

        monkeypatch.setattr(_bench, "onnx_eval_session", session)

    case = _bench.Case.from_logical((4, 3, 2, 2), layout)
    _run_case_once(monkeypatch, case, dtype, ["train", "eval", "backward"], torch=torch,
                   ort=ort)
    whos = {(who, name) for who, name, _ in seen}
    for name in ("forward_train", "forward_eval", "backward"):
        assert ("batchnorm", name) in whos and ("numpy", name) in whos
        # both batchnorm candidates (out= and allocating), warm-up included
        assert sum(1 for w, n, _ in seen if (w, n) == ("batchnorm", name)) >= 2
    if torch is not None:
        assert ("torch", "batch_norm") in whos
    assert (("onnxruntime", "run") in whos) == (ort is not None and layout == "nchw")
    for who, name, dtypes in seen:
        assert dtypes and all(d == np.dtype(dtype) for d in dtypes), (who, name, dtypes)
    assert backward_stats and all(isinstance(st, bn.Stats) for st in backward_stats)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 4)])
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-10)])
def test_onnxruntime_session_matches_forward_eval(shape, dtype, tol):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    ort = _bench._import_onnxruntime(False)
    rng = np.random.default_rng(3)
    x = rng.normal(3.0, 2.0, shape).astype(dtype)
    c = shape[1]
    gamma, beta, mean = (rng.uniform(-1.5, 1.5, c).astype(dtype) for _ in range(3))
    var = rng.uniform(0.0, 2.0, c).astype(dtype)
    var[0] = 0.0  # epsilon matters
    sess = _bench.onnx_eval_session(ort, shape, dtype, 1)
    (y,) = sess.run(None, {"x": x, "scale": gamma, "B": beta, "input_mean": mean,
                           "input_var": var})
    assert y.dtype == dtype and y.shape == shape
    # ONNX float attributes are float32: epsilon is float32(1e-5), visible in float64 at var=0
    eps = float(np.float32(_bench.EPS))
    ref = reference.forward_eval(x, mean, var, gamma, beta, eps=eps)
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_onnxruntime_candidate_only_for_eval_on_nchw_and_2d(tmp_path, capsys):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "bench.json"
    argv = ["bench", "--shapes", "4x3x5x5,6x4", "--layout", "both", "--repeat", "1",
            "--no-torch", "--no-progress", "--threads", "1", "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"onnxruntime {ort.__version__}" in out.splitlines()[0]
    (head1, _), rows = _table(out)
    assert "onnxruntime" in head1
    data = json.loads(path.read_text())
    assert data["meta"]["onnxruntime"] == ort.__version__
    assert [(d["layout"], sorted(d["ops"])) for d in data["detail"]] == [
        ("nchw", sorted(OPS)), ("nhwc", sorted(OPS)), ("2d", sorted(OPS))]
    for d in data["detail"]:
        for op, per_impl in d["ops"].items():
            wanted = op == "eval" and d["layout"] != "nhwc"
            assert ("onnxruntime" in per_impl) == wanted, (d["layout"], op)
            if wanted:
                t = per_impl["onnxruntime"]
                assert t["error"] is None and t["median_ms"] > 0
    for row in data["rows"]:
        has = row["op"] == "eval" and row["layout"] != "nhwc"
        assert (row["onnxruntime"]["ms"] is not None) == has, (row["layout"], row["op"])
    # the printed table: the onnxruntime column (before "torch / batchnorm") is "-" elsewhere
    for r in rows:
        ms = r[-3]
        assert (ms != "-") == (r[2] == "eval" and r[1] != "nhwc"), r


@pytest.mark.parametrize("extra", [
    ["--no-onnxruntime"],
    ["--ops", "train,backward,stats"],  # onnxruntime has eval only
    ["--layout", "nhwc"],  # and no channels-last case
])
def test_no_onnxruntime_column_without_a_case_for_it(extra, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    argv = ["bench", "--shapes", "4x3x5x5", "--repeat", "1", "--no-torch", "--no-progress",
            "--ops", "eval", *extra]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "onnxruntime" not in out


def test_onnxruntime_is_imported_only_when_benchmarking():
    code = ("import sys, batchnorm, batchnorm._bench, batchnorm.__main__; "
            "print(sorted(m for m in ('onnxruntime', 'onnx', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --- the asv suite's user-style calls run (asv itself is not needed) ------------------------

ASV_DIR = __import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(not (ASV_DIR / "benchmarks" / "bench_user.py").exists(),
                    reason="the asv suite is not in this tree")
def test_asv_user_suite_runs_once(monkeypatch, threads):
    import importlib

    monkeypatch.syspath_prepend(str(ASV_DIR))
    suite = importlib.import_module("benchmarks.bench_user")
    # the ratios' machinery once, briefly: this checks that the calls run, not their speed
    quick = functools.partial(suite.interleaved_ratio, rounds=1, seconds=0.0, settle=0.0,
                              min_sample=0.0)
    monkeypatch.setattr(suite, "interleaved_ratio", quick)
    assert suite.USER_SHAPES == ["4x4", "64x128", "8x32x8x8", "256x1024"]
    x, dy, axis, *vectors = suite.user_inputs("8x32x8x8")
    assert x.dtype == dy.dtype == np.float32 and axis == 1
    assert [v.dtype for v in vectors] == [np.float32] * 4 and vectors[0].shape == (32,)
    for cls in (suite.UserFunctions, suite.UserLayer):
        bench = cls()
        bench.setup("4x4")
        names = [n for n in dir(cls) if n.startswith("time_")]
        assert len(names) == 3
        for name in names:
            getattr(bench, name)("4x4")
    for variant in ("renorm", "ghost"):
        bench = suite.UserLayerVariants()
        bench.setup("4x4", variant)
        bench.time_layer_train("4x4", variant)
        bench.time_layer_backward("4x4", variant)
    overhead = suite.CallOverhead()
    overhead.setup()
    for name in ("time_forward_eval", "time_forward_eval_out", "time_multiply"):
        getattr(overhead, name)()
    for name in ("track_ratio_to_multiply", "track_ratio_out_to_multiply"):
        ratio = getattr(overhead, name)()
        assert math.isfinite(ratio) and ratio > 0
    for call in suite.CALLS:
        ratios = suite.UserRatios()
        ratios.setup("4x4", call)
        ratio = ratios.track_ratio_to_copy("4x4", call)
        assert math.isfinite(ratio) and ratio > 0, call
    # the masked and fused calls, on the smallest of their shapes
    shape = suite.VARIANT_SHAPES[0]
    for call in suite.UserMaskedFused.params[1]:
        bench = suite.UserMaskedFused()
        bench.setup(shape, call)
        bench.time_call(shape, call)
    for call in suite.EpilogueRatios.params[1]:
        ratios = suite.EpilogueRatios()
        ratios.setup(shape, call)
        ratio = ratios.track_ratio_to_plain(shape, call)
        assert math.isfinite(ratio) and ratio > 0, call


@pytest.mark.skipif(not (ASV_DIR / "benchmarks" / "common.py").exists(),
                    reason="the asv suite is not in this tree")
def test_asv_ratio_is_that_of_the_fastest_samples(monkeypatch):
    """Noise only adds time: the tracked ratio is min(op) / min(fastest reference), so a slow
    spell on a few samples of either side leaves it where it was."""
    import importlib

    monkeypatch.syspath_prepend(str(ASV_DIR))
    common = importlib.import_module("benchmarks.common")
    samples = {"op": [3.0, 9.0, 3.3, 2.0, 50.0], "copy": [1.1, 1.0, 7.0, 1.2, 1.0],
               "add": [0.8, 0.9, 5.0, 0.85, 0.81]}
    monkeypatch.setattr(common, "interleaved_samples", lambda cands, **kw: samples)
    assert common.interleaved_ratio(None, {"copy": None}) == 2.0
    assert common.interleaved_ratio(None, {"copy": None, "add": None}) == 2.0 / 0.8


def _asv_compare_output(rows):
    """What `asv compare` prints (its GitHub-style table) for rows (mark, a, b, name)."""
    lines = ["| Change   | Before [aaaa] <main>   | After [bbbb] <b>   | Ratio   | "
             "Benchmark (Parameter)   |",
             "|----------|------------------------|--------------------|---------|"
             "-------------------------|"]
    for mark, a, b, name in rows:
        lines.append(f"| {mark:8s} | {a} | {b} | {b / a:.2f} | {name} |")
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(not (ASV_DIR / "regressions.py").exists(),
                    reason="the asv suite is not in this tree")
def test_regression_check_confirms_on_the_best_of_two_figures(monkeypatch, capsys):
    """regressions.py with asv replaced by canned tables: a burst on one measurement is not
    reported, a slowdown is, even when the rerun measured the reference slowly."""
    import importlib

    monkeypatch.syspath_prepend(str(ASV_DIR))
    regressions = importlib.import_module("regressions")
    noise = "bench_floor.RatioToFloorOneThread.track_ratio_to_floor('32x251x7x7', 'nchw', 'x')"
    real = "bench_floor.RatioToFloorOneThread.track_ratio_to_floor('8x32x8x8', 'nchw', 'y')"
    steady = "bench_user.UserRatios.track_ratio_to_copy('4x4', 'layer_eval')"
    passes = {  # per asv continuous call: the figures asv compare then prints
        1: [("+", 3.35, 4.39, noise), ("+", 3.57, 5.05, real), ("", 4.9, 5.0, steady)],
        2: [("", 3.36, 3.40, noise), ("", 4.49, 5.02, real)],
    }
    calls = []

    def fake_run(cmd, **kwargs):
        if cmd[1] == "continuous":
            calls.append(cmd[cmd.index("--bench") + 1])
            return SimpleNamespace(returncode=1, stdout="", stderr="")
        factor = float(cmd[cmd.index("--factor") + 1])
        rows = [(m if m else ("+" if b > factor * a else " "), a, b, n)
                for m, a, b, n in passes[len(calls)]]
        return SimpleNamespace(returncode=0, stdout=_asv_compare_output(rows), stderr="")

    monkeypatch.setattr(regressions.subprocess, "run", fake_run)
    assert regressions.main(["main", "HEAD"]) == 1
    out = capsys.readouterr().out
    assert calls[0] == regressions.REGRESSION_SET and len(calls) == 2
    assert calls[1] == "^" + "$|^".join(map(__import__("re").escape, (noise, real))) + "$"
    assert f"not confirmed    1.01x  {noise}" in out
    assert f"CONFIRMED    1.41x  {real}" in out
    assert steady not in out and "1 slower by more than 1.3x" in out

    # nothing flagged: one asv run, exit 0
    passes[1] = [("", 3.35, 3.40, noise)]
    calls.clear()
    assert regressions.main(["main", "HEAD"]) == 0 and len(calls) == 1
    # only noise flagged: exit 0
    passes[1], passes[2] = [("+", 3.35, 4.39, noise)], [("", 3.36, 3.40, noise)]
    calls.clear()
    assert regressions.main(["main", "HEAD"]) == 0 and len(calls) == 2


def test_layer_ops_are_timed_against_their_floors(tmp_path, capsys):
    """--ops layer: the layer's training call, inference call and training step, with the
    copy floor for the calls and the add floor for the step (which yields a gradient)."""
    path = tmp_path / "layer.json"
    argv = ["bench", "--shapes", "8x4,4x3x5x5", "--layout", "nhwc", "--ops", "layer,eval",
            "--repeat", "1", "--no-progress", "--no-onnxruntime", "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "layer-step: training call then backward" in out
    data = json.loads(path.read_text())
    assert data["meta"]["ops"] == ["layer-train", "layer-eval", "layer-step", "eval"]
    assert len(data["rows"]) == 8
    floors = {tuple(d["shape"]): d["floors"] for d in data["detail"]}
    for r in data["rows"]:
        assert r["batchnorm"]["ms"] > 0 and r["batchnorm out="]["ms"] > 0
        assert (r.get("torch", {}).get("ms") is not None) == _has_torch()
        shape = tuple(int(n) for n in r["shape"].split("x"))
        kind = "add" if r["op"] == "layer-step" else "copy"
        assert r["floor_ms"] == min(t["median_ms"] for t in floors[shape][kind].values())


@pytest.mark.parametrize("shape, layout", [((6, 5), "2d"), ((4, 3, 5, 5), "nchw"),
                                           ((4, 3, 5, 5), "nhwc")])
@pytest.mark.parametrize("op", _bench.LAYER_OPS)
def test_layer_candidates_compute_what_the_module_computes(shape, layout, op):
    """The layer and PyTorch's module are given the same parameters and statistics, so
    their outputs (a step's: dx) agree: the benchmark compares like with like."""
    torch = pytest.importorskip("torch")
    case = _bench.Case(shape, layout)
    rng = np.random.default_rng(5)
    x = rng.standard_normal(case.shape).astype(np.float32) * 2 + 3
    dy = rng.standard_normal(case.shape).astype(np.float32)
    ax, c = case.axis, case.channels
    g, b = rng.uniform(0.5, 1.5, c).astype(np.float32), rng.uniform(-1, 1, c).astype(np.float32)
    mean, var = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)

    def tview(a):
        t = torch.from_numpy(a)
        return torch.movedim(t, -1, 1) if layout == "nhwc" else t

    y, dx = np.zeros_like(x), np.zeros_like(x)
    cands = _bench._layer_candidates(op, x, dy, y, dx, ax, g, b, mean, var, torch, tview(x),
                                     tview(dy))
    assert set(cands) == {"batchnorm out=", "batchnorm", "torch"}
    ours = cands["batchnorm"]()
    theirs = cands["torch"]().detach()
    if layout == "nhwc":
        theirs = torch.movedim(theirs, 1, -1)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-5)
    cands["batchnorm out="]()
    np.testing.assert_allclose(dx if op == "layer-step" else y, ours, rtol=1e-6, atol=1e-6)
