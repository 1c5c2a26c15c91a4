"""Sphinx configuration of the batchnorm user guide.

Build: ``python -m sphinx -W -b html docs docs/_build/html`` (warnings are errors).
The figures are drawn by ``figures.py`` (matplotlib, a docs-only dependency) at build time,
from numbers computed by the installed package.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # for figures.py

import batchnorm  # noqa: E402  (the installed package: the guide documents what is installed)
import figures  # noqa: E402

project = "batchnorm"
author = "the batchnorm developers"
copyright = "the batchnorm developers"
release = batchnorm.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
]

exclude_patterns = ["_build", "_generated"]
templates_path = []
html_static_path = []
html_theme = "alabaster"
html_theme_options = {"description": "Batch normalization for NumPy, fast and explained"}

# API reference from the numpydoc-style docstrings.
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings say the types; signatures stay short

# Code examples: plain ">>>" blocks, run by the doctest builder (and by tests/test_guide.py).
# Every page imports what it uses, so the same blocks also run under doctest.testfile.
doctest_test_doctest_blocks = "default"
# Examples that need a framework (convert.rst) are ``.. doctest::`` blocks with
# ``:skipif: not have("torch")``: skipped where it is not installed, run where it is (CI).
doctest_global_setup = """
import importlib.util
def have(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)
"""

nitpicky = False


def setup(app):
    def draw(app):
        figures.draw_all(os.path.join(app.srcdir, "_generated"))

    app.connect("builder-inited", draw)
