//! Every model value survives the wire: `x_from_pb(x_to_pb(v)) == v`, for values proptest makes up
//! (both address families, every kind, empty and full optional fields); and what a node cannot use
//! is refused or left out, never guessed.

use proptest::prelude::*;

use super::*;

fn node_id() -> impl Strategy<Value = NodeId> {
    any::<[u8; 10]>().prop_map(NodeId::from_random)
}

fn node_kind() -> impl Strategy<Value = NodeKind> {
    prop_oneof![Just(NodeKind::Site), Just(NodeKind::Client)]
}

fn candidate() -> impl Strategy<Value = Candidate> {
    let kind = prop_oneof![
        Just(CandidateKind::Lan),
        Just(CandidateKind::Reflexive),
        Just(CandidateKind::Advertised)
    ];
    let addr = prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        (any::<[u16; 8]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
    ];
    (addr, kind).prop_map(|(addr, kind)| Candidate { addr, kind })
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![any::<[u8; 4]>().prop_map(IpAddr::from), any::<[u16; 8]>().prop_map(IpAddr::from)]
}

fn net() -> impl Strategy<Value = IpNet> {
    (ip(), any::<u8>()).prop_map(|(ip, p)| {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        IpNet::new(ip, p % (max + 1)).unwrap()
    })
}

fn text() -> impl Strategy<Value = String> {
    "[a-z0-9.:/-]{0,12}"
}

fn peer() -> impl Strategy<Value = PeerInfo> {
    (
        node_id(),
        text(),
        node_kind(),
        proptest::option::of(any::<[u8; 32]>()),
        ip(),
        proptest::collection::vec(net(), 0..3),
        proptest::collection::vec(candidate(), 0..4),
        any::<bool>(),
        proptest::collection::vec(text(), 0..3),
    )
        .prop_map(
            |(node_id, name, kind, public_key, overlay_addr, allowed_ips, candidates, online, resources)| {
                PeerInfo {
                    node_id,
                    name,
                    kind,
                    public_key: public_key.map(tunnel_core::PublicKey),
                    overlay_addr,
                    allowed_ips,
                    candidates,
                    online,
                    resources,
                }
            },
        )
}

fn resource() -> impl Strategy<Value = ResourceInfo> {
    // The wire says "absent" with an empty string: an empty optional text is `None`.
    let opt = || proptest::option::of("[a-z0-9.:/-]{1,12}");
    (text(), ip(), opt(), any::<u16>(), opt(), node_id(), proptest::collection::vec(text(), 0..3), opt())
        .prop_map(|(name, overlay_addr, target, port, alias, site_id, dns_names, health_check)| {
            ResourceInfo { name, overlay_addr, target, port, alias, site_id, dns_names, health_check }
        })
}

fn relay() -> impl Strategy<Value = RelayInfo> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..8);
    (text(), bytes(), bytes(), proptest::option::of("[a-z0-9.:]{1,12}"))
        .prop_map(|(addr, key_pin, capability, tcp_addr)| RelayInfo { addr, key_pin, capability, tcp_addr })
}

fn network_map() -> impl Strategy<Value = NetworkMap> {
    (
        (any::<u64>(), node_id(), text(), node_kind(), ip(), net(), text(), any::<u16>()),
        proptest::collection::vec(peer(), 0..4),
        proptest::collection::vec(resource(), 0..4),
        proptest::collection::vec(relay(), 0..2),
        proptest::option::of("[a-z0-9.:]{1,12}"),
    )
        .prop_map(
            |(
                (version, node_id, node_name, kind, overlay_addr, overlay_cidr, dns_zone, mtu),
                peers,
                res,
                relays,
                stun_addr,
            )| {
                NetworkMap {
                    version,
                    node_id,
                    node_name,
                    kind,
                    overlay_addr,
                    overlay_cidr,
                    dns_zone,
                    mtu,
                    peers: peers.into_iter().map(|p| (p.node_id.clone(), p)).collect(),
                    resources: res.into_iter().map(|r| (r.name.clone(), r)).collect(),
                    relays,
                    stun_addr,
                }
            },
        )
}

fn delta() -> impl Strategy<Value = MapDelta> {
    (
        any::<u64>(),
        any::<u64>(),
        proptest::collection::vec(peer(), 0..3),
        proptest::collection::vec(node_id(), 0..3),
        proptest::collection::vec(resource(), 0..3),
        proptest::collection::vec(text(), 0..3),
        proptest::option::of(proptest::collection::vec(relay(), 0..2)),
    )
        .prop_map(
            |(
                base_version,
                version,
                upsert_peers,
                remove_peers,
                upsert_resources,
                remove_resources,
                relays,
            )| {
                MapDelta {
                    base_version,
                    version,
                    upsert_peers,
                    remove_peers,
                    upsert_resources,
                    remove_resources,
                    relays,
                }
            },
        )
}

fn health() -> impl Strategy<Value = TargetHealth> {
    let state =
        prop_oneof![Just(HealthState::Unknown), Just(HealthState::Healthy), Just(HealthState::Unhealthy)];
    (text(), state, text(), any::<i64>()).prop_map(|(resource, state, detail, checked_ms)| TargetHealth {
        resource,
        state,
        detail,
        checked_ms,
    })
}

proptest! {
    #[test]
    fn maps_round_trip(m in network_map()) {
        prop_assert_eq!(map_from_pb(&map_to_pb(&m)).unwrap(), m);
    }

    #[test]
    fn deltas_round_trip(d in delta()) {
        prop_assert_eq!(delta_from_pb(&delta_to_pb(&d)).unwrap(), d);
    }

    #[test]
    fn candidates_and_health_round_trip(c in candidate(), h in health(), k in node_kind()) {
        prop_assert_eq!(candidate_from_pb(&candidate_to_pb(&c)), Some(c));
        prop_assert_eq!(health_from_pb(&health_to_pb(&h)), h);
        prop_assert_eq!(kind_from_pb(kind_to_pb(k) as i32), Some(k));
    }
}

#[test]
fn what_a_node_cannot_use_is_refused_or_left_out() {
    let c = |addr: &str, kind: i32| pb::Candidate { addr: addr.into(), kind };
    let lan = pb::CandidateKind::Lan as i32;
    // Host names, missing ports, unspecified and future kinds: left out, not guessed.
    assert_eq!(candidate_from_pb(&c("relay.example.com:5", lan)), None);
    assert_eq!(candidate_from_pb(&c("192.0.2.1", lan)), None);
    assert_eq!(candidate_from_pb(&c("192.0.2.1:5", 0)), None);
    assert_eq!(candidate_from_pb(&c("192.0.2.1:5", 99)), None);
    assert_eq!(
        candidate_from_pb(&c("[2001:db8::1]:5", lan)),
        Some(Candidate { addr: "[2001:db8::1]:5".parse().unwrap(), kind: CandidateKind::Lan })
    );
    // A peer keeps its usable candidates when one is not.
    let mut p = peer_to_pb(&PeerInfo {
        node_id: NodeId::from_random([1; 10]),
        name: "a".into(),
        kind: NodeKind::Site,
        public_key: None,
        overlay_addr: "100.96.0.1".parse().unwrap(),
        allowed_ips: vec!["100.96.0.1/32".parse().unwrap(), "fd00::1/128".parse().unwrap()],
        candidates: vec![Candidate { addr: "192.0.2.1:5".parse().unwrap(), kind: CandidateKind::Lan }],
        online: true,
        resources: vec![],
    });
    p.candidates.push(c("not an address", lan));
    assert_eq!(peer_from_pb(&p).unwrap().candidates.len(), 1);
    // What the model cannot hold makes the message malformed.
    let mut bad = p.clone();
    bad.public_key = vec![1; 31];
    assert_eq!(peer_from_pb(&bad), Err(Malformed("public key")));
    let mut bad = p.clone();
    bad.kind = 0;
    assert_eq!(peer_from_pb(&bad), Err(Malformed("node kind")));
    let mut bad = p.clone();
    bad.node_id = "Not An Id".into();
    assert_eq!(peer_from_pb(&bad), Err(Malformed("node id")));
    let mut bad = p.clone();
    bad.overlay_addr = "100.96.0".into();
    assert_eq!(peer_from_pb(&bad), Err(Malformed("peer overlay address")));
    // A bare address is its host network, as the data plane always read it.
    let mut bare = p.clone();
    bare.allowed_ips.push("100.96.0.9".into());
    assert_eq!(peer_from_pb(&bare).unwrap().allowed_ips.last(), Some(&"100.96.0.9/32".parse().unwrap()));
    let mut bad = p;
    bad.allowed_ips.push("100.96.0.9/33".into());
    assert_eq!(peer_from_pb(&bad), Err(Malformed("peer allowed IP")));
    let r = pb::Resource {
        port: 70_000,
        overlay_addr: "100.96.0.10".into(),
        site_id: NodeId::from_random([2; 10]).to_string(),
        ..Default::default()
    };
    assert_eq!(resource_from_pb(&r), Err(Malformed("resource port")));
    // Health states this version does not know read as unknown.
    assert_eq!(health_state_from_pb(42), HealthState::Unknown);
}
