#!/bin/sh
# Entrypoint of the Debian stand-ins for postgres, redis and nginx (see Dockerfile): the first
# argument names the service, the rest is the container's command.
set -eu
service="$1"; shift

as() { user="$1"; shift; exec setpriv --reuid="$user" --regid="$user" --init-groups "$@"; }

case "$service" in
postgres)
  # As the official image: a first start with an empty data folder creates the cluster,
  # POSTGRES_USER (superuser, password POSTGRES_PASSWORD) and POSTGRES_DB.
  mkdir -p "$PGDATA" /run/postgresql
  chown -R postgres:postgres "$PGDATA" /run/postgresql && chmod 700 "$PGDATA"
  if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pw=$(mktemp); printf '%s\n' "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}" > "$pw"
    chown postgres "$pw"
    setpriv --reuid=postgres --regid=postgres --init-groups \
      initdb -D "$PGDATA" -U "${POSTGRES_USER:-postgres}" --pwfile="$pw" \
             --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pw"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    setpriv --reuid=postgres --regid=postgres --init-groups \
      pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    db="${POSTGRES_DB:-${POSTGRES_USER:-postgres}}"
    if [ "$db" != "postgres" ]; then
      setpriv --reuid=postgres --regid=postgres --init-groups \
        psql -q -U "${POSTGRES_USER:-postgres}" -d postgres -c "CREATE DATABASE \"$db\""
    fi
    setpriv --reuid=postgres --regid=postgres --init-groups pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "postgres: initialised $PGDATA (user ${POSTGRES_USER:-postgres}, database $db)"
  fi
  [ "${1:-}" = "postgres" ] && set -- postgres -D "$PGDATA"
  as postgres "$@"
  ;;
redis)
  chown -R redis:redis /data
  # As the official image: no config file = listen everywhere, protected mode off (the
  # container network is the boundary; nothing publishes this port).
  if [ "${1:-}" = "redis-server" ]; then shift; set -- redis-server --protected-mode no "$@"; fi
  as redis "$@"
  ;;
nginx)
  # As the official image: /etc/nginx/templates/*.template -> /etc/nginx/conf.d/*, with only
  # the variables NGINX_ENVSUBST_FILTER matches substituted.
  filter="${NGINX_ENVSUBST_FILTER:-}"
  # Debian's nginx is 1.22: `server NAME resolve` and `resolver` inside an upstream need
  # >= 1.27.3. Without them, nginx resolves NAME when it loads its configuration, so a loop
  # below reloads it whenever the names' addresses change (replicas scaled or replaced).
  watch=""
  case "${NGINX_UPSTREAM_SERVERS:-}" in *" resolve"*)
    watch=$(printf '%s' "$NGINX_UPSTREAM_SERVERS" | sed -n 's/.*server \([A-Za-z0-9._-]*\):[0-9]* resolve.*/\1/p')
    NGINX_UPSTREAM_SERVERS=$(printf '%s' "$NGINX_UPSTREAM_SERVERS" | sed -e 's/resolver [^;]*;//' -e 's/ resolve / /')
    export NGINX_UPSTREAM_SERVERS ;;
  esac
  vars=$(env | cut -d= -f1 | grep -E "${filter:-.}" | sed 's/^/$/' | tr '\n' ' ')
  mkdir -p /etc/nginx/conf.d
  for t in /etc/nginx/templates/*.template; do
    [ -e "$t" ] || continue
    envsubst "$vars" < "$t" > "/etc/nginx/conf.d/$(basename "$t" .template)"
  done
  if [ -n "$watch" ]; then
    # Wait (bounded) until the name resolves, or nginx refuses to start.
    i=0; until getent ahostsv4 "$watch" >/dev/null || [ $i -ge 60 ]; do i=$((i+1)); sleep 1; done
    (
      last=$(getent ahostsv4 "$watch" | awk '{print $1}' | sort -u | tr '\n' ' ')
      while sleep 3; do
        now=$(getent ahostsv4 "$watch" | awk '{print $1}' | sort -u | tr '\n' ' ')
        if [ -n "$now" ] && [ "$now" != "$last" ]; then
          echo "nginx: $watch is now [$now]: reloading"
          nginx -s reload && last="$now"
        fi
      done
    ) &
  fi
  exec "$@"   # the master runs as root and drops to www-data (nginx.conf `user`)
  ;;
*)
  echo "unknown service: $service" >&2; exit 2 ;;
esac
