#!/usr/bin/env bash
# Throughput in cluster mode against single-server mode, in one run: a
# single server, and etcd with one cluster-mode server (the leader), started
# side by side; pklock-bench's uncontended and contended workloads against
# each in turn (single, cluster, cluster, single, ...: the order alternates
# every round, so neither always goes first), then the medians and the ratio.
#
#   benches/cluster.sh                 5 rounds of 5 s per workload and mode
#   ROUNDS=7 SECONDS_EACH=3 benches/cluster.sh
#
# The servers and etcd share one CPU (SERVER_CPU, default 1) and the load
# generator has the other (BENCH_CPU, default 0), as in benches/run.sh.
# Needs etcd (Debian: etcd-server), curl and jq. Everything it starts is
# stopped on exit, and its files removed.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
SECONDS_EACH=${SECONDS_EACH:-5}
SERVER_CPU=${SERVER_CPU:-1}
BENCH_CPU=${BENCH_CPU:-0}
SINGLE_PORT=${SINGLE_PORT:-22110}
CLUSTER_PORT=${CLUSTER_PORT:-22111}
ETCD_PORT=${ETCD_PORT:-22379}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-22380}

for tool in etcd curl jq; do
    command -v "$tool" >/dev/null || {
        echo "cluster.sh: $tool is needed" >&2
        exit 1
    }
done

cargo build --release --bin server --bin pklock --bin pklock-bench >&2

WORK=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

etcd_url="http://127.0.0.1:$ETCD_PORT"
peer_url="http://127.0.0.1:$ETCD_PEER_PORT"
taskset -c "$SERVER_CPU" etcd --name bench --data-dir "$WORK/etcd" \
    --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "$peer_url" --initial-advertise-peer-urls "$peer_url" \
    --initial-cluster "bench=$peer_url" \
    --logger zap --log-outputs stderr --log-level warn 2>"$WORK/etcd.log" &
pids+=($!)
for _ in $(seq 100); do
    curl -fs "$etcd_url/health" 2>/dev/null | grep -q '"health":"true"' && break
    sleep 0.1
done
curl -fs "$etcd_url/health" | grep -q '"health":"true"' || {
    echo "cluster.sh: etcd did not start:" >&2
    cat "$WORK/etcd.log" >&2
    exit 1
}

printf 'listen = ["127.0.0.1:%s"]\nrestart_grace_ms = 0\nstate_file = ""\n' \
    "$SINGLE_PORT" >"$WORK/single.toml"
printf 'listen = ["127.0.0.1:%s"]\n[cluster]\netcd_endpoints = ["%s"]\n' \
    "$CLUSTER_PORT" "$etcd_url" >"$WORK/cluster.toml"
declare -A pid_of
for mode in single cluster; do
    RUST_LOG=warn taskset -c "$SERVER_CPU" target/release/server --config "$WORK/$mode.toml" \
        2>"$WORK/$mode.log" &
    pids+=($!)
    pid_of[$mode]=$!
done
declare -A addr_of=([single]="127.0.0.1:$SINGLE_PORT" [cluster]="127.0.0.1:$CLUSTER_PORT")
# status is refused by a standby: it succeeds once the server grants.
for mode in single cluster; do
    for _ in $(seq 100); do
        target/release/pklock --server "${addr_of[$mode]}" status >/dev/null 2>&1 && break
        sleep 0.1
    done
    target/release/pklock --server "${addr_of[$mode]}" status >/dev/null || {
        echo "cluster.sh: the $mode server does not serve:" >&2
        cat "$WORK/$mode.log" >&2
        exit 1
    }
done

for round in $(seq "$ROUNDS"); do
    order=(single cluster)
    [ $((round % 2)) -eq 0 ] && order=(cluster single)
    for mode in "${order[@]}"; do
        echo "round $round/$ROUNDS: $mode" >&2
        taskset -c "$BENCH_CPU" target/release/pklock-bench --server "${addr_of[$mode]}" \
            --pid "${pid_of[$mode]}" --workload uncontended --workload contended \
            --seconds "$SECONDS_EACH" --json 2>/dev/null |
            jq -c --arg mode "$mode" --argjson round "$round" \
                '.[0] | {mode: $mode, round: $round,
                  cycles: .uncontended.cycles_per_sec,
                  cpu: .uncontended.server_cpu.us_per_op,
                  lock_p50: .uncontended.lock_latency.p50_us,
                  grants: .contended.grants_per_sec,
                  handover_p50: .contended.handover.p50_us,
                  errors: .errors}' >>"$WORK/runs.jsonl"
    done
done

# Each run, then the medians and cluster/single.
jq -rs '
  def median: sort | if length % 2 == 1 then .[length / 2 | floor]
              else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def row(name): name + "  "
      + "uncontended \(.cycles | floor) cycles/s (lock p50 \(.lock_p50 * 10 | round / 10) us, server CPU/cycle \(.cpu * 100 | round / 100) us)  "
      + "contended \(.grants | floor) grants/s (handover p50 \(.handover_p50 * 10 | round / 10) us)";
  def medians(mode): map(select(.mode == mode))
      | {cycles: (map(.cycles) | median), cpu: (map(.cpu) | median),
         lock_p50: (map(.lock_p50) | median), grants: (map(.grants) | median),
         handover_p50: (map(.handover_p50) | median)};
  (.[] | row("round \(.round) \(.mode | . + " " * (7 - length))")
       + (if (.errors | length) > 0 then "  errors: \(.errors)" else "" end)),
  "",
  (medians("single") as $s | medians("cluster") as $c
   | ($s | row("median single ")), ($c | row("median cluster")),
     "cluster/single: uncontended \($c.cycles / $s.cycles * 1000 | round / 1000)x cycles/s, "
     + "contended \($c.grants / $s.grants * 1000 | round / 1000)x grants/s")
' "$WORK/runs.jsonl"
