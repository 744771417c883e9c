#!/usr/bin/env bash
# Instructions the server executes per lock/unlock cycle, counted by
# callgrind: a run with CYCLES cycles on 10 connections, less a run with none.
#
#   benches/callgrind.sh [CYCLES_PER_CONNECTION]     (default 2000)
set -euo pipefail
cd "$(dirname "$0")/.."
CYCLES=${1:-2000}
CONNECTIONS=10
PORT=${PKLOCK_PROFILE_PORT:-22200}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
command -v valgrind >/dev/null || { apt-get update -q && apt-get install -y -q valgrind; }
CARGO_PROFILE_RELEASE_DEBUG=true cargo build --release --bin server >&2
printf 'listen = ["127.0.0.1:%s"]\nrestart_grace_ms = 0\nstate_file = ""\n' "$PORT" >"$WORK/cfg.toml"

count() {
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$WORK/out.$1" \
        target/release/server --config "$WORK/cfg.toml" 2>/dev/null &
    local pid=$!
    for _ in $(seq 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT)).close()" 2>/dev/null && break
        sleep 0.2
    done
    python3 benches/cycles.py 127.0.0.1 "$PORT" "$1" "$CONNECTIONS"
    sleep 0.5
    kill -INT "$pid"
    wait "$pid" || true
    callgrind_annotate "$WORK/out.$1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
}

base=$(count 0)
loaded=$(count "$CYCLES")
echo "$(( (loaded - base) / (CYCLES * CONNECTIONS) )) instructions per lock/unlock cycle ($((CYCLES * CONNECTIONS)) cycles)"
echo "profile: callgrind_annotate $WORK/out.$CYCLES (removed on exit; copy it first)" >&2
