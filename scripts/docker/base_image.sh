#!/usr/bin/env bash
# Print the Python base image to build on: PYTHON_IMAGE (python:3.11-slim-bookworm) when it is
# present or can be pulled; otherwise a local stand-in, Debian bookworm + its Python 3.11 made
# with debootstrap (the Debian mirror is reachable where no image registry is) and
# `docker import`ed as urbansound-base:bookworm-py311. Built once per machine: the image itself
# is the cache, labelled with the recipe's hash so a changed recipe is rebuilt.
#
#   scripts/docker/base_image.sh            # prints the image name on stdout, progress on stderr
#   URBANSOUND_FORCE_LOCAL_BASE=1 ...       # skip the pull (e.g. a registry that is slow to fail)
set -euo pipefail

WANT="${PYTHON_IMAGE:-python:3.11-slim-bookworm}"
LOCAL="urbansound-base:bookworm-py311"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# What the images need from the base: python (3.11, with venv), CA certificates, and nothing
# to build with. useradd/groupadd come with minbase (passwd).
PACKAGES="python3,python3-venv,python-is-python3,ca-certificates,libgomp1"
RECIPE=$(printf '%s\n' "bookworm" "$MIRROR" "$PACKAGES" "v1" | sha256sum | cut -c1-12)

log() { echo "base image: $*" >&2; }

if [[ -z "${URBANSOUND_FORCE_LOCAL_BASE:-}" ]]; then
  if docker image inspect "$WANT" >/dev/null 2>&1; then
    echo "$WANT"; exit 0
  fi
  if timeout 60 docker pull -q "$WANT" >/dev/null 2>&1; then
    log "pulled $WANT"; echo "$WANT"; exit 0
  fi
  log "$WANT cannot be pulled (no registry reachable): using a local Debian base"
fi

have=$(docker image inspect -f '{{index .Config.Labels "urbansound.recipe"}}' "$LOCAL" 2>/dev/null || true)
if [[ "$have" == "$RECIPE" ]]; then
  log "$LOCAL (cached, recipe $RECIPE)"; echo "$LOCAL"; exit 0
fi

command -v debootstrap >/dev/null || {
  log "installing debootstrap"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2; }
root=$(mktemp -d /var/tmp/urbansound-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
log "debootstrap bookworm ($PACKAGES) from $MIRROR ..."
nice -n 10 debootstrap --variant=minbase --include="$PACKAGES" bookworm "$root" "$MIRROR" >&2 \
  || { log "debootstrap failed"; exit 1; }
# Slim it like the official slim images: no apt lists, caches, docs or man pages.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
       "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
tar -C "$root" -c . | docker import \
  -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c "LABEL urbansound.recipe=$RECIPE" -c 'CMD ["python3"]' \
  -m "Debian bookworm + Python 3.11 (debootstrap), stand-in for $WANT" - "$LOCAL" >&2
docker run --rm --network none "$LOCAL" python -c "import sys, venv, ssl; assert sys.version_info[:2] == (3, 11), sys.version" >&2
log "built $LOCAL ($(docker image inspect -f '{{.Size}}' "$LOCAL" | awk '{printf "%.0f MB", $1/1e6}'))"
echo "$LOCAL"
