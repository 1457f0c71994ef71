//! From the server's model to the wire types.

use tunnel_core::map::{Candidate, NodeKind, PeerInfo, ResourceInfo};
use tunnel_proto::v1 as pb;

/// Domain kind to wire kind.
pub fn kind_to_pb(k: NodeKind) -> pb::NodeKind {
    match k {
        NodeKind::Site => pb::NodeKind::Site,
        NodeKind::Client => pb::NodeKind::Client,
    }
}

/// Wire kind to domain kind; `None` for unspecified.
pub fn kind_from_pb(k: i32) -> Option<NodeKind> {
    match pb::NodeKind::try_from(k).ok()? {
        pb::NodeKind::Site => Some(NodeKind::Site),
        pb::NodeKind::Client => Some(NodeKind::Client),
        pb::NodeKind::Unspecified => None,
    }
}

/// Candidate kinds by wire value.
pub fn candidate_from_pb(c: &pb::Candidate) -> Option<Candidate> {
    let kind = match pb::CandidateKind::try_from(c.kind).ok()? {
        pb::CandidateKind::Lan => "lan",
        pb::CandidateKind::Reflexive => "reflexive",
        pb::CandidateKind::Advertised => "advertised",
        pb::CandidateKind::Unspecified => return None,
    };
    // Only IP:PORT literals: a node cannot make others dial host names.
    let addr: std::net::SocketAddr = c.addr.parse().ok()?;
    Some(Candidate { addr: addr.to_string(), kind: kind.into() })
}

/// A node's reported candidates, bounded: only IP:PORT literals of a known kind, no address that is
/// refused as a candidate ([`tunnel_core::map::candidate_addr_allowed`]) or inside the overlay, at most
/// the cap per kind. Returns them and how many were dropped.
///
/// Loopback candidates are kept only from a node that connects from loopback (on the server's host).
pub fn candidates_from_pb(
    list: &[pb::Candidate],
    overlay: ipnet::Ipv4Net,
    from_loopback: bool,
) -> (Vec<Candidate>, usize) {
    let parsed: Vec<Candidate> = list.iter().filter_map(candidate_from_pb).collect();
    let unparsed = list.len() - parsed.len();
    let (kept, dropped) = tunnel_core::map::bound_candidates(parsed, from_loopback, |ip| match ip {
        std::net::IpAddr::V4(v4) => overlay.contains(&v4),
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(|v4| overlay.contains(&v4)),
    });
    (kept, dropped + unparsed)
}

/// Domain candidate to wire candidate.
pub fn candidate_to_pb(c: &Candidate) -> pb::Candidate {
    let kind = match c.kind.as_str() {
        "lan" => pb::CandidateKind::Lan,
        "reflexive" => pb::CandidateKind::Reflexive,
        "advertised" => pb::CandidateKind::Advertised,
        _ => pb::CandidateKind::Unspecified,
    };
    pb::Candidate { addr: c.addr.clone(), kind: kind as i32 }
}

/// A peer entry on the wire.
pub fn peer_to_pb(p: &PeerInfo) -> pb::Peer {
    pb::Peer {
        node_id: p.node_id.to_string(),
        name: p.name.clone(),
        kind: kind_to_pb(p.kind) as i32,
        public_key: p.public_key.map(|k| k.to_vec()).unwrap_or_default(),
        overlay_addr: p.overlay_addr.clone(),
        allowed_ips: p.allowed_ips.clone(),
        candidates: p.candidates.iter().map(candidate_to_pb).collect(),
        online: p.online,
        resources: p.resources.clone(),
    }
}

/// A resource entry on the wire.
pub fn resource_to_pb(r: &ResourceInfo) -> pb::Resource {
    pb::Resource {
        name: r.name.clone(),
        overlay_addr: r.overlay_addr.clone(),
        target: r.target.clone().unwrap_or_default(),
        port: u32::from(r.port),
        alias: r.alias.clone().unwrap_or_default(),
        site_id: r.site_id.to_string(),
        dns_names: r.dns_names.clone(),
        health_check: r.health_check.clone().unwrap_or_default(),
    }
}
