"""Every notebook in colab/ runs top to bottom without an error, and none is stored with outputs.

Executed with nbclient on the `python3` kernel, which jupyter_client starts with this
interpreter (sys.executable), from the repository root, so the notebook's install cell finds
tcjax importable and skips itself. The kernel gets TCJAX_NOTEBOOK_TINY=1: notebooks with long
work (02 to 04) read it in their install cell (`TINY`) and run every cell on fewer examples,
plans, steps or frames. Measured: 9 to 30 CPU-s per notebook (03 the most: its resume with more
steps compiles the training step a second time).
"""

import glob
import os
import re
import sys

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))


def test_notebooks_exist():
  assert NOTEBOOKS, "no notebook in colab/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"cell {i} has stored outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_colab_ready(path):
  """An install cell with the repository URL in one variable, and a note for TPU / GPU runtimes."""
  nb = nbformat.read(path, as_version=4)
  code = [c.source for c in nb.cells if c.cell_type == "code"]
  text = " ".join(c.source for c in nb.cells if c.cell_type == "markdown")
  assert any(re.search(r"^REPO_URL = ", src, re.M) for src in code), "no REPO_URL install cell"
  assert "TPU" in text and "GPU" in text, "no note for TPU and GPU runtimes"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_runs(path, tmp_path):
  from jupyter_client.kernelspec import KernelSpecManager  # pylint: disable=g-import-not-at-top
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  # jupyter_client runs a spec's bare "python" / "python3" as sys.executable; any other
  # interpreter would test another environment than this one.
  argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
  assert argv0 in ("python", "python3", sys.executable), f"python3 kernel runs {argv0}"
  nb = nbformat.read(path, as_version=4)
  # The kernel is a fresh process: one CPU device (04 asks for 8 itself, in its first cell), the
  # test suite's cheap compiles (conftest's XLA_FLAGS are not for it), tiny mode, and temporary
  # files (03's training run) under pytest's tmp_path.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0",
             TCJAX_NOTEBOOK_TINY="1", TMPDIR=str(tmp_path))
  client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={
      "metadata": {"path": ROOT}})
  client.execute(env=env)  # raises CellExecutionError naming the failing cell
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      errors = [o for o in cell.outputs if o.get("output_type") == "error"]
      assert not errors, f"cell {i}: {errors}"
