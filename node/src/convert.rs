//! From the wire types to the core's network map.

use std::collections::BTreeMap;

use tunnel_core::map::{Candidate, MapDelta, NetworkMap, NodeKind, PeerInfo, RelayInfo, ResourceInfo};
use tunnel_core::NodeId;
use tunnel_proto::v1 as pb;

/// Why a message from the server could not be read.
#[derive(Debug, thiserror::Error)]
#[error("malformed {0} from the server")]
pub struct Malformed(pub &'static str);

fn kind(k: i32) -> Result<NodeKind, Malformed> {
    match pb::NodeKind::try_from(k) {
        Ok(pb::NodeKind::Site) => Ok(NodeKind::Site),
        Ok(pb::NodeKind::Client) => Ok(NodeKind::Client),
        _ => Err(Malformed("node kind")),
    }
}

fn id(s: &str) -> Result<NodeId, Malformed> {
    s.parse().map_err(|_| Malformed("node id"))
}

/// A wire candidate.
pub fn candidate(c: &pb::Candidate) -> Candidate {
    let kind = match pb::CandidateKind::try_from(c.kind) {
        Ok(pb::CandidateKind::Lan) => "lan",
        Ok(pb::CandidateKind::Reflexive) => "reflexive",
        Ok(pb::CandidateKind::Advertised) => "advertised",
        _ => "unknown",
    };
    Candidate { addr: c.addr.clone(), kind: kind.into() }
}

/// A candidate for the wire.
pub fn candidate_to_pb(c: &Candidate) -> pb::Candidate {
    let kind = match c.kind.as_str() {
        "lan" => pb::CandidateKind::Lan,
        "reflexive" => pb::CandidateKind::Reflexive,
        "advertised" => pb::CandidateKind::Advertised,
        _ => pb::CandidateKind::Unspecified,
    };
    pb::Candidate { addr: c.addr.clone(), kind: kind as i32 }
}

/// A wire peer.
pub fn peer(p: &pb::Peer) -> Result<PeerInfo, Malformed> {
    let public_key = match p.public_key.len() {
        0 => None,
        32 => Some(p.public_key.as_slice().try_into().map_err(|_| Malformed("public key"))?),
        _ => return Err(Malformed("public key")),
    };
    Ok(PeerInfo {
        node_id: id(&p.node_id)?,
        name: p.name.clone(),
        kind: kind(p.kind)?,
        public_key,
        overlay_addr: p.overlay_addr.clone(),
        allowed_ips: p.allowed_ips.clone(),
        candidates: p.candidates.iter().map(candidate).collect(),
        online: p.online,
        resources: p.resources.clone(),
    })
}

/// A wire resource.
pub fn resource(r: &pb::Resource) -> Result<ResourceInfo, Malformed> {
    Ok(ResourceInfo {
        name: r.name.clone(),
        overlay_addr: r.overlay_addr.clone(),
        target: (!r.target.is_empty()).then(|| r.target.clone()),
        port: u16::try_from(r.port).map_err(|_| Malformed("resource port"))?,
        alias: (!r.alias.is_empty()).then(|| r.alias.clone()),
        site_id: id(&r.site_id)?,
        dns_names: r.dns_names.clone(),
        health_check: (!r.health_check.is_empty()).then(|| r.health_check.clone()),
    })
}

/// A target health report for the wire.
pub fn health_to_pb(h: &tunnel_core::map::TargetHealth) -> pb::TargetHealth {
    use tunnel_core::map::HealthState;
    pb::TargetHealth {
        resource: h.resource.clone(),
        state: match h.state {
            HealthState::Unknown => pb::HealthState::Unknown,
            HealthState::Healthy => pb::HealthState::Healthy,
            HealthState::Unhealthy => pb::HealthState::Unhealthy,
        } as i32,
        detail: h.detail.clone(),
        checked_ms: h.checked_ms,
    }
}

fn relay(r: &pb::Relay) -> RelayInfo {
    RelayInfo {
        addr: r.addr.clone(),
        key_pin: r.key_pin.clone(),
        capability: r.capability.clone(),
        tcp_addr: (!r.tcp_addr.is_empty()).then(|| r.tcp_addr.clone()),
    }
}

/// A wire full map.
pub fn map(m: &pb::NetworkMap) -> Result<NetworkMap, Malformed> {
    let mut peers = BTreeMap::new();
    for p in &m.peers {
        let p = peer(p)?;
        peers.insert(p.node_id.clone(), p);
    }
    let mut resources = BTreeMap::new();
    for r in &m.resources {
        let r = resource(r)?;
        resources.insert(r.name.clone(), r);
    }
    Ok(NetworkMap {
        version: m.version,
        node_id: id(&m.node_id)?,
        node_name: m.node_name.clone(),
        kind: kind(m.kind)?,
        overlay_addr: m.overlay_addr.clone(),
        overlay_cidr: m.overlay_cidr.clone(),
        dns_zone: m.dns_zone.clone(),
        mtu: u16::try_from(m.mtu).map_err(|_| Malformed("mtu"))?,
        peers,
        resources,
        relays: m.relays.iter().map(relay).collect(),
        stun_addr: (!m.stun_addr.is_empty()).then(|| m.stun_addr.clone()),
    })
}

/// A wire delta.
pub fn delta(d: &pb::MapDelta) -> Result<MapDelta, Malformed> {
    Ok(MapDelta {
        base_version: d.base_version,
        version: d.version,
        upsert_peers: d.upsert_peers.iter().map(peer).collect::<Result<_, _>>()?,
        remove_peers: d.remove_peers.iter().map(|s| id(s)).collect::<Result<_, _>>()?,
        upsert_resources: d.upsert_resources.iter().map(resource).collect::<Result<_, _>>()?,
        remove_resources: d.remove_resources.clone(),
        relays: d.relays_changed.then(|| d.relays.iter().map(relay).collect()),
    })
}
