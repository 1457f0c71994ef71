#!/usr/bin/env bash
# Path benchmark (root): figures for NAT traversal and the relay, direct path beside relayed path.
#
#   server 203.0.113.10 --+
#   relay  203.0.113.20 --+-- br0 (own namespace; the public segment)
#   agent  203.0.113.2  --+        agent --(veth, 10.9.0.0/24)-- service ns (http.server :80, iperf3 -s)
#   client 203.0.113.3  --+
#
# No NATs: every node reaches every other on the public segment, so punching always finds the direct
# path; the relayed path is made with --force-relay (client, and the agent where said). NATs change
# whether the direct path exists, not these figures. The server announces the standalone relay
# (`tunnel-server relay`, embedded relay off), which runs pinned to one core (taskset -c 1) for the
# whole run.
#
#   bench/paths.sh
#   BENCH_BIN=DIR bench/paths.sh      binaries from DIR (e.g. another commit's build)
#   BENCH_KEEP=DIR bench/paths.sh     keep every node's log in DIR
# Prints:
#   1. `tunnelctl up` (userspace) launch -> first HTTP response from the resource through SOCKS5, by
#      private name, fresh state dir each run, agent already up; 5 runs direct, 5 relayed (goal 1 s / 2 s).
#   2. ping RTT from a TUN client to the resource's overlay address, direct and relayed, and the
#      difference (goal < 0.5 ms); plain veth RTT for reference.
#   3. iperf3 TCP through the tunnel, client and agent both forced to relay, relay on one core
#      (goal >= 1 Gbit/s), with the relay's own tunnel_relay_bytes_total delta, refused packets and
#      CPU time; the same iperf3 over the direct path for reference (what the nodes alone manage).
# Every namespace is removed on exit, pass or fail.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
for cmd_pkg in iperf3:iperf3 curl:curl ip:iproute2 ping:iputils-ping taskset:util-linux; do
    command -v "${cmd_pkg%%:*}" >/dev/null || need="${need:-} ${cmd_pkg#*:}"
done
if [ -n "${need:-}" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need; fi

# BENCH_BIN=DIR runs binaries built elsewhere (another commit) instead of building these.
if [ -z "${BENCH_BIN:-}" ]; then cargo build --release -q --workspace --bins; fi
BIN="${BENCH_BIN:-$PWD/target/release}"
RUNS=5
P="tp$$"
N="${P}n"; SRV="${P}srv"; RLY="${P}rly"; A="${P}agt"; C="${P}cli"; S="${P}svc"
NSES=("$C" "$A" "$S" "$RLY" "$SRV" "$N")
WORK="$(mktemp -d)"
cleanup() {
    rc=$?
    if [ "$rc" != 0 ]; then
        echo "--- failed (exit $rc); log tails from $WORK:" >&2
        for f in "$WORK"/*.log; do [ -f "$f" ] && { echo "== $f" >&2; tail -n 15 "$f" >&2; }; done
    fi
    for ns in "${NSES[@]}"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    if [ -n "${BENCH_KEEP:-}" ]; then mkdir -p "$BENCH_KEEP" && cp "$WORK"/*.log "$BENCH_KEEP"/ 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- topology ---
for ns in "${NSES[@]}"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n "$N" link add br0 type bridge
ip -n "$N" link set br0 up
attach() { # ns port-name address
    ip -n "$1" link add eth0 type veth peer name "$2" netns "$N"
    ip -n "$N" link set "$2" master br0 up
    ip -n "$1" addr add "$3/24" dev eth0
    ip -n "$1" link set eth0 up
}
attach "$SRV" srv 203.0.113.10
attach "$RLY" rly 203.0.113.20
attach "$A" agt 203.0.113.2
attach "$C" cli 203.0.113.3
ip -n "$A" link add lan0 type veth peer name eth0 netns "$S"
ip -n "$A" addr add 10.9.0.1/24 dev lan0; ip -n "$A" link set lan0 up
ip -n "$S" addr add 10.9.0.2/24 dev eth0; ip -n "$S" link set eth0 up

mkdir -p "$WORK/www"; echo "hello, tunnel" >"$WORK/www/hello.txt"
ip netns exec "$S" python3 -m http.server 80 --bind 10.9.0.2 --directory "$WORK/www" >"$WORK/http.log" 2>&1 &
ip netns exec "$S" iperf3 -s -B 10.9.0.2 -D --logfile "$WORK/iperf-s.log"

# --- server, standalone relay, agent ---
# Figure 1 logs one client in ten times within seconds; the server's per-node login limit (a burst
# of 6, then 12 a minute) would make the later launches wait for the control link's 3 s retry,
# which measures the limiter, not the launch. It is raised here only.
ip netns exec "$SRV" "$BIN/tunnel-server" --data-dir "$WORK/server" --listen 203.0.113.10:8443 \
    --public-addr 203.0.113.10 --stun-listen 203.0.113.10:3478 --relay-listen off --relay-tcp-listen off \
    --external-relay 203.0.113.20:21820 --metrics-listen 127.0.0.1:9180 \
    --node-login-burst 100 --node-logins-per-minute 600 >"$WORK/server.log" 2>&1 &
for _ in $(seq 100); do [ -f "$WORK/server/admin.token" ] && [ -f "$WORK/server/relay.bundle" ] && break; sleep 0.1; done
ip netns exec "$RLY" taskset -c 1 "$BIN/tunnel-server" relay --bundle-file "$WORK/server/relay.bundle" \
    --relay-listen 203.0.113.20:21820 --relay-tcp-listen off --metrics-listen 127.0.0.1:9190 >"$WORK/relay.log" 2>&1 &
RELAY_PID=$!  # `ip netns exec` and `taskset` exec in place: this is the relay's pid
relay_metric() { ip netns exec "$RLY" curl -sf 127.0.0.1:9190/metrics | awk -v m="$1" '$1 == m {print $2}'; }
for _ in $(seq 100); do relay_metric tunnel_relay_sessions >/dev/null 2>&1 && break; sleep 0.1; done
ctl() { ip netns exec "$SRV" "$BIN/tunnelctl" --admin-token-file "$WORK/server/admin.token" "$@"; }
for _ in $(seq 100); do ctl info >/dev/null 2>&1 && break; sleep 0.1; done
ctl site add lan >"$WORK/site.token"
ctl client add bench >"$WORK/client.token"
ctl add-resource --site lan --name web --target 10.9.0.2:80 >/dev/null
ctl add-resource --site lan --name iperf --target 10.9.0.2:5201 >/dev/null
ctl grant --client bench --resource web >/dev/null
ctl grant --client bench --resource iperf >/dev/null
overlay_of() { ctl resources --json | python3 -c '
import json, sys
d = json.load(sys.stdin)
rs = d if isinstance(d, list) else d.get("resources", d)
for r in rs:
    if r["name"] == sys.argv[1]:
        print(r["overlay_addr"]); break
' "$1"; }
WEB_IP=$(overlay_of web); IPERF_IP=$(overlay_of iperf)

AGENT_PID=
start_agent() { # [--force-relay]
    ip netns exec "$A" "$BIN/tunnel-agent" --token-file "$WORK/site.token" --state-dir "$WORK/agent" \
        --metrics-listen 127.0.0.1:9181 "$@" >>"$WORK/agent.log" 2>&1 &
    AGENT_PID=$!
    for _ in $(seq 100); do
        [ "$(ip netns exec "$A" curl -sf 127.0.0.1:9181/status | jq_ control.state)" = connected ] && return 0
        sleep 0.1
    done
    echo "agent did not connect" >&2; return 1
}
stop() { # pid: SIGTERM, then SIGKILL after 5 s
    kill "$1" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
# Field of a /status document on stdin: `control.state`, or `peer.NAME.FIELD`.
jq_() { python3 -c '
import json, sys
try:
    d = json.load(sys.stdin)
except Exception:
    sys.exit(0)
k = sys.argv[1].split(".")
if k[0] == "peer":
    d = next((p for p in d.get("peers", []) if p.get("name") == k[1]), {})
    k = k[2:]
for x in k:
    d = d.get(x) if isinstance(d, dict) else None
print("" if d is None else d)
' "$1"; }
status_of() { ip netns exec "$1" curl -sf "127.0.0.1:$2/status" || true; }  # ns port
start_agent

# --- 1: `tunnelctl up` to first byte, userspace client ---
# Runs inside the client namespace, so no `ip netns exec` per poll. Prints "ok|timeout SECONDS PATH".
TTFB='
set -euo pipefail
bin=$1; tok=$2; sd=$3; log=$4; shift 4
t0=$EPOCHREALTIME
"$bin/tunnelctl" up --token-file "$tok" --userspace --state-dir "$sd" --socks5 127.0.0.1:1080 \
    --dns-listen 127.0.0.1:5353 --metrics-listen 127.0.0.1:9182 "$@" >"$log" 2>&1 &
pid=$!
res=timeout
while :; do
    code=$(curl -s -o /dev/null -w "%{http_code}" --max-time 10 --socks5-hostname 127.0.0.1:1080 \
        http://web.tunnel.internal/hello.txt || true)
    t1=$EPOCHREALTIME
    if [ "$code" = 200 ]; then res=ok; break; fi
    if awk -v a="$t0" -v b="$t1" "BEGIN{exit !(b - a > 20)}"; then break; fi
    sleep 0.02
done
path=$(curl -sf 127.0.0.1:9182/status | python3 -c "import json,sys; print(\",\".join(p[\"path\"] for p in json.load(sys.stdin)[\"peers\"]) or \"none\")" || echo "?")
kill $pid 2>/dev/null || true; wait $pid || true
awk -v r="$res" -v a="$t0" -v b="$t1" -v p="$path" "BEGIN{printf \"%s %.3f %s\n\", r, b - a, p}"
'
declare -A FIG1
for mode in direct relay; do
    flag=(); [ "$mode" = relay ] && flag=(--force-relay)
    out=""
    for i in $(seq "$RUNS"); do
        r=$(ip netns exec "$C" bash -c "$TTFB" _ "$BIN" "$WORK/client.token" "$WORK/ttfb-$mode-$i" \
            "$WORK/client-ttfb-$mode-$i.log" "${flag[@]}")
        out+="$r"$'\n'
        sleep 0.5
    done
    FIG1[$mode]="$out"
done
summary() { # lines "ok|timeout SECONDS PATH" on stdin
    python3 -c '
import sys
rows = [l.split() for l in sys.stdin if l.strip()]
ok = sorted(float(r[1]) for r in rows if r[0] == "ok")
runs = " ".join(("%.3f" % float(r[1])) + ("" if r[0] == "ok" else "(timeout)") for r in rows)
paths = ",".join(sorted(set(r[2] for r in rows)))
if ok:
    print("min %.3f s, median %.3f s  (%d/%d ok; runs: %s; path at first byte: %s)" % (ok[0], ok[len(ok) // 2], len(ok), len(rows), runs, paths))
else:
    print("no run succeeded (runs: %s)" % runs)
'; }

# --- 2: RTT, TUN client ---
CLIENT_PID=
start_tun_client() { # state-dir [--force-relay]
    local sd=$1; shift
    ip netns exec "$C" "$BIN/tunnelctl" up --token-file "$WORK/client.token" --state-dir "$sd" \
        --metrics-listen 127.0.0.1:9182 --dns-mode off "$@" >"$sd.log" 2>&1 &
    CLIENT_PID=$!
    for _ in $(seq 100); do ip netns exec "$C" ping -n -c 1 -W 1 "$WEB_IP" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "no ping reply from $WEB_IP through the tunnel" >&2; status_of "$C" 9182 >&2; return 1
}
wait_path() { # ns port peer want: waits up to 10 s; prints the path seen last
    local p=
    for _ in $(seq 100); do
        p=$(status_of "$1" "$2" | jq_ "peer.$3.path")
        [ "$p" = "$4" ] && break
        ip netns exec "$C" ping -n -c 1 -W 1 "$WEB_IP" >/dev/null 2>&1 || true
        sleep 0.1
    done
    echo "${p:-?}"
}
ping_avg() { # ns addr -> "AVG LOSS%"
    ip netns exec "$1" ping -n -c 200 -i 0.01 -q "$2" | awk -F'[/ ]' '
        /packet loss/ {for (i = 1; i <= NF; i++) if ($i ~ /%$/) loss = $i}
        /^rtt/ {avg = $8} END {print avg, loss}'
}
iperf_gbps() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("%.2f Gbit/s (%d retransmits)" % (d["end"]["sum_received"]["bits_per_second"]/1e9, d["end"]["sum_sent"].get("retransmits", 0)))' "$1"; }
refused() { ip netns exec "$RLY" curl -sf 127.0.0.1:9190/metrics | awk '/^tunnel_relay_refused_packets_total/ {n += $2} END {print n + 0}'; }
read -r RTT_V LOSS_V < <(ping_avg "$C" 203.0.113.2)

start_tun_client "$WORK/tun-direct"
CP_D=$(wait_path "$C" 9182 lan direct); AP_D=$(status_of "$A" 9181 | jq_ peer.bench.path)
ip netns exec "$C" ping -n -c 20 -i 0.01 -q "$WEB_IP" >/dev/null
RB0=$(relay_metric tunnel_relay_bytes_total)
read -r RTT_D LOSS_D < <(ping_avg "$C" "$WEB_IP")
RELAY_D=$(( $(relay_metric tunnel_relay_bytes_total) - RB0 ))
# Reference for figure 3: the same iperf3 over the direct path.
ip netns exec "$C" iperf3 -c "$IPERF_IP" -t 10 -J >"$WORK/iperf-direct.json"
TPUT_D=$(iperf_gbps "$WORK/iperf-direct.json")
stop "$CLIENT_PID"

start_tun_client "$WORK/tun-relay" --force-relay
CP_R=$(wait_path "$C" 9182 lan relay)
AP_R=$(wait_path "$A" 9181 bench relay)
AGENT_NOTE="agent not forced"
if [ "$AP_R" != relay ]; then
    # The agent still uses another path to this client: force it too.
    stop "$AGENT_PID"; start_agent --force-relay
    AP_R=$(wait_path "$A" 9181 bench relay); CP_R=$(wait_path "$C" 9182 lan relay)
    AGENT_NOTE="agent restarted with --force-relay"
fi
ip netns exec "$C" ping -n -c 20 -i 0.01 -q "$WEB_IP" >/dev/null
RB0=$(relay_metric tunnel_relay_bytes_total)
read -r RTT_R LOSS_R < <(ping_avg "$C" "$WEB_IP")
RELAY_R=$(( $(relay_metric tunnel_relay_bytes_total) - RB0 ))

# --- 3: relay throughput, both nodes forced, relay on one core ---
if [ "$AGENT_NOTE" = "agent not forced" ]; then
    stop "$AGENT_PID"; start_agent --force-relay
fi
CP_3=$(wait_path "$C" 9182 lan relay); AP_3=$(wait_path "$A" 9181 bench relay)
ip netns exec "$C" ping -n -c 1 -W 2 "$IPERF_IP" >/dev/null
AFFINITY=$(taskset -pc "$RELAY_PID" | awk -F': ' '{print $2}')
cpu_ticks() { awk '{print $14 + $15}' "/proc/$RELAY_PID/stat"; }
B0=$(relay_metric tunnel_relay_bytes_total); F0=$(refused); K0=$(cpu_ticks); T0=$EPOCHREALTIME
ip netns exec "$C" iperf3 -c "$IPERF_IP" -t 10 -J >"$WORK/iperf-relay.json"
B1=$(relay_metric tunnel_relay_bytes_total); F1=$(refused); K1=$(cpu_ticks); T1=$EPOCHREALTIME
TPUT=$(iperf_gbps "$WORK/iperf-relay.json")
CLIENT_RELAY_TX=$(status_of "$C" 9182 | jq_ peer.lan.relay_tx_bytes)
stop "$CLIENT_PID"

echo "Paths benchmark: one bridge segment (203.0.113.0/24), no NATs; relayed = --force-relay;"
echo "standalone relay (tunnel-server relay) pinned to CPU ${AFFINITY} for the whole run."
echo
echo "1. tunnelctl up (userspace, fresh state dir) -> first HTTP response via SOCKS5 from web.tunnel.internal, ${RUNS} runs each:"
echo "   direct  (goal <= 1 s): $(printf '%s' "${FIG1[direct]}" | summary)"
echo "   relayed (goal <= 2 s): $(printf '%s' "${FIG1[relay]}" | summary)"
echo
echo "2. ping -c 200 -i 0.01, TUN client -> resource overlay address ${WEB_IP} (answered by the agent):"
echo "   plain veth (client -> agent 203.0.113.2): avg ${RTT_V} ms, loss ${LOSS_V}"
echo "   direct:  avg ${RTT_D} ms, loss ${LOSS_D}  (path client=${CP_D}, agent=${AP_D}; relay bytes during ping: ${RELAY_D})"
echo "   relayed: avg ${RTT_R} ms, loss ${LOSS_R}  (path client=${CP_R}, agent=${AP_R}; ${AGENT_NOTE}; relay bytes during ping: ${RELAY_R})"
python3 -c 'import sys; d,r=float(sys.argv[1]),float(sys.argv[2]); print("   added by the relay: %.3f ms (goal < 0.5 ms)" % (r-d))' "$RTT_D" "$RTT_R"
echo
echo "3. iperf3 TCP 10 s, one stream, TUN client -> ${IPERF_IP}:5201, client and agent --force-relay (path client=${CP_3}, agent=${AP_3}):"
echo "   throughput: ${TPUT} (goal >= 1 Gbit/s); same over the direct path, for reference: ${TPUT_D}"
python3 -c '
import sys, os
b0, b1, k0, k1, t0, t1 = (float(x) for x in sys.argv[1:7])
hz = os.sysconf("SC_CLK_TCK")
refused = int(sys.argv[7]) - int(sys.argv[8])
print("   relay tunnel_relay_bytes_total delta: %d bytes (%.2f Gbit/s over %.1f s); relay CPU %.0f%% of one core; packets refused by the relay: %d" % (b1 - b0, (b1 - b0) * 8 / (t1 - t0) / 1e9, t1 - t0, 100 * (k1 - k0) / hz / (t1 - t0), refused))
' "$B0" "$B1" "$K0" "$K1" "$T0" "$T1" "$F1" "$F0"
echo "   client's relay_tx_bytes to the site (whole session): ${CLIENT_RELAY_TX}"
