//! Network maps from the server (tunnel_proto::v1 -> tunnel-wire -> core/src/map.rs -> the engine).
//!
//! The input is a sequence of `u16`-length-prefixed protobuf messages: the first is decoded as a
//! `NetworkMap`, the rest as `MapDelta`s, as a node's control stream delivers them. Each is converted
//! (`wire::map_from_pb` / `wire::delta_from_pb`), deltas are applied (`NetworkMap::apply`), and every
//! map the node would hold goes through what a node derives from it: `map::diff` against the previous
//! one, the private DNS zone (`PrivateZone::from_map`, `routing_domains`, lookups), and the engine of
//! the map's kind (`Engine::handle_map`: WireGuard peers, path candidates, routes, the stack, STUN),
//! then its timers, rounds and outputs.
//!
//! Also the server's side of peers: `candidates_from_pb` (what a node reports, bounded), and the wire
//! round trip of peers and maps.
//!
//! Checks: no panic; a refused delta leaves the map untouched; an applied delta makes the map's
//! version the delta's; diffing a map against itself is empty.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tunnel_core::dns::PrivateZone;
use tunnel_core::engine::{BufferPort, Client, Engine, EngineConfig, Site};
use tunnel_core::map::{self, NetworkMap, NodeKind};
use tunnel_fuzz::Input;
use tunnel_proto::v1 as pb;
use tunnel_wire as wire;

/// Peers installed into the device per map: each costs an X25519 (keeps the target fast).
const MAX_INSTALLED: usize = 8;

/// The engines a node of either kind would run; each map goes through `handle_map`, as the data
/// plane hands it over.
struct Engines {
    site: Engine<Site>,
    client: Engine<Client>,
    port: BufferPort,
}

impl Engines {
    fn new(now: Instant) -> Engines {
        let cfg = || EngineConfig {
            private_key: [9; 32],
            seed: 1,
            tun: false,
            keepalive: Duration::from_secs(25),
            force_relay: false,
            base_candidates: vec![],
            stack: Default::default(),
        };
        Engines { site: Engine::new(cfg(), now), client: Engine::new(cfg(), now), port: BufferPort::default() }
    }
}

fn derive(m: &NetworkMap, e: &mut Engines, now: Instant) {
    let zone = PrivateZone::from_map(m);
    let _ = zone.routing_domains();
    for r in m.resources.values() {
        for n in &r.dns_names {
            let _ = zone.lookup(n);
            let _ = m.resource_by_dns_name(n);
        }
    }
    let _ = zone.lookup(&m.node_name);

    // What the data plane does with a map: peers, candidates, routes, the stack, STUN. The peers are
    // bounded (each installed one costs an X25519, which keeps the target fast).
    let mut m = m.clone();
    let installed: Vec<_> = m.peers.iter().filter(|(_, p)| p.public_key.is_some()).map(|(id, _)| id.clone()).collect();
    for id in installed.iter().skip(MAX_INSTALLED) {
        m.peers.remove(id);
    }
    let m = Arc::new(m);
    macro_rules! run {
        ($engine:expr) => {{
            let engine = $engine;
            engine.handle_map(m.clone(), &mut e.port, now);
            engine.handle_timeout(now);
            while engine.drive(&mut e.port, now) {}
            while engine.poll_transmit(now).is_some() {}
            while engine.poll_deliver().is_some() {}
            while engine.poll_effect().is_some() {}
            while engine.poll_event().is_some() {}
            let _ = engine.status();
        }};
    }
    match m.kind {
        NodeKind::Site => run!(&mut e.site),
        NodeKind::Client => run!(&mut e.client),
    }
}

/// What the server does with candidates a node reports (server/src/convert.rs), and the wire round
/// trip of peers and maps: encoding then decoding (tunnel-wire) is the identity.
fn wire_checks(first: &pb::NetworkMap, m: &NetworkMap) {
    let overlay = map::ipv4_net(m.overlay_cidr).unwrap_or_else(|| "100.96.0.0/16".parse().unwrap_or_else(|_| unreachable!()));
    for p in &first.peers {
        let (kept, dropped) = tunnel_server::convert::candidates_from_pb(&p.candidates, overlay, false);
        assert_eq!(kept.len() + dropped, p.candidates.len());
        for c in &kept {
            assert!(map::candidate_addr_allowed(c.addr), "kept refused candidate {c:?}");
            assert!(kept.iter().filter(|k| k.kind == c.kind).count() <= c.kind.cap());
        }
    }
    for p in m.peers.values() {
        let back = wire::peer_from_pb(&wire::peer_to_pb(p)).unwrap_or_else(|e| panic!("{e}: {p:?}"));
        assert_eq!(&back, p, "peer changed on the wire");
    }
    let back = wire::map_from_pb(&wire::map_to_pb(m)).unwrap_or_else(|e| panic!("{e}: {m:?}"));
    assert_eq!(&back, m, "map changed on the wire");
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let Ok(first) = pb::NetworkMap::decode(input.chunk()) else { return };
    let Ok(mut current) = wire::map_from_pb(&first) else { return };
    wire_checks(&first, &current);
    assert!(map::diff(&current, &current).is_empty());

    let now = Instant::now();
    let mut engines = Engines::new(now);
    derive(&current, &mut engines, now);

    let mut step = 0u64;
    while !input.is_empty() {
        step += 1;
        let Ok(d) = pb::MapDelta::decode(input.chunk()) else { continue };
        let Ok(delta) = wire::delta_from_pb(&d) else { continue };
        let before = current.clone();
        let version = delta.version;
        match current.apply(delta) {
            Ok(()) => assert_eq!(current.version, version),
            Err(map::MapError::Gap { .. }) => {
                assert_eq!(current, before, "a refused delta changed the map");
                continue;
            }
        }
        let d = map::diff(&before, &current);
        for p in d.added_peers.iter().chain(d.changed_peers.iter()) {
            assert_eq!(current.peers.get(&p.node_id), Some(*p));
        }
        for id in &d.removed_peers {
            assert!(!current.peers.contains_key(id));
        }
        derive(&current, &mut engines, now + Duration::from_millis(step * 100));
    }
});
