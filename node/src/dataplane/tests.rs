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
use tunnel_core::wg::{self, Device, PeerConfig};
use tunnel_core::NodeId;

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
    async fn new(allowed: &str, node: SocketAddr) -> RawPeer {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut dev = Device::new(RAW_KEY, 7);
        dev.set_peers(
            vec![PeerConfig {
                key: wg::public_key(NODE_KEY),
                allowed: vec![allowed.parse().unwrap()],
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
        overlay_addr: allowed[0].trim_end_matches("/32").into(),
        allowed_ips: allowed.iter().map(|s| s.to_string()).collect(),
        candidates: vec![],
        online: true,
        resources: resources.iter().map(|s| s.to_string()).collect(),
    }
}

fn resource(name: &str, addr: &str, target: Option<String>, port: u16) -> ResourceInfo {
    ResourceInfo {
        name: name.into(),
        overlay_addr: addr.into(),
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
        overlay_addr: own.into(),
        overlay_cidr: "100.96.0.0/16".into(),
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

async fn counter(dp: &Dataplane, group: &str, name: &str) -> u64 {
    dp.status().await.unwrap()[group][name].as_u64().unwrap_or(0)
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
    let mut raw = RawPeer::new("100.96.0.2/32", dp.local_addr).await;
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
        counter(&dp, "counters", "wrong_destination").await + counter(&dp, "counters", "unsolicited").await
            >= hostile.len() as u64
    })
    .await;
    assert_eq!(counter(&dp, "counters", "wrong_destination").await, 3);
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
