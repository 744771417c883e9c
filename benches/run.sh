#!/usr/bin/env bash
# One side-by-side benchmark run: a fresh pklock server, throwaway Redis and
# PostgreSQL (benches/services.sh), and pklock-bench against all three.
#
#   benches/run.sh [pklock-bench options...]     e.g. --seconds 10, --json
#
# The servers share one CPU (SERVER_CPU, default 1) and the load generator
# has the other (BENCH_CPU, default 0): on a 2-core machine that keeps every
# run's placement the same, which latency figures depend on.
set -euo pipefail
cd "$(dirname "$0")/.."

SERVER_CPU=${SERVER_CPU:-1}
BENCH_CPU=${BENCH_CPU:-0}
PORT=${PKLOCK_BENCH_PORT:-22100}
WORK=$(mktemp -d)

cargo build --release -p pklock -p pklock-bench --features pklock-bench/compare >&2

cleanup() {
    [ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    benches/services.sh stop >&2 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

mapfile -t urls < <(taskset -c "$SERVER_CPU" benches/services.sh start)

printf 'listen = ["127.0.0.1:%s"]\nrestart_grace_ms = 0\nmax_connections = 20000\nstate_file = ""\n' "$PORT" >"$WORK/pklock.toml"
RUST_LOG=warn taskset -c "$SERVER_CPU" target/release/server --config "$WORK/pklock.toml" &
SERVER_PID=$!
for _ in $(seq 50); do
    target/release/pklock --server "127.0.0.1:$PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
done

compare=()
for url in "${urls[@]}"; do
    compare+=(--compare "$url")
done
taskset -c "$BENCH_CPU" target/release/pklock-bench --server "127.0.0.1:$PORT" --pid "$SERVER_PID" "${compare[@]}" "$@"
