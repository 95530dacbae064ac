"""Every notebook in notebooks/ runs top to bottom, headless, on this machine (GPU cells skip themselves
without a GPU): once against the repository's results (whatever exists, possibly nothing) and once against
synthetic results in the sweeps' exact schemas, so the with-data cells run even before anything is
measured."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[test]')")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install -e '.[test]')")

import quick_lab  # noqa: E402
from quick_lab.report.results import RESULTS_ENV  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def test_there_are_notebooks():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_interleave.ipynb", "02_bank_conflicts.ipynb", "03_tile_sizes.ipynb",
            "04_throughput_and_e2e.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_have_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: cell {i} has outputs"


def _execute(path: Path, workdir: Path, monkeypatch, results: Path | None):
    # The kernel is a subprocess: it inherits this environment. Put this interpreter first on PATH (the
    # python3 kernelspec runs "python") and the quick_lab under test (the checkout, or an installed wheel)
    # first on PYTHONPATH; "the repository's results" are this checkout's results/ either way.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("PYTHONPATH", str(Path(quick_lab.__file__).resolve().parents[1]) + os.pathsep
                       + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    if results is None:
        monkeypatch.delenv(RESULTS_ENV, raising=False)
        monkeypatch.setenv("QUICK_LAB_RESULTS_ROOT", str(REPO / "results"))
    else:
        monkeypatch.setenv(RESULTS_ENV, str(results))
    copy = workdir / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{exc}")
    return nb


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_repository_results(path, tmp_path, monkeypatch):
    nb = _execute(path, tmp_path, monkeypatch, results=None)
    assert "results directory:" in _text(nb)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_synthetic_results(path, tmp_path, monkeypatch):
    from test_figures import write_synthetic_results

    results = write_synthetic_results(tmp_path / "results" / "synthetic-gpu")
    nb = _execute(path, tmp_path, monkeypatch, results=results)
    text = _text(nb)
    assert str(results) in text
    assert "no tiles.csv" not in text and "no e2e.csv" not in text and "no conflicts.csv" not in text
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= 1
