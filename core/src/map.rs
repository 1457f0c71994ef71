//! The network map as a node sees it, and the versioned deltas that keep it current.
//!
//! The server sends one full map when a session starts and then deltas. Each delta names the version it
//! applies to; a node that holds another version must not guess, it asks for a full map
//! ([`MapError::Gap`]). Maps are kept in `BTreeMap`s so their iteration order, their serialised form on
//! disk and every diff are deterministic.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::token::NodeId;
use crate::PublicKey;

/// Site agent or machine client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// A site agent: hosts resources.
    Site,
    /// A machine client: uses resources.
    Client,
}

impl NodeKind {
    /// `site` or `client`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Site => "site",
            NodeKind::Client => "client",
        }
    }
}

/// How a node learned one of its candidate addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CandidateKind {
    /// On the node's own network interfaces.
    Lan,
    /// The public address a STUN server saw.
    Reflexive,
    /// Configured by the operator: a forwarded port, a hostPort.
    Advertised,
}

impl CandidateKind {
    /// `lan`, `reflexive` or `advertised`.
    pub fn as_str(self) -> &'static str {
        match self {
            CandidateKind::Lan => "lan",
            CandidateKind::Reflexive => "reflexive",
            CandidateKind::Advertised => "advertised",
        }
    }

    /// The most candidates of this kind a node may report.
    pub fn cap(self) -> usize {
        match self {
            CandidateKind::Lan => MAX_CANDIDATES_LAN,
            CandidateKind::Reflexive => MAX_CANDIDATES_REFLEXIVE,
            CandidateKind::Advertised => MAX_CANDIDATES_ADVERTISED,
        }
    }
}

/// The IPv4 address, if `a` is one: inside the tunnel the data plane carries IPv4 today, while the
/// model holds both families.
pub fn ipv4(a: IpAddr) -> Option<std::net::Ipv4Addr> {
    match a {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    }
}

/// The IPv4 network, if `n` is one (see [`ipv4`]).
pub fn ipv4_net(n: IpNet) -> Option<ipnet::Ipv4Net> {
    match n {
        IpNet::V4(v4) => Some(v4),
        IpNet::V6(_) => None,
    }
}

/// Where a peer may be reached, and how the address was learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Candidate {
    /// `IP:PORT` (on disk and on the wire; IPv6 in brackets).
    pub addr: std::net::SocketAddr,
    pub kind: CandidateKind,
}

impl Candidate {
    pub fn new(addr: std::net::SocketAddr, kind: CandidateKind) -> Candidate {
        Candidate { addr, kind }
    }
}

/// The most candidates of one kind a node may report (and a peer will probe). LAN covers every
/// interface address of both families on a host with a few bridges; reflexive one per family and NAT
/// mapping; advertised a few forwarded ports.
pub const MAX_CANDIDATES_LAN: usize = 16;
/// See [`MAX_CANDIDATES_LAN`].
pub const MAX_CANDIDATES_REFLEXIVE: usize = 4;
/// See [`MAX_CANDIDATES_LAN`].
pub const MAX_CANDIDATES_ADVERTISED: usize = 4;

/// Whether `addr` may be a candidate at all: a unicast address another host could reach, and a port.
/// Loopback, unspecified, multicast, broadcast, link-local (both families) and documentation-free
/// special cases are refused, so a compromised node cannot turn its peers' probes (ten a second to
/// each candidate) into a flood at their own loopback, their link or a multicast group.
pub fn candidate_addr_allowed(addr: std::net::SocketAddr) -> bool {
    use std::net::IpAddr;
    if addr.port() == 0 {
        return false;
    }
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_link_local()
                || v4.octets()[0] == 0
                || v4.octets()[0] >= 240)
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() || (first & 0xffc0) == 0xfe80)
        }
    }
}

/// `list` without refused addresses ([`candidate_addr_allowed`], and `refuse` for the caller's own
/// rule, e.g. the overlay), duplicates or more than the cap of each kind (first ones kept), and how
/// many were dropped.
///
/// `allow_loopback` keeps loopback candidates: right only for a node on the server's own host (the
/// single-host demo, in-process tests), whose peers on that host can reach them.
pub fn bound_candidates(
    list: impl IntoIterator<Item = Candidate>,
    allow_loopback: bool,
    refuse: impl Fn(std::net::IpAddr) -> bool,
) -> (Vec<Candidate>, usize) {
    let mut kept: Vec<Candidate> = Vec::new();
    let mut dropped = 0;
    for c in list {
        let a = c.addr;
        let ok = (candidate_addr_allowed(a)
            || (allow_loopback && a.port() != 0 && a.ip().to_canonical().is_loopback()))
            && !refuse(a.ip());
        let room = kept.iter().filter(|k| k.kind == c.kind).count() < c.kind.cap();
        if ok && room && !kept.contains(&c) {
            kept.push(c);
        } else {
            dropped += 1;
        }
    }
    (kept, dropped)
}

/// A peer this node may exchange tunnel traffic with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer's node id.
    pub node_id: NodeId,
    /// The peer's name.
    pub name: String,
    /// Site or client.
    pub kind: NodeKind,
    /// X25519 public key, absent until the peer first joins.
    pub public_key: Option<PublicKey>,
    /// The peer's own overlay address.
    pub overlay_addr: IpAddr,
    /// Inner addresses (`ADDR/32`, or `/128`) this peer may send from and be sent to.
    pub allowed_ips: Vec<IpNet>,
    /// Where the peer may be reached.
    pub candidates: Vec<Candidate>,
    /// Whether the peer holds a control session now (a hint only).
    pub online: bool,
    /// For a client seen by a site: the resources on that site it may use.
    #[serde(default)]
    pub resources: Vec<String>,
}

/// A resource this node hosts (site) or may use (client).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceInfo {
    /// Unique resource name.
    pub name: String,
    /// The overlay address it answers on.
    pub overlay_addr: IpAddr,
    /// `HOST:PORT` to re-dial; only known to the hosting site.
    pub target: Option<String>,
    /// The port it answers on.
    pub port: u16,
    /// Optional alias FQDN.
    pub alias: Option<String>,
    /// The hosting site's node id.
    pub site_id: NodeId,
    /// Every DNS name it answers as.
    pub dns_names: Vec<String>,
    /// How the hosting site checks the target (`http:/PATH`; `None`: TCP connect).
    #[serde(default)]
    pub health_check: Option<String>,
}

/// A target's health as its site sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// Not checked (yet), or the site is not connected.
    #[default]
    Unknown,
    /// The last check passed.
    Healthy,
    /// The last check failed.
    Unhealthy,
}

impl HealthState {
    /// `healthy`, `unhealthy` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Unknown => "unknown",
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
        }
    }
}

/// One resource's last check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetHealth {
    /// The resource.
    pub resource: String,
    /// Result of the last check.
    pub state: HealthState,
    /// What the check saw.
    pub detail: String,
    /// Unix ms of the last check.
    pub checked_ms: i64,
}

/// A relay the node may use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// `HOST:PORT` of the QUIC listener.
    pub addr: String,
    /// SHA-256 of the relay's TLS SPKI.
    pub key_pin: Vec<u8>,
    /// Signed capability.
    pub capability: Vec<u8>,
    /// `HOST:PORT` of the TCP/TLS listener.
    pub tcp_addr: Option<String>,
}

/// The whole network as one node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkMap {
    /// Version of this view; deltas name the version they apply to.
    pub version: u64,
    /// This node.
    pub node_id: NodeId,
    /// This node's name.
    pub node_name: String,
    /// Site or client.
    pub kind: NodeKind,
    /// This node's overlay address.
    pub overlay_addr: IpAddr,
    /// The whole overlay CIDR.
    pub overlay_cidr: IpNet,
    /// The private DNS zone.
    pub dns_zone: String,
    /// Inner MTU.
    pub mtu: u16,
    /// Peers by node id.
    pub peers: BTreeMap<NodeId, PeerInfo>,
    /// Resources by name.
    pub resources: BTreeMap<String, ResourceInfo>,
    /// Relays.
    pub relays: Vec<RelayInfo>,
    /// `HOST:PORT` of the server's STUN responder.
    #[serde(default)]
    pub stun_addr: Option<String>,
}

/// A change to a [`NetworkMap`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapDelta {
    /// The version this delta applies to.
    pub base_version: u64,
    /// The version after applying it.
    pub version: u64,
    /// Peers added or changed (whole entries).
    pub upsert_peers: Vec<PeerInfo>,
    /// Peers removed.
    pub remove_peers: Vec<NodeId>,
    /// Resources added or changed (whole entries).
    pub upsert_resources: Vec<ResourceInfo>,
    /// Resources removed, by name.
    pub remove_resources: Vec<String>,
    /// A new relay list, when it changed.
    pub relays: Option<Vec<RelayInfo>>,
}

/// Why a delta was not applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MapError {
    /// The delta is for another version: ask the server for a full map.
    #[error("delta for version {base} does not apply to map version {have}; a full map is needed")]
    Gap {
        /// Version the node holds.
        have: u64,
        /// Version the delta applies to.
        base: u64,
    },
}

impl NetworkMap {
    /// Applies a delta in place, or leaves the map untouched and reports a gap.
    pub fn apply(&mut self, delta: MapDelta) -> Result<(), MapError> {
        if delta.base_version != self.version || delta.version <= delta.base_version {
            return Err(MapError::Gap { have: self.version, base: delta.base_version });
        }
        for id in delta.remove_peers {
            self.peers.remove(&id);
        }
        for p in delta.upsert_peers {
            self.peers.insert(p.node_id.clone(), p);
        }
        for name in delta.remove_resources {
            self.resources.remove(&name);
        }
        for r in delta.upsert_resources {
            self.resources.insert(r.name.clone(), r);
        }
        if let Some(relays) = delta.relays {
            self.relays = relays;
        }
        self.version = delta.version;
        Ok(())
    }

    /// The resource answering as `name` (case-insensitive, trailing dot ignored), if any.
    pub fn resource_by_dns_name(&self, name: &str) -> Option<&ResourceInfo> {
        let name = name.strip_suffix('.').unwrap_or(name);
        self.resources.values().find(|r| r.dns_names.iter().any(|n| n.eq_ignore_ascii_case(name)))
    }
}

/// What changed between two maps, entry by entry: the input for reconciling installed state.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MapDiff<'a> {
    /// Peers only in the new map.
    pub added_peers: Vec<&'a PeerInfo>,
    /// Peers in both maps whose entries differ.
    pub changed_peers: Vec<&'a PeerInfo>,
    /// Peers only in the old map.
    pub removed_peers: Vec<NodeId>,
    /// Resources added or changed.
    pub upserted_resources: Vec<&'a ResourceInfo>,
    /// Resources only in the old map.
    pub removed_resources: Vec<String>,
}

impl MapDiff<'_> {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added_peers.is_empty()
            && self.changed_peers.is_empty()
            && self.removed_peers.is_empty()
            && self.upserted_resources.is_empty()
            && self.removed_resources.is_empty()
    }
}

/// The entry-by-entry difference from `old` to `new`.
pub fn diff<'a>(old: &NetworkMap, new: &'a NetworkMap) -> MapDiff<'a> {
    let mut d = MapDiff::default();
    for (id, p) in &new.peers {
        match old.peers.get(id) {
            None => d.added_peers.push(p),
            Some(o) if o != p => d.changed_peers.push(p),
            Some(_) => {}
        }
    }
    d.removed_peers = old.peers.keys().filter(|id| !new.peers.contains_key(*id)).cloned().collect();
    for (name, r) in &new.resources {
        if old.resources.get(name) != Some(r) {
            d.upserted_resources.push(r);
        }
    }
    d.removed_resources = old.resources.keys().filter(|n| !new.resources.contains_key(*n)).cloned().collect();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_bounded_and_only_unicast() {
        let c = |addr: &str, kind| Candidate { addr: addr.parse().unwrap(), kind };
        use CandidateKind::{Lan, Reflexive};
        let refused = [
            "127.0.0.1:5",
            "0.0.0.0:5",
            "224.0.0.1:5",
            "255.255.255.255:5",
            "169.254.1.1:5",
            "[::1]:5",
            "[::]:5",
            "[ff02::1]:5",
            "[fe80::1]:5",
            "[::ffff:127.0.0.1]:5",
            "192.0.2.1:0",
            "240.0.0.1:5",
        ];
        for a in refused {
            assert!(!candidate_addr_allowed(a.parse().unwrap()), "{a} must be refused");
        }
        for a in ["192.0.2.1:5", "10.1.0.2:51820", "[2001:db8::1]:5", "[fd00::1]:5", "100.64.0.1:9"] {
            assert!(candidate_addr_allowed(a.parse().unwrap()), "{a} must be allowed");
        }
        let mut list: Vec<Candidate> = (0..40).map(|i| c(&format!("10.0.0.{i}:1"), Lan)).collect();
        list.push(c("127.0.0.1:1", Lan));
        list.push(c("100.96.0.9:1", Reflexive));
        list.push(c("192.0.2.1:1", Reflexive));
        list.push(c("192.0.2.1:1", Reflexive));
        let overlay: ipnet::Ipv4Net = "100.96.0.0/16".parse().unwrap();
        let (kept, dropped) = bound_candidates(list, false, |ip| match ip {
            std::net::IpAddr::V4(v4) => overlay.contains(&v4),
            _ => false,
        });
        assert_eq!(kept.iter().filter(|k| k.kind == Lan).count(), MAX_CANDIDATES_LAN);
        assert_eq!(
            kept.iter().filter(|k| k.kind == Reflexive).collect::<Vec<_>>(),
            vec![&c("192.0.2.1:1", Reflexive)]
        );
        // (A kind this version does not know never gets here: tunnel-wire leaves it out.)
        assert_eq!(dropped, 40 - MAX_CANDIDATES_LAN + 1 + 1 + 1);
    }
    use proptest::prelude::*;

    fn id(n: u8) -> NodeId {
        NodeId::from_random([n; 10])
    }

    fn peer(n: u8, addr: &str) -> PeerInfo {
        PeerInfo {
            node_id: id(n),
            name: format!("p{n}"),
            kind: NodeKind::Site,
            public_key: Some(crate::PublicKey([n; 32])),
            overlay_addr: addr.parse().unwrap(),
            allowed_ips: vec![format!("{addr}/32").parse().unwrap()],
            candidates: vec![],
            online: true,
            resources: vec![],
        }
    }

    fn map() -> NetworkMap {
        NetworkMap {
            version: 1,
            node_id: id(0),
            node_name: "me".into(),
            kind: NodeKind::Client,
            overlay_addr: "100.96.0.2".parse().unwrap(),
            overlay_cidr: "100.96.0.0/16".parse().unwrap(),
            dns_zone: "tunnel.internal".into(),
            mtu: 1280,
            peers: BTreeMap::new(),
            resources: BTreeMap::new(),
            relays: vec![],
            stun_addr: None,
        }
    }

    /// The cached `map.json` of a node from before the model was typed (every address a string)
    /// loads as it is, and saves back in the same shape: an upgraded node starts from its cache.
    #[test]
    fn a_map_cached_by_an_older_node_still_loads() {
        let old = r#"{"version":3,"node_id":"n1","node_name":"laptop","kind":"client",
            "overlay_addr":"100.96.0.2","overlay_cidr":"100.96.0.0/16","dns_zone":"tunnel.internal",
            "mtu":1280,"peers":{"n2":{"node_id":"n2","name":"home","kind":"site","public_key":null,
            "overlay_addr":"100.96.0.1","allowed_ips":["100.96.0.1/32","100.96.0.10/32"],
            "candidates":[{"addr":"192.0.2.7:51820","kind":"lan"},{"addr":"[2001:db8::7]:51820","kind":"reflexive"}],
            "online":true}},"resources":{"web":{"name":"web","overlay_addr":"100.96.0.10","target":null,
            "port":80,"alias":null,"site_id":"n2","dns_names":["web.tunnel.internal"]}},"relays":[],
            "stun_addr":null}"#;
        let m: NetworkMap = serde_json::from_str(old).unwrap();
        let home = &m.peers[&"n2".parse().unwrap()];
        assert_eq!(ipv4(m.overlay_addr), Some(std::net::Ipv4Addr::new(100, 96, 0, 2)));
        assert_eq!(home.allowed_ips[1], "100.96.0.10/32".parse::<IpNet>().unwrap());
        assert_eq!(home.candidates[1].addr, "[2001:db8::7]:51820".parse::<std::net::SocketAddr>().unwrap());
        assert_eq!(home.candidates[1].kind, CandidateKind::Reflexive);
        let again: serde_json::Value = serde_json::to_value(&m).unwrap();
        assert_eq!(again["peers"]["n2"]["allowed_ips"][0], "100.96.0.1/32");
        assert_eq!(again["resources"]["web"]["overlay_addr"], "100.96.0.10");
        assert_eq!(again["peers"]["n2"]["candidates"][1]["addr"], "[2001:db8::7]:51820");
        assert_eq!(serde_json::from_value::<NetworkMap>(again).unwrap(), m);
    }

    #[test]
    fn apply_in_order_and_refuse_gaps() {
        let mut m = map();
        let d = MapDelta {
            base_version: 1,
            version: 2,
            upsert_peers: vec![peer(1, "100.96.0.3")],
            ..Default::default()
        };
        m.apply(d).unwrap();
        assert_eq!(m.version, 2);
        assert_eq!(m.peers.len(), 1);
        let before = m.clone();
        let gap = MapDelta { base_version: 3, version: 4, remove_peers: vec![id(1)], ..Default::default() };
        assert_eq!(m.apply(gap), Err(MapError::Gap { have: 2, base: 3 }));
        assert_eq!(m, before, "a refused delta leaves the map untouched");
        m.apply(MapDelta { base_version: 2, version: 3, remove_peers: vec![id(1)], ..Default::default() })
            .unwrap();
        assert!(m.peers.is_empty());
    }

    #[test]
    fn diff_reports_each_kind_of_change() {
        let mut a = map();
        a.peers.insert(id(1), peer(1, "100.96.0.3"));
        a.peers.insert(id(2), peer(2, "100.96.0.4"));
        let mut b = a.clone();
        b.peers.remove(&id(2));
        b.peers.insert(id(3), peer(3, "100.96.0.5"));
        b.peers
            .get_mut(&id(1))
            .unwrap()
            .candidates
            .push(Candidate { addr: "192.0.2.1:5".parse().unwrap(), kind: CandidateKind::Reflexive });
        let d = diff(&a, &b);
        assert_eq!(d.added_peers.iter().map(|p| p.node_id.clone()).collect::<Vec<_>>(), vec![id(3)]);
        assert_eq!(d.changed_peers.iter().map(|p| p.node_id.clone()).collect::<Vec<_>>(), vec![id(1)]);
        assert_eq!(d.removed_peers, vec![id(2)]);
        assert!(diff(&b, &b).is_empty());
    }

    proptest! {
        /// Applying "remove everything old, upsert everything new" always yields the new map's entries.
        #[test]
        fn delta_from_diff_reaches_target(olds in proptest::collection::btree_set(0u8..20, 0..10),
                                          news in proptest::collection::btree_set(0u8..20, 0..10)) {
            let mut a = map();
            for n in &olds { a.peers.insert(id(*n), peer(*n, "100.96.0.9")); }
            let mut b = map();
            b.version = 7;
            for n in &news { b.peers.insert(id(*n), peer(*n, "100.96.0.10")); }
            let d = diff(&a, &b);
            let delta = MapDelta {
                base_version: a.version, version: 7,
                upsert_peers: d.added_peers.iter().chain(d.changed_peers.iter()).map(|p| (*p).clone()).collect(),
                remove_peers: d.removed_peers.clone(),
                ..Default::default()
            };
            a.apply(delta).unwrap();
            prop_assert_eq!(a, b);
        }
    }
}
