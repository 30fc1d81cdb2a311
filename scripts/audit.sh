#!/usr/bin/env bash
# Reruns the hostile audit behind the README's reliability table and prints its counts:
# bad inputs tried / answered cleanly (decoder fuzz, schemathesis over every API operation, the
# hardening reproductions), faults tried / survived (kill -9 of gunicorn worker and master
# during uploads, of the Celery pool child and worker group mid-epoch, corrupted CURRENT).
# Needs what `scripts/test.sh` needs (Postgres and Redis for the worker kills). ~10 minutes.
#   bash scripts/audit.sh            # the table
#   bash scripts/audit.sh -x         # extra pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

# The order CI runs them in (unit files first, alphabetically): some tests leave the process's
# Prometheus folder variable changed for later ones, and this order is the one CI proves.
hardening=(tests/code/test_default_secrets.py tests/code/test_hardening_api.py
           tests/code/test_pointer_trust.py tests/code/test_rate_limits.py
           tests/integration/test_edge_errors.py)
tests=(tests/code/test_decoder_fuzz.py "${hardening[@]:0:4}" tests/integration/test_edge_errors.py
       tests/integration/test_faults.py tests/integration/test_schemathesis.py)
worker_kills=(
  "tests/integration/test_worker.py::test_kill_9_mid_training_leaves_model_and_next_retrain_succeeds"
  "tests/integration/test_worker.py::test_kill_9_of_the_pool_child_fails_the_job_on_redelivery"
)

set +e
.venv/bin/python -m pytest -s -q -p no:cacheprovider --junitxml="$out/junit.xml" \
  "${tests[@]}" "${worker_kills[@]}" "$@" | tee "$out/log.txt"
status=${PIPESTATUS[0]}
set -e

HARDENING="${hardening[*]}" .venv/bin/python - "$out" <<'EOF'
"""Counts: AUDIT lines the tests print once they have asserted everything, plus one per test
case for the hardening reproductions and the worker kills; a failed test counts as tried and
not answered cleanly / not survived."""
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
rows: dict[str, list[int]] = {}  # label -> [tried, clean]
kinds: dict[str, str] = {}


def add(kind: str, label: str, tried: int, clean: int) -> None:
    kinds[label] = kind
    row = rows.setdefault(label, [0, 0])
    row[0] += tried
    row[1] += clean


printed = set()
for line in (out / "log.txt").read_text(errors="replace").splitlines():
    if line.startswith("AUDIT "):
        rec = json.loads(line[6:])
        printed.add(rec["what"])
        label = rec["what"].split(" ")[0] if rec["what"].startswith("schemathesis") \
            else rec["what"]
        add(rec["kind"], label, rec["tried"], rec["clean"])

hardening = {Path(p).stem for p in os.environ.get("HARDENING", "").split()}
for case in ET.parse(out / "junit.xml").iter("testcase"):
    module = case.get("classname", "").split(".")[-1]
    failed = case.find("failure") is not None or case.find("error") is not None
    skipped = case.find("skipped") is not None
    if skipped:
        continue
    if module in hardening:
        add("bad_input", "hardening reproductions (one test each)", 1, int(not failed))
    elif module == "test_worker":
        add("fault", "Celery kill -9 mid-epoch (pool child, worker group)", 1, int(not failed))
    elif module == "test_schemathesis" and (
            "[valid]" in case.get("name", "") and "schemathesis positive" in printed
            or "[invalid]" in case.get("name", "") and "schemathesis negative" in printed):
        continue  # its failed requests are in its own counts
    elif failed:  # an audited test that failed before printing its counts
        add("fault" if module == "test_faults" else "bad_input", f"FAILED {case.get('name')}",
            1, 0)

print("\n| Audit | tried | answered cleanly / survived |\n|---|---:|---:|")
for kind, title in (("bad_input", "Bad inputs"), ("fault", "Faults")):
    total = [0, 0]
    for label, (tried, clean) in rows.items():
        if kinds[label] == kind:
            print(f"| {title}: {label} | {tried} | {clean} |")
            total[0] += tried
            total[1] += clean
    print(f"| **{title}, all** | **{total[0]}** | **{total[1]}** |")
EOF
exit "$status"
