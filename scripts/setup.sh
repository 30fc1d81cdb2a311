#!/usr/bin/env bash
# Set up urbansound on a fresh Debian machine: system packages, a virtualenv, the package.
#   scripts/setup.sh          runtime only (what `urbansound up` needs)
#   scripts/setup.sh --dev    plus test tools: chromium + chromedriver, nginx, pytest, librosa...
# Idempotent: re-running installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[[ "${1:-}" == "--dev" ]] && dev=1

# Debian packages. libsndfile ships inside the soundfile wheel, so the runtime needs none;
# tests drive Debian's Chromium (no downloaded browser) and run nginx for the local stack.
apt_packages=()
if [[ $dev == 1 ]]; then
  apt_packages+=(chromium chromium-driver nginx)
fi
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Python: torch is pinned to 2.13.0 in pyproject.toml (the CPU wheel; any other version or
# torchaudio would pull a multi-GB CUDA build).
PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
extras=""; [[ $dev == 1 ]] && extras="[dev]"
# pip's and the build backend's chatter (notices, build warnings) goes to a log that is shown
# only when the install fails: a person reads a few lines, not pages.
echo "setup: installing urbansound${extras} into .venv (the first time downloads PyTorch) ..."
log=$(mktemp "${TMPDIR:-/tmp}/urbansound-setup.XXXXXX")
if ! .venv/bin/python -m pip install -q -e ".${extras}" >"$log" 2>&1; then
  cat "$log" >&2
  echo "setup: pip install failed (its output is above)" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
.venv/bin/python -c "import torch, src.cli" || { echo "setup: install failed" >&2; exit 1; }
echo "setup: ready (.venv, torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
