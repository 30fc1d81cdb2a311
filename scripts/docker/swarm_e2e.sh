# shellcheck shell=bash
# `scripts/docker_e2e.sh --swarm`: docker-compose.yml on a one-node Docker Swarm. Sourced by
# docker_e2e.sh after the images are built and the run's env file is written; uses its
# helpers (say, ok, die, compose, CHECKS...) and its teardown (stack rm, volumes, swarm leave).
#
# The file is the compose file, rendered by Compose (`config`: variables and the env file
# resolved, as `docker stack deploy` cannot read an env file) with two changes for this test
# only: no published ports (Swarm's routing mesh publishes on every interface and cannot bind
# 127.0.0.1, so the checks run from a probe container on the stack's network instead), an
# attachable network (for that probe), and DNS round robin instead of virtual IPs for the
# services that did not ask for it (VIPs need IPVS, missing from this kernel). Everything else - replicas, endpoint_mode dnsrr,
# update_config, the one-shot migrate - is what the compose file itself says.

swarm_file() {
  local py=python3
  $py -c 'import yaml' 2>/dev/null || py="$ROOT/.venv/bin/python"
  compose config | "$py" -c '
import sys, yaml
stack = yaml.safe_load(sys.stdin)
stack.pop("name", None)
for svc in stack["services"].values():
    for key in ("ports", "build", "depends_on", "restart", "container_name"):
        svc.pop(key, None)
    # Every name resolves to its tasks (DNS round robin) rather than a virtual IP: Swarm VIPs
    # need the kernel IPVS module, missing on some kernels (this one); the compose file already
    # asks for it on web, where it matters for balancing.
    svc.setdefault("deploy", {})["endpoint_mode"] = "dnsrr"
    limits = svc.get("deploy", {}).get("resources", {}).get("limits", {})
    if "cpus" in limits:  # Compose 1.29 renders it as a number; the stack schema wants text
        limits["cpus"] = str(limits["cpus"])
stack.setdefault("networks", {}).setdefault("default", {})["attachable"] = True
yaml.safe_dump(stack, sys.stdout, sort_keys=False)
' > "$RUN_DIR/stack.yml"
}

service_running() {  # SERVICE -> number of running tasks whose container is healthy
  local n=0 t c
  for t in $(docker service ps -q --filter desired-state=running "${PROJECT}_$1" 2>/dev/null); do
    c=$(docker inspect -f '{{.Status.ContainerStatus.ContainerID}}' "$t" 2>/dev/null) || continue
    [[ -n "$c" ]] || continue
    [[ "$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$c" 2>/dev/null)" =~ ^(healthy|running)$ ]] \
      && n=$((n + 1))
  done
  echo "$n"
}

wait_services() {  # SECONDS: every service at its replica count, healthy
  local deadline=$(( $(date +%s) + $1 )) bad svc want
  while :; do
    bad=""
    for svc in postgres redis web nginx worker flower; do
      want=$(docker service inspect -f '{{.Spec.Mode.Replicated.Replicas}}' "${PROJECT}_$svc")
      [[ "$(service_running "$svc")" -ge "$want" ]] || bad+=" $svc"
    done
    [[ -z "$bad" ]] && return 0
    (( $(date +%s) > deadline )) && die "swarm services not healthy after $1 s:$bad"
    sleep 3
  done
}

web_containers() {
  local t
  for t in $(docker service ps -q --filter desired-state=running "${PROJECT}_web"); do
    docker inspect -f '{{.Status.ContainerStatus.ContainerID}}' "$t"
  done | grep . | sort
}

probe() {  # run e2e_checks.py inside the probe container, on the stack's network
  docker exec "$PROBE" python /checks/e2e_checks.py "$@"
}

run_swarm() {
  if [[ "$(docker info -f '{{.Swarm.LocalNodeState}}')" != active ]]; then
    # The address of docker0: a one-node swarm that nothing outside this machine can reach
    # (Swarm refuses a loopback advertise address).
    local addr
    addr=$(ip -4 -o addr show docker0 2>/dev/null | awk '{print $4}' | cut -d/ -f1)
    [[ -n "$addr" ]] || die "no docker0 address to advertise the swarm on"
    say "docker swarm init (one node, on $addr)"
    docker swarm init --advertise-addr "$addr" --listen-addr "$addr:2377" >/dev/null \
      || die "docker swarm init failed"
    SWARM_INIT=1
  fi
  ok "one-node swarm: $(docker node ls --format '{{.Hostname}} {{.Status}} {{.ManagerStatus}}')"
  swarm_file
  say "docker stack deploy $PROJECT (the compose file, rendered by ${COMPOSE[*]} config)"
  DEPLOYED=1
  docker stack deploy --resolve-image never -c "$RUN_DIR/stack.yml" "$PROJECT" >/dev/null \
    || die "docker stack deploy failed"
  wait_services 420
  local migrate
  migrate=$(docker service ps --format '{{.CurrentState}}' "${PROJECT}_migrate" | sed -n 1p)
  [[ "$migrate" == Complete* ]] || die "migrate: $migrate"
  ok "stack deployed: $(docker stack services -q "$PROJECT" | wc -l) services, each at its" \
     "replica count and healthy (web: $(service_running web)); migrate: $migrate"

  PROBE="${PROJECT}-probe"
  docker run -d --rm --name "$PROBE" --network "${PROJECT}_default" \
    --label "com.docker.stack.namespace=$PROJECT" --entrypoint sleep \
    -v "$ROOT/scripts/docker/e2e_checks.py:/checks/e2e_checks.py:ro" \
    -v "$(realpath "$CLIPS"):/clips:ro" urbansound-web:latest infinity >/dev/null
  local clip="/clips/${CLIP_REL}" url="http://nginx:80" line
  probe wait "$url" 180 >/dev/null || die "not ready through nginx"
  line=$(probe predict "$url" "$clip") || die "prediction through nginx"
  ok "${line#ok: } (from a probe container on the stack's network)"

  local before after
  before=$(web_containers)
  [[ $(echo "$before" | wc -l) -eq 2 ]] || die "web has $(echo "$before" | wc -l) tasks, not 2"
  ok "web: 2 replicas running and healthy"

  say "rolling update of web (start-first, one at a time) under continuous predictions"
  docker exec -d "$PROBE" sh -c "python /checks/e2e_checks.py predict-loop $url $clip /tmp/stop > /tmp/loop.out 2>&1; echo \$? > /tmp/loop.rc"
  sleep 3
  local t=$(date +%s)
  docker service update --quiet --force "${PROJECT}_web" >/dev/null 2>&1 \
    || die "docker service update web failed"
  wait_services 300
  sleep 5
  docker exec "$PROBE" touch /tmp/stop
  for _ in $(seq 30); do docker exec "$PROBE" test -f /tmp/loop.rc && break; sleep 1; done
  [[ "$(docker exec "$PROBE" cat /tmp/loop.rc)" == 0 ]] \
    || die "predictions failed during the rolling update: $(docker exec "$PROBE" cat /tmp/loop.out)"
  after=$(web_containers)
  [[ -z "$(comm -12 <(echo "$before") <(echo "$after"))" ]] || die "some web tasks were not replaced"
  ok "rolling update of web in $(( $(date +%s) - t )) s: both tasks replaced;" \
     "$(docker exec "$PROBE" cat /tmp/loop.out | sed 's/^ok: //')"

  say "killing one web replica"
  local victim
  victim=$(echo "$after" | sed -n 1p)
  docker kill "$victim" >/dev/null
  line=$(probe predict "$url" "$clip") || die "prediction right after a replica was killed"
  t=$(date +%s)
  for _ in $(seq 120); do
    [[ "$(service_running web)" -ge 2 ]] && ! web_containers | grep -q "$victim" && break
    sleep 2
  done
  [[ "$(service_running web)" -ge 2 ]] || die "the killed replica was not replaced"
  ok "killed web task ${victim:0:12}: a prediction right after it still answered; swarm" \
     "replaced it in $(( $(date +%s) - t )) s (2 healthy again)"
  line=$(probe predict "$url" "$clip") || die "prediction after the replacement"
  ok "${line#ok: }"
}
