"""Every notebook in notebooks/ runs headless, start to finish, without errors."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "notebooks are committed with outputs stripped"
    )
    # A cell's timeout guards against a hang; each cell takes well under a minute on 2 idle
    # cores, and the suite must hold on 2 cores shared with another busy process.
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3").execute(
        cwd=str(path.parent)
    )
