#!/usr/bin/env bash
# Throughput benchmark (root): iperf3 from a TUN client through the tunnel to an iperf3 server on the
# site's LAN, beside the same topology over wireguard-go with kernel forwarding, in one run.
#
#   client ns --(veth, 192.0.2.0/24)-- agent ns --(veth, 10.9.0.0/24)-- service ns (iperf3 -s)
#
#   bench/throughput.sh [SECONDS]
# Prints Gbit/s for both and the ratio. Every namespace is removed on exit, pass or fail.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-10}"
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
for cmd_pkg in iperf3:iperf3 wireguard-go:wireguard-go wg:wireguard-tools ip:iproute2; do
    command -v "${cmd_pkg%%:*}" >/dev/null || need="${need:-} ${cmd_pkg#*:}"
done
if [ -n "${need:-}" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need; fi

cargo build --release -q --workspace --bins
BIN="$PWD/target/release"
P="tb$$"
C="${P}c"; A="${P}a"; S="${P}s"
WORK="$(mktemp -d)"
cleanup() {
    for ns in "$C" "$A" "$S"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
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
ip netns exec "$S" iperf3 -s -B 10.9.0.2 -D --logfile "$WORK/iperf-s.log"
mkdir -p "/etc/netns/$C"; echo "nameserver 198.51.100.53" > "/etc/netns/$C/resolv.conf"

gbps() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("%.2f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))' "$1"; }

# --- tunnel ---
ip netns exec "$A" "$BIN/tunnel-server" --data-dir "$WORK/server" --listen 192.0.2.1:8443 --public-addr 192.0.2.1 >"$WORK/server.log" 2>&1 &
for _ in $(seq 100); do [ -f "$WORK/server/admin.token" ] && break; sleep 0.1; done
ctl() { ip netns exec "$A" "$BIN/tunnelctl" --admin-token-file "$WORK/server/admin.token" "$@"; }
for _ in $(seq 100); do ctl info >/dev/null 2>&1 && break; sleep 0.1; done
ctl site add lan >"$WORK/site.token"
ctl client add bench >"$WORK/client.token"
ctl add-resource --site lan --name iperf --target 10.9.0.2:5201 >/dev/null
ctl grant --client bench --resource iperf >/dev/null
ip netns exec "$A" "$BIN/tunnel-agent" --token-file "$WORK/site.token" --state-dir "$WORK/agent" >"$WORK/agent.log" 2>&1 &
ip netns exec "$C" "$BIN/tunnelctl" up --token-file "$WORK/client.token" --state-dir "$WORK/client" --dns-mode resolv-conf >"$WORK/client.log" 2>&1 &
for _ in $(seq 100); do grep -q "managed by tunnelctl" "/etc/netns/$C/resolv.conf" && break; sleep 0.1; done
ip netns exec "$C" ping -c 1 -W 2 iperf.tunnel.internal >/dev/null
ip netns exec "$C" iperf3 -c iperf.tunnel.internal -t "$SECS" -J >"$WORK/tunnel.json"
RTT_T=$(ip netns exec "$C" ping -n -c 20 -i 0.05 iperf.tunnel.internal | awk -F/ '/^rtt/ {print $5}')
T=$(gbps "$WORK/tunnel.json")
for pid in $(ip netns pids "$C"); do kill "$pid" 2>/dev/null || true; done
sleep 1

# --- wireguard-go, kernel forwarding ---
umask 077; wg genkey >"$WORK/c.key"; wg pubkey <"$WORK/c.key" >"$WORK/c.pub"
wg genkey >"$WORK/a.key"; wg pubkey <"$WORK/a.key" >"$WORK/a.pub"
start_wg() { # ns
    ip netns exec "$1" unshare -m sh -c 'mount -t tmpfs none /run && exec wireguard-go -f wg0' >"$WORK/wg-$1.log" 2>&1 &
    echo $!
}
PC=$(start_wg "$C"); PA=$(start_wg "$A")
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
ip -n "$A" addr add 10.200.0.1/24 dev wg0; ip -n "$A" link set wg0 mtu 1420 up
ip -n "$C" addr add 10.200.0.2/24 dev wg0; ip -n "$C" link set wg0 mtu 1420 up
ip -n "$C" route add 10.9.0.0/24 dev wg0
ip -n "$S" route add 10.200.0.0/24 via 10.9.0.1
ip netns exec "$A" sysctl -qw net.ipv4.ip_forward=1
ip netns exec "$C" ping -c 1 -W 2 10.9.0.2 >/dev/null
ip netns exec "$C" iperf3 -c 10.9.0.2 -t "$SECS" -J >"$WORK/wg.json"
RTT_W=$(ip netns exec "$C" ping -n -c 20 -i 0.05 10.9.0.2 | awk -F/ '/^rtt/ {print $5}')
W=$(gbps "$WORK/wg.json")
kill "$PC" "$PA" 2>/dev/null || true

echo "iperf3 TCP, ${SECS}s, one stream, TUN client -> site LAN service:"
echo "  tunnel (boringtun + userspace agent): ${T} Gbit/s, ping RTT ${RTT_T} ms"
echo "  wireguard-go + kernel forwarding:     ${W} Gbit/s, ping RTT ${RTT_W} ms"
python3 -c "import sys; t,w=float(sys.argv[1]),float(sys.argv[2]); print('  ratio tunnel / wireguard-go: %.2fx' % (t/w if w else 0))" "$T" "$W"
