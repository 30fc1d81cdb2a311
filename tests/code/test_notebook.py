"""The notebook runs top to bottom (quick mode: synthetic data, tiny epochs) and the committed copy
carries the outputs of a real run on UrbanSound8K with the committed model.

The run executes an in-memory copy in a kernel started from this interpreter (a private kernel
spec, so whatever Jupyter kernels the machine has are irrelevant); the committed file is never
rewritten. Full-mode outputs come from ``scripts/run_notebook.sh``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebook" / "urbansound.ipynb"
CELL_TIMEOUT_S = 900  # per cell: a hang fails; the whole quick run is ~20 s of kernel CPU


def _text(cell) -> str:
    """Everything a code cell showed: streams, plain text and Markdown displays, errors."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            data = out.get("data", {})
            parts.append(data.get("text/markdown") or data.get("text/plain", ""))
        elif out.output_type == "error":
            parts.append(f"{out.ename}: {out.evalue}")
    return "\n".join(parts)


def _kernel_manager(kernel_dir: Path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = kernel_dir / "urbansound-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "urbansound (tests)", "language": "python"}))
    return KernelManager(kernel_name="urbansound-test",
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))


@pytest.fixture(scope="module")
def committed():
    return nbformat.read(NOTEBOOK, as_version=4)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about a minute on an idle machine; a shared one can be far slower
def test_notebook_runs_top_to_bottom_in_quick_mode(tmp_path, monkeypatch):
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("URBANSOUND_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("URBANSOUND_TORCH_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("URBANSOUND_STATE_DIR", str(tmp_path / "var"))  # nothing in var/ is touched
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path / "kernels"), timeout=CELL_TIMEOUT_S,
        record_timing=False, resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"the notebook failed in quick mode:\n{exc}", pytrace=False)
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")  # for a look after a failure

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    shown = "\n".join(_text(c) for c in code)
    assert "mode: quick" in shown
    images = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert images >= 8, f"only {images} figures were displayed"
    evaluation = "\n".join(_text(c) for c in code if "evaluation" in c.metadata.get("tags", []))
    assert "SYNTHETIC" in evaluation, "quick-mode results must say they are synthetic"


def test_first_code_cell_holds_the_parameters(committed):
    first = next(c for c in committed.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", [])
    for name in ("DATA =", "QUICK = False", "EPOCHS =", "MAX_CLIPS ="):
        assert name in first.source


def test_committed_outputs_come_from_a_real_run(committed):
    code = [c for c in committed.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert all(counts) and counts == sorted(counts), \
        "the committed notebook must be executed top to bottom: run scripts/run_notebook.sh"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    shown = "\n".join(_text(c) for c in code)
    assert "mode: full" in shown, "the committed outputs are from a quick run"
    evaluation = "\n".join(_text(c) for c in code if "evaluation" in c.metadata.get("tags", []))
    assert "UrbanSound8K fold 3" in evaluation
    assert "synthetic" not in evaluation.lower()
    assert NOTEBOOK.stat().st_size < 3 * 2**20, "keep the committed notebook under 3 MiB"


def test_committed_outputs_evaluate_the_committed_model(committed):
    from src import registry

    try:
        version, _ = registry.current(ROOT / "models")
    except registry.RegistryError:
        pytest.skip("no committed model in models/")
    evaluation = "\n".join(_text(c) for c in committed.cells
                           if c.cell_type == "code" and "evaluation" in c.metadata.get("tags", []))
    assert f"the committed model `{version}`" in evaluation, (
        f"the notebook's evaluation is not of the served model {version}: "
        "re-run scripts/run_notebook.sh after committing a new model")
