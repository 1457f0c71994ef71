//! Private DNS answering (core/src/dns.rs): `PrivateZone::answer` on any datagram, for a zone with
//! resources, aliases and a reverse zone, and for a map with an empty zone name.
//!
//! Checks: no panic; every reply is a DNS response that parses, carries the query's id, and for a
//! parsed query echoes its question.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;
use tunnel_core::dns::{DnsAction, PrivateZone};
use tunnel_core::map::{NetworkMap, NodeKind, ResourceInfo};
use tunnel_core::NodeId;

fn resource(name: &str, addr: &str, names: &[&str]) -> ResourceInfo {
    ResourceInfo {
        name: name.into(),
        overlay_addr: addr.parse().unwrap_or_else(|_| unreachable!()),
        target: None,
        port: 80,
        alias: names.get(1).map(|s| s.to_string()),
        site_id: NodeId::from_random([1; 10]),
        dns_names: names.iter().map(|s| s.to_string()).collect(),
        health_check: None,
    }
}

fn zones() -> &'static [PrivateZone; 2] {
    static Z: OnceLock<[PrivateZone; 2]> = OnceLock::new();
    Z.get_or_init(|| {
        let mut resources = BTreeMap::new();
        for r in [
            resource("prom", "100.96.0.10", &["prom.tunnel.internal", "prom.private.example.com"]),
            resource("periphery", "100.96.0.11", &["periphery.tunnel.internal", "periphery.private.example.com"]),
            // An address the zone has no A record for (the model holds both families).
            resource("bad", "fd00::9", &["bad.tunnel.internal"]),
            resource("upper", "100.96.1.1", &["UPPER.Tunnel.Internal."]),
        ] {
            resources.insert(r.name.clone(), r);
        }
        let map = NetworkMap {
            version: 1,
            node_id: NodeId::from_random([2; 10]),
            node_name: "me".into(),
            kind: NodeKind::Client,
            overlay_addr: "100.96.0.2".parse().unwrap_or_else(|_| unreachable!()),
            overlay_cidr: "100.96.0.0/16".parse().unwrap_or_else(|_| unreachable!()),
            dns_zone: "tunnel.internal".into(),
            mtu: 1280,
            peers: BTreeMap::new(),
            resources,
            relays: vec![],
            stun_addr: None,
        };
        let mut empty = map.clone();
        empty.dns_zone = String::new();
        // An overlay with no IPv4 reverse zone.
        empty.overlay_cidr = "fd00::/8".parse().unwrap_or_else(|_| unreachable!());
        [PrivateZone::from_map(&map), PrivateZone::from_map(&empty)]
    })
}

fuzz_target!(|data: &[u8]| {
    let query = Message::from_vec(data).ok();
    for zone in zones() {
        match zone.answer(data) {
            DnsAction::Reply(bytes) => {
                let m = Message::from_vec(&bytes)
                    .unwrap_or_else(|e| panic!("our reply does not parse: {e}; reply {bytes:02x?}"));
                assert!(data.len() >= 2);
                assert_eq!(m.metadata.id, u16::from_be_bytes([data[0], data[1]]), "reply id");
                assert_eq!(m.metadata.message_type, MessageType::Response);
                if let Some(q) = &query {
                    assert_eq!(m.queries, q.queries, "reply does not echo the question");
                }
            }
            DnsAction::Forward => assert!(query.is_some(), "forwarding something that is not a query"),
            DnsAction::Drop => {}
        }
        // Names from the input go through lookup too.
        if let Ok(s) = std::str::from_utf8(data) {
            let _ = zone.lookup(s);
        }
    }
});
