"""The colabs/ notebooks run top to bottom on CPU at smoke size (nbclient), reusing the shared smoke workdir;
their committed copies carry no outputs."""

import os
import time

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("mae_quickstart", "au_occlusion", "restore_and_eval")
FIGURES = {"mae_quickstart": 3, "au_occlusion": 4, "restore_and_eval": 1}  # PNGs each displays at least


def _load(name):
  return nbformat.read(os.path.join(ROOT, "colabs", f"{name}.ipynb"), as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs_and_parameterised(name):
  nb = _load(name)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
  assert "parameters" in code[0].metadata.get("tags", ())  # the first code cell holds every size and path
  assert any("jax.devices()" in c.source for c in code)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, au_smoke_run, tmp_path, monkeypatch):
  from nbclient import NotebookClient

  # Read by the notebooks' parameter cells; the kernel inherits this environment.
  monkeypatch.setenv("MAEJAX_NB_SMOKE", "1")
  monkeypatch.setenv("MAEJAX_NB_WORKDIR", str(au_smoke_run.workdir))
  monkeypatch.setenv("MAEJAX_NB_OUT", str(tmp_path))
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as on a laptop
  nb = _load(name)
  t0 = time.time()
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  print(f"{name}: {time.time() - t0:.0f}s")
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert sum("image/png" in o.get("data", {}) for o in outputs) >= FIGURES[name]
  text = "".join(o.get("text", "") for o in outputs)
  if name == "restore_and_eval":  # the notebook asserts equality; this checks the comparison really ran
    assert "largest difference in avg F1" in text
