//! The loop in-process: a node under test on loopback, fed a hand-made map, and a raw peer (a bare
//! [`Device`] on its own UDP socket) that sends whatever a hostile peer would.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tunnel_core::map::{NetworkMap, NodeKind, PeerInfo, ResourceInfo};
use tunnel_core::packet;
use tunnel_core::path::Via;
use tunnel_core::status::NodeStatus;
use tunnel_core::wg::{self, Device, PeerConfig};
use tunnel_core::NodeId;

use smoltcp::wire::{Ipv4Packet, TcpPacket};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket};
use tunnel_core::netstack::{FlowLimits, StackOptions};

use super::{start_on, Dataplane, OsPackets, PathOptions};

const NODE_KEY: [u8; 32] = [11; 32];
const RAW_KEY: [u8; 32] = [12; 32];
const PATIENCE: Duration = Duration::from_secs(15);

/// A peer that is only a WireGuard device: it sends exactly the inner packets it is given.
struct RawPeer {
    dev: Device,
    sock: UdpSocket,
    buf: Vec<u8>,
}

impl RawPeer {
    async fn new(allowed: &[&str], node: SocketAddr) -> RawPeer {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut dev = Device::new(RAW_KEY, 7);
        dev.set_peers(
            vec![PeerConfig {
                key: wg::public_key(NODE_KEY),
                allowed: allowed.iter().map(|a| a.parse().unwrap()).collect(),
                endpoint: Some(SocketAddr::from(([127, 0, 0, 1], node.port()))),
                keepalive: None,
            }],
            std::time::Instant::now(),
        );
        RawPeer { dev, sock, buf: vec![0; 65_536] }
    }

    async fn flush(&mut self) {
        while let Some(t) = self.dev.poll_transmit() {
            if let Via::Direct(a) = t.dst {
                self.sock.send_to(&t.payload, a).await.unwrap();
            }
        }
    }

    /// Sends inner packets (the first one also makes the handshake).
    async fn send(&mut self, packets: &[Vec<u8>]) {
        let node = wg::public_key(NODE_KEY);
        for p in packets {
            self.dev.send_to_peer(&node, p);
        }
        self.flush().await;
    }

    /// Handles what arrives until `done` holds; returns the decrypted packets.
    async fn receive_until(&mut self, done: impl Fn(&Device, &[Vec<u8>]) -> bool) -> Vec<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut got = Vec::new();
        while !done(&self.dev, &got) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Ok(Ok((n, from))) = tokio::time::timeout(left, self.sock.recv_from(&mut self.buf)).await
            else {
                panic!("the raw peer timed out waiting; it has {} packets", got.len());
            };
            // Path probes are not WireGuard; the device counts and drops them.
            self.dev.handle_datagram(Via::Direct(from), &self.buf[..n]);
            self.flush().await;
            got.extend(std::iter::from_fn(|| self.dev.poll_inbound()).map(|i| i.packet));
        }
        got
    }

    /// Sends the first packet and completes the handshake it starts.
    async fn connect(&mut self, first: Vec<u8>) {
        self.send(&[first]).await;
        let node = wg::public_key(NODE_KEY);
        self.receive_until(|d, _| d.peer_stats(&node).is_some_and(|s| s.last_handshake_secs.is_some())).await;
    }
}

fn peer(allowed: &[&str], resources: &[&str]) -> PeerInfo {
    PeerInfo {
        node_id: NodeId::from_random([2; 10]),
        name: "raw".into(),
        kind: NodeKind::Client,
        public_key: Some(wg::public_key(RAW_KEY)),
        overlay_addr: allowed[0].trim_end_matches("/32").parse().unwrap(),
        allowed_ips: allowed.iter().map(|s| s.parse().unwrap()).collect(),
        candidates: vec![],
        online: true,
        resources: resources.iter().map(|s| s.to_string()).collect(),
    }
}

fn resource(name: &str, addr: &str, target: Option<String>, port: u16) -> ResourceInfo {
    ResourceInfo {
        name: name.into(),
        overlay_addr: addr.parse().unwrap(),
        target,
        port,
        alias: None,
        site_id: NodeId::from_random([3; 10]),
        dns_names: vec![format!("{name}.tunnel.internal")],
        health_check: None,
    }
}

fn map(kind: NodeKind, own: &str, peer: PeerInfo, resources: Vec<ResourceInfo>) -> NetworkMap {
    NetworkMap {
        version: 1,
        node_id: NodeId::from_random([1; 10]),
        node_name: "under-test".into(),
        kind,
        overlay_addr: own.parse().unwrap(),
        overlay_cidr: "100.96.0.0/16".parse().unwrap(),
        dns_zone: "tunnel.internal".into(),
        mtu: 1280,
        peers: BTreeMap::from([(peer.node_id.clone(), peer)]),
        resources: resources.into_iter().map(|r| (r.name.clone(), r)).collect(),
        relays: vec![],
        stun_addr: None,
    }
}

async fn node(
    kind: NodeKind,
    map: NetworkMap,
    os: Option<OsPackets>,
    opts: PathOptions,
) -> (Dataplane, tokio::task::JoinHandle<()>, watch::Sender<Option<Arc<NetworkMap>>>) {
    let (tx, rx) = watch::channel(Some(Arc::new(map)));
    let sock = super::bind_socket("127.0.0.1:0".parse().unwrap()).unwrap();
    let (dp, task) = start_on(kind, NODE_KEY, sock, rx, os, opts).await.unwrap();
    (dp, task, tx)
}

async fn counter(dp: &Dataplane, field: impl Fn(&NodeStatus) -> u64) -> u64 {
    field(&dp.status().await.unwrap())
}

/// Waits until `f` holds, polling against a generous deadline.
async fn until<F, Fut>(what: &str, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tcp(src: &str, dst: &str, syn: bool, ack: bool) -> Vec<u8> {
    packet::tcp_segment(src.parse().unwrap(), dst.parse().unwrap(), syn, ack)
}

/// An IPv4 packet of another protocol (GRE) with a good header.
fn gre(src: &str, dst: &str) -> Vec<u8> {
    let mut p = packet::udp_packet(src.parse().unwrap(), dst.parse().unwrap(), b"tunnelled");
    p[9] = 47;
    p[10] = 0;
    p[11] = 0;
    let mut sum: u32 = p[..20].chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p
}

#[tokio::test]
async fn a_tun_client_lets_in_only_replies_for_its_own_address() {
    let (from_os_tx, from_os) = mpsc::channel(64);
    let (to_os, mut to_os_rx) = mpsc::channel(64);
    let site = peer(&["100.96.0.1/32", "100.96.0.10/32"], &[]);
    let m = map(NodeKind::Client, "100.96.0.2", site, vec![resource("web", "100.96.0.10", None, 80)]);
    let os = OsPackets { from_os, to_os };
    let (dp, _task, _maps) = node(NodeKind::Client, m, Some(os), PathOptions::default()).await;
    let mut raw = RawPeer::new(&["100.96.0.2/32"], dp.local_addr).await;
    // A hostile site: into the client's LAN through a forwarding kernel (a TCP segment that is no
    // SYN, and UDP), at a service of the client itself (a SYN, and a segment of no connection), a
    // ping, and another protocol.
    let hostile = [
        tcp("100.96.0.10:80", "192.168.1.10:80", false, true),
        packet::udp_packet("100.96.0.10:53".parse().unwrap(), "192.168.1.10:53".parse().unwrap(), b"x"),
        tcp("100.96.0.10:80", "100.96.0.2:22", true, false),
        tcp("100.96.0.10:80", "100.96.0.2:22", false, true),
        gre("100.96.0.10:0", "100.96.0.2:0"),
        gre("100.96.0.10:0", "192.168.1.10:0"),
    ];
    raw.connect(hostile[0].clone()).await;
    raw.send(&hostile[1..]).await;
    until("the client to count every hostile packet", || async {
        counter(&dp, |s| s.counters.wrong_destination).await + counter(&dp, |s| s.counters.unsolicited).await
            >= hostile.len() as u64
    })
    .await;
    assert_eq!(counter(&dp, |s| s.counters.wrong_destination).await, 3);
    assert!(to_os_rx.try_recv().is_err(), "nothing reached the system");
    // The client's own conversation: its datagram goes out, the reply comes in, and only that.
    let query =
        packet::udp_packet("100.96.0.2:5000".parse().unwrap(), "100.96.0.10:53".parse().unwrap(), b"q");
    from_os_tx.send(query.clone()).await.unwrap();
    let got = raw.receive_until(|_, got| !got.is_empty()).await;
    assert_eq!(got, vec![query]);
    let reply =
        packet::udp_packet("100.96.0.10:53".parse().unwrap(), "100.96.0.2:5000".parse().unwrap(), b"a");
    let stray =
        packet::udp_packet("100.96.0.10:53".parse().unwrap(), "100.96.0.2:5001".parse().unwrap(), b"a");
    raw.send(&[stray, reply.clone()]).await;
    let arrived = tokio::time::timeout(PATIENCE, to_os_rx.recv()).await.unwrap().unwrap();
    assert_eq!(arrived, reply);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(to_os_rx.try_recv().is_err(), "the reply to another port stayed out");
}

/// The TCP flags of a decrypted packet, (SYN, ACK, RST), and its destination port.
fn tcp_flags(p: &[u8]) -> Option<((bool, bool, bool), u16)> {
    let ip = Ipv4Packet::new_checked(p).ok()?;
    let t = TcpPacket::new_checked(ip.payload()).ok()?;
    Some(((t.syn(), t.ack(), t.rst()), t.dst_port()))
}

/// How many connections (told apart by the client's port) got a segment with these flags:
/// retransmissions count once.
fn count(got: &[Vec<u8>], want: (bool, bool, bool)) -> usize {
    let ports: std::collections::BTreeSet<u16> =
        got.iter().filter_map(|p| tcp_flags(p)).filter(|(f, _)| *f == want).map(|(_, port)| port).collect();
    ports.len()
}

const SYN_ACK: (bool, bool, bool) = (true, true, false);
const RST: (bool, bool, bool) = (false, true, true);

/// A site serving `web` (TCP, 100.96.0.10:80, dialled at `web`) and `dns` (UDP, 100.96.0.11:53,
/// at `dns`) to the raw client 100.96.0.2, with these flow limits.
async fn site(web: SocketAddr, dns: SocketAddr, flows: FlowLimits) -> (Dataplane, RawPeer, impl Drop) {
    let client = peer(&["100.96.0.2/32"], &["web", "dns"]);
    let m = map(
        NodeKind::Site,
        "100.96.0.1",
        client,
        vec![
            resource("web", "100.96.0.10", Some(web.to_string()), 80),
            resource("dns", "100.96.0.11", Some(dns.to_string()), 53),
        ],
    );
    let opts =
        PathOptions { stack: StackOptions { flows, ..StackOptions::default() }, ..PathOptions::default() };
    let (dp, task, maps) = node(NodeKind::Site, m, None, opts).await;
    let raw = RawPeer::new(&["100.96.0.1/32", "100.96.0.10/32", "100.96.0.11/32"], dp.local_addr).await;
    /// Stops the loop (and holds its map channel open until then).
    struct Stop(tokio::task::JoinHandle<()>, #[allow(dead_code)] watch::Sender<Option<Arc<NetworkMap>>>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    (dp, raw, Stop(task, maps))
}

fn syn(port: u16) -> Vec<u8> {
    tcp(&format!("100.96.0.2:{port}"), "100.96.0.10:80", true, false)
}

async fn unused_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap()
}

#[tokio::test]
async fn a_site_holds_only_so_many_dials_per_peer_and_resets_the_rest() {
    // A target whose accept queue is full: the kernel drops further SYNs, so dials hang.
    let l = TcpSocket::new_v4().unwrap();
    l.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let target = l.local_addr().unwrap();
    let _listener = l.listen(0).unwrap();
    let _filler = tokio::net::TcpStream::connect(target).await.unwrap();
    let flows = FlowLimits { pending_dials_per_peer: 4, ..FlowLimits::default() };
    let (dp, mut raw, _stop) = site(target, unused_udp().await, flows).await;
    raw.connect(packet::udp_packet("100.96.0.2:9".parse().unwrap(), "100.96.0.1:9".parse().unwrap(), b""))
        .await;
    let syns: Vec<Vec<u8>> = (40_000..40_010).map(syn).collect();
    raw.send(&syns).await;
    let got = raw.receive_until(|_, got| count(got, RST) >= 6).await;
    assert_eq!(count(&got, RST), 6, "one reset for each SYN beyond the four dials");
    let st = dp.status().await.unwrap();
    assert_eq!(st.pending_dials, 4);
    assert_eq!(st.refused.pending_dial_peer, 6);
    // A SYN retransmitted while its dial is pending is neither a new dial nor refused.
    raw.send(&syns[..1]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(dp.status().await.unwrap().refused.pending_dial_peer, 6);
}

#[tokio::test]
async fn a_site_caps_tcp_flows_per_peer_and_drops_handshakes_that_never_complete() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let (closed_tx, mut closed_rx) = mpsc::channel::<()>(64);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let closed = closed_tx.clone();
            tokio::spawn(async move {
                let mut b = [0u8; 16];
                while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
                let _ = closed.send(()).await;
            });
        }
    });
    let flows = FlowLimits { tcp_per_peer: 6, ..FlowLimits::default() };
    let (dp, mut raw, _stop) = site(target, unused_udp().await, flows).await;
    raw.connect(packet::udp_packet("100.96.0.2:9".parse().unwrap(), "100.96.0.1:9".parse().unwrap(), b""))
        .await;
    // Eight connection attempts that never send the final ACK: six flows, two resets.
    raw.send(&(41_000..41_008).map(syn).collect::<Vec<_>>()).await;
    let got = raw.receive_until(|_, got| count(got, SYN_ACK) >= 6 && count(got, RST) >= 2).await;
    assert_eq!((count(&got, SYN_ACK), count(&got, RST)), (6, 2));
    let st = dp.status().await.unwrap();
    assert_eq!((st.flows, st.tcp.refused_peer_flows), (6, 2));
    // Half-open, they end after the handshake timeout, not smoltcp's 120 s, and free their targets.
    let deadline = tokio::time::Instant::now() + tunnel_core::engine::HANDSHAKE_TIMEOUT + PATIENCE;
    for _ in 0..6 {
        tokio::time::timeout_at(deadline, closed_rx.recv()).await.expect("the target connection closed");
    }
    until("the half-open flows to go", || async { dp.status().await.unwrap().flows == 0 }).await;
    assert_eq!(dp.status().await.unwrap().tcp.buffer_bytes, 0, "their buffers are given back");
}

#[tokio::test]
async fn a_site_caps_udp_flows_per_peer() {
    let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut b = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut b).await {
            let _ = echo.send_to(&b[..n], from).await;
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flows = FlowLimits { udp_per_peer: 5, ..FlowLimits::default() };
    let (dp, mut raw, _stop) = site(listener.local_addr().unwrap(), target, flows).await;
    let q = |port: u16| {
        packet::udp_packet(
            format!("100.96.0.2:{port}").parse().unwrap(),
            "100.96.0.11:53".parse().unwrap(),
            b"q",
        )
    };
    raw.connect(q(5000)).await;
    raw.send(&(5001..5008).map(q).collect::<Vec<_>>()).await;
    until("the site to refuse the flows beyond five", || async {
        dp.status().await.unwrap().refused.udp_peer == 3
    })
    .await;
    let got = raw.receive_until(|_, got| got.len() >= 5).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let more = raw.dev.poll_inbound();
    assert_eq!(got.len() + usize::from(more.is_some()), 5, "answers for the five flows only");
    assert_eq!(dp.status().await.unwrap().udp_flows, 5);
    // The refusals show in /metrics with their kind and limit.
    let (link_tx, link) = watch::channel(crate::control::LinkState::Connected);
    let (addr, _t) =
        crate::http::serve("127.0.0.1:0".parse().unwrap(), dp.clone(), link, None, Default::default())
            .await
            .unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(text.contains("tunnel_node_flows_refused_total{kind=\"udp\",limit=\"peer\"} 3"), "{text}");
    assert!(text.contains("tunnel_node_udp_flows 5"), "{text}");
    drop(link_tx);
}

/// A stranger floods the node's socket with junk as fast as one core sends; the loop's sweep gives
/// the socket a budget per wake-up, so a status request and a client's UDP datagram (out through
/// the tunnel and its answer back) are still served, and the junk is counted, not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_junk_datagrams_starves_neither_status_nor_a_clients_udp() {
    let site = peer(&["100.96.0.1/32", "100.96.0.11/32"], &[]);
    let m = map(NodeKind::Client, "100.96.0.2", site, vec![resource("dns", "100.96.0.11", None, 53)]);
    let (dp, _task, _maps) = node(NodeKind::Client, m, None, PathOptions::default()).await;
    let mut raw = RawPeer::new(&["100.96.0.2/32"], dp.local_addr).await;
    // The site speaks first, so the client learns its endpoint; the packet itself is unsolicited.
    raw.connect(packet::udp_packet("100.96.0.11:53".parse().unwrap(), "100.96.0.2:9".parse().unwrap(), b""))
        .await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let target = dp.local_addr;
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let junk = [0xeeu8; 120];
            let mut sent = 0u64;
            // Bounded in count and in time.
            let until = std::time::Instant::now() + Duration::from_secs(30);
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && sent < 3_000_000
                && std::time::Instant::now() < until
            {
                if s.send_to(&junk, target).is_ok() {
                    sent += 1;
                }
            }
            sent
        })
    };
    until("the flood to reach the loop", || {
        let dp = dp.clone();
        async move { counter(&dp, |s| s.drops.malformed).await > 10_000 }
    })
    .await;

    // Both answered within a deadline (far longer than either needs when the socket is quiet).
    let status = tokio::time::timeout(Duration::from_secs(5), dp.status()).await;
    assert!(status.is_ok_and(|s| s.is_some()), "/status went unanswered during the flood");
    let (replies, mut replies_rx) = mpsc::channel(4);
    let query = b"who is dns".to_vec();
    dp.commands
        .send(super::Command::UdpSend {
            local_port: 5300,
            remote: "100.96.0.11:53".parse().unwrap(),
            payload: query.clone(),
            replies,
        })
        .await
        .unwrap();
    let got = raw.receive_until(|_, got| got.iter().any(|p| p.ends_with(&query))).await;
    assert!(got.iter().any(|p| p.ends_with(&query)));
    raw.send(&[packet::udp_packet(
        "100.96.0.11:53".parse().unwrap(),
        "100.96.0.2:5300".parse().unwrap(),
        b"here",
    )])
    .await;
    let (from, answer) = tokio::time::timeout(Duration::from_secs(5), replies_rx.recv())
        .await
        .expect("the answer went undelivered during the flood")
        .unwrap();
    assert_eq!((from, answer), ("100.96.0.11:53".parse().unwrap(), b"here".to_vec()));
    let before = counter(&dp, |s| s.drops.malformed).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.join().unwrap();
    assert!(before > 10_000 && before <= sent, "{before} junk datagrams counted of {sent} sent");
}
