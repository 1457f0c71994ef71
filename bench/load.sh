#!/usr/bin/env bash
# Load benchmark: one release tunnel-server on loopback under bounded abuse, while an observer times
# admin calls and samples the server's memory and CPU. No root; every address is in 127.0.0.0/8.
#
#   bench/load.sh [SECS]          SECS per scenario (default 20); the run takes 5 x SECS + 30 s (idle)
#                                 + ~40 s of setup and draining (~2.5 min at 20), after the build
#   BENCH_KEEP=DIR bench/load.sh  keep the server's data dir and log in DIR
#   LOAD_ARGS="--only relay --relay quic" bench/load.sh   some scenarios only (setup, idle, relay,
#                                 logins, udp, tickets), QUIC or TCP only in the relay one
#
# Scenarios (tests/examples/load/ says what each one sends): setup (200 nodes join once), idle
# (100 sessions held 30 s), relay (3000 QUIC + 2000 TCP connections without a capability), logins
# (failed-login flood from 500 sources), udp (20,000 garbage datagrams/s), tickets (200 nodes
# reconnecting). The server keeps its production defaults (argon2 19 MiB, relay and login caps).
# Prints a block per scenario and a summary table; figures, never pass/fail.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-20}"
# ~5000 relay connections and their reconnects on both ends, plus gRPC and the load's own sockets.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

cargo build --release -q -p tunnel-server -p tunnelctl
cargo build --release -q -p tunnel-tests --example load
BIN="$PWD/target/release"
LOAD="$BIN/examples/load"

WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$SERVER_PID" 2>/dev/null || true
    fi
    if [ -n "${BENCH_KEEP:-}" ]; then mkdir -p "$BENCH_KEEP" && cp -r "$WORK"/. "$BENCH_KEEP"/; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

DATA="$WORK/data"
LOG="$WORK/server.log"
# Free ports can be taken between the check and the bind: try a few times.
for attempt in 1 2 3; do
    read -r GRPC STUN RELAY RELAY_TCP METRICS < <("$LOAD" free-ports 5)
    "$BIN/tunnel-server" --data-dir "$DATA" --listen "127.0.0.1:$GRPC" --public-addr 127.0.0.1 \
        --stun-listen "127.0.0.1:$STUN" --relay-listen "127.0.0.1:$RELAY" \
        --relay-tcp-listen "127.0.0.1:$RELAY_TCP" --metrics-listen "127.0.0.1:$METRICS" >"$LOG" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 100); do
        grep -q "tunnel-server listening" "$LOG" 2>/dev/null && break
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    if grep -q "tunnel-server listening" "$LOG"; then break; fi
    echo "server did not start (attempt $attempt):" >&2
    tail -5 "$LOG" >&2
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
    [ "$attempt" = 3 ] && exit 1
done

echo "tunnel-server $("$BIN/tunnel-server" --version | awk '{print $2}') (release), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- server core proto node || echo ' + uncommitted changes in the tree')"
# shellcheck disable=SC2086 # LOAD_ARGS is a list of words
"$LOAD" --data-dir "$DATA" --server-pid "$SERVER_PID" --metrics "127.0.0.1:$METRICS" \
    --stun "127.0.0.1:$STUN" --relay-udp "127.0.0.1:$RELAY" --relay-tcp "127.0.0.1:$RELAY_TCP" \
    --secs "$SECS" --idle-secs 30 ${LOAD_ARGS:-}

echo
echo "== after the run =="
if kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "server still running; tunnelctl info:"
    "$BIN/tunnelctl" --admin-token-file "$DATA/admin.token" info | sed 's/^/  /'
else
    echo "SERVER EXITED; last log lines:"
    tail -20 "$LOG"
fi
echo "server log: $(wc -l <"$LOG") lines, $(du -h "$LOG" | cut -f1); by level:" \
    "$(grep -c ' WARN ' "$LOG" || true) WARN, $(grep -c ' ERROR ' "$LOG" || true) ERROR"
grep -E ' (WARN|ERROR) ' "$LOG" | sed -E 's/^[^ ]+ +//; s/(node|source|from|remote)=[^ ]+/\1=…/g' \
    | cut -c1-160 | sort | uniq -c | sort -rn | head -8 | sed 's/^/  /' || true
