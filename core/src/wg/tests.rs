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
        key: [9; 32],
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
                key: [5; 32],
                allowed: vec!["100.96.0.0/16".parse().unwrap()],
                endpoint: None,
                keepalive: None,
            },
            PeerConfig {
                key: [6; 32],
                allowed: vec!["100.96.0.7/32".parse().unwrap()],
                endpoint: None,
                keepalive: None,
            },
        ],
        now,
    );
    assert_eq!(d.route("100.96.0.7".parse().unwrap()), Some([6; 32]));
    assert_eq!(d.route("100.96.3.1".parse().unwrap()), Some([5; 32]));
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
    let auth = b.handle_datagram(Via::Relay, &t.payload).unwrap();
    assert!(auth.initiation);
}
