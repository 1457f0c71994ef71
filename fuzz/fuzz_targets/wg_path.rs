//! WireGuard sessions and path selection through the engine (core/src/engine/: the datagram
//! dispatch of `Engine::handle_datagram`, core/src/wg.rs, core/src/path.rs, core/src/probe.rs).
//!
//! Two TUN clients' engines, A (100.96.0.2) and B (100.96.0.10), are wired back to back over
//! simulated UDP and a simulated relay. They prove a direct path with probes and complete a real
//! handshake, and B opens a conversation (so its inbound filter lets A's answers in), before the
//! fuzzer's input is read. The input is then a list of operations on B: arbitrary datagrams from
//! A's address or from any address, or via the relay (named as A, as a stranger, or as nobody);
//! real packets of A's with bytes changed; replays of A's earlier datagrams; validly signed probes
//! from any address; bytes behind the probe magic; inner packets sent by B; the relay going up and
//! down; new maps with new candidates for A; time passing.
//!
//! Checks: no panic; B only ever hands the system inner packets that came from A with A's source.
#![no_main]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tunnel_core::engine::{BufferPort, Client, Deliver, Engine, EngineConfig, Transmit};
use tunnel_core::map::{Candidate, CandidateKind, NetworkMap, NodeKind, PeerInfo};
use tunnel_core::probe::{self, ProbeKind};
use tunnel_core::{packet, wg, NodeId, PublicKey};
use tunnel_fuzz::Input;

const KEY_A: [u8; 32] = [0x11; 32];
const KEY_B: [u8; 32] = [0x22; 32];
const A_IP: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 2);
const B_IP: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 10);

struct Keys {
    a: PublicKey,
    b: PublicKey,
    pair: [u8; 32],
}

fn keys() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    K.get_or_init(|| {
        let a = wg::public_key(KEY_A);
        let b = wg::public_key(KEY_B);
        let pair = probe::pair_key(&boringtun::x25519::StaticSecret::from(KEY_B), &a);
        Keys { a, b, pair }
    })
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|_| unreachable!())
}

/// One node's map: itself at `own`, and the other at `peer_ip` with these candidates.
fn map(own: Ipv4Addr, peer_key: PublicKey, peer_ip: Ipv4Addr, candidates: Vec<Candidate>, version: u64) -> NetworkMap {
    let peer = PeerInfo {
        node_id: NodeId::from_random([peer_ip.octets()[3]; 10]),
        name: "peer".into(),
        kind: NodeKind::Client,
        public_key: Some(peer_key),
        overlay_addr: peer_ip.into(),
        allowed_ips: vec![ipnet::IpNet::from(std::net::IpAddr::V4(peer_ip))],
        candidates,
        online: true,
        resources: vec![],
    };
    NetworkMap {
        version,
        node_id: NodeId::from_random([own.octets()[3]; 10]),
        node_name: "me".into(),
        kind: NodeKind::Client,
        overlay_addr: own.into(),
        overlay_cidr: "100.96.0.0/16".parse().unwrap_or_else(|_| unreachable!()),
        dns_zone: "tunnel.internal".into(),
        mtu: 1280,
        peers: BTreeMap::from([(peer.node_id.clone(), peer)]),
        resources: BTreeMap::new(),
        relays: vec![],
        stun_addr: None,
    }
}

struct Node {
    engine: Engine<Client>,
    me: SocketAddr,
    key: PublicKey,
}

impl Node {
    fn new(private_key: [u8; 32], me: SocketAddr, seed: u64, now: Instant) -> Node {
        let cfg = EngineConfig {
            private_key,
            seed,
            tun: true,
            keepalive: Duration::from_secs(25),
            force_relay: false,
            base_candidates: vec![],
            stack: Default::default(),
        };
        Node { engine: Engine::new(cfg, now), me, key: wg::public_key(private_key) }
    }
}

/// What crossed the wire, for checks and replays.
#[derive(Default)]
struct Wire {
    from_a: Vec<Vec<u8>>,
    b_delivered: usize,
}

/// Hands `from`'s datagrams to `to` (UDP to its address, or the relay naming `from`); datagrams
/// to other addresses are lost, as on a network where nobody listens there. A's are recorded for
/// replays. Whether any arrived.
fn carry(from: &mut Node, to: &mut Node, record: Option<&mut Vec<Vec<u8>>>, now: Instant) -> bool {
    let mut moved = false;
    let mut record = record;
    while let Some(t) = from.engine.poll_transmit(now) {
        match t {
            Transmit::Udp { dst, payload } => {
                if let Some(r) = record.as_deref_mut().filter(|r| r.len() < 32) {
                    r.push(payload.clone());
                }
                if dst == to.me {
                    moved = true;
                    to.engine.handle_datagram(from.me, &payload, now);
                }
            }
            Transmit::Relay { peer, payload } => {
                if peer == to.key {
                    moved = true;
                    to.engine.handle_relayed(from.key, &payload);
                }
            }
        }
    }
    moved
}

/// Moves datagrams between A and B until both are quiet (bounded).
fn pump(a: &mut Node, b: &mut Node, port: &mut BufferPort, wire: &mut Wire, now: Instant) {
    for _ in 0..32 {
        let mut moved = a.engine.drive(port, now);
        moved |= b.engine.drive(port, now);
        moved |= carry(a, b, Some(&mut wire.from_a), now);
        moved |= carry(b, a, None, now);
        while a.engine.poll_deliver().is_some() {}
        while let Some(d) = b.engine.poll_deliver() {
            if let Deliver::Os(p) = d {
                let s = packet::summarize(&p);
                assert_eq!(s.map(|s| s.src), Some(A_IP), "B handed the system a packet A may not send");
                wire.b_delivered += 1;
            }
        }
        for e in [&mut a.engine, &mut b.engine] {
            while e.poll_effect().is_some() {}
            while e.poll_event().is_some() {}
        }
        if !moved {
            return;
        }
    }
}

/// An inner packet of A's conversation with B (A answering on 5000 what B asked on 53).
fn inner(payload: &[u8]) -> Vec<u8> {
    packet::udp_packet(
        "100.96.0.2:5000".parse().unwrap_or_else(|_| unreachable!()),
        "100.96.0.10:53".parse().unwrap_or_else(|_| unreachable!()),
        payload,
    )
}

fuzz_target!(|data: &[u8]| {
    let k = keys();
    let t0 = Instant::now();
    let (a_addr, b_addr) = (addr("192.0.2.1:1000"), addr("192.0.2.2:2000"));
    let mut a = Node::new(KEY_A, a_addr, 10, t0);
    let mut b = Node::new(KEY_B, b_addr, 20, t0);
    let mut port = BufferPort::default();
    let lan = |at| vec![Candidate::new(at, CandidateKind::Lan)];
    a.engine.handle_map(Arc::new(map(A_IP, k.b, B_IP, lan(b_addr), 1)), &mut port, t0);
    b.engine.handle_map(Arc::new(map(B_IP, k.a, A_IP, lan(a_addr), 1)), &mut port, t0);
    let mut wire = Wire::default();
    let mut now = t0;
    // Probes prove the path; B asks, so its filter lets A's answer in; the handshake and the
    // answer go through.
    for _ in 0..3 {
        a.engine.handle_timeout(now);
        b.engine.handle_timeout(now);
        pump(&mut a, &mut b, &mut port, &mut wire, now);
        now += Duration::from_millis(50);
    }
    b.engine.handle_os_packet(
        &packet::udp_packet(
            "100.96.0.10:53".parse().unwrap_or_else(|_| unreachable!()),
            "100.96.0.2:5000".parse().unwrap_or_else(|_| unreachable!()),
            b"ask",
        ),
        now,
    );
    pump(&mut a, &mut b, &mut port, &mut wire, now);
    a.engine.handle_os_packet(&inner(b"hello"), now);
    pump(&mut a, &mut b, &mut port, &mut wire, now);
    assert!(wire.b_delivered > 0, "the set-up conversation did not reach B");

    let mut input = Input::new(data);
    let mut ops = 0;
    let mut version = 1;
    while !input.is_empty() && ops < 64 {
        ops += 1;
        match input.u8() % 11 {
            0 => b.engine.handle_datagram(a_addr, input.chunk(), now),
            1 => {
                let from = input.addr();
                b.engine.handle_datagram(from, input.chunk(), now);
            }
            2 => {
                // Via the relay, which names the sender: A, a stranger, or nobody.
                let who = input.u8();
                let p = input.chunk();
                let sender = match who % 3 {
                    0 => k.a,
                    1 => {
                        let mut stranger = [0u8; 32];
                        stranger[0] = who;
                        PublicKey(stranger)
                    }
                    _ => PublicKey::default(),
                };
                b.engine.handle_relayed(sender, p);
            }
            3 => {
                // A real packet of A's, then bytes of it changed.
                a.engine.handle_os_packet(&inner(input.chunk()), now);
                let flips = usize::from(input.u8() % 8);
                let keep_original = input.u8() & 1 == 1;
                let mut sent = Vec::new();
                while let Some(t) = a.engine.poll_transmit(now) {
                    let (Transmit::Udp { payload, .. } | Transmit::Relay { payload, .. }) = t;
                    sent.push(payload);
                }
                for mut p in sent {
                    if keep_original {
                        b.engine.handle_datagram(a_addr, &p, now);
                    }
                    for _ in 0..flips {
                        if p.is_empty() {
                            break;
                        }
                        let at = usize::from(input.u16()) % p.len();
                        p[at] ^= input.u8() | 1;
                    }
                    b.engine.handle_datagram(a_addr, &p, now);
                }
            }
            4 => {
                let i = usize::from(input.u8());
                let from = if input.u8() & 1 == 0 { a_addr } else { input.addr() };
                if !wire.from_a.is_empty() {
                    let p = wire.from_a[i % wire.from_a.len()].clone();
                    b.engine.handle_datagram(from, &p, now);
                }
            }
            5 => {
                now += Duration::from_millis(u64::from(input.u16()) * 4);
                a.engine.handle_timeout(now);
                b.engine.handle_timeout(now);
            }
            6 => b.engine.handle_os_packet(input.chunk(), now),
            7 => {
                // A validly signed probe from A, from wherever the input says.
                let from = input.addr();
                let kind = if input.u8() & 1 == 0 { ProbeKind::Ping } else { ProbeKind::Pong };
                let p = probe::encode(kind, &k.a, input.u64(), &k.pair);
                b.engine.handle_datagram(from, &p, now);
            }
            8 => b.engine.handle_relay_up(input.u8() & 1 == 1, now),
            9 => {
                // A new map: A's candidates as the input says.
                let n = usize::from(input.u8() % 4);
                let candidates = (0..n)
                    .map(|_| {
                        let kind = match input.u8() % 3 {
                            0 => CandidateKind::Lan,
                            1 => CandidateKind::Reflexive,
                            _ => CandidateKind::Advertised,
                        };
                        Candidate::new(input.addr(), kind)
                    })
                    .collect();
                version += 1;
                b.engine.handle_map(Arc::new(map(B_IP, k.a, A_IP, candidates, version)), &mut port, now);
            }
            _ => {
                // Any bytes behind the probe magic, from anywhere.
                let from = input.addr();
                let mut p = probe::MAGIC.to_vec();
                p.extend_from_slice(input.chunk());
                b.engine.handle_datagram(from, &p, now);
            }
        }
        pump(&mut a, &mut b, &mut port, &mut wire, now);
        let _ = b.engine.status();
    }
});
