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
    assert_eq!(st["pending_dials"], 4);
    assert_eq!(st["refused"]["pending_dial_peer"], 6);
    // A SYN retransmitted while its dial is pending is neither a new dial nor refused.
    raw.send(&syns[..1]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(dp.status().await.unwrap()["refused"]["pending_dial_peer"], 6);
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
    assert_eq!((st["flows"].as_u64(), st["tcp"]["refused_peer_flows"].as_u64()), (Some(6), Some(2)));
    // Half-open, they end after the handshake timeout, not smoltcp's 120 s, and free their targets.
    let deadline = tokio::time::Instant::now() + super::HANDSHAKE_TIMEOUT + PATIENCE;
    for _ in 0..6 {
        tokio::time::timeout_at(deadline, closed_rx.recv()).await.expect("the target connection closed");
    }
    until("the half-open flows to go", || async { dp.status().await.unwrap()["flows"] == 0 }).await;
    assert_eq!(dp.status().await.unwrap()["tcp"]["buffer_bytes"], 0, "their buffers are given back");
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
        dp.status().await.unwrap()["refused"]["udp_peer"] == 3
    })
    .await;
    let got = raw.receive_until(|_, got| got.len() >= 5).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let more = raw.dev.poll_inbound();
    assert_eq!(got.len() + usize::from(more.is_some()), 5, "answers for the five flows only");
    assert_eq!(dp.status().await.unwrap()["udp_flows"], 5);
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

/// `service_flows` on synthetic time: two real stacks wired back to back, packets moved by hand, so
/// no test waits for a real timeout.
mod flow_timeouts {
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use smoltcp::iface::SocketHandle;
    use smoltcp::socket::tcp::State;
    use tokio::sync::{oneshot, Notify};
    use tunnel_core::netstack::NetStack;

    use super::super::{service_flows, Flow, FlowEnds};

    const CLIENT: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 2);
    const SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(100, 96, 0, 10), 80);
    const PEER: [u8; 32] = [7; 32];

    fn stack(addr: Ipv4Addr, any_ip: bool, t0: Instant) -> NetStack {
        NetStack::new(addr, 16, 1280, any_ip, 1, t0)
    }

    /// Moves every packet `from` has queued into `to`; how many.
    fn carry(from: &mut NetStack, to: &mut NetStack, now: Instant) -> usize {
        from.poll(now);
        let mut n = 0;
        while let Some(p) = from.pop_outbound() {
            to.push_inbound(p);
            n += 1;
        }
        to.poll(now);
        n
    }

    /// A site's listening flow, as `inbound` makes one for a granted SYN.
    fn site_flow(site: &mut NetStack, t0: Instant) -> (SocketHandle, HashMap<SocketHandle, Flow>, FlowEnds) {
        let h = site.listen(SERVICE, Some(&PEER)).unwrap();
        let (flow, ends) = Flow::new(Some(PEER), Arc::new(Notify::new()), t0);
        (h, HashMap::from([(h, flow)]), ends)
    }

    #[test]
    fn a_site_socket_nobody_takes_is_dropped_after_the_listen_timeout() {
        let t0 = Instant::now();
        let mut site = stack(Ipv4Addr::new(100, 96, 0, 1), true, t0);
        let (_, mut flows, _ends) = site_flow(&mut site, t0);
        service_flows(&mut site, &mut flows, t0 + Duration::from_secs(4));
        assert_eq!(flows.len(), 1, "kept while the SYN may still come");
        service_flows(&mut site, &mut flows, t0 + Duration::from_secs(6));
        assert!(flows.is_empty(), "dropped after 5 s in Listen");
    }

    #[test]
    fn a_handshake_the_client_never_finishes_ends_after_ten_seconds() {
        let t0 = Instant::now();
        let mut site = stack(Ipv4Addr::new(100, 96, 0, 1), true, t0);
        let mut client = stack(CLIENT, false, t0);
        let (h, mut flows, _ends) = site_flow(&mut site, t0);
        client.connect(CLIENT, SERVICE, Some(&PEER)).unwrap();
        assert_eq!(carry(&mut client, &mut site, t0), 1, "the SYN");
        // The SYN-ACK is never carried back: the site's socket stays half open.
        assert_eq!(site.socket(h).state(), State::SynReceived);
        service_flows(&mut site, &mut flows, t0 + Duration::from_secs(9));
        assert_eq!(site.socket(h).state(), State::SynReceived, "kept within 10 s");
        service_flows(&mut site, &mut flows, t0 + Duration::from_secs(11));
        assert_eq!(site.socket(h).state(), State::Closed, "aborted after 10 s half open");
        service_flows(&mut site, &mut flows, t0 + Duration::from_secs(11));
        assert!(flows.is_empty());
    }

    #[test]
    fn a_client_connect_nobody_answers_fails_after_fifteen_seconds() {
        let t0 = Instant::now();
        let mut client = stack(CLIENT, false, t0);
        let h = client.connect(CLIENT, SERVICE, Some(&PEER)).unwrap();
        client.poll(t0);
        let (mut flow, ends) = Flow::new(None, Arc::new(Notify::new()), t0);
        let (reply_tx, mut reply_rx) = oneshot::channel();
        flow.connect_reply = Some((reply_tx, ends));
        let mut flows = HashMap::from([(h, flow)]);
        assert_eq!(client.socket(h).state(), State::SynSent);
        service_flows(&mut client, &mut flows, t0 + Duration::from_secs(14));
        assert!(reply_rx.try_recv().is_err(), "no answer yet within 15 s (a site may take its 10 s dial)");
        service_flows(&mut client, &mut flows, t0 + Duration::from_secs(16));
        let e = reply_rx.try_recv().expect("answered after 15 s").expect_err("a failure");
        assert!(e.contains("timed out"), "{e}");
        service_flows(&mut client, &mut flows, t0 + Duration::from_secs(16));
        assert!(flows.is_empty());
    }

    #[test]
    fn a_fin_from_the_client_ends_the_applications_stream_after_the_data() {
        let t0 = Instant::now();
        let mut site = stack(Ipv4Addr::new(100, 96, 0, 1), true, t0);
        let mut client = stack(CLIENT, false, t0);
        let (_, mut flows, mut ends) = site_flow(&mut site, t0);
        let c = client.connect(CLIENT, SERVICE, Some(&PEER)).unwrap();
        let mut now = t0;
        for _ in 0..4 {
            now += Duration::from_millis(1);
            carry(&mut client, &mut site, now);
            carry(&mut site, &mut client, now);
        }
        assert_eq!(client.socket(c).state(), State::Established);
        client.socket(c).send_slice(b"hello").unwrap();
        client.socket(c).close();
        carry(&mut client, &mut site, now);
        service_flows(&mut site, &mut flows, now);
        assert_eq!(ends.rx.try_recv().unwrap(), &b"hello"[..]);
        assert!(
            matches!(ends.rx.try_recv(), Err(tokio::sync::mpsc::error::TryRecvError::Disconnected)),
            "end of stream after the data"
        );
        assert_eq!(flows.len(), 1, "the site's half stays open for its answer");
    }
}

/// The decisions the loop leaves to the shell, read from its queue of effects without performing
/// them (docs/plans/engine-split.md, step 2).
mod effects {
    use std::net::Ipv4Addr;
    use std::sync::Arc;
    use std::time::Instant;

    use tokio::sync::{mpsc, watch};
    use tunnel_core::map::NodeKind;
    use tunnel_core::packet;
    use tunnel_core::wg;

    use super::super::{effects::Effect, Loop, PathOptions};
    use super::{map, peer, resource, syn, NODE_KEY, RAW_KEY};

    async fn site_loop() -> Loop {
        let udp = Arc::new(super::super::bind_socket("127.0.0.1:0".parse().unwrap()).unwrap());
        let state = Arc::new(quinn_udp::UdpSocketState::new((&*udp).into()).unwrap());
        let (relay_out, _) = mpsc::channel(1);
        let (relay_list, _) = watch::channel(vec![]);
        Loop::new(NodeKind::Site, NODE_KEY, udp, state, None, PathOptions::default(), relay_out, relay_list)
    }

    fn site_map(resources: &[&str], stun: Option<&str>) -> Arc<tunnel_core::map::NetworkMap> {
        let mut m = map(
            NodeKind::Site,
            "100.96.0.1",
            peer(&["100.96.0.2/32"], resources),
            vec![
                resource("web", "100.96.0.10", Some("127.0.0.1:9".into()), 80),
                resource("dns", "100.96.0.11", Some("127.0.0.1:53".into()), 53),
            ],
        );
        m.stun_addr = stun.map(str::to_string);
        Arc::new(m)
    }

    fn taken(lp: &mut Loop) -> Vec<Effect> {
        lp.effects.drain(..).collect()
    }

    #[tokio::test]
    async fn a_stun_server_is_resolved_once_per_name() {
        let mut lp = site_loop().await;
        let now = Instant::now();
        lp.apply_map(site_map(&["web"], Some("stun.example:3478")), now);
        let e = taken(&mut lp);
        assert!(matches!(&e[..], [Effect::ResolveStun(n)] if n == "stun.example:3478"), "{e:?}");
        lp.apply_map(site_map(&["web"], Some("stun.example:3478")), now);
        assert!(taken(&mut lp).is_empty(), "the same name again is not resolved again");
        lp.apply_map(site_map(&["web"], Some("stun2.example:3478")), now);
        let e = taken(&mut lp);
        assert!(matches!(&e[..], [Effect::ResolveStun(n)] if n == "stun2.example:3478"), "{e:?}");
        // The first name's late answer is not taken for the second's.
        lp.stun_resolved("stun.example:3478".into(), Some("192.0.2.1:3478".parse().unwrap()), now);
        assert!(lp.stun.next.is_none(), "no request to a server the map no longer names");
        // A name that did not resolve is tried again with the next map, and only then.
        lp.stun_resolved("stun2.example:3478".into(), None, now);
        lp.apply_map(site_map(&["web"], Some("stun2.example:3478")), now);
        let e = taken(&mut lp);
        assert!(matches!(&e[..], [Effect::ResolveStun(n)] if n == "stun2.example:3478"), "{e:?}");
        lp.stun_resolved("stun2.example:3478".into(), Some("192.0.2.2:3478".parse().unwrap()), now);
        assert_eq!(lp.stun.next, Some(now), "a request is due at once");
        lp.apply_map(site_map(&["web"], Some("stun2.example:3478")), now);
        assert!(taken(&mut lp).is_empty(), "a resolved name is kept");
        lp.apply_map(site_map(&["web"], None), now);
        assert!(taken(&mut lp).is_empty());
        assert!(lp.stun.server.is_none());
    }

    #[tokio::test]
    async fn a_granted_syn_asks_for_one_dial_and_its_retransmission_for_none() {
        let mut lp = site_loop().await;
        let now = Instant::now();
        lp.apply_map(site_map(&["web"], None), now);
        let client = wg::public_key(RAW_KEY);
        lp.inbound(client, syn(40_000), now);
        let e = taken(&mut lp);
        assert!(
            matches!(&e[..], [Effect::DialTcp { tuple, target }]
                if target == "127.0.0.1:9" && tuple.src.port() == 40_000 && *tuple.dst.ip() == Ipv4Addr::new(100, 96, 0, 10)),
            "{e:?}"
        );
        lp.inbound(client, syn(40_000), now);
        assert!(taken(&mut lp).is_empty(), "a retransmitted SYN is the dial already asked for");
        // A peer without the grant gets nothing dialled (a reset goes back instead).
        lp.apply_map(site_map(&["dns"], None), now);
        lp.inbound(client, syn(40_001), now);
        assert!(taken(&mut lp).is_empty());
    }

    #[tokio::test]
    async fn a_udp_flow_asks_for_its_socket_once_and_ends_with_its_grant() {
        let mut lp = site_loop().await;
        let now = Instant::now();
        lp.apply_map(site_map(&["dns"], None), now);
        let client = wg::public_key(RAW_KEY);
        let q =
            packet::udp_packet("100.96.0.2:5000".parse().unwrap(), "100.96.0.11:53".parse().unwrap(), b"q");
        lp.inbound(client, q.clone(), now);
        lp.inbound(client, q, now);
        let e = taken(&mut lp);
        assert!(matches!(&e[..], [Effect::OpenUdp { target, .. }] if target == "127.0.0.1:53"), "{e:?}");
        assert_eq!(lp.udp_flows.len(), 1);
        assert_eq!(lp.udp_flows.values().next().map(|f| f.queued.len()), Some(2), "both wait for the socket");
        lp.apply_map(site_map(&["web"], None), now);
        assert!(lp.udp_flows.is_empty(), "the revoked grant ends the flow");
    }
}
