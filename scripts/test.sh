#!/usr/bin/env bash
# The test command: set up (with test tools), make sure Postgres and Redis answer, run pytest.
# Integration tests use the real services; in CI (CI=true) a missing service fails loudly.
#
# Run with no arguments (the whole suite, as CI does) it also checks the Docker deployment:
# `scripts/docker_e2e.sh --reduced` (build both images offline-capable, compose up, predict a
# real clip through nginx, tear down). It needs root and a Docker engine (it installs Debian's
# docker.io if missing); it runs beside ruff and mypy, which it mostly waits alongside (health
# checks), and finishes before pytest starts so that no test shares the cores with containers.
# Outside CI without root it is skipped with the reason; `sudo scripts/docker_e2e.sh` runs
# the full deployment check (upload, retrain, scale) by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
bash scripts/services.sh ensure

docker_pid=""
docker_log=var/docker-e2e.log
if [[ $# -eq 0 ]]; then
  if [[ -n "${CI:-}" || $(id -u) -eq 0 ]]; then
    mkdir -p var
    echo "test: scripts/docker_e2e.sh --reduced runs beside ruff and mypy (log: $docker_log)"
    bash scripts/docker_e2e.sh --reduced >"$docker_log" 2>&1 &
    docker_pid=$!
    trap '[[ -n $docker_pid ]] && kill $docker_pid 2>/dev/null || true' EXIT
  else
    echo "test: skipping scripts/docker_e2e.sh --reduced: it needs root (CI runs it)"
  fi
fi

.venv/bin/ruff check .
.venv/bin/mypy  # src (strict), web, worker, scripts, benchmarks: pyproject.toml

if [[ -n $docker_pid ]]; then
  if wait "$docker_pid"; then
    docker_pid=""
    sed -n '/^PASSED/,$p' "$docker_log"
  else
    docker_pid=""
    cat "$docker_log" >&2
    echo "test: the Docker deployment check failed (its log is above)" >&2
    exit 1
  fi
fi
exec .venv/bin/python -m pytest "$@"
