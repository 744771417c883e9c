#!/usr/bin/env bash
# TLS against plain text, in one run: a throwaway CA and server certificate
# made with openssl, then rounds of pklock-bench over plain TCP and over TLS
# (plain then TLS, TLS then plain, ...: the order alternates every round),
# each against a fresh server that has both a plain and a TLS listener, and
# the medians and TLS/plain at the end.
#
#   benches/tls.sh                          5 rounds
#   ROUNDS=7 SECONDS_EACH=3 KEY=rsa benches/tls.sh
#
# Each run is `idle-holders` first (HOLDERS holders, default 10000, on a
# server that has served nothing else yet, so that its memory before them is
# a fresh server's), then `uncontended` and `handshakes` for SECONDS_EACH
# each. KEY is the certificates' key type: ec (P-256, the default) or rsa
# (2048 bits). The servers run on SERVER_CPU (default 1) and the load
# generator on BENCH_CPU (default 0), as in benches/run.sh. Needs openssl and
# jq. Everything it starts is stopped on exit, and its files removed.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
SECONDS_EACH=${SECONDS_EACH:-5}
HOLDERS=${HOLDERS:-10000}
KEY=${KEY:-ec}
SERVER_CPU=${SERVER_CPU:-1}
BENCH_CPU=${BENCH_CPU:-0}
PLAIN_PORT=${PLAIN_PORT:-22120}
TLS_PORT=${TLS_PORT:-22121}

for tool in openssl jq; do
    command -v "$tool" >/dev/null || {
        echo "tls.sh: $tool is needed" >&2
        exit 1
    }
done

cargo build --release --bin server --bin pklock --bin pklock-bench >&2

WORK=$(mktemp -d)
SERVER_PID=
stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
}
cleanup() {
    stop_server
    rm -rf "$WORK"
}
trap cleanup EXIT

# The throwaway CA, and a server certificate it signs for 127.0.0.1.
new_key() {
    case "$KEY" in
    ec) openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" ;;
    rsa) openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" ;;
    *)
        echo "tls.sh: KEY is ec or rsa, not $KEY" >&2
        exit 64
        ;;
    esac
}
new_key "$WORK/ca.key" 2>/dev/null
openssl req -x509 -new -key "$WORK/ca.key" -subj "/CN=pklock bench CA" -days 2 \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$WORK/ca.pem"
new_key "$WORK/server.key" 2>/dev/null
openssl req -new -key "$WORK/server.key" -subj "/CN=127.0.0.1" -out "$WORK/server.csr"
printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" >"$WORK/server.ext"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" \
    -CAcreateserial -days 2 -extfile "$WORK/server.ext" -out "$WORK/server.pem" 2>/dev/null

cat >"$WORK/pklock.toml" <<EOF
listen = ["127.0.0.1:$PLAIN_PORT"]
restart_grace_ms = 0
max_connections = 20000
state_file = ""

[tls]
listen = ["127.0.0.1:$TLS_PORT"]
cert_file = "$WORK/server.pem"
key_file = "$WORK/server.key"
EOF

start_server() {
    RUST_LOG=warn taskset -c "$SERVER_CPU" target/release/server --config "$WORK/pklock.toml" \
        2>>"$WORK/server.log" &
    SERVER_PID=$!
    for _ in $(seq 100); do
        target/release/pklock --server "127.0.0.1:$PLAIN_PORT" ping >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "tls.sh: the server did not start:" >&2
    cat "$WORK/server.log" >&2
    exit 1
}

# The fd limit the holders need, for the server and for pklock-bench.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

for round in $(seq "$ROUNDS"); do
    order=(plain tls)
    [ $((round % 2)) -eq 0 ] && order=(tls plain)
    for mode in "${order[@]}"; do
        echo "round $round/$ROUNDS: $mode" >&2
        start_server
        if [ "$mode" = tls ]; then
            target=(--server "127.0.0.1:$TLS_PORT" --tls --ca "$WORK/ca.pem")
        else
            target=(--server "127.0.0.1:$PLAIN_PORT")
        fi
        taskset -c "$BENCH_CPU" target/release/pklock-bench "${target[@]}" --pid "$SERVER_PID" \
            --workload idle-holders --workload uncontended --workload handshakes \
            --holders "$HOLDERS" --seconds "$SECONDS_EACH" --json 2>>"$WORK/bench.log" |
            jq -c --arg mode "$mode" --argjson round "$round" \
                '.[0] | {mode: $mode, round: $round,
                  cycles: .uncontended.cycles_per_sec,
                  cpu: .uncontended.server_cpu.us_per_op,
                  lock_p50: .uncontended.lock_latency.p50_us,
                  per_holder: .idle_holders.bytes_per_holder,
                  probe_p99: .idle_holders.probe_with_holders.p99_us,
                  conns: .handshakes.per_sec,
                  conn_cpu: .handshakes.server_cpu.us_per_op,
                  conn_p50: .handshakes.latency.p50_us,
                  errors: .errors}' >>"$WORK/runs.jsonl" || true
        stop_server
    done
done

if [ ! -s "$WORK/runs.jsonl" ]; then
    echo "tls.sh: no results; pklock-bench said:" >&2
    cat "$WORK/bench.log" >&2
    exit 1
fi

# Each run, then the medians and TLS/plain.
jq -rs '
  def median: map(select(. != null)) | sort
      | if length == 0 then null
        elif length % 2 == 1 then .[length / 2 | floor]
        else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def r(n): if . == null then "-" else . * n | round / n end;
  def row(name): name + "  "
      + "uncontended \(.cycles | r(1)) cycles/s (lock p50 \(.lock_p50 | r(10)) us, server CPU/cycle \(.cpu | r(100)) us)  "
      + "idle holders \(.per_holder | r(1)) B each (probe p99 beside them \(.probe_p99 | r(10)) us)  "
      + "new connections \(.conns | r(1))/s (p50 \(.conn_p50 | r(10)) us, server CPU \(.conn_cpu | r(10)) us each)";
  def medians(mode): map(select(.mode == mode))
      | {cycles: (map(.cycles) | median), cpu: (map(.cpu) | median),
         lock_p50: (map(.lock_p50) | median), per_holder: (map(.per_holder) | median),
         probe_p99: (map(.probe_p99) | median), conns: (map(.conns) | median),
         conn_cpu: (map(.conn_cpu) | median), conn_p50: (map(.conn_p50) | median)};
  def ratio(a; b): if a == null or b == null or b == 0 then "-" else a / b * 1000 | round / 1000 end;
  (.[] | row("round \(.round) \(.mode | . + " " * (5 - length))")
       + (if (.errors | length) > 0 then "  errors: \(.errors)" else "" end)),
  "",
  (medians("plain") as $p | medians("tls") as $t
   | ($p | row("median plain")), ($t | row("median tls  ")),
     "tls/plain: uncontended \(ratio($t.cycles; $p.cycles))x cycles/s, server CPU/cycle \(ratio($t.cpu; $p.cpu))x; "
     + "idle holder memory \(ratio($t.per_holder; $p.per_holder))x (\($t.per_holder | r(1)) B, \($t.per_holder / 1024 | r(100)) KiB per TLS holder); "
     + "new connections \(ratio($t.conns; $p.conns))x per second, server CPU \(ratio($t.conn_cpu; $p.conn_cpu))x each"),
  # The two runs of a round are next to each other in time, so their ratio
  # is less exposed to the machine slowing down for a while.
  ([group_by(.round)[] | select(length == 2)
    | (map(select(.mode == "tls"))[0]) as $t | (map(select(.mode == "plain"))[0]) as $p
    | select($t.cycles != null and $p.cycles != null and $p.cycles > 0)
    | $t.cycles / $p.cycles] as $rs
   | "tls/plain uncontended cycles/s round by round: \($rs | map(. * 1000 | round / 1000))"
     + ", median \($rs | median | r(1000))x")
' "$WORK/runs.jsonl"
