"""Build the Sphinx documentation with warnings as errors (autodoc + numpydoc + myst-parser)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_docs_build_without_warnings(tmp_path):
    out = tmp_path / "html"
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q",
           "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sphinx-build failed (rc={proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-15000:]}"
    assert (out / "index.html").is_file()
    assert (out / "api.html").is_file()
    api = (out / "api.html").read_text(encoding="utf-8")
    for name in ("tilepipe.tiling.TileGrid", "tilepipe.image.open_image", "tilepipe.background.estimate_background",
                 "tilepipe.detect.detect_sources", "tilepipe.subtract.subtract"):
        assert f'id="{name}"' in api, f"{name} missing from the API reference"
    index = (out / "index.html").read_text(encoding="utf-8")
    for page in sorted(p.stem for p in DOCS.glob("*.md")):
        assert f'href="{page}.html"' in index, f"user-guide page {page}.md is not in the index toctree"
