"""Sphinx configuration: API reference from the numpydoc docstrings + Markdown user guide."""

from __future__ import annotations

import tilepipe

project = "tilepipe"
author = "tilepipe developers"
release = version = tilepipe.__version__
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
autosummary_generate = False
autodoc_typehints = "none"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
numpydoc_show_class_members = False
numpydoc_validation_checks: set[str] = set()
myst_heading_anchors = 3
html_theme = "alabaster"
suppress_warnings = ["myst.header", "myst.xref_missing", "ref.python"]
nitpicky = False
