#!/usr/bin/env bash
# Instructions the server executes per lock/unlock cycle, counted by
# callgrind: a run with CYCLES cycles on 10 connections, less a run with none.
# WORKLOAD=handovers counts per handover of one lock among 50 connections
# instead (benches/handovers.py: N handovers, default 10000), and
# WORKLOAD=hold-and-wait the same with each connection holding a lock of its
# own. CONFIG is added to the server's configuration file.
#
#   benches/callgrind.sh [CYCLES_PER_CONNECTION]     (default 2000)
#   WORKLOAD=hold-and-wait CONFIG='detect_deadlocks = false' benches/callgrind.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
WORKLOAD=${WORKLOAD:-cycles}
case "$WORKLOAD" in
cycles) N=${1:-2000} ;;
handovers | hold-and-wait) N=${1:-10000} ;;
*)
    echo "callgrind.sh: WORKLOAD is cycles, handovers or hold-and-wait, not $WORKLOAD" >&2
    exit 64
    ;;
esac
CONNECTIONS=10
PORT=${PKLOCK_PROFILE_PORT:-22200}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
command -v valgrind >/dev/null || { apt-get update -q && apt-get install -y -q valgrind; }
CARGO_PROFILE_RELEASE_DEBUG=true cargo build --release --bin server >&2
printf 'listen = ["127.0.0.1:%s"]\nrestart_grace_ms = 0\nstate_file = ""\n%s\n' "$PORT" "${CONFIG:-}" >"$WORK/cfg.toml"

count() {
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$WORK/out.$1" \
        target/release/server --config "$WORK/cfg.toml" 2>/dev/null &
    local pid=$!
    for _ in $(seq 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT)).close()" 2>/dev/null && break
        sleep 0.2
    done
    case "$WORKLOAD" in
    cycles) python3 benches/cycles.py 127.0.0.1 "$PORT" "$1" "$CONNECTIONS" ;;
    handovers) python3 benches/handovers.py 127.0.0.1 "$PORT" "$1" 50 ;;
    hold-and-wait) python3 benches/handovers.py 127.0.0.1 "$PORT" "$1" 50 --hold-own ;;
    esac
    sleep 0.5
    kill -INT "$pid"
    wait "$pid" || true
    callgrind_annotate "$WORK/out.$1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
}

base=$(count 0)
loaded=$(count "$N")
if [ "$WORKLOAD" = cycles ]; then
    echo "$(((loaded - base) / (N * CONNECTIONS))) instructions per lock/unlock cycle ($((N * CONNECTIONS)) cycles)"
else
    echo "$(((loaded - base) / N)) instructions per handover ($N handovers, $WORKLOAD)"
fi
echo "profile: callgrind_annotate $WORK/out.$N (removed on exit; copy it first)" >&2
