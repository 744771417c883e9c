#!/usr/bin/env bash
# What the deadlock check costs, in one run: two servers side by side, one
# with `detect_deadlocks = false` and one with the default (the check on),
# and pklock-bench's uncontended, contended and hold-and-wait workloads
# against each in turn, several rounds, then the medians and on/off.
#
#   benches/deadlock.sh                5 rounds of 5 s per workload and server
#   ROUNDS=9 SECONDS_EACH=3 SERVER_CPU=0 BENCH_CPU=0 benches/deadlock.sh
#
# Each round runs every workload against both servers back to back (off
# then on, on then off, ...: the order alternates every round), so that the
# two runs compared are next to each other in time. `uncontended` never
# waits, so the check never runs; in `contended` every wait comes from a
# connection that holds nothing, which the check passes over at once; in
# `hold-and-wait` each connection holds a lock of its own while it waits,
# so every wait is checked in full. Both servers stay up for the whole run
# and share SERVER_CPU (default 1); the load generator has BENCH_CPU
# (default 0), as in benches/run.sh. Needs jq. Everything it starts is
# stopped on exit, and its files removed.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
SECONDS_EACH=${SECONDS_EACH:-5}
SERVER_CPU=${SERVER_CPU:-1}
BENCH_CPU=${BENCH_CPU:-0}
OFF_PORT=${OFF_PORT:-22140}
ON_PORT=${ON_PORT:-22141}
WORKLOADS=(uncontended contended hold-and-wait)

command -v jq >/dev/null || {
    echo "deadlock.sh: jq is needed" >&2
    exit 1
}

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

printf 'listen = ["127.0.0.1:%s"]\nrestart_grace_ms = 0\nstate_file = ""\ndetect_deadlocks = false\n' \
    "$OFF_PORT" >"$WORK/off.toml"
printf 'listen = ["127.0.0.1:%s"]\nrestart_grace_ms = 0\nstate_file = ""\n' \
    "$ON_PORT" >"$WORK/on.toml"
declare -A pid_of
declare -A addr_of=([off]="127.0.0.1:$OFF_PORT" [on]="127.0.0.1:$ON_PORT")
for mode in off on; do
    RUST_LOG=warn taskset -c "$SERVER_CPU" target/release/server --config "$WORK/$mode.toml" \
        2>"$WORK/$mode.log" &
    pids+=($!)
    pid_of[$mode]=$!
done
for mode in off on; do
    for _ in $(seq 100); do
        target/release/pklock --server "${addr_of[$mode]}" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
    target/release/pklock --server "${addr_of[$mode]}" ping >/dev/null || {
        echo "deadlock.sh: the server with the check $mode does not serve:" >&2
        cat "$WORK/$mode.log" >&2
        exit 1
    }
done

for round in $(seq "$ROUNDS"); do
    order=(off on)
    [ $((round % 2)) -eq 0 ] && order=(on off)
    for workload in "${WORKLOADS[@]}"; do
        for mode in "${order[@]}"; do
            echo "round $round/$ROUNDS: $workload, check $mode" >&2
            taskset -c "$BENCH_CPU" target/release/pklock-bench --server "${addr_of[$mode]}" \
                --pid "${pid_of[$mode]}" --workload "$workload" \
                --seconds "$SECONDS_EACH" --json 2>>"$WORK/bench.log" |
                jq -c --arg mode "$mode" --arg workload "$workload" --argjson round "$round" \
                    '.[0] | (.uncontended // .contended // .hold_and_wait) as $r
                     | {mode: $mode, workload: $workload, round: $round,
                        rate: ($r.cycles_per_sec // $r.grants_per_sec),
                        cpu: $r.server_cpu.us_per_op,
                        p50: ($r.lock_latency.p50_us // $r.handover.p50_us),
                        errors: .errors}' >>"$WORK/runs.jsonl" || true
        done
    done
done

if [ ! -s "$WORK/runs.jsonl" ]; then
    echo "deadlock.sh: no results; pklock-bench said:" >&2
    cat "$WORK/bench.log" >&2
    exit 1
fi

# Each run, then per workload the medians, on/off of the medians, and on/off
# round by round (the two runs of a round are next to each other in time).
jq -rs '
  def median: map(select(. != null)) | sort
      | if length == 0 then null
        elif length % 2 == 1 then .[length / 2 | floor]
        else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def r(n): if . == null then "-" else . * n | round / n end;
  def ratio(a; b): if a == null or b == null or b == 0 then null else a / b end;
  def unit: if .workload == "uncontended" then "cycles/s" else "grants/s" end;
  def row(name): name + "  \(.rate | r(1)) \(unit)  "
      + (if .workload == "uncontended" then "lock" else "handover" end)
      + " p50 \(.p50 | r(10)) us  server CPU/\(if .workload == "uncontended" then "cycle" else "grant" end) \(.cpu | r(100)) us";
  def medians: {workload: .[0].workload, rate: (map(.rate) | median),
                cpu: (map(.cpu) | median), p50: (map(.p50) | median)};
  def pad(n): . + " " * (n - length);
  (.[] | row("round \(.round) \(.workload | pad(13)) check \(.mode | pad(3))")
       + (if (.errors | length) > 0 then "  errors: \(.errors)" else "" end)),
  (group_by(.workload) | sort_by(.[0].workload as $w | ["uncontended", "contended", "hold-and-wait"] | index($w))[]
   | (map(select(.mode == "off")) | medians) as $off
   | (map(select(.mode == "on")) | medians) as $on
   | [group_by(.round)[] | select(length == 2)
      | ratio(map(select(.mode == "on"))[0].rate; map(select(.mode == "off"))[0].rate)
      | select(. != null)] as $rs
   | "",
     ($off | row("median  \(.workload | pad(13)) check off")),
     ($on | row("median  \(.workload | pad(13)) check on ")),
     "on/off \($on.workload): \(ratio($on.rate; $off.rate) | r(1000))x \($on | unit), "
     + "server CPU \(ratio($on.cpu; $off.cpu) | r(1000))x; "
     + "round by round \($rs | map(r(1000))), median \($rs | median | r(1000))x")
' "$WORK/runs.jsonl"
