"""The notebooks in notebooks/ run top to bottom, and are committed without outputs.

Each notebook runs in a kernel of its own (a separate process with this interpreter, see
tests/run_notebooks.py) that starts its own private Ray with ``address="local"``, beside the
one this test session may be running; it never joins that one. A cell that raises fails the
test, and so do the notebooks' own assertions (exact counters, rows in SQLite).
"""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError, CellTimeoutError
from nbformat.v4 import new_code_cell, new_notebook
from run_notebooks import NOTEBOOK_DIR, execute, notebooks

EXPECTED = ["01_quickstart.ipynb", "02_shared_cache.ipynb", "03_pipeline_checkpoints.ipynb"]
NOTEBOOK_TIMEOUT_S = 300


def test_the_notebooks_are_there():
    names = [os.path.basename(p) for p in notebooks()]
    assert names[:len(EXPECTED)] == EXPECTED


@pytest.mark.parametrize("path", notebooks(), ids=os.path.basename)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    kept = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
            and (cell.outputs or cell.execution_count is not None)]
    assert not kept, (f"{os.path.basename(path)}: code cells {kept} have outputs or "
                      "execution counts; clear them before committing (e.g. `jupyter "
                      "nbconvert --clear-output --inplace`)")


def outputs(nb: nbformat.NotebookNode, mime: str) -> list[str]:
    return [o.data[mime] for cell in nb.cells if cell.cell_type == "code"
            for o in cell.outputs if mime in o.get("data", {})]


@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S + 60)  # a margin for the kernel's start and stop
def test_quickstart_runs(tmp_path):
    nb = execute(os.path.join(NOTEBOOK_DIR, "01_quickstart.ipynb"),
                 str(tmp_path / "01_quickstart.ipynb"), NOTEBOOK_TIMEOUT_S)
    # cache.metrics() rendered as tables (Metrics._repr_html_): one shard, then four.
    tables = [h for h in outputs(nb, "text/html") if "Per shard:" in h]
    rows = [h.split("Per shard:")[1].split("</table>")[0].count("<tr>") for h in tables]
    assert rows == [1 + 1, 1 + 4]  # a header and a row per shard
    # metrics.to_frame(): a DataFrame, with a row per shard of the four-shard cache.
    frames = [h for h in outputs(nb, "text/html") if 'class="dataframe"' in h]
    assert len(frames) == 1 and frames[0].split("<tbody>")[1].count("<tr>") == 4


@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S + 60)
def test_shared_cache_runs(tmp_path):
    nb = execute(os.path.join(NOTEBOOK_DIR, "02_shared_cache.ipynb"),
                 str(tmp_path / "02_shared_cache.ipynb"), NOTEBOOK_TIMEOUT_S)
    assert len(outputs(nb, "image/png")) == 2  # the plots, drawn with no display
    assert any("Per shard:" in h for h in outputs(nb, "text/html"))


@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S + 60)
def test_pipeline_checkpoints_runs(tmp_path):
    nb = execute(os.path.join(NOTEBOOK_DIR, "03_pipeline_checkpoints.ipynb"),
                 str(tmp_path / "03_pipeline_checkpoints.ipynb"), NOTEBOOK_TIMEOUT_S)
    text = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for o in cell.outputs)
    assert "killed, exit code -9" in text
    assert "resuming at event" in text and "each counted once" in text
    assert any('class="dataframe"' in h for h in outputs(nb, "text/html"))


def test_a_failing_cell_fails_the_run(tmp_path):
    path = str(tmp_path / "fails.ipynb")
    nbformat.write(new_notebook(cells=[new_code_cell("x = 1"),
                                       new_code_cell("assert x == 2, 'the check failed'"),
                                       new_code_cell("print('never runs')")]), path)
    out = str(tmp_path / "fails.out.ipynb")
    with pytest.raises(CellExecutionError, match="the check failed"):
        execute(path, out)
    nb = nbformat.read(out, as_version=4)
    assert nb.cells[1].outputs[0].output_type == "error"
    assert nb.cells[2].outputs == []


def test_a_notebook_over_its_time_fails(tmp_path):
    path = str(tmp_path / "slow.ipynb")
    nbformat.write(new_notebook(cells=[new_code_cell("import time; time.sleep(1.5)"),
                                       new_code_cell("time.sleep(60)")]), path)
    with pytest.raises(CellTimeoutError):
        execute(path, timeout_s=3)
