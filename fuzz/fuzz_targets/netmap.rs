//! Network maps from the server (tunnel_proto::v1 -> node/src/convert.rs -> core/src/map.rs).
//!
//! The input is a sequence of `u16`-length-prefixed protobuf messages: the first is decoded as a
//! `NetworkMap`, the rest as `MapDelta`s, as a node's control stream delivers them. Each is converted
//! (`convert::map` / `convert::delta`), deltas are applied (`NetworkMap::apply`), and every map the node
//! would hold goes through what a node derives from it: `map::diff` against the previous one, the
//! private DNS zone (`PrivateZone::from_map`, `routing_domains`, lookups), and the WireGuard peers and
//! path candidates (parsed as the data plane's `apply_map` does) installed into a `wg::Device` and a
//! `path::Paths`.
//!
//! Also the server's side of peers: `candidates_from_pb` (what a node reports, bounded) and
//! `peer_to_pb` (what the node decodes).
//!
//! Checks: no panic; a refused delta leaves the map untouched; an applied delta makes the map's
//! version the delta's; diffing a map against itself is empty.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tunnel_core::dns::PrivateZone;
use tunnel_core::map::{self, NetworkMap};
use tunnel_core::path::{CandidateKind, PeerCandidates, Paths};
use tunnel_core::wg::{Device, PeerConfig};
use tunnel_fuzz::Input;
use tunnel_node::convert;
use tunnel_proto::v1 as pb;

/// Peers installed into the device per map: each costs an X25519 (keeps the target fast).
const MAX_INSTALLED: usize = 8;

fn derive(m: &NetworkMap, device: &mut Device, paths: &mut Paths, now: Instant) {
    let zone = PrivateZone::from_map(m);
    let _ = zone.routing_domains();
    for r in m.resources.values() {
        for n in &r.dns_names {
            let _ = zone.lookup(n);
            let _ = m.resource_by_dns_name(n);
        }
    }
    let _ = zone.lookup(&m.node_name);
    let _ = m.overlay_cidr.parse::<ipnet::Ipv4Net>();
    let _ = m.overlay_addr.parse::<Ipv4Addr>();

    // As `Engine::handle_map` (core/src/engine/mod.rs) turns peers into installed state.
    let mut peers = Vec::new();
    let mut path_peers = Vec::new();
    for p in m.peers.values().filter(|p| p.public_key.is_some()).take(MAX_INSTALLED) {
        let Some(key) = p.public_key else { continue };
        let allowed: Vec<ipnet::Ipv4Net> = p
            .allowed_ips
            .iter()
            .filter_map(|s| s.parse().ok().or_else(|| s.parse::<Ipv4Addr>().ok().map(ipnet::Ipv4Net::from)))
            .collect();
        peers.push(PeerConfig { key, allowed, endpoint: None, keepalive: Some(25) });
        let candidates = p
            .candidates
            .iter()
            .filter_map(|c| Some((c.addr.parse::<SocketAddr>().ok()?, CandidateKind::from_name(&c.kind)?)))
            .collect();
        path_peers.push(PeerCandidates { key, candidates });
    }
    device.set_peers(peers, now);
    paths.set_peers(path_peers, now);
    paths.set_relay(!m.relays.is_empty(), now);
    paths.handle_timeout(now);
    while paths.poll_transmit().is_some() {}
    while let Some(ev) = paths.poll_event() {
        device.set_endpoint(&ev.key, ev.via, !ev.proven);
    }
    device.handle_timeout(now);
    while device.poll_transmit().is_some() {}
    if let Some(ip) = m.resources.values().find_map(|r| r.overlay_addr.parse::<Ipv4Addr>().ok()) {
        let _ = device.route(ip);
    }
}

/// What the server does with candidates a node reports (server/src/convert.rs), and the wire round
/// trip of peers: server encoding (`peer_to_pb`) then node decoding (`convert::peer`) is the identity.
fn wire_checks(first: &pb::NetworkMap, m: &NetworkMap) {
    let overlay: ipnet::Ipv4Net = m.overlay_cidr.parse().unwrap_or_else(|_| "100.96.0.0/16".parse().unwrap_or_else(|_| unreachable!()));
    for p in &first.peers {
        let (kept, dropped) = tunnel_server::convert::candidates_from_pb(&p.candidates, overlay, false);
        assert_eq!(kept.len() + dropped, p.candidates.len());
        for c in &kept {
            let a: SocketAddr = c.addr.parse().unwrap_or_else(|_| panic!("kept candidate {c:?} does not parse"));
            assert!(map::candidate_addr_allowed(a), "kept refused candidate {c:?}");
            assert!(kept.iter().filter(|k| k.kind == c.kind).count() <= map::candidate_cap(&c.kind));
        }
    }
    for p in m.peers.values() {
        let back = convert::peer(&tunnel_server::convert::peer_to_pb(p)).unwrap_or_else(|e| panic!("{e}: {p:?}"));
        assert_eq!(&back, p, "peer changed on the wire");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let Ok(first) = pb::NetworkMap::decode(input.chunk()) else { return };
    let Ok(mut current) = convert::map(&first) else { return };
    wire_checks(&first, &current);
    assert!(map::diff(&current, &current).is_empty());

    let now = Instant::now();
    let mut device = Device::new([9; 32], 1);
    let mut paths = Paths::new([9; 32], Duration::from_secs(25), 1, now);
    derive(&current, &mut device, &mut paths, now);

    let mut step = 0u64;
    while !input.is_empty() {
        step += 1;
        let Ok(d) = pb::MapDelta::decode(input.chunk()) else { continue };
        let Ok(delta) = convert::delta(&d) else { continue };
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
        derive(&current, &mut device, &mut paths, now + Duration::from_millis(step * 100));
    }
});
