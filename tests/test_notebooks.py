"""Every notebook in colab/ runs top to bottom without an error, and none is stored with outputs.

Executed with nbclient on the `python3` kernel, which jupyter_client starts with this
interpreter (sys.executable), from the repository root, so the notebook's install cell finds
tcjax importable and skips itself.
"""

import glob
import os
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
def test_runs(path):
  from jupyter_client.kernelspec import KernelSpecManager  # pylint: disable=g-import-not-at-top
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  # jupyter_client runs a spec's bare "python" / "python3" as sys.executable; any other
  # interpreter would test another environment than this one.
  argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
  assert argv0 in ("python", "python3", sys.executable), f"python3 kernel runs {argv0}"
  nb = nbformat.read(path, as_version=4)
  # The kernel is a fresh process: one CPU device, the test suite's cheap compiles, no 8-device
  # simulation (conftest's XLA_FLAGS are not for it).
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={
      "metadata": {"path": ROOT}})
  client.execute(env=env)  # raises CellExecutionError naming the failing cell
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      errors = [o for o in cell.outputs if o.get("output_type") == "error"]
      assert not errors, f"cell {i}: {errors}"
