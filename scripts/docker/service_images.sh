#!/usr/bin/env bash
# The three public images docker-compose.yml runs besides ours: each one is used as is when it
# is present or can be pulled; otherwise a Debian stand-in is built (scripts/docker/services/,
# on the local base image) and tagged urbansound-local/<name>. Prints the compose variables
# that select them (POSTGRES_IMAGE=..., REDIS_IMAGE=..., NGINX_IMAGE=...), one per line.
#
#   scripts/docker/service_images.sh BASE_IMAGE
set -euo pipefail
cd "$(dirname "$0")/services"
base="${1:?usage: service_images.sh BASE_IMAGE}"
log() { echo "service images: $*" >&2; }

declare -A official=([postgres]="${POSTGRES_IMAGE:-postgres:16-bookworm}"
                     [redis]="${REDIS_IMAGE:-redis:7-bookworm}"
                     [nginx]="${NGINX_IMAGE:-nginx:1.28-alpine}")
for name in postgres redis nginx; do
  var="$(echo "$name" | tr a-z A-Z)_IMAGE"
  image="${official[$name]}"
  if docker image inspect "$image" >/dev/null 2>&1 \
     || { [[ -z "${URBANSOUND_FORCE_LOCAL_BASE:-}" ]] && timeout 60 docker pull -q "$image" >/dev/null 2>&1; }; then
    echo "$var=$image"; continue
  fi
  local_image="urbansound-local/$name:bookworm"
  log "$image cannot be pulled: building the Debian stand-in $local_image"
  # One Dockerfile, three targets on one shared package layer: the first build pays for apt,
  # the other two are cached. Legacy builder (no BuildKit needed); apt uses the host network.
  DOCKER_BUILDKIT=0 nice -n 10 docker build -q --network host --build-arg "BASE_IMAGE=$base" \
      --target "$name" -t "$local_image" . >&2
  echo "$var=$local_image"
done
