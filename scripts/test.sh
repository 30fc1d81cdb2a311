#!/usr/bin/env bash
# The test command: set up (with test tools), make sure Postgres and Redis answer, run pytest.
# Integration tests use the real services; in CI (CI=true) a missing service fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
bash scripts/services.sh ensure
.venv/bin/ruff check .
.venv/bin/mypy src
exec .venv/bin/python -m pytest "$@"
