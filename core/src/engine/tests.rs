//! The engine without a socket: its decisions read from its queues, its flows on synthetic time,
//! and a site and a client back to back in memory, real WireGuard between them.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::socket::tcp::State;

use super::flows::{self, FlowState};
use super::*;
use crate::map::{Candidate, NetworkMap, NodeKind, PeerInfo, ResourceInfo};
use crate::netstack::NetStack;
use crate::{packet, wg, NodeId};

const SITE_KEY: [u8; 32] = [21; 32];
const CLIENT_KEY: [u8; 32] = [22; 32];
const SITE_UDP: &str = "192.0.2.1:51820";
const CLIENT_UDP: &str = "192.0.2.2:51820";
const CLIENT: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 2);
const SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(100, 96, 0, 10), 80);
const PEER: [u8; 32] = [7; 32];

type Port = BufferPort;

fn peer(name: &str, key: [u8; 32], allowed: &[&str], udp: &str, resources: &[&str]) -> PeerInfo {
    PeerInfo {
        node_id: NodeId::from_random([key[0]; 10]),
        name: name.into(),
        kind: NodeKind::Client,
        public_key: Some(wg::public_key(key)),
        overlay_addr: allowed[0].trim_end_matches("/32").parse().unwrap(),
        allowed_ips: allowed.iter().map(|s| s.parse().unwrap()).collect(),
        candidates: vec![Candidate::new(udp.parse().unwrap(), crate::map::CandidateKind::Lan)],
        online: true,
        resources: resources.iter().map(|s| s.to_string()).collect(),
    }
}

fn resource(name: &str, addr: &str, target: Option<&str>, port: u16) -> ResourceInfo {
    ResourceInfo {
        name: name.into(),
        overlay_addr: addr.parse().unwrap(),
        target: target.map(str::to_string),
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

/// The site's map: the client is granted `granted` of `web` (TCP 80) and `dns` (UDP 53).
fn site_map(granted: &[&str], stun: Option<&str>) -> Arc<NetworkMap> {
    let mut m = map(
        NodeKind::Site,
        "100.96.0.1",
        peer("client", CLIENT_KEY, &["100.96.0.2/32"], CLIENT_UDP, granted),
        vec![
            resource("web", "100.96.0.10", Some("127.0.0.1:9"), 80),
            resource("dns", "100.96.0.11", Some("127.0.0.1:53"), 53),
        ],
    );
    m.stun_addr = stun.map(str::to_string);
    Arc::new(m)
}

/// The client's map: the site routes both resources (what it grants is the site's business).
fn client_map() -> Arc<NetworkMap> {
    Arc::new(map(
        NodeKind::Client,
        "100.96.0.2",
        peer("site", SITE_KEY, &["100.96.0.1/32", "100.96.0.10/32", "100.96.0.11/32"], SITE_UDP, &[]),
        vec![resource("web", "100.96.0.10", None, 80), resource("dns", "100.96.0.11", None, 53)],
    ))
}

fn config(key: [u8; 32], tun: bool) -> EngineConfig {
    EngineConfig {
        private_key: key,
        seed: u64::from(key[0]),
        tun,
        keepalive: Duration::from_secs(25),
        force_relay: false,
        base_candidates: vec![],
        stack: Default::default(),
    }
}

fn effects<R: Role>(e: &mut Engine<R>) -> Vec<Effect> {
    std::iter::from_fn(|| e.poll_effect()).collect()
}

fn syn(port: u16) -> Vec<u8> {
    packet::tcp_segment(SocketAddrV4::new(CLIENT, port), SERVICE, true, false)
}

mod queues {
    use super::*;

    fn site() -> (Engine<Site>, Port, Instant) {
        let now = Instant::now();
        (Engine::new(config(SITE_KEY, false), now), Port::default(), now)
    }

    #[test]
    fn a_stun_server_is_resolved_once_per_name() {
        let (mut e, mut port, now) = site();
        e.handle_map(site_map(&["web"], Some("stun.example:3478")), &mut port, now);
        assert_eq!(effects(&mut e), [Effect::ResolveStun("stun.example:3478".into())]);
        e.handle_map(site_map(&["web"], Some("stun.example:3478")), &mut port, now);
        assert!(effects(&mut e).is_empty(), "the same name again is not resolved again");
        e.handle_map(site_map(&["web"], Some("stun2.example:3478")), &mut port, now);
        assert_eq!(effects(&mut e), [Effect::ResolveStun("stun2.example:3478".into())]);
        // The first name's late answer is not taken for the second's.
        e.handle_stun_resolved("stun.example:3478".into(), Some("192.0.2.7:3478".parse().unwrap()), now);
        e.handle_timeout(now);
        let stale: SocketAddr = "192.0.2.7:3478".parse().unwrap();
        assert!(
            !std::iter::from_fn(|| e.poll_transmit(now))
                .any(|t| matches!(t, Transmit::Udp { dst, .. } if dst == stale)),
            "no request to a server the map no longer names"
        );
        // A name that did not resolve is tried again with the next map, and only then.
        e.handle_stun_resolved("stun2.example:3478".into(), None, now);
        e.handle_map(site_map(&["web"], Some("stun2.example:3478")), &mut port, now);
        assert_eq!(effects(&mut e), [Effect::ResolveStun("stun2.example:3478".into())]);
        let server: SocketAddr = "192.0.2.8:3478".parse().unwrap();
        e.handle_stun_resolved("stun2.example:3478".into(), Some(server), now);
        e.handle_timeout(now);
        let sent: Vec<_> = std::iter::from_fn(|| e.poll_transmit(now)).collect();
        assert!(
            sent.iter().any(|t| matches!(t, Transmit::Udp { dst, payload } if *dst == server && crate::stun::is_stun(payload))),
            "a STUN request is due at once: {sent:?}"
        );
        e.handle_map(site_map(&["web"], Some("stun2.example:3478")), &mut port, now);
        assert!(effects(&mut e).is_empty(), "a resolved name is kept");
        e.handle_map(site_map(&["web"], None), &mut port, now);
        assert!(effects(&mut e).is_empty());
    }

    #[test]
    fn a_granted_syn_asks_for_one_dial_and_its_retransmission_for_none() {
        let (mut e, mut port, now) = site();
        e.handle_map(site_map(&["web"], None), &mut port, now);
        let client = wg::public_key(CLIENT_KEY);
        e.role.on_inbound(&mut e.node, client, syn(40_000), now);
        let flow = FlowTuple { src: SocketAddrV4::new(CLIENT, 40_000), dst: SERVICE };
        assert_eq!(effects(&mut e), [Effect::DialTcp { flow, target: "127.0.0.1:9".into() }]);
        e.role.on_inbound(&mut e.node, client, syn(40_000), now);
        assert!(effects(&mut e).is_empty(), "a retransmitted SYN is the dial already asked for");
        // A peer without the grant gets nothing dialled (a reset goes back instead).
        e.handle_map(site_map(&["dns"], None), &mut port, now);
        e.role.on_inbound(&mut e.node, client, syn(40_001), now);
        assert!(effects(&mut e).is_empty());
        assert_eq!(e.status().counters.not_granted, 1);
        // The dial asked for before the revoke comes back: the revoke holds, nothing is bridged.
        assert_eq!(e.handle_dial_result(flow, Ok(()), now), None);
        assert_eq!(e.status().pending_dials, 0);
    }

    #[test]
    fn a_udp_flow_asks_for_its_socket_once_and_ends_with_its_grant() {
        let (mut e, mut port, now) = site();
        e.handle_map(site_map(&["dns"], None), &mut port, now);
        let client = wg::public_key(CLIENT_KEY);
        let q = packet::udp_packet(SocketAddrV4::new(CLIENT, 5000), "100.96.0.11:53".parse().unwrap(), b"q");
        e.role.on_inbound(&mut e.node, client, q.clone(), now);
        e.role.on_inbound(&mut e.node, client, q, now);
        let flow = FlowTuple { src: SocketAddrV4::new(CLIENT, 5000), dst: "100.96.0.11:53".parse().unwrap() };
        assert_eq!(effects(&mut e), [Effect::OpenUdp { flow, target: "127.0.0.1:53".into() }]);
        assert!(e.poll_deliver().is_none(), "both wait for the socket");
        assert!(e.handle_udp_ready(flow));
        let d: Vec<_> = std::iter::from_fn(|| e.poll_deliver()).collect();
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d.iter().all(|d| *d == Deliver::Target { flow, payload: b"q".to_vec() }));
        e.handle_map(site_map(&["web"], None), &mut port, now);
        assert_eq!(effects(&mut e), [Effect::CloseUdp { flow }], "the revoked grant ends the flow");
        assert_eq!(e.status().udp_flows, 0);
        assert!(!e.handle_udp_ready(flow), "a socket opened for it late is closed");
    }

    #[test]
    fn an_idle_udp_flow_ends_after_a_minute() {
        let (mut e, mut port, now) = site();
        e.handle_map(site_map(&["dns"], None), &mut port, now);
        let q = packet::udp_packet(SocketAddrV4::new(CLIENT, 5000), "100.96.0.11:53".parse().unwrap(), b"q");
        e.role.on_inbound(&mut e.node, wg::public_key(CLIENT_KEY), q, now);
        let _ = effects(&mut e);
        e.settle(now + UDP_IDLE - Duration::from_secs(1));
        assert!(effects(&mut e).is_empty());
        e.settle(now + UDP_IDLE + Duration::from_secs(1));
        assert!(matches!(&effects(&mut e)[..], [Effect::CloseUdp { .. }]));
    }
}

/// The flow service on synthetic time: two real stacks wired back to back, packets moved by hand,
/// so no test waits for a real timeout.
mod flow_timeouts {
    use super::*;

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

    /// A site's listening flow, as a dial's success makes one for a granted SYN.
    fn site_flow(site: &mut NetStack, t0: Instant) -> (FlowId, BTreeMap<FlowId, FlowState>) {
        let h = site.listen(SERVICE, Some(&crate::PublicKey(PEER))).unwrap();
        (h, BTreeMap::from([(h, FlowState::site(crate::PublicKey(PEER), t0))]))
    }

    #[test]
    fn a_site_socket_nobody_takes_is_dropped_after_the_listen_timeout() {
        let t0 = Instant::now();
        let mut site = stack(Ipv4Addr::new(100, 96, 0, 1), true, t0);
        let (h, mut flows) = site_flow(&mut site, t0);
        let mut port = Port::default();
        flows::service(&mut site, &mut flows, &mut port, t0 + Duration::from_secs(4));
        assert_eq!(flows.len(), 1, "kept within 5 s");
        flows::service(&mut site, &mut flows, &mut port, t0 + Duration::from_secs(6));
        assert!(flows.is_empty(), "dropped after 5 s in Listen");
        assert!(port.closed.contains(&h), "its ends are dropped");
    }

    #[test]
    fn a_handshake_the_client_never_finishes_ends_after_ten_seconds() {
        let t0 = Instant::now();
        let mut site = stack(Ipv4Addr::new(100, 96, 0, 1), true, t0);
        let mut client = stack(CLIENT, false, t0);
        let (h, mut flows) = site_flow(&mut site, t0);
        let mut port = Port::default();
        client.connect(CLIENT, SERVICE, Some(&crate::PublicKey(PEER))).unwrap();
        assert_eq!(carry(&mut client, &mut site, t0), 1, "the SYN");
        // The SYN-ACK is never carried back: the site's socket stays half open.
        assert_eq!(site.socket(h).state(), State::SynReceived);
        flows::service(&mut site, &mut flows, &mut port, t0 + Duration::from_secs(9));
        assert_eq!(site.socket(h).state(), State::SynReceived, "kept within 10 s");
        flows::service(&mut site, &mut flows, &mut port, t0 + Duration::from_secs(11));
        assert_eq!(site.socket(h).state(), State::Closed, "aborted after 10 s half open");
        flows::service(&mut site, &mut flows, &mut port, t0 + Duration::from_secs(11));
        assert!(flows.is_empty());
    }

    #[test]
    fn a_client_connect_nobody_answers_fails_after_fifteen_seconds() {
        let t0 = Instant::now();
        let mut client = stack(CLIENT, false, t0);
        let h = client.connect(CLIENT, SERVICE, Some(&crate::PublicKey(PEER))).unwrap();
        client.poll(t0);
        let mut flows = BTreeMap::from([(h, FlowState::client(t0))]);
        let mut port = Port::default();
        assert_eq!(client.socket(h).state(), State::SynSent);
        flows::service(&mut client, &mut flows, &mut port, t0 + Duration::from_secs(14));
        assert!(port.connected.is_empty(), "no answer yet within 15 s (a site may take its 10 s dial)");
        flows::service(&mut client, &mut flows, &mut port, t0 + Duration::from_secs(16));
        let e = port.connected[&h].clone().expect_err("a failure");
        assert!(e.contains("timed out"), "{e}");
        flows::service(&mut client, &mut flows, &mut port, t0 + Duration::from_secs(16));
        assert!(flows.is_empty());
    }

    #[test]
    fn a_fin_from_the_client_ends_the_applications_stream_after_the_data() {
        let t0 = Instant::now();
        let mut site = stack(Ipv4Addr::new(100, 96, 0, 1), true, t0);
        let mut client = stack(CLIENT, false, t0);
        let (h, mut flows) = site_flow(&mut site, t0);
        let mut port = Port::default();
        let c = client.connect(CLIENT, SERVICE, Some(&crate::PublicKey(PEER))).unwrap();
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
        flows::service(&mut site, &mut flows, &mut port, now);
        assert_eq!(port.got[&h], b"hello");
        assert!(port.eos.contains(&h), "end of stream after the data");
        assert_eq!(flows.len(), 1, "the site's half stays open for its answer");
    }
}

/// A site and a client engine back to back: their datagrams carried between two made-up
/// addresses, the site's dials answered at once, time stepped by hand (boringtun keeps its own
/// clock: handshakes complete as packets flow).
mod pair {
    use super::*;

    struct Pair {
        site: Engine<Site>,
        client: Engine<Client>,
        site_port: Port,
        client_port: Port,
        now: Instant,
        /// Whether the site's TCP dials succeed.
        dial_ok: bool,
        /// Flows the site bridged, by tuple.
        bridged: BTreeMap<FlowTuple, FlowId>,
        /// What the site's UDP targets and the client's system received.
        targets: Vec<(FlowTuple, Vec<u8>)>,
        os: Vec<Vec<u8>>,
    }

    /// One wake-up of an engine, as the shell runs it; its UDP datagrams.
    fn wake<R: Role>(e: &mut Engine<R>, port: &mut Port, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = vec![];
        e.handle_timeout(now);
        for _ in 0..DRIVE_ROUNDS {
            let mut moved = e.drive(port, now);
            while let Some(t) = e.poll_transmit(now) {
                moved = true;
                if let Transmit::Udp { dst, payload } = t {
                    out.push((dst, payload));
                }
            }
            if !moved {
                break;
            }
        }
        e.settle(now);
        out
    }

    impl Pair {
        fn new(granted: &[&str], tun: bool) -> Pair {
            let now = Instant::now();
            let mut p = Pair {
                site: Engine::new(config(SITE_KEY, false), now),
                client: Engine::new(config(CLIENT_KEY, tun), now),
                site_port: Port::default(),
                client_port: Port::default(),
                now,
                dial_ok: true,
                bridged: BTreeMap::new(),
                targets: vec![],
                os: vec![],
            };
            p.site.handle_map(site_map(granted, None), &mut p.site_port, now);
            p.client.handle_map(client_map(), &mut p.client_port, now);
            p
        }

        /// One wake-up of each engine, as the shell runs it, then 1 ms of time.
        fn step(&mut self) {
            let (site_addr, client_addr): (SocketAddr, SocketAddr) =
                (SITE_UDP.parse().unwrap(), CLIENT_UDP.parse().unwrap());
            let now = self.now;
            let to_client = wake(&mut self.site, &mut self.site_port, now);
            let to_site = wake(&mut self.client, &mut self.client_port, now);
            let (to_site, to_client) = (
                to_site.into_iter().filter(|(dst, _)| *dst == site_addr).map(|(_, d)| (client_addr, d)),
                to_client.into_iter().filter(|(dst, _)| *dst == client_addr).map(|(_, d)| (site_addr, d)),
            );
            for (from, d) in to_site {
                self.site.handle_datagram(from, &d, now);
            }
            for (from, d) in to_client {
                self.client.handle_datagram(from, &d, now);
            }
            while let Some(eff) = self.site.poll_effect() {
                match eff {
                    Effect::DialTcp { flow, .. } => {
                        let r = if self.dial_ok { Ok(()) } else { Err("connection refused".into()) };
                        if let Some(id) = self.site.handle_dial_result(flow, r, now) {
                            self.bridged.insert(flow, id);
                        }
                    }
                    Effect::OpenUdp { flow, .. } => {
                        self.site.handle_udp_ready(flow);
                    }
                    _ => {}
                }
            }
            while let Some(d) = self.site.poll_deliver() {
                if let Deliver::Target { flow, payload } = d {
                    self.targets.push((flow, payload));
                }
            }
            while let Some(d) = self.client.poll_deliver() {
                if let Deliver::Os(p) = d {
                    self.os.push(p);
                }
            }
            self.now += Duration::from_millis(1);
        }

        fn until(&mut self, what: &str, steps: usize, done: impl Fn(&Pair) -> bool) {
            for _ in 0..steps {
                if done(self) {
                    return;
                }
                self.step();
            }
            assert!(done(self), "{what}: not within {steps} steps");
        }

        /// Steps until the client's connect to `remote` is answered; the answer.
        fn connect(&mut self, remote: SocketAddrV4) -> (FlowId, Result<(), String>) {
            let id = self.client.connect(remote, self.now).unwrap();
            self.client_port.reuse(id);
            self.until("the connect's answer", 5_000, |p| p.client_port.connected.contains_key(&id));
            (id, self.client_port.connected[&id].clone())
        }
    }

    #[test]
    fn the_path_goes_direct_and_bytes_cross_both_ways() {
        let mut p = Pair::new(&["web"], false);
        let (c, r) = p.connect(SERVICE);
        assert_eq!(r, Ok(()));
        // The handshake the connect started makes the proven path a live one on both sides.
        p.until("a direct path", 5_000, |p| {
            p.site.status().peers.first().is_some_and(|s| s.path == crate::status::PathState::Direct)
                && p.client.status().peers.first().is_some_and(|s| s.path == crate::status::PathState::Direct)
        });
        assert_eq!(p.bridged.len(), 1, "the site dialled once and bridged the flow");
        let s = *p.bridged.values().next().unwrap();
        let up: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..150_000u32).map(|i| (i % 241) as u8).collect();
        p.client_port.out.insert(c, up.clone());
        p.site_port.out.insert(s, down.clone());
        p.until("both directions", 20_000, |p| {
            p.site_port.got.get(&s).map(Vec::len) == Some(up.len())
                && p.client_port.got.get(&c).map(Vec::len) == Some(down.len())
        });
        assert!(p.site_port.got[&s] == up, "upload byte-exact");
        assert!(p.client_port.got[&c] == down, "download byte-exact");
        // The client closes its side: the target's stream ends.
        p.client_port.out_closed.insert(c);
        p.until("end of stream at the site", 5_000, |p| p.site_port.eos.contains(&s));
        assert_eq!(p.site.status().counters.flows_opened, 1);
    }

    #[test]
    fn a_resource_not_granted_is_refused_with_a_reset() {
        let mut p = Pair::new(&["dns"], false);
        let (_, r) = p.connect(SERVICE);
        let e = r.expect_err("refused");
        assert!(e.contains("refused"), "{e}");
        assert!(p.bridged.is_empty(), "nothing dialled");
        assert!(p.site.status().counters.not_granted >= 1);
    }

    #[test]
    fn a_wrong_port_and_a_refusing_target_are_reset() {
        let mut p = Pair::new(&["web"], false);
        let (_, r) = p.connect(SocketAddrV4::new(*SERVICE.ip(), 81));
        assert!(r.expect_err("refused").contains("refused"));
        assert_eq!(p.site.status().counters.wrong_port, 1, "{:?}", p.site.status());
        p.dial_ok = false;
        let (_, r) = p.connect(SERVICE);
        let e = r.expect_err("refused");
        assert!(e.contains("refused"), "{e}");
        assert_eq!(p.site.status().counters.dial_failures, 1, "{:?}", p.site.status());
    }

    #[test]
    fn a_revoked_grant_aborts_the_flow() {
        let mut p = Pair::new(&["web"], false);
        let (c, r) = p.connect(SERVICE);
        assert_eq!(r, Ok(()));
        let now = p.now;
        p.site.handle_map(site_map(&["dns"], None), &mut p.site_port, now);
        p.until("the client's flow ends", 5_000, |p| p.client_port.closed.contains(&c));
        assert_eq!(p.client.status().flows, 0);
    }

    #[test]
    fn a_tun_client_pings_a_resource_and_sends_udp_to_its_target() {
        use smoltcp::phy::ChecksumCapabilities;
        use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr};
        let mut p = Pair::new(&["dns"], true);
        let icmp = Icmpv4Repr::EchoRequest { ident: 7, seq_no: 1, data: b"ping" };
        let ip = Ipv4Repr {
            src_addr: CLIENT,
            dst_addr: Ipv4Addr::new(100, 96, 0, 11),
            next_header: IpProtocol::Icmp,
            payload_len: icmp.buffer_len(),
            hop_limit: 64,
        };
        let mut req = vec![0u8; ip.buffer_len() + icmp.buffer_len()];
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut Ipv4Packet::new_unchecked(&mut req[..]), &caps);
        icmp.emit(&mut Icmpv4Packet::new_unchecked(&mut req[ip.buffer_len()..]), &caps);
        let now = p.now;
        p.client.handle_os_packet(&req, now);
        p.until("the echo reply", 5_000, |p| !p.os.is_empty());
        let reply = Ipv4Packet::new_checked(&p.os[0][..]).unwrap();
        assert_eq!(reply.src_addr(), Ipv4Addr::new(100, 96, 0, 11));
        let q = packet::udp_packet(SocketAddrV4::new(CLIENT, 5353), "100.96.0.11:53".parse().unwrap(), b"q");
        p.client.handle_os_packet(&q, now);
        p.until("the datagram at the target", 5_000, |p| !p.targets.is_empty());
        assert_eq!(p.targets[0].1, b"q");
        // The target answers: the reply reaches the client's system, the only thing it let in.
        let flow = p.targets[0].0;
        let now = p.now;
        p.site.handle_udp_reply(flow, b"a", now);
        p.until("the answer", 5_000, |p| p.os.len() >= 2);
        assert_eq!(packet::udp_payload(&p.os[1]).unwrap(), b"a");
        assert_eq!(p.client.status().counters.unsolicited, 0);
    }
}
