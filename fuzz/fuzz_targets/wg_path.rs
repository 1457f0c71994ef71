//! WireGuard sessions and path selection (core/src/wg.rs, core/src/path.rs, core/src/probe.rs).
//!
//! Two nodes, A and B, each a `wg::Device` plus a `path::Paths`, are wired back to back and complete a
//! real handshake (with path probes) before the fuzzer's input is read. Datagrams reach a node through
//! the same dispatch as `Engine::handle_datagram` (core/src/engine/mod.rs): probe, STUN, else WireGuard, with
//! authenticated packets confirming paths and path events moving the device's endpoint. The input is
//! then a list of operations on B: arbitrary datagrams from A's address, from any address, or via the
//! relay (named as A, as a stranger, or not named); real packets of A's with bytes changed; replays of A's earlier datagrams; validly signed
//! probes from any address; inner packets sent by B; the relay going up and down; new candidates;
//! time passing.
//!
//! Checks: no panic; B only ever delivers inner packets that came from A with A's allowed source.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tunnel_core::packet;
use tunnel_core::path::{Origin, PeerCandidates, Paths, Via};
use tunnel_core::probe::{self, ProbeKind};
use tunnel_core::stun;
use tunnel_core::wg::{self, Device, PeerConfig};
use tunnel_fuzz::Input;

const KEY_A: [u8; 32] = [0x11; 32];
const KEY_B: [u8; 32] = [0x22; 32];

struct Keys {
    a: tunnel_core::PublicKey,
    b: tunnel_core::PublicKey,
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

struct Node {
    dev: Device,
    paths: Paths,
    me: SocketAddr,
}

impl Node {
    /// As `Engine::handle_datagram` in core/src/engine/mod.rs.
    fn datagram(&mut self, from: SocketAddr, data: &[u8], now: Instant) {
        if probe::is_probe(data) {
            self.paths.handle_probe(from, data, now);
        } else if stun::is_stun(data) {
            let _ = stun::parse_response(data);
        } else if let Some(auth) = self.dev.handle_datagram(Via::Direct(from), data) {
            if auth.initiation {
                self.paths.handle_initiation(&auth.peer, from, now);
            }
            self.paths.handle_rx(&auth.peer, from, now);
        }
    }

    fn events(&mut self) {
        while let Some(ev) = self.paths.poll_event() {
            self.dev.set_endpoint(&ev.key, ev.via, !ev.proven);
        }
    }

    fn timers(&mut self, now: Instant) {
        if self.paths.poll_timeout().is_some_and(|(t, _)| t <= now) {
            self.paths.handle_timeout(now);
        }
        if self.dev.poll_timeout().is_some_and(|(t, _)| t <= now) {
            self.dev.handle_timeout(now);
        }
    }
}

/// What crossed the wire, for checks and replays.
#[derive(Default)]
struct Wire {
    from_a: Vec<Vec<u8>>,
    b_inbound: usize,
}

/// Moves datagrams between A and B until both are quiet (bounded). Datagrams to other addresses
/// are lost, as on a network where nobody listens there.
fn pump(a: &mut Node, b: &mut Node, wire: &mut Wire, now: Instant) {
    for _ in 0..32 {
        let mut moved = false;
        a.events();
        b.events();
        while let Some(t) = a.dev.poll_transmit() {
            if wire.from_a.len() < 32 {
                wire.from_a.push(t.payload.clone());
            }
            match t.dst {
                Via::Direct(d) if d == b.me => {
                    moved = true;
                    b.datagram(a.me, &t.payload, now);
                }
                Via::Relay => {
                    moved = true;
                    b.dev.handle_relayed(&keys().a, &t.payload);
                }
                Via::Direct(_) => {}
            }
        }
        while let Some((d, p)) = a.paths.poll_transmit() {
            if d == b.me {
                moved = true;
                b.datagram(a.me, &p, now);
            }
        }
        while let Some(t) = b.dev.poll_transmit() {
            match t.dst {
                Via::Direct(d) if d == a.me => {
                    moved = true;
                    a.datagram(b.me, &t.payload, now);
                }
                Via::Relay => {
                    moved = true;
                    a.dev.handle_relayed(&keys().b, &t.payload);
                }
                Via::Direct(_) => {}
            }
        }
        while let Some((d, p)) = b.paths.poll_transmit() {
            if d == a.me {
                moved = true;
                a.datagram(b.me, &p, now);
            }
        }
        while a.dev.poll_inbound().is_some() {}
        while let Some(inb) = b.dev.poll_inbound() {
            assert_eq!(inb.peer, keys().a, "B delivered a packet from a peer it does not have");
            let s = packet::summarize(&inb.packet);
            if let Some(s) = s {
                assert_eq!(s.src, Ipv4Addr::new(100, 96, 0, 2), "B delivered a packet from a source A may not use");
            }
            wire.b_inbound += 1;
        }
        if !moved {
            return;
        }
    }
}

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
    let mut a = Node { dev: Device::new(KEY_A, 10), paths: Paths::new(KEY_A, Duration::from_secs(25), 1, t0), me: a_addr };
    let mut b = Node { dev: Device::new(KEY_B, 20), paths: Paths::new(KEY_B, Duration::from_secs(25), 2, t0), me: b_addr };
    a.dev.set_peers(
        vec![PeerConfig {
            key: k.b,
            allowed: vec!["100.96.0.1/32".parse().unwrap_or_else(|_| unreachable!()), "100.96.0.10/32".parse().unwrap_or_else(|_| unreachable!())],
            endpoint: None,
            keepalive: Some(25),
        }],
        t0,
    );
    b.dev.set_peers(
        vec![PeerConfig {
            key: k.a,
            allowed: vec!["100.96.0.2/32".parse().unwrap_or_else(|_| unreachable!())],
            endpoint: None,
            keepalive: None,
        }],
        t0,
    );
    a.paths.set_peers(vec![PeerCandidates { key: k.b, candidates: vec![(b_addr, Origin::Lan)] }], t0);
    b.paths.set_peers(vec![PeerCandidates { key: k.a, candidates: vec![(a_addr, Origin::Lan)] }], t0);
    let mut wire = Wire::default();
    let mut now = t0;
    // Probes prove the path, then the handshake and a first packet go through.
    a.timers(now);
    b.timers(now);
    pump(&mut a, &mut b, &mut wire, now);
    a.dev.handle_outbound(&inner(b"hello"));
    pump(&mut a, &mut b, &mut wire, now);

    let mut input = Input::new(data);
    let mut ops = 0;
    while !input.is_empty() && ops < 64 {
        ops += 1;
        match input.u8() % 11 {
            0 => b.datagram(a_addr, input.chunk(), now),
            1 => {
                let from = input.addr();
                b.datagram(from, input.chunk(), now);
            }
            2 => {
                // Via the relay, which names the sender: A, a stranger, or nobody.
                let who = input.u8();
                let p = input.chunk();
                match who % 3 {
                    0 => {
                        b.dev.handle_relayed(&k.a, p);
                    }
                    1 => {
                        let mut stranger = [0u8; 32];
                        stranger[0] = who;
                        b.dev.handle_relayed(&tunnel_core::PublicKey(stranger), p);
                    }
                    _ => {
                        b.dev.handle_datagram(Via::Relay, p);
                    }
                }
            }
            3 => {
                // A real packet of A's, then bytes of it changed.
                a.dev.handle_outbound(&inner(input.chunk()));
                let flips = usize::from(input.u8() % 8);
                let keep_original = input.u8() & 1 == 1;
                let mut sent = Vec::new();
                while let Some(t) = a.dev.poll_transmit() {
                    sent.push(t.payload);
                }
                for mut p in sent {
                    if keep_original {
                        b.datagram(a_addr, &p, now);
                    }
                    for _ in 0..flips {
                        if p.is_empty() {
                            break;
                        }
                        let at = usize::from(input.u16()) % p.len();
                        p[at] ^= input.u8() | 1;
                    }
                    b.datagram(a_addr, &p, now);
                }
            }
            4 => {
                let i = usize::from(input.u8());
                let from = if input.u8() & 1 == 0 { a_addr } else { input.addr() };
                if !wire.from_a.is_empty() {
                    let p = wire.from_a[i % wire.from_a.len()].clone();
                    b.datagram(from, &p, now);
                }
            }
            5 => {
                now += Duration::from_millis(u64::from(input.u16()) * 4);
                a.timers(now);
                b.timers(now);
            }
            6 => {
                let p = input.chunk();
                b.dev.handle_outbound(p);
                b.dev.send_to_peer(&k.a, p);
                b.paths.handle_tx(&k.a, now);
            }
            7 => {
                // A validly signed probe from A, from wherever the input says.
                let from = input.addr();
                let kind = if input.u8() & 1 == 0 { ProbeKind::Ping } else { ProbeKind::Pong };
                let p = probe::encode(kind, &k.a, input.u64(), &k.pair);
                b.datagram(from, &p, now);
            }
            8 => b.paths.set_relay(input.u8() & 1 == 1, now),
            9 => {
                let n = usize::from(input.u8() % 4);
                let candidates = (0..n)
                    .map(|_| {
                        let kind = match input.u8() % 3 {
                            0 => Origin::Lan,
                            1 => Origin::Reflexive,
                            _ => Origin::Advertised,
                        };
                        (input.addr(), kind)
                    })
                    .collect();
                b.paths.set_peers(vec![PeerCandidates { key: k.a, candidates }], now);
                if input.u8() & 1 == 1 {
                    b.paths.punch_all(now);
                }
            }
            _ => {
                let from = input.addr();
                b.paths.handle_probe(from, input.chunk(), now);
            }
        }
        pump(&mut a, &mut b, &mut wire, now);
        let _ = b.paths.current(&k.a);
        let _ = b.paths.stats(&k.a);
        let _ = b.dev.peer_stats(&k.a);
    }
});
