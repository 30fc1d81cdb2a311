#!/usr/bin/env bash
# Prepare the offline wheelhouse the images install from when the build has no network:
# every runtime dependency of pyproject.toml as a wheel (the CPU torch 2.13.0 wheel included:
# the host's pip finds it through its own configuration, e.g. find-links), downloaded once on
# the host and cached under the state folder, keyed by a hash of what decides the resolution
# (the dependency list, pip's constraints, the Python tag). The cache is then hard-linked into
# deploy/wheelhouse/ (git-ignored), which the Dockerfiles COPY; with only its README there,
# the images install from the online indexes instead (the default for users).
#
# The host's Python resolves, but environment markers are then evaluated for the host's
# interpreter (3.11.7 here) while the image runs the base's (Debian's 3.11.2: redis then needs
# async-timeout). So the result is checked with the base image's own pip, offline, and what it
# still asks for is fetched too, until it resolves (a few rounds at most).
#
#   scripts/docker/wheelhouse.sh BASE_IMAGE [PYTHON]   # PYTHON: the host's (default .venv)
set -euo pipefail
cd "$(dirname "$0")/../.."

BASE="${1:?usage: wheelhouse.sh BASE_IMAGE [PYTHON]}"
PY="${2:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3   # a fresh clone without scripts/setup.sh: the system Python
STATE="${URBANSOUND_STATE_DIR:-var}"
DEST=deploy/wheelhouse
log() { echo "wheelhouse: $*" >&2; }

reqs=$("$PY" - <<'PY'
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
PY
)
constraints=$("$PY" -m pip config list 2>/dev/null | sed -n "s/.*constraint='\(.*\)'/\1/p" | sed -n 1p)
key=$( { echo "$reqs"; [[ -n "$constraints" && -f "$constraints" ]] && cat "$constraints";
         docker run --rm --network none "$BASE" python -c 'import platform; print(platform.python_version(), platform.machine())'; } \
       | sha256sum | cut -c1-16)
cache="$STATE/docker/wheelhouse/$key"

if [[ ! -f "$cache/wheelhouse.lock" ]]; then
  log "downloading the locked dependencies into $cache ..."
  rm -rf "$cache.tmp" && mkdir -p "$cache.tmp"
  echo "$reqs" > "$cache.tmp/requirements.txt"
  download() { nice -n 10 "$PY" -m pip download --quiet --only-binary=:all: --dest "$cache.tmp" "$@" \
                 2> >(grep -v 'is ignored: it is neither' >&2); }
  download -r "$cache.tmp/requirements.txt"
  for round in 1 2 3 4 5; do
    missing=$(docker run --rm --network none -v "$PWD/$cache.tmp:/wheelhouse:ro" "$BASE" sh -c \
        'python -m venv /tmp/v && /tmp/v/bin/pip install -q --dry-run --no-index \
           --find-links /wheelhouse -r /wheelhouse/requirements.txt 2>&1' \
      | sed -n 's/^ERROR: No matching distribution found for \([^;]*\).*/\1/p' || true)
    [[ -z "$missing" ]] && break
    log "the base's Python also needs: $missing"
    # shellcheck disable=SC2086
    download $missing
  done
  [[ -z "$missing" ]] || { log "still unresolved for $BASE: $missing"; exit 1; }
  "$PY" - "$cache.tmp" <<'PY'
import sys
from pathlib import Path
folder = Path(sys.argv[1])
wheels = sorted(p.name for p in folder.glob("*.whl"))
torch = [w for w in wheels if w.startswith("torch-")]
assert torch and "+cpu" in torch[0], f"not the CPU torch wheel: {torch}"
(folder / "wheelhouse.lock").write_text("\n".join(wheels) + "\n")
PY
  rm -rf "$cache" && mv "$cache.tmp" "$cache"
else
  log "cached: $cache"
fi

# Hard links: instant and no second copy on disk (fall back to a copy across filesystems).
find "$DEST" -mindepth 1 ! -name README.md -delete
cp -al "$cache"/. "$DEST"/ 2>/dev/null || cp -a "$cache"/. "$DEST"/
log "$(grep -c . "$DEST/wheelhouse.lock") wheels in $DEST ($(du -sh --apparent-size "$DEST" | cut -f1))"
