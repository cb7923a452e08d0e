"""notebooks/*.ipynb run top to bottom in a real IPython kernel (nbclient), on their quick settings.

The default suite runs notebooks 1 and 2 as they are, and 3, 4 and 5 on runs and an export made
once and shared (one tiny training and its export here, plus the session's tiny run from
conftest.py), so that their own cells (reading run.json and TensorBoard, evaluation, serving) run
without each training again. The slow test runs
every notebook exactly as committed, training included (`bash scripts/test.sh -m slow`).
A notebook that raises fails: `test_a_notebook_that_raises_fails` proves it on a broken copy.
"""
from __future__ import annotations

import json
import os
import time

# Installed by the test command (requirements/lock.txt): missing, the install is broken: an
# import error, not a skip.
import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
ALL = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))
CELL_TIMEOUT_S = 600


def execute(path: str, parameters: dict | None = None, cwd: str = NOTEBOOKS
            ) -> tuple[object, float]:
  """Runs the notebook (with `parameters` assigned right after its `parameters` cell, as papermill
  does) -> (executed notebook, wall seconds). Raises nbclient's CellExecutionError on a failure."""
  nb = nbformat.read(path, as_version=4)
  if parameters:
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", ()))
    source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected"]}))
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": cwd}})
  t0 = time.perf_counter()
  client.execute()
  return nb, time.perf_counter() - t0


def errors(nb) -> list[str]:
  return [o.get("ename", "") for c in nb.cells if c.cell_type == "code"
          for o in c.get("outputs", []) if o.get("output_type") == "error"]


def test_notebooks_are_committed_without_outputs_and_have_a_quick_parameter():
  assert ALL == ["01_dataset_exploration.ipynb", "02_augmentation_preview.ipynb",
                 "03_training_curves.ipynb", "04_error_analysis.ipynb", "05_rest_api.ipynb",
                 "06_transfer_learning.ipynb"]
  for name in ALL:
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{name} has outputs"
    params = [c for c in code if "parameters" in c.metadata.get("tags", ())]
    assert len(params) == 1 and "quick = True" in params[0].source, name
    # The library's own functions, not a copy of the pipeline.
    assert any("from jaxclf" in c.source for c in code), name


@pytest.fixture(scope="module")
def shared_runs(single_view_tiny_run, tmp_path_factory):
  """The inputs of notebooks 3-5 in the default suite: a tiny run on the notebooks' quick settings
  (AdamW) and its export, plus the session's tiny run of `configs/cnn.py:tiny` as committed (SGD;
  trained once per session for tests/test_served_agreement.py too) to compare it with."""
  from conftest import train_tiny_run  # noqa: PLC0415
  from jaxclf.export.onnx import export_run  # noqa: PLC0415
  root = tmp_path_factory.mktemp("nb-runs")
  run_dir = str(root / "adamw")
  train_tiny_run(run_dir, ["data.limit_per_split=512", "train.num_epochs=2", "optimizer.name=adamw",
                           "optimizer.learning_rate=0.003", "schedule.name=constant",
                           "train.tta_flip=false"])
  export_dir = str(root / "export")
  export_run(run_dir, export_dir)
  return [run_dir, single_view_tiny_run[0]], export_dir


def _injected(name: str, shared, tmp_path) -> dict:
  if shared is None:
    return {"workdir": str(tmp_path)}
  runs, export_dir = shared
  return {"03_training_curves.ipynb": {"runs": runs},
          # The export: scored by onnxruntime as served (the run's checkpoint path: the slow test).
          "04_error_analysis.ipynb": {"model_path": export_dir, "workdir": str(tmp_path),
                                      "max_examples": 500},
          "05_rest_api.ipynb": {"export_dir": export_dir, "workdir": str(tmp_path)},
          }[name]


@pytest.mark.parametrize("name", ALL)
def test_notebook_runs_on_its_quick_settings(name, request, tmp_path):
  shared = request.getfixturevalue("shared_runs") if name[:2] in ("03", "04", "05") else None
  nb, seconds = execute(os.path.join(NOTEBOOKS, name), _injected(name, shared, tmp_path))
  mode = "shared runs" if shared else "quick"
  print(json.dumps({"notebook": name, "wall_s": round(seconds, 1), "mode": mode}))
  assert not errors(nb)
  # Each ran every code cell and drew its figures.
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code), name
  assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
             for c in code for o in c.outputs), f"{name} drew no figure"


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_notebook_runs_as_committed(name, tmp_path):
  """Training and export included: what a user gets running the notebook top to bottom."""
  nb, seconds = execute(os.path.join(NOTEBOOKS, name), {"workdir": str(tmp_path)})
  print(json.dumps({"notebook": name, "wall_s": round(seconds, 1), "mode": "as committed"}))
  assert not errors(nb)


def test_a_notebook_that_raises_fails(tmp_path):
  nb = nbformat.read(os.path.join(NOTEBOOKS, "02_augmentation_preview.ipynb"), as_version=4)
  broken = nbformat.v4.new_code_cell("from jaxclf.data import transforms\n"
                                     "transforms.AugmentSpec(no_such_switch=1)")
  nb.cells.insert(2, broken)  # right after the parameters: the heavy cells never run
  path = tmp_path / "broken.ipynb"
  nbformat.write(nb, str(path))
  with pytest.raises(nbclient.exceptions.CellExecutionError, match="no_such_switch"):
    execute(str(path))
