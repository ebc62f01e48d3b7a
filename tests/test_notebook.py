"""notebooks/quickstart.ipynb runs top to bottom, headless, shrunk by EA_JAX_NOTEBOOK_TINY=1."""

import os

import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_executes(monkeypatch):
  monkeypatch.setenv("EA_JAX_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel starts in notebooks/ (as Jupyter would) and inherits the environment above.
  client = nbclient.NotebookClient(
    nb,
    timeout=240,
    kernel_name="python3",
    resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}},
  )
  client.execute()
  outputs = {
    i: "".join(o.get("text", "") for o in c.get("outputs", []))
    for i, c in enumerate(nb.cells)
    if c.cell_type == "code"
  }
  text = "\n".join(outputs.values())
  assert "tiny: True" in text
  assert "ea: token acc" in text and "dpa: token acc" in text
  images = sum(
    "image/png" in o.get("data", {})
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
  )
  assert images == 3  # accuracy curves, attention map, geometry histograms
