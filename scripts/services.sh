#!/usr/bin/env bash
# Postgres and Redis for tests and the local stack: check they answer, start them if not.
#   scripts/services.sh ensure
# On the project's machines both are installed from Debian and normally already running.
set -uo pipefail

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

ensure() {
  if ! pg_up && command -v pg_ctlcluster >/dev/null; then
    echo "services: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
  if ! redis_up && command -v redis-server >/dev/null; then
    echo "services: starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  fi
  for _ in $(seq 1 20); do pg_up && redis_up && break; sleep 0.5; done
  pg_up && echo "services: PostgreSQL up" || echo "services: PostgreSQL NOT reachable on 127.0.0.1:5432"
  redis_up && echo "services: Redis up" || echo "services: Redis NOT reachable on 127.0.0.1:6379"
  if [[ -n "${CI:-}" ]] && ! (pg_up && redis_up); then
    echo "services: CI needs both services; failing" >&2
    exit 1
  fi
}

case "${1:-ensure}" in
  ensure) ensure ;;
  *) echo "usage: $0 ensure" >&2; exit 2 ;;
esac
