//! The engines on a simulated internet (`tunnel_tests::sim`), in virtual time: hole punching
//! through each NAT model, relay fallback, a lossy and slow link, and the same run twice giving the
//! same datagrams. The namespace lab (`lab_nat`) covers the same cases on real kernels, slowly.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tunnel_core::map::NodeKind;
use tunnel_tests::sim::{LinkModel, NatKind, Sim};

const SITE_WAN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const CLIENT_WAN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Virtual time a path may take to settle: punching retries, a STUN round, the relay fallback.
const SETTLE: Duration = Duration::from_secs(20);

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A site and a client, each behind its router of the given kind (`None`: a public host).
fn world(site: Option<NatKind>, client: Option<NatKind>, link: LinkModel, seed: u64) -> (Sim, usize, usize) {
    let mut sim = Sim::new(seed, link);
    let (s, c) = place(&mut sim, site, client);
    sim.set_relay(true);
    sim.publish();
    (sim, s, c)
}

fn place(sim: &mut Sim, site: Option<NatKind>, client: Option<NatKind>) -> (usize, usize) {
    let s = match site {
        Some(k) => {
            let r = sim.add_router(k, SITE_WAN);
            sim.add_node("site", NodeKind::Site, addr("10.1.0.2:51820"), Some(r))
        }
        None => sim.add_node("site", NodeKind::Site, SocketAddr::from((SITE_WAN, 51820)), None),
    };
    let c = match client {
        Some(k) => {
            let r = sim.add_router(k, CLIENT_WAN);
            sim.add_node("client", NodeKind::Client, addr("10.2.0.2:51820"), Some(r))
        }
        None => sim.add_node("client", NodeKind::Client, SocketAddr::from((CLIENT_WAN, 51820)), None),
    };
    (s, c)
}

/// Opens a flow from the client and moves `up` and `down` bytes through it; both arrive byte-exact.
fn transfer(sim: &mut Sim, s: usize, c: usize, up: usize, down: usize, limit: Duration) {
    let (cf, sf) = sim.connect(c, s, SETTLE).expect("the client's connection is established and bridged");
    let up_data: Vec<u8> = (0..up as u32).map(|i| (i % 251) as u8).collect();
    let down_data: Vec<u8> = (0..down as u32).map(|i| (i % 241) as u8).collect();
    sim.nodes[c].port.out.insert(cf, up_data.clone());
    sim.nodes[s].port.out.insert(sf, down_data.clone());
    let done = sim.run_until(limit, |sim| {
        sim.nodes[s].port.got.get(&sf).map(Vec::len) == Some(up)
            && sim.nodes[c].port.got.get(&cf).map(Vec::len) == Some(down)
    });
    let got_up = sim.nodes[s].port.got.get(&sf).map(Vec::len).unwrap_or(0);
    let got_down = sim.nodes[c].port.got.get(&cf).map(Vec::len).unwrap_or(0);
    assert!(done, "transfer incomplete after {limit:?}: up {got_up} of {up}, down {got_down} of {down}");
    assert!(sim.nodes[s].port.got[&sf] == up_data, "upload byte-exact");
    assert!(sim.nodes[c].port.got[&cf] == down_data, "download byte-exact");
}

fn settle_on(sim: &mut Sim, s: usize, c: usize, path: &str) {
    let ok = sim.run_until(SETTLE, |sim| sim.nodes[s].path() == path && sim.nodes[c].path() == path);
    assert!(
        ok,
        "expected both on {path} within {SETTLE:?}: site {} ({:?}), client {} ({:?})",
        sim.nodes[s].path(),
        sim.nodes[s].endpoint(),
        sim.nodes[c].path(),
        sim.nodes[c].endpoint()
    );
}

#[test]
fn cone_and_cone_punch_through_and_go_direct() {
    let (mut sim, s, c) = world(Some(NatKind::Cone), Some(NatKind::Cone), LinkModel::default(), 1);
    transfer(&mut sim, s, c, 300_000, 300_000, Duration::from_secs(10));
    settle_on(&mut sim, s, c, "direct");
    // Each reaches the other at its router's public address: the reflexive candidate STUN found.
    assert_eq!(sim.nodes[c].endpoint(), Some("198.51.100.1:51820".into()));
    assert_eq!(sim.nodes[s].endpoint(), Some("198.51.100.2:51820".into()));
}

#[test]
fn firewalls_without_translation_go_direct() {
    let (mut sim, s, c) = world(Some(NatKind::Firewall), Some(NatKind::Firewall), LinkModel::default(), 2);
    transfer(&mut sim, s, c, 100_000, 100_000, Duration::from_secs(10));
    settle_on(&mut sim, s, c, "direct");
}

#[test]
fn a_symmetric_client_behind_a_cone_site_is_relayed() {
    let (mut sim, s, c) = world(Some(NatKind::Cone), Some(NatKind::Symmetric), LinkModel::default(), 3);
    transfer(&mut sim, s, c, 200_000, 200_000, Duration::from_secs(10));
    settle_on(&mut sim, s, c, "relay");
}

#[test]
fn symmetric_on_both_sides_is_relayed() {
    let (mut sim, s, c) = world(Some(NatKind::Symmetric), Some(NatKind::Symmetric), LinkModel::default(), 4);
    transfer(&mut sim, s, c, 100_000, 100_000, Duration::from_secs(10));
    settle_on(&mut sim, s, c, "relay");
}

#[test]
fn without_the_relay_a_symmetric_pair_has_no_path() {
    let mut sim = Sim::new(5, LinkModel::default());
    let (s, c) = place(&mut sim, Some(NatKind::Symmetric), Some(NatKind::Symmetric));
    sim.set_relay(false);
    sim.publish();
    sim.start_connect(c).expect("a map");
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.nodes[c].path(), "down");
    assert_eq!(sim.nodes[s].path(), "down");
    assert!(sim.nodes[s].bridged.is_empty(), "nothing got through");
}

/// The site's router records the client's early punches (which it drops) and then maps the site's
/// own first packets to the client onto another public port. The client, a public host, sees the
/// site at a port nobody announced and must answer there: only that way does the path go direct.
#[test]
fn a_router_that_records_early_inbound_packets_still_goes_direct() {
    let mut sim = Sim::new(6, LinkModel::default());
    let r = sim.add_router(NatKind::EarlyConntrack, SITE_WAN);
    let s = sim.add_node("site", NodeKind::Site, addr("10.1.0.2:51820"), Some(r));
    sim.set_relay(true);
    sim.publish();
    // The site learns its public address before any client exists.
    sim.run_for(Duration::from_millis(200));
    // A client joins; the site's control link is slow, so the client punches first.
    let c = sim.add_node("client", NodeKind::Client, SocketAddr::from((CLIENT_WAN, 51820)), None);
    sim.nodes[s].map_delay = Duration::from_millis(500);
    sim.set_relay(true);
    sim.publish();
    transfer(&mut sim, s, c, 100_000, 100_000, Duration::from_secs(10));
    settle_on(&mut sim, s, c, "direct");
    assert_eq!(sim.clashes(r), 1, "the early entry took the site's port towards the client");
    let e = sim.nodes[c].endpoint().expect("an endpoint");
    assert_ne!(e, "198.51.100.1:51820", "the announced port is the one the router took for the early entry");
    assert!(e.starts_with("198.51.100.1:"), "{e}");
}

#[test]
fn a_slow_lossy_link_still_goes_direct_and_delivers_byte_exact() {
    let link = LinkModel { latency: Duration::from_millis(20), loss: 0.05, spare_handshakes: true };
    let (mut sim, s, c) = world(Some(NatKind::Cone), Some(NatKind::Cone), link, 7);
    transfer(&mut sim, s, c, 300_000, 300_000, Duration::from_secs(60));
    settle_on(&mut sim, s, c, "direct");
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let run = || {
        let link = LinkModel { latency: Duration::from_millis(3), loss: 0.02, spare_handshakes: true };
        let (mut sim, s, c) = world(Some(NatKind::Cone), Some(NatKind::Symmetric), link, 42);
        transfer(&mut sim, s, c, 200_000, 200_000, Duration::from_secs(20));
        sim.trace
    };
    let (a, b) = (run(), run());
    assert!(a.len() > 300, "a real run: {} datagrams", a.len());
    let first_difference = a.iter().zip(&b).position(|(x, y)| x != y);
    assert!(
        first_difference.is_none() && a.len() == b.len(),
        "runs differ at datagram {first_difference:?} of {} / {}",
        a.len(),
        b.len()
    );
}
