#!/usr/bin/env bash
# The Docker deployment, for real: build both images, run the whole docker-compose.yml, use it
# through nginx, tear it down. Exit 0 only if every step worked; each step prints what it
# checked. Works offline (no image registry, no package index inside the build).
#
#   scripts/docker_e2e.sh             full: compose up (postgres, redis, migrate, web x2,
#                                     nginx, worker, flower), predict a real clip through
#                                     nginx, upload a zip, retrain until promoted, the promoted
#                                     model served by every web container, scale web 2 -> 4 -> 2
#   scripts/docker_e2e.sh --reduced   CI: build both images, compose up, one prediction, down
#   scripts/docker_e2e.sh --swarm     the same file with `docker stack deploy` on a one-node
#                                     swarm: replicas, a rolling update of web with zero failed
#                                     predictions, a killed replica replaced
#   --keep                            leave the deployment running (no teardown) to look at it
#   --up / --down                     build and start it, ready, and leave it running (its
#                                     settings in $STATE/current.env: benchmarks/loadtest.py
#                                     --docker drives it from there) / tear that one down (and
#                                     stop dockerd if --up started it)
#
# What it sets up (and undoes): Debian's docker.io (+ docker-compose when `docker compose` is
# missing) are installed if absent; dockerd is started if not running and stopped at the end
# only if this script started it. Base image: PYTHON_IMAGE if it can be pulled, else a local
# Debian bookworm + Python 3.11 made with debootstrap (scripts/docker/base_image.sh, cached
# per machine). Python dependencies: a host-side wheelhouse cached under the state folder by
# lock hash (scripts/docker/wheelhouse.sh), so the image builds run with --network none.
# postgres/redis/nginx: the official images, or Debian stand-ins when they cannot be pulled
# (scripts/docker/service_images.sh). Secrets: random, in a throw-away env file (never in
# git). Everything is published on 127.0.0.1 only; the deployment and its volumes are removed
# at the end, on failure too.
#
# Settings (environment): E2E_HTTP_PORT (18480), E2E_FLOWER_PORT (18455), E2E_CLIPS (real
# clips, default ../shared/us8k), E2E_PROJECT (compose project, urbansound-e2e),
# URBANSOUND_STATE_DIR (caches, default var/), URBANSOUND_FORCE_LOCAL_BASE=1 (skip pulls).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

MODE=full KEEP=""
for arg in "$@"; do
  case "$arg" in
    --reduced) MODE=reduced ;;
    --swarm) MODE=swarm ;;
    --keep) KEEP=1 ;;
    --up) MODE=up KEEP=1 ;;
    --down) MODE=down ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
  esac
done

T0=$(date +%s)
STATE="${URBANSOUND_STATE_DIR:-var}/docker"
PROJECT="${E2E_PROJECT:-urbansound-e2e}"
HTTP_PORT="${E2E_HTTP_PORT:-18480}"
FLOWER_PORT="${E2E_FLOWER_PORT:-18455}"
CLIPS="${E2E_CLIPS:-$ROOT/../shared/us8k}"
URL="http://127.0.0.1:$HTTP_PORT"
CHECKS=(python3 "$ROOT/scripts/docker/e2e_checks.py")
SUDO=""; [[ $EUID -ne 0 ]] && SUDO="sudo"
CHECKED=()
STARTED_DOCKERD="" RUN_DIR="" DEPLOYED="" SWARM_INIT=""

say() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }
ok() { CHECKED+=("$*"); echo "ok: $*"; }
die() { echo "FAIL: $*" >&2; exit 1; }

# --------------------------------------------------------------------------- teardown
teardown() {
  local rc=$?
  set +e
  if [[ -n "$DEPLOYED" && -z "$KEEP" ]]; then
    if [[ $rc -ne 0 ]]; then
      say "failed: the last lines of every container's log"
      for c in $(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT";
                 docker ps -aq --filter "label=com.docker.stack.namespace=$PROJECT"); do
        echo "--- $(docker inspect -f '{{.Name}}' "$c")"; docker logs --tail 15 "$c" 2>&1
      done
    fi
    say "teardown (containers, network, volumes)"
    if [[ "$MODE" == swarm ]]; then
      docker rm -f "$PROJECT-probe" >/dev/null 2>&1
      docker stack rm "$PROJECT" >/dev/null
      for _ in $(seq 60); do   # the stack's tasks go first, then its volumes can
        [[ -z "$(docker ps -aq --filter "label=com.docker.stack.namespace=$PROJECT")" ]] && break
        sleep 1
      done
      docker volume ls -q --filter "label=com.docker.stack.namespace=$PROJECT" \
        | xargs -r docker volume rm >/dev/null
    else
      compose down -v --remove-orphans --timeout 20 >/dev/null 2>&1
    fi
  fi
  [[ -n "$SWARM_INIT" && -z "$KEEP" ]] && docker swarm leave --force >/dev/null
  [[ -n "$RUN_DIR" && -z "$KEEP" ]] && rm -rf "$RUN_DIR" "$STATE/current.env"
  if [[ -n "$STARTED_DOCKERD" && -z "$KEEP" ]]; then
    say "stopping the dockerd this script started (pid $STARTED_DOCKERD)"
    $SUDO kill "$STARTED_DOCKERD"
    for _ in $(seq 30); do $SUDO kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 1; done
  fi
  echo
  if [[ $rc -eq 0 ]]; then
    echo "PASSED ($MODE) in $(( $(date +%s) - T0 )) s; checked:"
  else
    echo "FAILED ($MODE, exit $rc) after $(( $(date +%s) - T0 )) s; what passed before:"
  fi
  for c in "${CHECKED[@]}"; do echo "  - $c"; done
  exit $rc
}
trap teardown EXIT
trap 'exit 130' INT TERM

# --------------------------------------------------------------------------- the engine
ensure_engine() {
  if ! command -v dockerd >/dev/null; then
    say "installing Debian's docker.io"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      docker.io >/dev/null || die "apt-get install docker.io failed"
  fi
  if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
  else
    command -v docker-compose >/dev/null || {
      say "installing Debian's docker-compose"
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        docker-compose >/dev/null || die "apt-get install docker-compose failed"; }
    COMPOSE=(docker-compose)
  fi
  if ! docker info >/dev/null 2>&1; then
    say "starting dockerd (log: $STATE/dockerd.log)"
    mkdir -p "$STATE"
    $SUDO sh -c "nohup dockerd > '$STATE/dockerd.log' 2>&1 & echo \$! > '$STATE/dockerd.pid'"
    STARTED_DOCKERD=$(cat "$STATE/dockerd.pid")
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || die "dockerd did not start: $(tail -3 "$STATE/dockerd.log")"
  fi
  ok "engine: Docker $(docker version -f '{{.Server.Version}}'), storage" \
     "$(docker info -f '{{.Driver}}'), compose: $("${COMPOSE[@]}" version --short 2>/dev/null \
     || "${COMPOSE[@]}" version | head -1)"
}

compose() {
  URBANSOUND_ENV_FILE="$RUN_DIR/e2e.env" "${COMPOSE[@]}" -p "$PROJECT" \
    --env-file "$RUN_DIR/e2e.env" -f "$ROOT/docker-compose.yml" "$@"
}

# --------------------------------------------------------------------------- images
build_images() {
  say "base image"
  BASE=$(scripts/docker/base_image.sh)
  ok "base image $BASE ($(docker image inspect -f '{{.Size}}' "$BASE" | numfmt --to=si)B)"
  say "wheelhouse (host-side, cached by lock hash)"
  scripts/docker/wheelhouse.sh "$BASE"
  for kind in web worker; do
    say "building urbansound-$kind (no network inside the build)"
    local t=$(date +%s)
    DOCKER_BUILDKIT=0 nice -n 10 docker build -q --network none \
      --build-arg "PYTHON_IMAGE=$BASE" -f "Dockerfile.$kind" -t "urbansound-$kind:latest" . \
      >/dev/null || die "docker build Dockerfile.$kind failed (rerun without -q to see why)"
    local user size
    user=$(docker run --rm --network none --entrypoint id "urbansound-$kind:latest" -u)
    [[ "$user" != 0 ]] || die "urbansound-$kind runs as root"
    docker run --rm --network none --entrypoint sh "urbansound-$kind:latest" -c \
      'for t in gcc cc g++ make; do command -v $t && exit 1; done; exit 0' >/dev/null \
      || die "urbansound-$kind contains build tools"
    size=$(docker image inspect -f '{{.Size}}' "urbansound-$kind:latest" | numfmt --to=si)
    ok "built urbansound-$kind in $(( $(date +%s) - t )) s: ${size}B, runs as uid $user," \
       "no compiler"
  done
  say "postgres, redis, nginx images"
  SERVICE_IMAGES=$(scripts/docker/service_images.sh "$BASE")
  ok "service images: $(echo $SERVICE_IMAGES)"
}

# --------------------------------------------------------------------------- run settings
write_env() {
  mkdir -p "$STATE"
  RUN_DIR=$(mktemp -d "$PWD/$STATE/e2e.XXXXXX")
  chmod 700 "$RUN_DIR"
  mkdir -p "$RUN_DIR/data"   # no data set: a retrain holds out part of the uploads as its test
  secret() { python3 -c 'import secrets; print(secrets.token_urlsafe(24))'; }
  TOKEN=$(secret)
  FLOWER_AUTH="admin:$(secret)"
  cat > "$RUN_DIR/e2e.env" <<EOF
# Throw-away settings of one scripts/docker_e2e.sh run (deleted at its end).
URBANSOUND_API_TOKEN=$TOKEN
URBANSOUND_ADMIN_PASSWORD=$(secret)
URBANSOUND_SECRET_KEY=$(secret)
POSTGRES_PASSWORD=$(secret)
FLOWER_BASIC_AUTH=$FLOWER_AUTH
URBANSOUND_ALLOW_DEFAULT_SECRETS=false
POSTGRES_USER=urbansound
POSTGRES_DB=urbansound
HTTP_BIND=127.0.0.1
HTTP_PORT=$HTTP_PORT
FLOWER_PORT=$FLOWER_PORT
WEB_REPLICAS=2
WEB_CPUS=1
URBANSOUND_WEB_WORKERS=1
WEB_TORCH_THREADS=1
WORKER_CPUS=1
URBANSOUND_RETRAIN_EPOCHS=1
# The run checks the plumbing (train, gate, promote, swap everywhere), not model quality:
# with a margin of 1 the gate always promotes, and the few clips the upload of 40 holds out
# are test set enough.
URBANSOUND_GATE_MARGIN=1.0
URBANSOUND_GATE_MIN_TEST_CLIPS=1
URBANSOUND_HOST_DATA_DIR=$RUN_DIR/data
$SERVICE_IMAGES
EOF
}

containers() {  # ids of the running containers of one service
  docker ps -q --filter "label=com.docker.compose.project=$PROJECT" \
               --filter "label=com.docker.compose.service=$1"
}

wait_healthy() {  # every running container of the project healthy (those with a check)
  local deadline=$(( $(date +%s) + $1 )) bad
  while :; do
    bad=$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" \
          | xargs -r docker inspect -f '{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' \
          | grep -v -E ' (healthy|running)$' || true)
    [[ -z "$bad" ]] && return 0
    (( $(date +%s) > deadline )) && die "not healthy after $1 s: $bad"
    sleep 2
  done
}

served_by_every_web() {  # VERSION EXPECTED_COUNT: each web container's own readiness
  local version=$1 want=$2 n=0 c answer
  for c in $(containers web); do
    for _ in $(seq 20); do
      answer=$(docker exec "$c" python -c "import json, urllib.request; print(json.load(urllib.request.urlopen('http://127.0.0.1:8000/api/v1/ready', timeout=5))['checks']['model']['message'])" 2>/dev/null || true)
      [[ "$answer" == "serving $version" ]] && break
      sleep 1
    done
    [[ "$answer" == "serving $version" ]] \
      || die "$(docker inspect -f '{{.Name}}' "$c") answers '$answer', not 'serving $version'"
    n=$((n + 1))
  done
  [[ $n -eq $want ]] || die "$n web containers, expected $want"
}

upstreams_seen() {  # N predictions through nginx -> how many distinct replicas answered
  local clip=$1 n=$2
  for _ in $(seq "$n"); do
    curl -s -o /dev/null -D - -X POST --data-binary "@$clip" -H 'Content-Type: audio/flac' \
      "$URL/api/v1/predict" | tr -d '\r' | sed -n 's/^X-Upstream: //Ip'
  done | sort -u | wc -l
}

# --------------------------------------------------------------------------- compose
run_compose() {
  say "compose up (${COMPOSE[*]}): postgres, redis, migrate, web x2, nginx, worker, flower"
  DEPLOYED=1
  compose up -d --no-build >/dev/null 2>"$RUN_DIR/up.log" \
    || die "compose up failed: $(tail -5 "$RUN_DIR/up.log")"
  wait_healthy 300
  [[ "$(docker inspect -f '{{.State.ExitCode}}' "$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" --filter label=com.docker.compose.service=migrate)")" == 0 ]] \
    || die "the migrate service did not exit 0"
  ok "compose up: $(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l) containers healthy, migrate exited 0, $(containers web | wc -l) web"
  "${CHECKS[@]}" wait "$URL" 120 >/dev/null || die "not ready through nginx"
  ok "ready through nginx (/api/v1/ready: model, database, broker)"
  local published
  published=$(docker ps --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Ports}}' | grep -o '[0-9.:]*->' | sort -u | tr '\n' ' ')
  [[ -z "$(echo "$published" | tr ' ' '\n' | grep -v '^127\.0\.0\.1:' | grep .)" ]] \
    || die "a port is published beyond 127.0.0.1: $published"
  ok "published ports, loopback only: $published"

  local line
  line=$("${CHECKS[@]}" predict "$URL" "$CLIP") || die "prediction through nginx"
  ok "${line#ok: }"
  [[ "$MODE" == reduced || "$MODE" == up ]] && return 0

  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' -u "$FLOWER_AUTH" "http://127.0.0.1:$FLOWER_PORT/api/workers")
  [[ "$code" == 200 ]] || die "Flower answered $code on 127.0.0.1:$FLOWER_PORT"
  ok "Flower on 127.0.0.1:$FLOWER_PORT answers with its basic auth (and only with it: $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$FLOWER_PORT/api/workers") without)"

  line=$("${CHECKS[@]}" upload "$URL" "$TOKEN" "$CLIPS" 40) || die "upload"
  ok "${line#ok: }"
  local out version
  out=$("${CHECKS[@]}" retrain "$URL" "$TOKEN" 900) || die "retrain"
  echo "$out" | grep -v '^PROMOTED='
  version=$(echo "$out" | sed -n 's/^PROMOTED=//p')
  CHECKED+=("$(echo "$out" | grep '^ok:' | sed 's/^ok: //' | cut -c1-160)")
  served_by_every_web "$version" 2
  ok "every web container (2) serves the promoted $version (its own /api/v1/ready)"

  say "scale web to 4"
  compose up -d --no-build --no-recreate --scale web=4 >/dev/null 2>>"$RUN_DIR/up.log" \
    || die "scale to 4: $(tail -3 "$RUN_DIR/up.log")"
  wait_healthy 240
  served_by_every_web "$version" 4
  local seen=0
  for _ in $(seq 15); do   # nginx picks new replicas up within seconds (DNS re-read)
    seen=$(upstreams_seen "$CLIP" 24)
    [[ $seen -ge 4 ]] && break
    sleep 2
  done
  [[ $seen -ge 4 ]] || die "only $seen replicas answered through nginx after scaling to 4"
  ok "scaled to 4: 4 web containers healthy, serving $version, all 4 answering through nginx"
  say "scale web back to 2"
  compose up -d --no-build --no-recreate --scale web=2 >/dev/null 2>>"$RUN_DIR/up.log" \
    || die "scale to 2"
  [[ $(containers web | wc -l) -eq 2 ]] || die "still $(containers web | wc -l) web containers"
  sleep 4
  "${CHECKS[@]}" predict "$URL" "$CLIP" >/dev/null || die "prediction after scaling down"
  seen=$(upstreams_seen "$CLIP" 12)
  [[ $seen -eq 2 ]] || die "$seen replicas answered after scaling back to 2"
  ok "scaled back to 2: 2 web containers, predictions answered by exactly 2 replicas"
}

ensure_engine
if [[ "$MODE" == down ]]; then
  [[ -f "$STATE/current.env" ]] || { echo "nothing started with --up ($STATE/current.env)"; exit 0; }
  # shellcheck disable=SC1091
  source "$STATE/current.env"   # PROJECT, RUN_DIR, and STARTED_DOCKERD when --up started it
  DEPLOYED=1
  exit 0   # the teardown trap does the rest
fi
CLIP=$(find "$CLIPS" -type f \( -name '*.flac' -o -name '*.wav' \) | sort | sed -n 1p)
[[ -n "$CLIP" ]] || die "no clips under $CLIPS"
CLIP_REL=${CLIP#"$CLIPS"/}
build_images
write_env
if [[ "$MODE" == up ]]; then
  # --down stops the dockerd that --up started (and only that one)
  printf 'PROJECT=%q\nRUN_DIR=%q\nURL=%q\nCOMPOSE_CMD=%q\nSTARTED_DOCKERD=%q\n' "$PROJECT" \
    "$RUN_DIR" "$URL" "${COMPOSE[*]}" "$STARTED_DOCKERD" > "$STATE/current.env"
fi
if [[ "$MODE" == swarm ]]; then
  # shellcheck source=scripts/docker/swarm_e2e.sh
  source scripts/docker/swarm_e2e.sh
  run_swarm
else
  run_compose
fi
