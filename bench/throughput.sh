#!/usr/bin/env bash
# Throughput benchmark (root): one TCP stream (iperf3) from a client through the tunnel to an iperf3
# server on the site's LAN, beside the same topology over wireguard-go with kernel forwarding, in one
# run, on a clean link and on lossy ones, in both directions.
#
#   client ns --(veth, 192.0.2.0/24)-- agent ns --(veth, 10.9.0.0/24)-- service ns (iperf3 -s)
#
#   bench/throughput.sh [SECONDS] [LOSS% ...]        e.g. bench/throughput.sh 10 0 1 3
#   MODES="tun socks relay" bench/throughput.sh ...   which tunnel modes to run (default: all three)
#   BENCH_BIN=DIR bench/throughput.sh ...             binaries from DIR (e.g. another commit's build)
#   BENCH_KEEP=DIR, BENCH_STATS=1, AGENT_LOG=FILTER   keep logs and results; print the agent's TCP
#                                                     counters, ping under load and the kernels'
#                                                     TCP and UDP drop counters per run; the
#                                                     agent's TUNNEL_LOG
#   WG_MTU=1280 bench/throughput.sh ...               wireguard-go at the tunnel's MTU (default 1420)
#   BENCH_CALLGRIND=MB bench/throughput.sh            instead of the table: instructions per packet
#                                                     (below)
#
# Loss: an nftables `numgen random` drop of LOSS% of the UDP packets in each direction on the
# client's link, so both tunnels lose alike (this kernel has no netem). It is applied where packets
# arrive (input of the client and of the agent namespace), with UDP segmentation offload off on that
# link: a hook on the sending side sees one GSO batch of up to 64 datagrams as one packet and would
# drop them together (and fail the sendmsg with EPERM), which no real link does.
# "up" is client -> site (the client sends), "down" is site -> client (iperf3 -R: the site's
# userspace TCP stack sends; with wireguard-go the LAN server's kernel TCP does).
# Modes: tun = `tunnelctl up` with a TUN device, beside wireguard-go at the same loss;
# socks = `tunnelctl up --userspace`, iperf3 through its SOCKS5 listener (proxychains4), so the
# client's userspace stack is the sender on uploads; relay = TUN with --force-relay (QUIC relay).
# Prints a table in Gbit/s with ratios against wireguard-go. Every namespace is removed on exit.
# BENCH_CALLGRIND=MB runs the site agent and the TUN client under valgrind's callgrind and counts the
# instructions each executes per datagram on the client's link while MB megabytes go up, then down, on
# a clean link: an exact count, where a timer on this noisy machine is not (start-up is not counted:
# the counters are zeroed just before each transfer). Slow (tens of seconds per direction).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-10}"
shift || true
LOSSES=("$@")
[ "${#LOSSES[@]}" -gt 0 ] || LOSSES=(0 1 3)
MODES="${MODES:-tun socks relay}"
CG="${BENCH_CALLGRIND:-}"
# wireguard-go's MTU: its default, 1420; WG_MTU=1280 gives it the tunnel's packet size, so that
# on a lossy link both lose the same share of bytes per packet lost.
WG_MTU="${WG_MTU:-1420}"
WRAP=()
if [ -n "$CG" ]; then
    MODES=callgrind
    LOSSES=(0)
    WRAP=(valgrind --tool=callgrind -q)
fi
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
need=""
for cmd_pkg in ${CG:+valgrind:valgrind callgrind_control:valgrind} iperf3:iperf3 wireguard-go:wireguard-go wg:wireguard-tools ip:iproute2 nft:nftables proxychains4:proxychains4 ping:iputils-ping ethtool:ethtool; do
    command -v "${cmd_pkg%%:*}" >/dev/null || need="$need ${cmd_pkg#*:}"
done
# shellcheck disable=SC2086
if [ -n "$need" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need; fi

# BENCH_BIN=DIR runs binaries built elsewhere (another commit) instead of building these.
if [ -z "${BENCH_BIN:-}" ]; then cargo build --release -q --workspace --bins; fi
BIN="${BENCH_BIN:-$PWD/target/release}"
P="tb$$"
C="${P}c"; A="${P}a"; S="${P}s"
WORK="$(mktemp -d)"
cleanup() {
    for ns in "$C" "$A" "$S"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    if [ -n "${BENCH_KEEP:-}" ]; then mkdir -p "$BENCH_KEEP" && cp -r "$WORK"/. "$BENCH_KEEP"/; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

for ns in "$C" "$A" "$S"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n "$C" link add eth0 type veth peer name pub0 netns "$A"
ip -n "$A" link add lan0 type veth peer name eth0 netns "$S"
ip -n "$C" addr add 192.0.2.2/24 dev eth0; ip -n "$C" link set eth0 up
ip -n "$A" addr add 192.0.2.1/24 dev pub0; ip -n "$A" link set pub0 up
ip -n "$A" addr add 10.9.0.1/24 dev lan0; ip -n "$A" link set lan0 up
ip -n "$S" addr add 10.9.0.2/24 dev eth0; ip -n "$S" link set eth0 up
# Datagrams cross the client's link one by one (GSO batches are cut before the wire, as a NIC does).
ip netns exec "$C" ethtool -K eth0 tx-udp-segmentation off gro off >/dev/null
ip netns exec "$A" ethtool -K pub0 tx-udp-segmentation off gro off >/dev/null
ip netns exec "$S" iperf3 -s -B 10.9.0.2 -D --logfile "$WORK/iperf-s.log"
mkdir -p "/etc/netns/$C"; echo "nameserver 198.51.100.53" > "/etc/netns/$C/resolv.conf"

# Loss on the client's link, UDP only, each way, where the datagrams arrive.
set_loss() { # percent
    local permille ns dev
    permille=$(python3 -c 'import sys; print(round(float(sys.argv[1]) * 10))' "$1")
    for ns_dev in "$C:eth0" "$A:pub0"; do
        ns=${ns_dev%%:*}; dev=${ns_dev#*:}
        ip netns exec "$ns" nft delete table inet benchloss 2>/dev/null || true
        [ "$permille" -gt 0 ] || continue
        ip netns exec "$ns" nft -f - <<EOF
table inet benchloss {
    chain in { type filter hook input priority 0; iifname "$dev" meta l4proto udp numgen random mod 1000 < $permille drop; }
}
EOF
    done
}

gbps() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("%.3f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))' "$1" 2>/dev/null || echo 0; }
# The site agent's userspace TCP counters (loss recovery), to show what each run cost it.
agent_tcp() { ip netns exec "$A" curl -s --max-time 2 http://127.0.0.1:9181/status | python3 -c 'import json,sys; t=json.load(sys.stdin).get("tcp") or {}; print(" ".join("%s=%s" % (k, t.get(k, 0)) for k in ("retransmitted_segments","recoveries","tail_loss_probes","timeouts","rx_dropped","acks_merged")))' 2>/dev/null || true; }
# Kernel counters a run changes (BENCH_STATS=1): the client's TCP sender and receiver, and UDP
# datagrams each host dropped for a full socket buffer. nstat -az prints totals; kstat NAME prints
# them, kdelta NAME prints what changed since.
KCOUNTERS=(TcpRetransSegs TcpExtTCPLostRetransmit TcpExtTCPSackRecovery TcpExtTCPTimeouts TcpExtTCPSpuriousRTOs TcpExtTCPDSACKRecv UdpRcvbufErrors)
kstat() {
    for ns in "$C" "$A"; do ip netns exec "$ns" nstat -azs "${KCOUNTERS[@]}" 2>/dev/null | awk -v ns="${ns: -1}" 'NF >= 2 && $1 !~ /^#/ {print ns ":" $1, $2}'; done >"$WORK/$1.kstat"
}
# Packets through the TUN client's device (BENCH_STATS=1): "out" the kernel handed the client
# (an upload's data), "in" the client wrote (its ACKs), so ACKs per segment show; empty without it.
tunpk() { ip netns exec "$C" sh -c 'd=/sys/class/net/tunnel0/statistics; [ -d $d ] && echo "$(cat $d/tx_packets) $(cat $d/rx_packets)"' 2>/dev/null || true; }
kdelta() {
    kstat "$1.after"
    awk 'NR == FNR {b[$1] = $2; next} $2 - b[$1] != 0 {printf "%s=%d ", $1, $2 - b[$1]}' "$WORK/$1.kstat" "$WORK/$1.after.kstat"
}
# iperf3 NAME HOST DIR [wrapper...]: one run, prints Gbit/s (0 if it failed). With BENCH_STATS=1 the
# agent's loss-recovery counters before and after go to stderr.
iperf() {
    local name=$1 host=$2 dir=$3; shift 3
    local rev=(); [ "$dir" = down ] && rev=(-R)
    local tp0=""
    [ -z "${BENCH_STATS:-}" ] || { echo "$name before: $(agent_tcp)" >&2; kstat "$name"; tp0=$(tunpk); }
    local pinger=""
    if [ -n "${BENCH_STATS:-}" ] && [ "$#" = 0 ]; then
        ip netns exec "$C" ping -n -i 0.1 -w "$SECS" "$host" >"$WORK/$name.ping" 2>&1 &
        pinger=$!
    fi
    local cc=(); [ -n "${CC:-}" ] && cc=(-C "$CC")
    if ip netns exec "$C" "$@" iperf3 -c "$host" -t "$SECS" "${rev[@]}" "${cc[@]}" -J >"$WORK/$name.json" 2>"$WORK/$name.err"; then
        gbps "$WORK/$name.json"
    else
        echo 0
    fi
    if [ -n "$pinger" ]; then wait "$pinger" 2>/dev/null || true; fi
    [ -z "${BENCH_STATS:-}" ] || echo "$name after:  $(agent_tcp) retransmits(iperf3 sender)=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["end"]["sum_sent"].get("retransmits","-"))' "$WORK/$name.json" 2>/dev/null) ping-under-load(min/avg/max)=$(awk -F' = ' '/^rtt/ {print $2}' "$WORK/$name.ping" 2>/dev/null)" >&2
    [ -z "${BENCH_STATS:-}" ] || echo "$name kernel (c: client, a: agent host): $(kdelta "$name")" >&2
    if [ -n "$tp0" ]; then
        local o0 i0 o1 i1
        read -r o0 i0 o1 i1 <<<"$tp0 $(tunpk)"
        echo "$name TUN device: $((o1 - o0)) packets to the client, $((i1 - i0)) from it" >&2
    fi
}

# --- control server, site agent ---
ip netns exec "$A" "$BIN/tunnel-server" --data-dir "$WORK/server" --listen 192.0.2.1:8443 --public-addr 192.0.2.1 >"$WORK/server.log" 2>&1 &
for _ in $(seq 100); do [ -f "$WORK/server/admin.token" ] && break; sleep 0.1; done
ctl() { ip netns exec "$A" "$BIN/tunnelctl" --admin-token-file "$WORK/server/admin.token" "$@"; }
for _ in $(seq 100); do ctl info >/dev/null 2>&1 && break; sleep 0.1; done
ctl site add lan >"$WORK/site.token"
ctl add-resource --site lan --name iperf --target 10.9.0.2:5201 >/dev/null
for c in bench benchsocks benchrelay; do
    ctl client add "$c" >"$WORK/$c.token"
    ctl grant --client "$c" --resource iperf >/dev/null
done
ip netns exec "$A" env TUNNEL_LOG="${AGENT_LOG:-info}" ${AGENT_ENV:-} "${WRAP[@]}" ${CG:+--callgrind-out-file="$WORK/cg-agent"} "$BIN/tunnel-agent" --token-file "$WORK/site.token" --state-dir "$WORK/agent" >"$WORK/agent.log" 2>&1 &

stop_clients() {
    for pid in $(pgrep -f "tunnelctl up" || true); do
        if [ "$(ip netns identify "$pid" 2>/dev/null)" = "$C" ]; then kill "$pid" 2>/dev/null || true; fi
    done
    for _ in $(seq 50); do
        pgrep -f "tunnelctl up" >/dev/null || break
        sleep 0.1
    done
}
start_tun_client() { # token-name [flags...]
    local c=$1; shift
    ip netns exec "$C" "${WRAP[@]}" ${CG:+--callgrind-out-file="$WORK/cg-$c"} "$BIN/tunnelctl" up --token-file "$WORK/$c.token" --state-dir "$WORK/$c" --dns-mode resolv-conf "$@" >"$WORK/$c.log" 2>&1 &
    for _ in $(seq 1200); do grep -q "managed by tunnelctl" "/etc/netns/$C/resolv.conf" && break; sleep 0.1; done
    for _ in $(seq 50); do ip netns exec "$C" ping -c 1 -W 1 iperf.tunnel.internal >/dev/null 2>&1 && break; done
}
rtt() { ip netns exec "$C" ping -n -c 20 -i 0.05 "$1" | awk -F/ '/^rtt/ {print $5}'; }

# --- wireguard-go, kernel forwarding (up for the whole run, beside the TUN client) ---
umask 077; wg genkey >"$WORK/c.key"; wg pubkey <"$WORK/c.key" >"$WORK/c.pub"
wg genkey >"$WORK/a.key"; wg pubkey <"$WORK/a.key" >"$WORK/a.pub"
umask 022
start_wg() { # ns
    ip netns exec "$1" unshare -m sh -c 'mount -t tmpfs none /run && exec wireguard-go -f wg0' >"$WORK/wg-$1.log" 2>&1 &
}
start_wg "$C"; start_wg "$A"
for _ in $(seq 50); do ip -n "$C" link show wg0 >/dev/null 2>&1 && ip -n "$A" link show wg0 >/dev/null 2>&1 && break; sleep 0.1; done
# wireguard-go runs under `sh` in its own mount namespace; find it to reach its socket.
wgpid() {
    for p in $(pgrep -f "wireguard-go -f wg0"); do
        if [ "$(ip netns identify "$p" 2>/dev/null)" = "$1" ]; then echo "$p"; return 0; fi
    done
}
WC=$(wgpid "$C"); WA=$(wgpid "$A")
nsenter -t "$WA" -m -n wg set wg0 listen-port 51820 private-key "$WORK/a.key" peer "$(cat "$WORK/c.pub")" allowed-ips 10.200.0.2/32
nsenter -t "$WC" -m -n wg set wg0 private-key "$WORK/c.key" peer "$(cat "$WORK/a.pub")" allowed-ips 10.200.0.1/32,10.9.0.0/24 endpoint 192.0.2.1:51820
ip -n "$A" addr add 10.200.0.1/24 dev wg0; ip -n "$A" link set wg0 mtu "$WG_MTU" up
ip -n "$C" addr add 10.200.0.2/24 dev wg0; ip -n "$C" link set wg0 mtu "$WG_MTU" up
ip -n "$C" route add 10.9.0.0/24 dev wg0
ip -n "$S" route add 10.200.0.0/24 via 10.9.0.1
ip netns exec "$A" sysctl -qw net.ipv4.ip_forward=1
ip netns exec "$C" ping -c 1 -W 2 10.9.0.2 >/dev/null

# callgrind_total NAME PID: dumps the process's counters since they were last zeroed; prints the
# instructions (Ir) in that dump.
callgrind_total() {
    callgrind_control -d "$2" >/dev/null 2>&1
    local f
    f=$(ls -t "$WORK/cg-$1".* 2>/dev/null | head -1)
    awk '/^(summary|totals):/ {print $2; exit}' "$f"
}
link_packets() { echo $(( $(ip netns exec "$C" cat /sys/class/net/eth0/statistics/rx_packets) + $(ip netns exec "$C" cat /sys/class/net/eth0/statistics/tx_packets) )); }
if [ -n "$CG" ]; then
    start_tun_client bench
    AGENT_PID=$(for p in $(pgrep -f "tunnel-agent --token-file $WORK/site.token"); do [ "$(ip netns identify "$p")" = "$A" ] && echo "$p"; done | head -1)
    CLIENT_PID=$(for p in $(pgrep -f "tunnelctl up --token-file $WORK/bench.token"); do [ "$(ip netns identify "$p")" = "$C" ] && echo "$p"; done | head -1)
    echo "callgrind: ${CG} MB each way through the TUN client and the site agent, clean link"
    for dir in up down; do
        rev=(); [ "$dir" = down ] && rev=(-R)
        callgrind_control -z "$AGENT_PID" >/dev/null 2>&1; callgrind_control -z "$CLIENT_PID" >/dev/null 2>&1
        before=$(link_packets)
        ip netns exec "$C" iperf3 -c iperf.tunnel.internal -n "${CG}M" "${rev[@]}" -J >"$WORK/cg-$dir.json" 2>&1 || true
        packets=$(( $(link_packets) - before ))
        ia=$(callgrind_total agent "$AGENT_PID"); ic=$(callgrind_total bench "$CLIENT_PID")
        python3 -c 'import sys
d, p, a, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print("  %-4s %d datagrams on the link; instructions per datagram: site agent %.0f, TUN client %.0f" % (d, p, a / p, c / p))' \
            "$dir" "$packets" "$ia" "$ic"
    done
    exit 0
fi

declare -A R
RTT_W=$(rtt 10.9.0.2)
if [[ " $MODES " == *" tun "* ]]; then
    start_tun_client bench
    RTT_T=$(rtt iperf.tunnel.internal)
    for loss in "${LOSSES[@]}"; do
        set_loss "$loss"
        for dir in up down; do
            R[tun,$loss,$dir]=$(iperf "tun-$loss-$dir" iperf.tunnel.internal "$dir")
            R[wg,$loss,$dir]=$(iperf "wg-$loss-$dir" 10.9.0.2 "$dir")
            if [ -n "${BENCH_CUBIC:-}" ]; then
                R[wgc,$loss,$dir]=$(CC=cubic iperf "wgc-$loss-$dir" 10.9.0.2 "$dir")
            fi
        done
    done
    set_loss 0
    stop_clients
fi
if [[ " $MODES " == *" socks "* ]]; then
    ip netns exec "$C" "$BIN/tunnelctl" up --userspace --token-file "$WORK/benchsocks.token" --state-dir "$WORK/benchsocks" \
        --socks5 127.0.0.1:1080 --dns-listen 127.0.0.1:5353 --metrics-listen 127.0.0.1:9183 >"$WORK/benchsocks.log" 2>&1 &
    cat >"$WORK/proxychains.conf" <<EOF
strict_chain
proxy_dns
remote_dns_subnet 224
tcp_read_time_out 15000
tcp_connect_time_out 8000
[ProxyList]
socks5 127.0.0.1 1080
EOF
    for _ in $(seq 100); do
        r=0
        ip netns exec "$C" curl -s -o /dev/null --max-time 1 --socks5-hostname 127.0.0.1:1080 telnet://iperf.tunnel.internal:5201 2>/dev/null || r=$?
        # 28 (timeout) means connected and waiting for data: the path works.
        [ "$r" = 28 ] && break; sleep 0.1
    done
    for loss in "${LOSSES[@]}"; do
        set_loss "$loss"
        for dir in up down; do
            R[socks,$loss,$dir]=$(iperf "socks-$loss-$dir" iperf.tunnel.internal "$dir" proxychains4 -q -f "$WORK/proxychains.conf")
        done
    done
    set_loss 0
    stop_clients
fi
if [[ " $MODES " == *" relay "* ]]; then
    start_tun_client benchrelay --force-relay --metrics-listen 127.0.0.1:9184
    for loss in "${LOSSES[@]}"; do
        set_loss "$loss"
        for dir in up down; do
            R[relay,$loss,$dir]=$(iperf "relay-$loss-$dir" iperf.tunnel.internal "$dir")
        done
    done
    set_loss 0
    stop_clients
fi

echo "iperf3, one TCP stream, ${SECS}s per figure, Gbit/s; loss = UDP dropped each way on the client's link"
echo "  ping RTT: wireguard-go ${RTT_W} ms${RTT_T:+, tunnel ${RTT_T} ms}"
printf '  %-6s %-5s %-10s %-10s %-8s %-10s %-10s\n' dir loss% tunnel wg-go ratio socks relay
for loss in "${LOSSES[@]}"; do
    for dir in up down; do
        t=${R[tun,$loss,$dir]:--}; w=${R[wg,$loss,$dir]:--}
        ratio=$(python3 -c 'import sys
try: print("%.2fx" % (float(sys.argv[1]) / float(sys.argv[2])))
except Exception: print("-")' "$t" "$w")
        printf '  %-6s %-5s %-10s %-10s %-8s %-10s %-10s\n' "$dir" "$loss" "$t" "$w" "$ratio" "${R[socks,$loss,$dir]:--}" "${R[relay,$loss,$dir]:--}"
    done
done
