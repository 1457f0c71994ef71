//! The server's rules for what a node reports on the wire, applied after `tunnel-wire` decodes it
//! (the conversions themselves are `tunnel-wire`'s, shared with the nodes).

use tunnel_core::map::Candidate;
use tunnel_proto::v1 as pb;

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
    let parsed: Vec<Candidate> = list.iter().filter_map(tunnel_wire::candidate_from_pb).collect();
    let unparsed = list.len() - parsed.len();
    let (kept, dropped) = tunnel_core::map::bound_candidates(parsed, from_loopback, |ip| match ip {
        std::net::IpAddr::V4(v4) => overlay.contains(&v4),
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(|v4| overlay.contains(&v4)),
    });
    (kept, dropped + unparsed)
}
