#!/usr/bin/env bash
# Throwaway Redis and PostgreSQL instances for `pklock-bench --compare`.
#
#   benches/services.sh start    install (if missing) and start both, print the URLs
#   benches/services.sh stop     stop both and delete their data
#   benches/services.sh status   say what is running
#
# Redis listens on 127.0.0.1:6390 with no persistence and maxclients 20000
# (the default 10000 is too few for idle-holders' 10000 holders plus the
# bench's own connections). PostgreSQL runs from a fresh data directory under
# /tmp on 127.0.0.1:5440 with trust authentication and max_connections 1000.
# Both are for benchmarking only: no durability, no passwords.
#
# Environment: REDIS_PORT, PG_PORT, PG_MAX_CONNECTIONS, BENCH_SERVICES_DIR.
# Runs as root (apt-get, and PostgreSQL is started as the `postgres` user
# with runuser) or as a user who already has both installed.
set -euo pipefail

REDIS_PORT=${REDIS_PORT:-6390}
PG_PORT=${PG_PORT:-5440}
PG_MAX_CONNECTIONS=${PG_MAX_CONNECTIONS:-1000}
REDIS_MAXCLIENTS=20000
DIR=${BENCH_SERVICES_DIR:-/tmp/pklock-bench-services}
REDIS_DIR=$DIR/redis
PG_DATA=$DIR/pgdata
PG_SOCKETS=$DIR/pgsock

say() { echo "services.sh: $*" >&2; }

pg_bindir() {
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

# Runs a command as the postgres user when we are root, else as ourselves.
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

install_missing() {
    local want=()
    command -v redis-server >/dev/null 2>&1 || want+=(redis-server)
    pg_bindir >/dev/null || want+=(postgresql)
    if [ ${#want[@]} -eq 0 ]; then
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        say "missing ${want[*]}; install them (apt-get install ${want[*]}) or run as root"
        exit 1
    fi
    say "installing ${want[*]}"
    # Keep the packages' own services from starting on their default ports:
    # only the throwaway instances below should run.
    local policy=/usr/sbin/policy-rc.d made_policy=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    local rc=0
    apt-get install -y -q --no-install-recommends "${want[@]}" >&2 || rc=$?
    if [ -n "$made_policy" ]; then
        rm -f "$policy"
    fi
    return $rc
}

redis_cli() {
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"
}

redis_running() {
    [ -f "$DIR/redis.pid" ] && kill -0 "$(cat "$DIR/redis.pid")" 2>/dev/null
}

start_redis() {
    if redis_running; then
        say "redis already running (pid $(cat "$DIR/redis.pid"))"
        return 0
    fi
    mkdir -p "$REDIS_DIR"
    # maxclients needs as many file descriptors (plus 32 of Redis's own);
    # Redis lowers maxclients by itself if it cannot get them.
    ulimit -n $((REDIS_MAXCLIENTS + 64)) 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" \
        --save '' --appendonly no \
        --maxclients "$REDIS_MAXCLIENTS" \
        --daemonize yes --pidfile "$DIR/redis.pid" \
        --logfile "$DIR/redis.log" --dir "$REDIS_DIR"
    local i
    for i in $(seq 100); do
        if redis_cli ping 2>/dev/null | grep -q PONG; then
            break
        fi
        sleep 0.1
    done
    if ! redis_cli ping 2>/dev/null | grep -q PONG; then
        say "redis did not start; see $DIR/redis.log"
        exit 1
    fi
    local maxclients
    maxclients=$(redis_cli config get maxclients | tail -n 1)
    if [ "$maxclients" -lt "$REDIS_MAXCLIENTS" ]; then
        say "redis lowered maxclients to $maxclients to fit the open-file limit ($(ulimit -n)); pklock-bench --holders must stay below it"
    fi
    say "redis pid $(cat "$DIR/redis.pid"), maxclients $maxclients"
}

pg_running() {
    local bindir
    bindir=$(pg_bindir) || return 1
    [ -d "$PG_DATA" ] && as_pg "$bindir/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1
}

start_postgres() {
    local bindir
    bindir=$(pg_bindir)
    if pg_running; then
        say "postgres already running in $PG_DATA"
        return 0
    fi
    mkdir -p "$DIR"
    chmod 755 "$DIR"
    if [ ! -f "$PG_DATA/PG_VERSION" ]; then
        rm -rf "$PG_DATA"
        install -d -m 700 "$PG_DATA"
        [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_DATA"
        as_pg "$bindir/initdb" -D "$PG_DATA" -U postgres --auth=trust \
            --encoding=UTF8 --no-locale >"$DIR/initdb.log" 2>&1 || {
            say "initdb failed; see $DIR/initdb.log"
            exit 1
        }
    fi
    install -d -m 755 "$PG_SOCKETS"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_SOCKETS"
    touch "$DIR/postgres.log"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$DIR/postgres.log"
    # Each connection is a process with a few open files; give them room.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    # fsync and full_page_writes off: advisory locks write nothing, and this
    # instance is thrown away.
    as_pg "$bindir/pg_ctl" -D "$PG_DATA" -l "$DIR/postgres.log" -w -t 60 start -o "\
 -c listen_addresses=127.0.0.1 -c port=$PG_PORT\
 -c unix_socket_directories=$PG_SOCKETS\
 -c max_connections=$PG_MAX_CONNECTIONS\
 -c shared_buffers=128MB -c fsync=off -c full_page_writes=off\
 -c synchronous_commit=off" >/dev/null || {
        say "postgres did not start; see $DIR/postgres.log"
        exit 1
    }
    say "postgres pid $(head -n 1 "$PG_DATA/postmaster.pid"), max_connections $PG_MAX_CONNECTIONS"
}

stop_redis() {
    if redis_running; then
        local pid
        pid=$(cat "$DIR/redis.pid")
        kill "$pid"
        local i
        for i in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        say "redis stopped"
    fi
}

stop_postgres() {
    if pg_running; then
        as_pg "$(pg_bindir)/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null
        say "postgres stopped"
    fi
}

case "${1:-}" in
start)
    install_missing
    mkdir -p "$DIR"
    start_redis
    start_postgres
    echo "redis://127.0.0.1:$REDIS_PORT"
    echo "postgres://postgres@127.0.0.1:$PG_PORT/postgres"
    ;;
stop)
    stop_redis
    stop_postgres
    rm -rf "$DIR"
    ;;
status)
    if redis_running; then
        echo "redis: running, pid $(cat "$DIR/redis.pid"), redis://127.0.0.1:$REDIS_PORT"
    else
        echo "redis: stopped"
    fi
    if pg_running; then
        echo "postgres: running, postgres://postgres@127.0.0.1:$PG_PORT/postgres"
    else
        echo "postgres: stopped"
    fi
    ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 64
    ;;
esac
