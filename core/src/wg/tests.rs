use super::*;
use crate::packet::{summarize, udp_packet};

const A_ADDR: &str = "192.0.2.1:1000";
const B_ADDR: &str = "192.0.2.2:2000";
const C_ADDR: &str = "192.0.2.3:3000";

fn pair() -> (Device, Device, Instant) {
    let now = Instant::now();
    let mut a = Device::new([1; 32], 10);
    let mut b = Device::new([2; 32], 20);
    a.set_peers(
        vec![PeerConfig {
            key: b.public_key(),
            allowed: vec!["100.96.0.1/32".parse().unwrap(), "100.96.0.10/32".parse().unwrap()],
            endpoint: Some(B_ADDR.parse().unwrap()),
            keepalive: None,
        }],
        now,
    );
    b.set_peers(
        vec![PeerConfig {
            key: a.public_key(),
            allowed: vec!["100.96.0.2/32".parse().unwrap()],
            endpoint: None,
            keepalive: None,
        }],
        now,
    );
    (a, b, now)
}

/// Delivers every pending datagram between the devices until nothing moves; returns what each got.
fn run(a: &mut Device, b: &mut Device) -> (Vec<Inbound>, Vec<Inbound>) {
    let (mut got_a, mut got_b) = (vec![], vec![]);
    loop {
        let mut moved = false;
        while let Some(t) = a.poll_transmit() {
            moved = true;
            assert_eq!(t.dst, Via::Direct(B_ADDR.parse().unwrap()));
            b.handle_datagram(Via::Direct(A_ADDR.parse().unwrap()), &t.payload);
        }
        while let Some(t) = b.poll_transmit() {
            moved = true;
            assert_eq!(t.dst, Via::Direct(A_ADDR.parse().unwrap()));
            a.handle_datagram(Via::Direct(B_ADDR.parse().unwrap()), &t.payload);
        }
        got_a.extend(std::iter::from_fn(|| a.poll_inbound()));
        got_b.extend(std::iter::from_fn(|| b.poll_inbound()));
        if !moved {
            return (got_a, got_b);
        }
    }
}

fn udp(src: &str, dst: &str, data: &[u8]) -> Vec<u8> {
    udp_packet(src.parse().unwrap(), dst.parse().unwrap(), data)
}

#[test]
fn handshake_then_data_both_ways() {
    let (mut a, mut b, _) = pair();
    let p = udp("100.96.0.2:5000", "100.96.0.10:53", b"query");
    a.handle_outbound(&p);
    let (_, got_b) = run(&mut a, &mut b);
    assert_eq!(
        got_b,
        vec![Inbound { peer: a.public_key(), packet: p }],
        "queued during the handshake, then delivered"
    );
    // B learned A's endpoint from the authenticated handshake and can answer.
    let reply = udp("100.96.0.10:53", "100.96.0.2:5000", b"answer");
    b.handle_outbound(&reply);
    let (got_a, _) = run(&mut a, &mut b);
    assert_eq!(got_a.len(), 1);
    assert_eq!(got_a[0].packet, reply);
    assert_eq!(b.peer_stats(&a.public_key()).unwrap().endpoint, Some(Via::Direct(A_ADDR.parse().unwrap())));
}

#[test]
fn a_peer_cannot_borrow_another_address() {
    let (mut a, mut b, _) = pair();
    a.handle_outbound(&udp("100.96.0.2:5000", "100.96.0.10:53", b"ok"));
    run(&mut a, &mut b);
    // Same key, but an inner source that is not A's overlay address.
    a.handle_outbound(&udp("100.96.0.99:5000", "100.96.0.10:53", b"spoof"));
    let (_, got_b) = run(&mut a, &mut b);
    assert!(got_b.is_empty());
    assert_eq!(b.drops.bad_source, 1);
}

#[test]
fn strangers_and_garbage_are_counted_and_dropped() {
    let (mut a, mut b, now) = pair();
    let mut c = Device::new([3; 32], 30);
    c.set_peers(
        vec![PeerConfig {
            key: b.public_key(),
            allowed: vec!["100.96.0.0/16".parse().unwrap()],
            endpoint: Some(B_ADDR.parse().unwrap()),
            keepalive: None,
        }],
        now,
    );
    c.handle_outbound(&udp("100.96.0.2:5000", "100.96.0.10:53", b"let me in"));
    while let Some(t) = c.poll_transmit() {
        b.handle_datagram(Via::Direct(C_ADDR.parse().unwrap()), &t.payload);
    }
    assert!(b.poll_transmit().is_none(), "no answer to an unknown key");
    assert_eq!(b.drops.unknown_peer, 1);
    b.handle_datagram(Via::Direct(C_ADDR.parse().unwrap()), b"\x01\x00\x00\x00garbage");
    b.handle_datagram(Via::Direct(C_ADDR.parse().unwrap()), &[]);
    assert_eq!(b.drops.malformed, 2);
    // A data packet naming A's session index, sent from elsewhere, cannot decrypt and moves nothing.
    a.handle_outbound(&udp("100.96.0.2:5000", "100.96.0.10:53", b"x"));
    run(&mut a, &mut b);
    let idx = b.peers[&a.public_key()].index;
    let mut forged = vec![4, 0, 0, 0];
    forged.extend_from_slice(&(idx << 8).to_le_bytes());
    forged.extend_from_slice(&[0u8; 40]);
    b.handle_datagram(Via::Direct(C_ADDR.parse().unwrap()), &forged);
    assert_eq!(b.peer_stats(&a.public_key()).unwrap().endpoint, Some(Via::Direct(A_ADDR.parse().unwrap())));
    assert!(b.drops.crypto >= 1);
}

#[test]
fn set_peers_keeps_untouched_sessions_and_removes_the_rest() {
    let (mut a, mut b, now) = pair();
    a.handle_outbound(&udp("100.96.0.2:5000", "100.96.0.10:53", b"x"));
    run(&mut a, &mut b);
    let before = b.peer_stats(&a.public_key()).unwrap();
    assert!(before.last_handshake_secs.is_some());
    // Re-applying the same map (plus another peer) keeps A's session as is.
    let mut desired = vec![PeerConfig {
        key: a.public_key(),
        allowed: vec!["100.96.0.2/32".parse().unwrap()],
        endpoint: None,
        keepalive: None,
    }];
    desired.push(PeerConfig {
        key: crate::PublicKey([9; 32]),
        allowed: vec!["100.96.0.9/32".parse().unwrap()],
        endpoint: None,
        keepalive: None,
    });
    b.set_peers(desired, now);
    let reply = udp("100.96.0.10:53", "100.96.0.2:5000", b"still here");
    b.handle_outbound(&reply);
    let (got_a, _) = run(&mut a, &mut b);
    assert_eq!(got_a.len(), 1, "no new handshake was needed");
    b.set_peers(vec![], now);
    assert!(b.peer_keys().is_empty());
    b.handle_outbound(&reply);
    assert_eq!(b.drops.no_route, 1);
}

#[test]
fn routes_pick_the_longest_prefix() {
    let now = Instant::now();
    let mut d = Device::new([1; 32], 1);
    d.set_peers(
        vec![
            PeerConfig {
                key: crate::PublicKey([5; 32]),
                allowed: vec!["100.96.0.0/16".parse().unwrap()],
                endpoint: None,
                keepalive: None,
            },
            PeerConfig {
                key: crate::PublicKey([6; 32]),
                allowed: vec!["100.96.0.7/32".parse().unwrap()],
                endpoint: None,
                keepalive: None,
            },
        ],
        now,
    );
    assert_eq!(d.route("100.96.0.7".parse().unwrap()), Some(crate::PublicKey([6; 32])));
    assert_eq!(d.route("100.96.3.1".parse().unwrap()), Some(crate::PublicKey([5; 32])));
    assert_eq!(d.route("10.0.0.1".parse().unwrap()), None);
    let _ = summarize(&[]);
}

#[test]
fn an_initiation_that_arrives_before_its_key_is_answered_once_the_key_is_installed() {
    let (mut a, mut b, now) = pair();
    // B does not know A yet (its map has not caught up).
    b.set_peers(vec![], now);
    let p = udp("100.96.0.2:5000", "100.96.0.10:53", b"early");
    a.handle_outbound(&p);
    while let Some(t) = a.poll_transmit() {
        assert_eq!(b.handle_datagram(Via::Direct(A_ADDR.parse().unwrap()), &t.payload), None);
    }
    assert!(b.poll_transmit().is_none());
    // The map arrives: B answers the initiation it kept, and A's queued packet follows.
    b.set_peers(
        vec![PeerConfig {
            key: a.public_key(),
            allowed: vec!["100.96.0.2/32".parse().unwrap()],
            endpoint: None,
            keepalive: None,
        }],
        now,
    );
    let resp = b.poll_transmit().expect("a handshake response without waiting for a retry");
    assert_eq!(resp.dst, Via::Direct(A_ADDR.parse().unwrap()));
    let auth = a.handle_datagram(Via::Direct(B_ADDR.parse().unwrap()), &resp.payload).unwrap();
    assert!(!auth.initiation);
    let (_, got_b) = run(&mut a, &mut b);
    assert_eq!(got_b.len(), 1);
    assert_eq!(got_b[0].packet, p);
}

#[test]
fn an_initiation_dropped_for_want_of_an_endpoint_goes_out_once_there_is_one() {
    let (mut a, mut b, _) = pair();
    let bk = b.public_key();
    a.set_endpoint(&bk, None, true);
    a.handle_outbound(&udp("100.96.0.2:5000", "100.96.0.10:53", b"first"));
    assert!(a.poll_transmit().is_none());
    assert_eq!(a.drops.no_endpoint, 1);
    // The path logic finds a way (the relay came up): the initiation goes now, not 5 s later.
    a.set_endpoint(&bk, Some(Via::Relay), false);
    let t = a.poll_transmit().expect("an initiation at once");
    assert_eq!((t.dst, t.peer), (Via::Relay, Some(bk)));
    assert_eq!(t.payload[0], 1, "a handshake initiation");
    let auth = b.handle_relayed(&a.public_key(), &t.payload).unwrap();
    assert!(auth.initiation);
}

/// A site with two relayed clients: `flooder` ([7; 32]) and `victim` ([8; 32]).
fn relayed_site() -> (Device, crate::PublicKey, Device, Instant) {
    let now = Instant::now();
    let mut site = Device::new([2; 32], 20);
    let flooder = public_key([7; 32]);
    let mut victim = Device::new([8; 32], 80);
    site.set_peers(
        vec![
            PeerConfig {
                key: flooder,
                allowed: vec!["100.96.0.7/32".parse().unwrap()],
                endpoint: None,
                keepalive: None,
            },
            PeerConfig {
                key: victim.public_key(),
                allowed: vec!["100.96.0.8/32".parse().unwrap()],
                endpoint: None,
                keepalive: None,
            },
        ],
        now,
    );
    victim.set_peers(
        vec![PeerConfig {
            key: site.public_key(),
            allowed: vec!["100.96.0.10/32".parse().unwrap()],
            endpoint: None,
            keepalive: None,
        }],
        now,
    );
    victim.set_endpoint(&site.public_key(), Some(Via::Relay), false);
    site.handle_timeout(now);
    victim.handle_timeout(now);
    (site, flooder, victim, now)
}

/// Fresh, valid handshake initiations from the flooder's key (a granted client can make any number).
fn initiations(from: [u8; 32], to: crate::PublicKey, n: usize) -> Vec<Vec<u8>> {
    let mut t = Tunn::new(StaticSecret::from(from), X25519Public::from(to.0), None, None, 1, None);
    let mut buf = vec![0u8; 2048];
    (0..n)
        .map(|_| match t.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(b) => b.to_vec(),
            _ => panic!("no initiation"),
        })
        .collect()
}

/// The victim sends one packet through the relay; the site must answer its handshake and take it.
fn victim_gets_through(site: &mut Device, victim: &mut Device) -> bool {
    let (sk, vk) = (site.public_key(), victim.public_key());
    victim.handle_outbound(&udp("100.96.0.8:5000", "100.96.0.10:53", b"hello"));
    for _ in 0..4 {
        while let Some(t) = victim.poll_transmit() {
            assert_eq!(t.dst, Via::Relay);
            site.handle_relayed(&vk, &t.payload);
        }
        while let Some(t) = site.poll_transmit() {
            if t.peer == Some(vk) {
                victim.handle_relayed(&sk, &t.payload);
            }
        }
    }
    std::iter::from_fn(|| site.poll_inbound()).any(|i| i.peer == vk && i.packet.ends_with(b"hello"))
}

#[test]
fn one_relayed_sender_flooding_handshakes_does_not_stop_another() {
    let (mut site, flooder, mut victim, now) = relayed_site();
    for init in initiations([7; 32], site.public_key(), 500) {
        site.handle_relayed(&flooder, &init);
    }
    assert!(victim_gets_through(&mut site, &mut victim), "the other relayed peer completes its handshake");
    assert!(site.drops.handshake_rate >= 400, "the flood is cut at its sender's budget: {:?}", site.drops);
    // The flooder's budget refills slowly with time, not at once.
    site.handle_timeout(now + Duration::from_secs(1));
    let before = site.drops.handshake_rate;
    for init in initiations([7; 32], site.public_key(), 10) {
        site.handle_relayed(&flooder, &init);
    }
    assert_eq!(site.drops.handshake_rate - before, 8, "two a second come back");
}

#[test]
fn a_direct_handshake_flood_from_spoofed_addresses_does_not_stop_relayed_peers() {
    let (mut site, _, mut victim, _) = relayed_site();
    let inits = initiations([7; 32], site.public_key(), 300);
    let mut cookies = 0;
    for (i, init) in inits.iter().enumerate() {
        let from: SocketAddr = format!("198.51.100.{}:{}", i % 250 + 1, 1000 + i).parse().unwrap();
        site.handle_datagram(Via::Direct(from), init);
        while let Some(t) = site.poll_transmit() {
            cookies += usize::from(t.peer.is_none() && t.payload.first() == Some(&3));
        }
    }
    assert!(cookies >= 100, "beyond the device-wide limit, UDP senders must answer a cookie ({cookies})");
    assert!(victim_gets_through(&mut site, &mut victim));
}

#[test]
fn a_relayed_packet_must_come_from_the_key_the_relay_names() {
    let (mut site, flooder, mut victim, _) = relayed_site();
    // The flooder's initiation, presented by the relay as the victim's: dropped, and no answer.
    let init = initiations([7; 32], site.public_key(), 1).remove(0);
    assert_eq!(site.handle_relayed(&victim.public_key(), &init), None);
    assert_eq!(site.drops.relay_sender, 1);
    assert!(site.poll_transmit().is_none());
    // Named as itself, it is answered.
    assert!(site.handle_relayed(&flooder, &init).is_some());
    assert!(victim_gets_through(&mut site, &mut victim));
}
