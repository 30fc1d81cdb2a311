#!/usr/bin/env bash
# Execute notebook/urbansound.ipynb top to bottom and keep its outputs.
#
#   scripts/run_notebook.sh                  full mode: the real clips of ../shared/us8k and the
#                                            committed model; the outputs are written INTO
#                                            notebook/urbansound.ipynb (what gets committed)
#   scripts/run_notebook.sh --quick          quick mode (URBANSOUND_NOTEBOOK_QUICK=1: a small
#                                            synthetic set, tiny epochs) into a temporary file
#   scripts/run_notebook.sh --output PATH    write the executed notebook elsewhere
#   scripts/run_notebook.sh --timeout S      per-cell limit in seconds (default 3600)
#
# The kernel is this project's interpreter (.venv/bin/python, or $PYTHON), whatever Jupyter
# kernels the machine has installed. The notebook is replaced only after a run without errors,
# in one rename, so a failed run leaves the committed file as it was. Runs under `nice`
# ($NICE, default 10): the machine is usually shared with training jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [[ ! -x $PY ]]; then
  echo "error: $PY not found; run scripts/setup.sh --dev first (nbclient and ipykernel are dev extras)" >&2
  exit 2
fi
quick=0
output=""
timeout=3600
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) quick=1; shift ;;
    --output) output=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ $quick == 1 ]]; then
  export URBANSOUND_NOTEBOOK_QUICK=1
  output=${output:-$(mktemp -d)/urbansound.ipynb}
  if [[ $(realpath -m "$output") == $(realpath notebook/urbansound.ipynb) ]]; then
    echo "error: quick-mode outputs must not replace the committed notebook's real-run outputs" >&2
    exit 2
  fi
else
  unset URBANSOUND_NOTEBOOK_QUICK URBANSOUND_NOTEBOOK_EPOCHS
  output=${output:-notebook/urbansound.ipynb}
fi
export URBANSOUND_TORCH_THREADS=${URBANSOUND_TORCH_THREADS:-1}

exec nice -n "${NICE:-10}" "$PY" - notebook/urbansound.ipynb "$output" "$timeout" <<'PYTHON'
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

source, output, timeout = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
nb = nbformat.read(source, as_version=4)
with tempfile.TemporaryDirectory() as kernels:
    # A private kernel spec naming this interpreter: a "python3" kernel installed elsewhere on
    # the machine (another Python, without torch) cannot be picked up by mistake.
    spec = Path(kernels, "urbansound")
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "urbansound", "language": "python"}))
    km = KernelManager(kernel_name="urbansound",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernels]))
    client = NotebookClient(nb, km=km, timeout=timeout, record_timing=False,
                            resources={"metadata": {"path": str(source.parent.resolve())}})
    started = time.monotonic()
    try:
        client.execute()
    except CellExecutionError as exc:
        print(f"error: the notebook failed; {output} was not changed.\n{exc}", file=sys.stderr)
        sys.exit(1)
nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python",
                             "name": "python3"}
output.parent.mkdir(parents=True, exist_ok=True)
tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
nbformat.write(nb, tmp)
os.replace(tmp, output)
size = output.stat().st_size / 2**20
print(f"executed in {(time.monotonic() - started) / 60:.1f} min; wrote {output} ({size:.1f} MiB)")
PYTHON
