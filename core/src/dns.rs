//! Answering DNS for the private zone, without I/O.
//!
//! [`PrivateZone::answer`] reads one query in wire format and either answers it (a resource name or
//! alias: its A record; another type for such a name: an empty NOERROR; an unknown name inside the
//! zone: NXDOMAIN) or says it belongs upstream. Names under an alias's parent domain that are not
//! aliases themselves go upstream: `private.example.com` may well be a public zone too.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::str::FromStr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::map::NetworkMap;

/// TTL of private answers: short, because resources move and grants are revoked.
pub const TTL: u32 = 30;

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum DnsAction {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not ours: forward the query upstream unchanged.
    Forward,
    /// Not even a DNS header: drop it.
    Drop,
}

/// The names a node may resolve privately.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrivateZone {
    zone: String,
    records: BTreeMap<String, Ipv4Addr>,
    /// Overlay address -> its first name, for PTR answers.
    reverse: BTreeMap<Ipv4Addr, String>,
    /// The overlay, whose reverse zone is answered here (never leaked upstream).
    overlay: Option<ipnet::Ipv4Net>,
}

fn canon(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl PrivateZone {
    /// The zone and records of a network map.
    pub fn from_map(map: &NetworkMap) -> Self {
        let mut records = BTreeMap::new();
        let mut reverse = BTreeMap::new();
        for r in map.resources.values() {
            if let Some(addr) = crate::map::ipv4(r.overlay_addr) {
                for n in &r.dns_names {
                    records.insert(canon(n), addr);
                }
                if let Some(first) = r.dns_names.first() {
                    reverse.insert(addr, canon(first));
                }
            }
        }
        PrivateZone {
            zone: canon(&map.dns_zone),
            records,
            reverse,
            overlay: crate::map::ipv4_net(map.overlay_cidr),
        }
    }

    /// The zone name.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// Domains a resolver should route to us: the zone and the parent domain of each alias.
    pub fn routing_domains(&self) -> Vec<String> {
        let mut v = vec![self.zone.clone()];
        for name in self.records.keys() {
            if name != &self.zone && !name.ends_with(&format!(".{}", self.zone)) {
                if let Some((_, parent)) = name.split_once('.') {
                    v.push(parent.to_owned());
                }
            }
        }
        v.sort();
        v.dedup();
        v
    }

    /// The address a private name resolves to.
    pub fn lookup(&self, name: &str) -> Option<Ipv4Addr> {
        self.records.get(&canon(name)).copied()
    }

    fn in_zone(&self, name: &str) -> bool {
        !self.zone.is_empty() && (name == self.zone || name.ends_with(&format!(".{}", self.zone)))
    }

    /// Answers a query in wire format, or says where it goes.
    pub fn answer(&self, query: &[u8]) -> DnsAction {
        let msg = match Message::from_vec(query) {
            Ok(m) => m,
            Err(_) if query.len() >= 12 => {
                let id = u16::from_be_bytes([query[0], query[1]]);
                return reply(Message::error_msg(id, OpCode::Query, ResponseCode::FormErr));
            }
            Err(_) => return DnsAction::Drop,
        };
        if msg.metadata.message_type != MessageType::Query {
            return DnsAction::Drop;
        }
        if msg.metadata.op_code != OpCode::Query || msg.queries.len() != 1 {
            let mut m = Message::error_msg(msg.metadata.id, msg.metadata.op_code, ResponseCode::NotImp);
            m.queries = msg.queries.clone();
            return reply(m);
        }
        let q = &msg.queries[0];
        let name = canon(&q.name().to_ascii());
        if let Some(ip) = reverse_v4(&name) {
            if self.overlay.is_some_and(|o| o.contains(&ip)) {
                return self.answer_ptr(&msg, ip);
            }
            return DnsAction::Forward;
        }
        let addr = self.records.get(&name).copied();
        if addr.is_none() && !self.in_zone(&name) {
            return DnsAction::Forward;
        }
        let mut m = Message::response(msg.metadata.id, OpCode::Query);
        m.metadata.authoritative = true;
        m.metadata.recursion_desired = msg.metadata.recursion_desired;
        m.metadata.recursion_available = true;
        m.queries = msg.queries.clone();
        match (addr, q.query_type()) {
            (Some(a), RecordType::A) => {
                m.answers.push(Record::from_rdata(q.name().clone(), TTL, RData::A(A(a))));
            }
            (Some(_), _) => {
                // The name exists, with no record of this type: NOERROR, empty (NODATA).
                m.authorities.push(self.soa());
            }
            (None, _) if name == self.zone => m.authorities.push(self.soa()),
            (None, _) => {
                m.metadata.response_code = ResponseCode::NXDomain;
                m.authorities.push(self.soa());
            }
        }
        reply(m)
    }

    /// Reverse lookups inside the overlay: the resource's name, or NXDOMAIN. Never forwarded, so
    /// overlay addresses do not leak to outside resolvers (and `ping` does not wait on them).
    fn answer_ptr(&self, msg: &Message, ip: Ipv4Addr) -> DnsAction {
        let q = &msg.queries[0];
        let mut m = Message::response(msg.metadata.id, OpCode::Query);
        m.metadata.authoritative = true;
        m.metadata.recursion_desired = msg.metadata.recursion_desired;
        m.metadata.recursion_available = true;
        m.queries = msg.queries.clone();
        match (self.reverse.get(&ip), q.query_type()) {
            (Some(name), RecordType::PTR) => {
                if let Ok(target) = Name::from_str(&format!("{name}.")) {
                    m.answers.push(Record::from_rdata(q.name().clone(), TTL, RData::PTR(PTR(target))));
                }
            }
            (Some(_), _) => m.authorities.push(self.soa()),
            (None, _) => {
                m.metadata.response_code = ResponseCode::NXDomain;
                m.authorities.push(self.soa());
            }
        }
        reply(m)
    }

    fn soa(&self) -> Record {
        let zone = Name::from_str(&format!("{}.", self.zone)).unwrap_or_else(|_| Name::root());
        let mname = Name::from_str(&format!("ns.{}.", self.zone)).unwrap_or_else(|_| Name::root());
        let rname = Name::from_str(&format!("hostmaster.{}.", self.zone)).unwrap_or_else(|_| Name::root());
        Record::from_rdata(zone, TTL, RData::SOA(SOA::new(mname, rname, 1, 3600, 600, 86400, TTL)))
    }
}

/// The IPv4 address of a name like `3.0.96.100.in-addr.arpa`.
fn reverse_v4(name: &str) -> Option<Ipv4Addr> {
    let rest = name.strip_suffix(".in-addr.arpa")?;
    let mut octets: Vec<u8> = rest.split('.').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    if octets.len() != 4 {
        return None;
    }
    octets.reverse();
    Some(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))
}

fn reply(m: Message) -> DnsAction {
    match m.to_vec() {
        Ok(b) => DnsAction::Reply(b),
        Err(_) => DnsAction::Drop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::{NodeKind, ResourceInfo};
    use crate::NodeId;
    use hickory_proto::op::Query;
    use proptest::prelude::*;

    fn zone() -> PrivateZone {
        let mut resources = BTreeMap::new();
        resources.insert(
            "prom".to_string(),
            ResourceInfo {
                name: "prom".into(),
                overlay_addr: "100.96.0.10".parse().unwrap(),
                target: None,
                port: 9090,
                alias: Some("prom.private.example.com".into()),
                site_id: NodeId::from_random([1; 10]),
                dns_names: vec!["prom.tunnel.internal".into(), "prom.private.example.com".into()],
                health_check: None,
            },
        );
        PrivateZone::from_map(&NetworkMap {
            version: 1,
            node_id: NodeId::from_random([2; 10]),
            node_name: "me".into(),
            kind: NodeKind::Client,
            overlay_addr: "100.96.0.2".parse().unwrap(),
            overlay_cidr: "100.96.0.0/16".parse().unwrap(),
            dns_zone: "tunnel.internal".into(),
            mtu: 1280,
            peers: BTreeMap::new(),
            resources,
            relays: vec![],
            stun_addr: None,
        })
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn ask(name: &str, t: RecordType) -> Message {
        match zone().answer(&query(name, t)) {
            DnsAction::Reply(b) => Message::from_vec(&b).unwrap(),
            other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn answers_names_aliases_and_refuses_the_rest_of_the_zone() {
        for name in ["prom.tunnel.internal.", "PROM.Tunnel.Internal.", "prom.private.example.com."] {
            let m = ask(name, RecordType::A);
            assert_eq!(m.metadata.id, 4242);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            assert_eq!(m.answers.len(), 1, "{name}");
            assert_eq!(m.answers[0].data, RData::A(A("100.96.0.10".parse().unwrap())));
        }
        let aaaa = ask("prom.tunnel.internal.", RecordType::AAAA);
        assert_eq!((aaaa.metadata.response_code, aaaa.answers.len()), (ResponseCode::NoError, 0));
        let nx = ask("nope.tunnel.internal.", RecordType::A);
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(zone().answer(&query("example.org.", RecordType::A)), DnsAction::Forward);
        assert_eq!(zone().answer(&query("www.private.example.com.", RecordType::A)), DnsAction::Forward);
        assert_eq!(zone().routing_domains(), vec!["private.example.com", "tunnel.internal"]);
        let ptr = ask("10.0.96.100.in-addr.arpa.", RecordType::PTR);
        assert_eq!(ptr.answers[0].data, RData::PTR(PTR(Name::from_str("prom.tunnel.internal.").unwrap())));
        let unknown = ask("99.0.96.100.in-addr.arpa.", RecordType::PTR);
        assert_eq!(
            unknown.metadata.response_code,
            ResponseCode::NXDomain,
            "overlay reverse lookups never leak"
        );
        assert_eq!(zone().answer(&query("1.2.0.192.in-addr.arpa.", RecordType::PTR)), DnsAction::Forward);
    }

    #[test]
    fn malformed_queries() {
        assert_eq!(zone().answer(b"short"), DnsAction::Drop);
        match zone().answer(&[0xAB, 0xCD, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xFF]) {
            DnsAction::Reply(b) => {
                let m = Message::from_vec(&b).unwrap();
                assert_eq!((m.metadata.id, m.metadata.response_code), (0xABCD, ResponseCode::FormErr));
            }
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = zone().answer(&data);
        }
    }
}
