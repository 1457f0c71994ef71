//! Two nodes' path state machines wired through a simulated network with virtual time.

use super::*;

const KA: [u8; 32] = [11; 32];
const KB: [u8; 32] = [22; 32];

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A's and B's path logic; `routes` says which (destination address) reaches which node and what
/// source address the receiver sees.
struct Sim {
    now: Instant,
    a: Paths,
    b: Paths,
    /// (sender is A, destination) -> source seen by the receiver, if delivered.
    deliver: Box<dyn Fn(bool, SocketAddr) -> Option<SocketAddr>>,
    events_a: Vec<PathEvent>,
}

impl Sim {
    fn new(cands_of_b: Vec<(SocketAddr, Origin)>, cands_of_a: Vec<(SocketAddr, Origin)>) -> Sim {
        let now = Instant::now();
        let mut a = Paths::new(KA, Duration::from_secs(5), 1, now);
        let mut b = Paths::new(KB, Duration::from_secs(5), 2, now);
        let (pa, pb) = (crate::wg::public_key(KA), crate::wg::public_key(KB));
        a.set_peers(vec![PeerCandidates { key: pb, candidates: cands_of_b }], now);
        b.set_peers(vec![PeerCandidates { key: pa, candidates: cands_of_a }], now);
        Sim { now, a, b, deliver: Box::new(|_, _| None), events_a: vec![] }
    }

    fn run(&mut self, for_: Duration) {
        let end = self.now + for_;
        while self.now < end {
            self.now += Duration::from_millis(10);
            let now = self.now;
            self.a.handle_timeout(now);
            self.b.handle_timeout(now);
            // Let probes bounce until quiet.
            for _ in 0..10 {
                let mut moved = false;
                while let Some((dst, d)) = self.a.poll_transmit() {
                    moved = true;
                    if let Some(src) = (self.deliver)(true, dst) {
                        self.b.handle_probe(src, &d, now);
                    }
                }
                while let Some((dst, d)) = self.b.poll_transmit() {
                    moved = true;
                    if let Some(src) = (self.deliver)(false, dst) {
                        self.a.handle_probe(src, &d, now);
                    }
                }
                if !moved {
                    break;
                }
            }
            while let Some(e) = self.a.poll_event() {
                self.events_a.push(e);
            }
            while self.b.poll_event().is_some() {}
        }
    }

    fn a_path(&self) -> Option<Via> {
        self.a.current(&crate::wg::public_key(KB))
    }
}

#[test]
fn lan_beats_public_and_both_sides_go_direct() {
    let b_lan = addr("10.1.0.2:51820");
    let b_pub = addr("203.0.113.2:51820");
    let a_lan = addr("10.1.0.4:40000");
    let a_pub = addr("203.0.113.2:40000");
    let mut sim = Sim::new(
        vec![(b_pub, Origin::Reflexive), (b_lan, Origin::Lan)],
        vec![(a_pub, Origin::Reflexive), (a_lan, Origin::Lan)],
    );
    // Both work; the LAN one is on the same segment.
    sim.deliver = Box::new(move |from_a, dst| match (from_a, dst) {
        (true, d) if d == b_lan => Some(a_lan),
        (true, d) if d == b_pub => Some(a_pub),
        (false, d) if d == a_lan => Some(b_lan),
        (false, d) if d == a_pub => Some(b_pub),
        _ => None,
    });
    sim.run(Duration::from_millis(500));
    assert_eq!(sim.a_path(), Some(Via::Direct(b_lan)));
    assert!(sim.a.is_direct(&crate::wg::public_key(KB)));
    assert_eq!(sim.b.current(&crate::wg::public_key(KA)), Some(Via::Direct(a_lan)));
    let st = sim.a.stats(&crate::wg::public_key(KB)).unwrap();
    assert!(st.punch_successes >= 1 && st.pongs >= 1, "{st:?}");
}

#[test]
fn relay_first_then_direct_once_proven_then_relay_when_it_dies() {
    let b_pub = addr("203.0.113.2:51820");
    let a_pub = addr("203.0.113.3:40000");
    let mut sim = Sim::new(vec![(b_pub, Origin::Reflexive)], vec![(a_pub, Origin::Reflexive)]);
    sim.a.set_relay(true, sim.now);
    sim.b.set_relay(true, sim.now);
    // Nothing direct gets through yet.
    sim.run(Duration::from_millis(300));
    assert_eq!(sim.a_path(), Some(Via::Relay));
    assert!(!sim.a.is_direct(&crate::wg::public_key(KB)));
    // The NATs open up: the next punch round (within RETRY_EVERY) proves the direct path.
    sim.deliver = Box::new(move |from_a, dst| match (from_a, dst) {
        (true, d) if d == b_pub => Some(a_pub),
        (false, d) if d == a_pub => Some(b_pub),
        _ => None,
    });
    sim.run(RETRY_EVERY + Duration::from_secs(1));
    assert_eq!(sim.a_path(), Some(Via::Direct(b_pub)));
    // Traffic flows, then the direct path dies (a NAT mapping expired).
    let kb = crate::wg::public_key(KB);
    sim.a.handle_tx(&kb, sim.now);
    sim.deliver = Box::new(|_, _| None);
    let died = sim.now;
    while sim.a_path() != Some(Via::Relay) {
        sim.a.handle_tx(&kb, sim.now);
        sim.run(Duration::from_millis(50));
        assert!(sim.now - died < Duration::from_secs(4), "no fallback to the relay within 4 s");
    }
    let took = sim.now - died;
    assert!(took <= ACTIVE_CONFIRM + DEAD_AFTER + Duration::from_millis(100), "fallback took {took:?}");
}

#[test]
fn pongs_that_answer_nothing_we_sent_prove_nothing() {
    let b_pub = addr("203.0.113.2:51820");
    let mut sim = Sim::new(vec![(b_pub, Origin::Reflexive)], vec![]);
    let pa = crate::wg::public_key(KA);
    let pb = crate::wg::public_key(KB);
    let key = probe::pair_key(&StaticSecret::from(KB), &pa);
    sim.run(Duration::from_millis(200));
    // A valid MAC but a txid A never sent; and a right txid-less forgery from another key.
    let stray = probe::encode(ProbeKind::Pong, &pb, 12345, &key);
    sim.a.handle_probe(b_pub, &stray, sim.now);
    let forged = probe::encode(ProbeKind::Pong, &pb, 1, &[9; 32]);
    sim.a.handle_probe(b_pub, &forged, sim.now);
    assert!(!sim.a.is_direct(&pb));
    assert_eq!(sim.a.bad_probes, 2);
    // A real answer, but arriving from another address than the ping went to, proves nothing either.
    let (dst, ping) = loop {
        sim.now += PUNCH_INTERVAL;
        sim.a.handle_timeout(sim.now);
        if let Some(t) = sim.a.poll_transmit() {
            break t;
        }
    };
    assert_eq!(dst, b_pub);
    let txid = probe::parse(&ping).unwrap().txid;
    let pong = probe::encode(ProbeKind::Pong, &pb, txid, &key);
    sim.a.handle_probe(addr("198.51.100.9:1"), &pong, sim.now);
    assert!(!sim.a.is_direct(&pb));
    sim.a.handle_probe(b_pub, &pong, sim.now);
    assert!(sim.a.is_direct(&pb));
}

#[test]
fn a_ping_from_an_unknown_address_is_learned_and_proven() {
    // B sits behind a NAT that gave it a port nobody told A about (peer-reflexive).
    let b_seen = addr("203.0.113.2:61000");
    let a_pub = addr("203.0.113.3:40000");
    let mut sim = Sim::new(vec![], vec![(a_pub, Origin::Reflexive)]);
    sim.deliver = Box::new(move |from_a, dst| match (from_a, dst) {
        (true, d) if d == b_seen => Some(a_pub),
        (false, d) if d == a_pub => Some(b_seen),
        _ => None,
    });
    sim.run(Duration::from_millis(500));
    assert_eq!(sim.a_path(), Some(Via::Direct(b_seen)));
    assert!(sim.a.is_direct(&crate::wg::public_key(KB)));
}

#[test]
fn idle_direct_paths_are_confirmed_at_the_keepalive_not_faster() {
    let b_pub = addr("203.0.113.2:51820");
    let a_pub = addr("203.0.113.3:40000");
    let mut sim = Sim::new(vec![(b_pub, Origin::Reflexive)], vec![(a_pub, Origin::Reflexive)]);
    sim.deliver = Box::new(move |from_a, dst| match (from_a, dst) {
        (true, d) if d == b_pub => Some(a_pub),
        (false, d) if d == a_pub => Some(b_pub),
        _ => None,
    });
    sim.run(PUNCH_WINDOW + Duration::from_secs(1));
    let before = sim.a.stats(&crate::wg::public_key(KB)).unwrap().pings;
    sim.run(Duration::from_secs(20));
    let after = sim.a.stats(&crate::wg::public_key(KB)).unwrap().pings;
    // Keepalive 5 s: about 4 confirmations in 20 s, and the path stays up.
    assert!((2..=8).contains(&(after - before)), "{} pings while idle", after - before);
    assert_eq!(sim.a_path(), Some(Via::Direct(b_pub)));
    // A guess first, then the proof, then nothing more: an idle path does not flap.
    let via: Vec<(Option<Via>, bool)> = sim.events_a.iter().map(|e| (e.via, e.proven)).collect();
    assert_eq!(via, vec![(Some(Via::Direct(b_pub)), false), (Some(Via::Direct(b_pub)), true)]);
}

#[test]
fn a_peer_that_restarts_from_a_new_port_is_followed_at_once() {
    let b_old = addr("203.0.113.2:51820");
    let b_new = addr("203.0.113.2:51999");
    let a_pub = addr("203.0.113.3:40000");
    let mut sim = Sim::new(vec![(b_old, Origin::Reflexive)], vec![(a_pub, Origin::Reflexive)]);
    sim.deliver = Box::new(move |from_a, dst| match (from_a, dst) {
        (true, d) if d == b_old => Some(a_pub),
        (false, d) if d == a_pub => Some(b_old),
        _ => None,
    });
    sim.run(Duration::from_millis(300));
    assert_eq!(sim.a_path(), Some(Via::Direct(b_old)));
    // B restarts: its socket (and NAT mapping) is new; its first handshake initiation authenticates.
    sim.deliver = Box::new(move |from_a, dst| match (from_a, dst) {
        (true, d) if d == b_new => Some(a_pub),
        (false, d) if d == a_pub => Some(b_new),
        _ => None,
    });
    let kb = crate::wg::public_key(KB);
    sim.a.handle_initiation(&kb, b_new, sim.now);
    assert_eq!(sim.a_path(), Some(Via::Direct(b_new)), "followed at once");
    sim.run(Duration::from_millis(300));
    assert_eq!(sim.a_path(), Some(Via::Direct(b_new)));
    assert!(sim.a.is_direct(&kb), "and proven by probes");
    // Over the relay, an initiation from elsewhere does not pull a relayed peer off the relay unproven.
    sim.a.set_relay(true, sim.now);
    sim.deliver = Box::new(|_, _| None);
    // Idle: the dead path is noticed at the next keepalive check (5 s) plus DEAD_AFTER.
    sim.run(Duration::from_secs(8));
    assert_eq!(sim.a_path(), Some(Via::Relay));
    sim.a.handle_initiation(&kb, addr("198.51.100.7:1"), sim.now);
    assert_eq!(sim.a_path(), Some(Via::Relay));
}

#[test]
fn probes_go_only_to_allowed_addresses_and_a_bounded_number() {
    // A compromised node (or server) lists loopback, multicast, link-local and 200 LAN addresses.
    let mut cands: Vec<(SocketAddr, Origin)> = vec![
        (addr("224.0.0.251:5353"), Origin::Lan),
        (addr("[fe80::1]:9"), Origin::Lan),
        (addr("255.255.255.255:9"), Origin::Reflexive),
        (addr("0.0.0.0:9"), Origin::Advertised),
    ];
    cands.extend((0..200u32).map(|i| (addr(&format!("10.9.{}.{}:7", i / 250, i % 250 + 1)), Origin::Lan)));
    let mut sim = Sim::new(cands, vec![]);
    let mut seen = std::collections::BTreeSet::new();
    let end = sim.now + Duration::from_secs(3);
    while sim.now < end {
        sim.now += Duration::from_millis(10);
        sim.a.handle_timeout(sim.now);
        while let Some((dst, _)) = sim.a.poll_transmit() {
            seen.insert(dst);
        }
    }
    assert!(!seen.is_empty(), "A punches towards B");
    for dst in &seen {
        assert!(crate::map::candidate_addr_allowed(*dst), "probed {dst}");
    }
    assert!(seen.len() <= crate::map::MAX_CANDIDATES_LAN, "{} destinations probed", seen.len());
}
