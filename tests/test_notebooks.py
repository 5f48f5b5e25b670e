"""Execute the tutorial notebooks and check that each .ipynb is in sync with its jupytext .py.

The ``.py`` files (jupytext percent format) are the reviewed source; the ``.ipynb`` pairs are
stored with outputs stripped.  After editing a ``.py``:
``jupytext --to ipynb --update notebooks/NAME.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import nbformat  # noqa: E402
import jupytext  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"

# Every notebook executed by the suite (all of them; a notebook that cannot run yet is
# listed in NOT_EXECUTED with the reason, never skipped silently).
EXECUTED = [
    "01_quickstart",
    "02_photometric_pipeline",
    "03_empirical_psf",
    "04_varying_psf",
    "05_subtraction",
    "06_galaxy_cutouts",
    "07_scaling_out",
]
NOT_EXECUTED: dict[str, str] = {}

CELL_TIMEOUT_S = 600


def _pairs() -> list[str]:
    return sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.py"))


def _code_cells(nb) -> list[str]:
    return [c.source.strip() for c in nb.cells if c.cell_type == "code"]


def test_every_notebook_is_accounted_for():
    names = _pairs()
    assert names, f"no notebooks found in {NOTEBOOKS_DIR}"
    assert sorted(EXECUTED + list(NOT_EXECUTED)) == names, (
        "notebooks/*.py and the EXECUTED / NOT_EXECUTED lists of this test disagree")
    ipynbs = sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.ipynb"))
    assert ipynbs == names, "every notebooks/NAME.py needs its paired NAME.ipynb (jupytext --to ipynb --update)"


@pytest.mark.parametrize("name", _pairs())
def test_ipynb_in_sync_with_py(name):
    """Same cells (type and source) in the .ipynb as in the .py, and no stored outputs."""
    py = jupytext.read(NOTEBOOKS_DIR / f"{name}.py")
    ipynb = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
    assert _code_cells(ipynb) == _code_cells(py), (
        f"{name}.ipynb is out of sync with {name}.py: run `jupytext --to ipynb --update notebooks/{name}.py`")
    assert [c.cell_type for c in ipynb.cells] == [c.cell_type for c in py.cells]
    for cell in ipynb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, (
                f"{name}.ipynb stores outputs: strip them (jupytext --to ipynb --update notebooks/{name}.py)")


@pytest.mark.slow
@pytest.mark.parametrize("name", EXECUTED)
def test_notebook_executes(name, shared_data):
    """Run the notebook top to bottom in a fresh kernel, with the notebooks folder as cwd."""
    nb = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
    env_before = os.environ.get("TILEPIPE_SHARED_DATA")
    os.environ["TILEPIPE_SHARED_DATA"] = str(shared_data)  # the kernel inherits it
    try:
        client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
        client.execute()
    finally:
        if env_before is None:
            os.environ.pop("TILEPIPE_SHARED_DATA", None)
        else:
            os.environ["TILEPIPE_SHARED_DATA"] = env_before
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
