//! The one conversion between the core's model ([`tunnel_core::map`]) and the `tunnel.v1` wire
//! types: the server encodes with the `*_to_pb` functions, nodes decode with the `*_from_pb` ones,
//! and each pair is tested to round-trip. `tunnel-proto` stays generated code only; rules about what
//! a node may report (bounds, loopback) stay with the server, which applies them after decoding.
//!
//! Decoding is strict about what the model types: a node id, a kind, an overlay address or network
//! (either family), a port or an MTU that does not parse makes the whole message [`Malformed`]. A candidate that is not an `IP:PORT` literal of a known
//! kind is left out (a newer peer's new kind is not an error), as the data plane always ignored it.

#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use tunnel_core::map::{
    Candidate, CandidateKind, HealthState, MapDelta, NetworkMap, NodeKind, PeerInfo, RelayInfo, ResourceInfo,
    TargetHealth,
};
use tunnel_core::{NodeId, PublicKey};
use tunnel_proto::v1 as pb;

/// Why a message from the wire could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {0} from the server")]
pub struct Malformed(pub &'static str);

/// Node kind for the wire.
pub fn kind_to_pb(k: NodeKind) -> pb::NodeKind {
    match k {
        NodeKind::Site => pb::NodeKind::Site,
        NodeKind::Client => pb::NodeKind::Client,
    }
}

/// Node kind from the wire; `None` for unspecified or unknown.
pub fn kind_from_pb(k: i32) -> Option<NodeKind> {
    match pb::NodeKind::try_from(k).ok()? {
        pb::NodeKind::Site => Some(NodeKind::Site),
        pb::NodeKind::Client => Some(NodeKind::Client),
        pb::NodeKind::Unspecified => None,
    }
}

fn kind(k: i32) -> Result<NodeKind, Malformed> {
    kind_from_pb(k).ok_or(Malformed("node kind"))
}

fn id(s: &str) -> Result<NodeId, Malformed> {
    s.parse().map_err(|_| Malformed("node id"))
}

fn addr(s: &str, what: &'static str) -> Result<IpAddr, Malformed> {
    s.parse().map_err(|_| Malformed(what))
}

/// A network (`ADDR/LEN`); a bare address is its host network (`/32`, `/128`), as the data plane
/// always read allowed IPs.
fn net(s: &str, what: &'static str) -> Result<IpNet, Malformed> {
    s.parse().or_else(|_| s.parse::<IpAddr>().map(IpNet::from)).map_err(|_| Malformed(what))
}

/// Candidate kind for the wire.
pub fn candidate_kind_to_pb(k: CandidateKind) -> pb::CandidateKind {
    match k {
        CandidateKind::Lan => pb::CandidateKind::Lan,
        CandidateKind::Reflexive => pb::CandidateKind::Reflexive,
        CandidateKind::Advertised => pb::CandidateKind::Advertised,
    }
}

/// Candidate kind from the wire; `None` for unspecified or one this version does not know.
pub fn candidate_kind_from_pb(k: i32) -> Option<CandidateKind> {
    match pb::CandidateKind::try_from(k).ok()? {
        pb::CandidateKind::Lan => Some(CandidateKind::Lan),
        pb::CandidateKind::Reflexive => Some(CandidateKind::Reflexive),
        pb::CandidateKind::Advertised => Some(CandidateKind::Advertised),
        pb::CandidateKind::Unspecified => None,
    }
}

/// A candidate for the wire.
pub fn candidate_to_pb(c: &Candidate) -> pb::Candidate {
    pb::Candidate { addr: c.addr.to_string(), kind: candidate_kind_to_pb(c.kind) as i32 }
}

/// A candidate from the wire: only an `IP:PORT` literal (a peer cannot make others dial host names)
/// of a known kind.
pub fn candidate_from_pb(c: &pb::Candidate) -> Option<Candidate> {
    let kind = candidate_kind_from_pb(c.kind)?;
    let addr: SocketAddr = c.addr.parse().ok()?;
    Some(Candidate { addr, kind })
}

/// Health state for the wire.
pub fn health_state_to_pb(s: HealthState) -> pb::HealthState {
    match s {
        HealthState::Unknown => pb::HealthState::Unknown,
        HealthState::Healthy => pb::HealthState::Healthy,
        HealthState::Unhealthy => pb::HealthState::Unhealthy,
    }
}

/// Health state from the wire; anything but healthy or unhealthy is unknown.
pub fn health_state_from_pb(s: i32) -> HealthState {
    match pb::HealthState::try_from(s) {
        Ok(pb::HealthState::Healthy) => HealthState::Healthy,
        Ok(pb::HealthState::Unhealthy) => HealthState::Unhealthy,
        _ => HealthState::Unknown,
    }
}

/// A target health report for the wire.
pub fn health_to_pb(h: &TargetHealth) -> pb::TargetHealth {
    pb::TargetHealth {
        resource: h.resource.clone(),
        state: health_state_to_pb(h.state) as i32,
        detail: h.detail.clone(),
        checked_ms: h.checked_ms,
    }
}

/// A target health report from the wire (the server bounds its detail and checks the resource).
pub fn health_from_pb(h: &pb::TargetHealth) -> TargetHealth {
    TargetHealth {
        resource: h.resource.clone(),
        state: health_state_from_pb(h.state),
        detail: h.detail.clone(),
        checked_ms: h.checked_ms,
    }
}

/// A peer for the wire.
pub fn peer_to_pb(p: &PeerInfo) -> pb::Peer {
    pb::Peer {
        node_id: p.node_id.to_string(),
        name: p.name.clone(),
        kind: kind_to_pb(p.kind) as i32,
        public_key: p.public_key.map(|k| k.0.to_vec()).unwrap_or_default(),
        overlay_addr: p.overlay_addr.to_string(),
        allowed_ips: p.allowed_ips.iter().map(IpNet::to_string).collect(),
        candidates: p.candidates.iter().map(candidate_to_pb).collect(),
        online: p.online,
        resources: p.resources.clone(),
    }
}

/// A peer from the wire.
pub fn peer_from_pb(p: &pb::Peer) -> Result<PeerInfo, Malformed> {
    let public_key = match p.public_key.len() {
        0 => None,
        32 => Some(PublicKey::from_slice(&p.public_key).ok_or(Malformed("public key"))?),
        _ => return Err(Malformed("public key")),
    };
    Ok(PeerInfo {
        node_id: id(&p.node_id)?,
        name: p.name.clone(),
        kind: kind(p.kind)?,
        public_key,
        overlay_addr: addr(&p.overlay_addr, "peer overlay address")?,
        allowed_ips: p.allowed_ips.iter().map(|n| net(n, "peer allowed IP")).collect::<Result<_, _>>()?,
        candidates: p.candidates.iter().filter_map(candidate_from_pb).collect(),
        online: p.online,
        resources: p.resources.clone(),
    })
}

/// A resource for the wire.
pub fn resource_to_pb(r: &ResourceInfo) -> pb::Resource {
    pb::Resource {
        name: r.name.clone(),
        overlay_addr: r.overlay_addr.to_string(),
        target: r.target.clone().unwrap_or_default(),
        port: u32::from(r.port),
        alias: r.alias.clone().unwrap_or_default(),
        site_id: r.site_id.to_string(),
        dns_names: r.dns_names.clone(),
        health_check: r.health_check.clone().unwrap_or_default(),
    }
}

/// A resource from the wire.
pub fn resource_from_pb(r: &pb::Resource) -> Result<ResourceInfo, Malformed> {
    Ok(ResourceInfo {
        name: r.name.clone(),
        overlay_addr: addr(&r.overlay_addr, "resource overlay address")?,
        target: (!r.target.is_empty()).then(|| r.target.clone()),
        port: u16::try_from(r.port).map_err(|_| Malformed("resource port"))?,
        alias: (!r.alias.is_empty()).then(|| r.alias.clone()),
        site_id: id(&r.site_id)?,
        dns_names: r.dns_names.clone(),
        health_check: (!r.health_check.is_empty()).then(|| r.health_check.clone()),
    })
}

/// A relay for the wire.
pub fn relay_to_pb(r: &RelayInfo) -> pb::Relay {
    pb::Relay {
        addr: r.addr.clone(),
        key_pin: r.key_pin.clone(),
        capability: r.capability.clone(),
        tcp_addr: r.tcp_addr.clone().unwrap_or_default(),
    }
}

/// A relay from the wire.
pub fn relay_from_pb(r: &pb::Relay) -> RelayInfo {
    RelayInfo {
        addr: r.addr.clone(),
        key_pin: r.key_pin.clone(),
        capability: r.capability.clone(),
        tcp_addr: (!r.tcp_addr.is_empty()).then(|| r.tcp_addr.clone()),
    }
}

/// A full map for the wire: peers and resources in their maps' order.
pub fn map_to_pb(m: &NetworkMap) -> pb::NetworkMap {
    pb::NetworkMap {
        version: m.version,
        node_id: m.node_id.to_string(),
        node_name: m.node_name.clone(),
        kind: kind_to_pb(m.kind) as i32,
        overlay_addr: m.overlay_addr.to_string(),
        overlay_cidr: m.overlay_cidr.to_string(),
        dns_zone: m.dns_zone.clone(),
        mtu: u32::from(m.mtu),
        peers: m.peers.values().map(peer_to_pb).collect(),
        resources: m.resources.values().map(resource_to_pb).collect(),
        relays: m.relays.iter().map(relay_to_pb).collect(),
        stun_addr: m.stun_addr.clone().unwrap_or_default(),
    }
}

/// A full map from the wire.
pub fn map_from_pb(m: &pb::NetworkMap) -> Result<NetworkMap, Malformed> {
    let mut peers = BTreeMap::new();
    for p in &m.peers {
        let p = peer_from_pb(p)?;
        peers.insert(p.node_id.clone(), p);
    }
    let mut resources = BTreeMap::new();
    for r in &m.resources {
        let r = resource_from_pb(r)?;
        resources.insert(r.name.clone(), r);
    }
    Ok(NetworkMap {
        version: m.version,
        node_id: id(&m.node_id)?,
        node_name: m.node_name.clone(),
        kind: kind(m.kind)?,
        overlay_addr: addr(&m.overlay_addr, "overlay address")?,
        overlay_cidr: net(&m.overlay_cidr, "overlay CIDR")?,
        dns_zone: m.dns_zone.clone(),
        mtu: u16::try_from(m.mtu).map_err(|_| Malformed("mtu"))?,
        peers,
        resources,
        relays: m.relays.iter().map(relay_from_pb).collect(),
        stun_addr: (!m.stun_addr.is_empty()).then(|| m.stun_addr.clone()),
    })
}

/// A delta for the wire.
pub fn delta_to_pb(d: &MapDelta) -> pb::MapDelta {
    pb::MapDelta {
        base_version: d.base_version,
        version: d.version,
        upsert_peers: d.upsert_peers.iter().map(peer_to_pb).collect(),
        remove_peers: d.remove_peers.iter().map(NodeId::to_string).collect(),
        upsert_resources: d.upsert_resources.iter().map(resource_to_pb).collect(),
        remove_resources: d.remove_resources.clone(),
        relays_changed: d.relays.is_some(),
        relays: d.relays.iter().flatten().map(relay_to_pb).collect(),
    }
}

/// A delta from the wire.
pub fn delta_from_pb(d: &pb::MapDelta) -> Result<MapDelta, Malformed> {
    Ok(MapDelta {
        base_version: d.base_version,
        version: d.version,
        upsert_peers: d.upsert_peers.iter().map(peer_from_pb).collect::<Result<_, _>>()?,
        remove_peers: d.remove_peers.iter().map(|s| id(s)).collect::<Result<_, _>>()?,
        upsert_resources: d.upsert_resources.iter().map(resource_from_pb).collect::<Result<_, _>>()?,
        remove_resources: d.remove_resources.clone(),
        relays: d.relays_changed.then(|| d.relays.iter().map(relay_from_pb).collect()),
    })
}

#[cfg(test)]
mod tests;
