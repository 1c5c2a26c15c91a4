"""The user guide's examples run and say what they claim.

* every ``>>>`` example in docs/*.rst runs under doctest (the same blocks Sphinx's doctest
  builder runs in CI);
* every ``$ python -m batchnorm ...`` command shown in the guide runs;
* the C and Cython examples the guide includes compile, run, and print the API's numbers;
* the numbers behind the figures are what the captions say.

The guide lives in the source tree (docs/ next to tests/); without it these tests skip.
"""

from __future__ import annotations

import doctest
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.__main__ import main as cli_main
from conftest import require

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.rst")) if DOCS.is_dir() else []

pytestmark = pytest.mark.skipif(not PAGES, reason="docs/ not found next to tests/")

BATCH = np.array([[4, 5, 2, 1], [3, 4, 6, 0], [1, 4, 7, 9]], dtype=np.float64)


def test_guide_has_the_pages():
    names = {p.stem for p in PAGES}
    for page in ("index", "axes", "training_inference", "parameters", "gradients",
                 "conventions", "performance", "c_cython", "api", "explain", "install"):
        assert page in names, page


# The extra each framework named in a page's ``:skipif: not have(...)`` comes from.
FRAMEWORK_EXTRAS = {"torch": "torch", "keras": "test-frameworks", "jax": "test-frameworks",
                    "flax": "test-frameworks", "onnx": "test", "onnxruntime": "test"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_examples(page):
    """The page's >>> examples, run in one namespace per page as Sphinx's doctest does.

    A page whose blocks need frameworks (``:skipif: not have("torch")``) needs them all here;
    without them it skips (it fails where CI requires them)."""
    text = page.read_text(encoding="utf-8")
    for call in re.findall(r":skipif: not have\(([^)]*)\)", text):
        for module in re.findall(r'"([\w.]+)"', call):
            require(module, FRAMEWORK_EXTRAS[module])
    result = doctest.testfile(
        str(page), module_relative=False, encoding="utf-8", verbose=False, report=True,
        optionflags=doctest.ELLIPSIS,
    )
    assert result.failed == 0, (
        f"{result.failed} of {result.attempted} examples failed in {page.name}")


def test_pages_with_numbers_have_examples():
    """Every page but the placeholder and the API index shows computed numbers."""
    for page in PAGES:
        if page.stem in ("performance", "api"):
            continue
        assert ">>> " in page.read_text(encoding="utf-8"), f"{page.name} has no example"


def _commands():
    cmds = []
    for page in PAGES:
        for line in page.read_text(encoding="utf-8").splitlines():
            m = re.match(r"\s*\$ python -m batchnorm (.*)$", line)
            if m:
                cmds.append(pytest.param(shlex.split(m.group(1)), id=f"{page.stem}: {m.group(1)}"))
    return cmds


@pytest.mark.parametrize("argv", _commands())
def test_console_commands(argv, capsys):
    assert cli_main(argv) == 0
    assert capsys.readouterr().out.strip()


def test_the_guide_states_the_walkthrough_numbers():
    """The prose of the worked example matches what the package computes."""
    text = (DOCS / "training_inference.rst").read_text(encoding="utf-8")
    st = bn.batch_stats(BATCH)
    y = bn.forward_eval(np.array([[3.0, 5, 7, 9]]), st.mean, st.var, eps=0.0)[0]
    answer = "(" + ", ".join(f"{v:.2f}" for v in y) + ")"
    assert answer == "(0.27, 1.41, 0.93, 1.41)"
    assert answer in text
    assert "(8/3, 13/3, 5, 10/3)" in text and "(14/9, 2/9, 14/3, 146/9)" in text
    np.testing.assert_allclose(st.mean * 3, [8, 13, 15, 10])
    np.testing.assert_allclose(st.var * 9, [14, 2, 42, 146])


# --- figures ---------------------------------------------------------------------------------


def _figures_module():
    spec = importlib.util.spec_from_file_location("bn_docs_figures", DOCS / "figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_figure_data():
    fig = _figures_module()
    z, y, st = fig.hidden_activations()
    assert z.shape == y.shape and st.mean.shape == (z.shape[1],)
    assert np.ptp(st.mean) > 10  # before BN: features far apart
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(y.var(axis=0), 1, atol=1e-3)
    r = fig.running_means(steps=50)
    curves = r["curves"]
    cumulative = next(c for name, c in curves.items() if name.startswith("cumulative"))
    np.testing.assert_allclose(cumulative[-1], r["batch_means"].mean(), rtol=1e-12)
    keras = next(c for name, c in curves.items() if name.startswith("Keras"))
    torch = next(c for name, c in curves.items() if name.startswith("PyTorch"))
    assert keras[-1] < torch[-1]  # momentum 0.01 has not caught up yet
    np.testing.assert_allclose(torch[0], 0.1 * r["batch_means"][0], rtol=1e-12)


def test_figures_draw(tmp_path):
    pytest.importorskip("matplotlib")
    _figures_module().draw_all(str(tmp_path))
    for name in ("activations.png", "running_mean.png"):
        assert (tmp_path / name).stat().st_size > 10_000


# --- the C and Cython examples ----------------------------------------------------------------


def _cc():
    if not sys.platform.startswith("linux"):
        pytest.skip("the examples are compiled with Linux/gcc conventions")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    return cc


def test_c_example(tmp_path):
    """docs/examples/bn_example.c against the C core's sources (baseline kernels, no OpenMP)."""
    cc = _cc()
    core = ROOT / "bn_c"
    if not (core / "meson.build").exists():
        pytest.skip("bn_c/ not found")
    m = re.search(r"kernel_sources\s*=\s*files\(([^)]*)\)", (core / "meson.build").read_text())
    if m is None:
        pytest.skip("cannot read the kernel sources from bn_c/meson.build")
    kernels = {core / s for s in re.findall(r"'([^']+)'", m.group(1))}
    objects = []
    for src in sorted((core / "src").glob("*.c")):
        obj = tmp_path / (src.stem + ".o")
        flags = ["-DBN_ISA=baseline"] if src in kernels else []
        subprocess.run([cc, "-std=c11", "-O1", "-I", str(core / "include"), *flags, "-c",
                        str(src), "-o", str(obj)], check=True)
        objects.append(str(obj))
    exe = tmp_path / "bn_example"
    subprocess.run([cc, "-std=c11", "-I", str(core / "include"),
                    str(DOCS / "examples" / "bn_example.c"), *objects, "-lm", "-o", str(exe)],
                   check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    lines = {ln.split()[0]: [float(v) for v in ln.split()[1:]] for ln in out.splitlines()
             if ln.split()[0] != "isa"}
    y, st = bn.forward_train(BATCH, eps=0.0)
    np.testing.assert_allclose(lines["mean"], st.mean, atol=1e-4)
    np.testing.assert_allclose(lines["var"], st.var, atol=1e-4)
    np.testing.assert_allclose(lines["y[0]"], y[0], atol=1e-4)


def test_cython_example(tmp_path, monkeypatch):
    """docs/examples/cimport_example.pyx: `from batchnorm cimport _kernels` builds and runs."""
    pytest.importorskip("Cython")
    cc = _cc()
    pkg_parent = str(Path(bn.__file__).resolve().parent.parent)
    if not (Path(pkg_parent) / "batchnorm" / "_kernels.pxd").exists():
        pytest.skip("batchnorm/_kernels.pxd is not installed next to the package")
    src = tmp_path / "cimport_example.pyx"
    shutil.copy(DOCS / "examples" / "cimport_example.pyx", src)
    c_file = tmp_path / "cimport_example.c"
    subprocess.run([sys.executable, "-m", "cython", "-3", "-I", pkg_parent, str(src),
                    "-o", str(c_file)], check=True)
    ext = tmp_path / ("cimport_example" + sysconfig.get_config_var("EXT_SUFFIX"))
    include = sysconfig.get_paths()["include"]
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-I", include, str(c_file), "-o", str(ext)],
                   check=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("cimport_example")
    y, mean, var = mod.normalize_features(BATCH, 0.0)
    y_ref, st = bn.forward_train(BATCH, eps=0.0)
    np.testing.assert_array_equal(mean, st.mean)
    np.testing.assert_array_equal(var, st.var)
    np.testing.assert_array_equal(y, y_ref)


# --- the README --------------------------------------------------------------------------------


def _readme() -> str:
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md not found")
    return readme.read_text(encoding="utf-8")


def test_readme_starts_with_the_two_commands():
    """CI runs the second ```bash block as its test command: it must stay what it is."""
    blocks = re.findall(r"^```bash\n(.*?)\n```", _readme(), re.S | re.M)
    assert blocks[:2] == ['pip install . && python -m batchnorm explain',
                          'pip install ".[test]" && python -m pytest tests']


def test_readme_example_runs():
    blocks = re.findall(r"^```python\n(.*?)```", _readme(), re.S | re.M)
    assert blocks
    for i, code in enumerate(blocks):
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
        assert namespace["st"].mean.shape == (4,)
        if i == 0:      # the quick example
            assert namespace["y1"].shape == (1, 4)


def test_readme_links_to_the_guide():
    for target in re.findall(r"\]\((docs/[^)]+)\)", _readme()):
        assert (ROOT / target).exists(), target
