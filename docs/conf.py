"""Sphinx configuration: API reference from the numpydoc docstrings + Markdown user guide.

Build (the test suite does this with warnings as errors)::

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

from pathlib import Path

import tilepipe

DOCS = Path(__file__).resolve().parent

project = "tilepipe"
author = "tilepipe developers"
copyright = "tilepipe developers"
release = version = tilepipe.__version__
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
autodoc_typehints = "none"  # numpydoc renders the types written in the docstrings
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
numpydoc_show_class_members = False
numpydoc_validation_checks: set[str] = set()
myst_heading_anchors = 3
html_theme = "alabaster"
# Suppressed warning classes, each for a reason:
# * myst.header: the user-guide pages are Markdown written for GitHub, where a page may
#   start at "##" or skip a heading level; that is fine for reading and not an error.
# * myst.xref_missing: the guide pages link to repository files (../notebooks/*.py,
#   ../benchmarks/...) that are not part of the Sphinx project; they work on GitHub.
suppress_warnings = ["myst.header", "myst.xref_missing"]
nitpicky = False

# The user guide is every Markdown page in docs/ (colleagues add pages as modules land):
# the toctree placeholder GUIDE-PAGES in index.rst is replaced by the list of pages, the
# tiling scheme and the data model first, the rest alphabetically.  A glob toctree cannot be
# used because it would also pick up api.rst, which sits in its own "Reference" toctree.
_FIRST = ("tiling", "data_model")


def _guide_pages() -> list[str]:
    pages = sorted(p.stem for p in DOCS.glob("*.md"))
    return [p for p in _FIRST if p in pages] + [p for p in pages if p not in _FIRST]


def _fill_guide_toctree(app, docname: str, source: list[str]) -> None:
    if docname == "index":
        source[0] = source[0].replace("   GUIDE-PAGES", "\n".join(f"   {p}" for p in _guide_pages()))


def setup(app):
    app.connect("source-read", _fill_guide_toctree)
    return {"parallel_read_safe": True}
