//! Live sessions and the distribution of map changes to them.
//!
//! Each connected node has a [`Session`] holding what the server last sent it, entry by entry. A change
//! in the model names the entries it touched (`(viewer, entry)` pairs); for each connected viewer the hub
//! recomputes just those entries, compares them with what was sent, and pushes one versioned delta with
//! the differences. Work per change therefore grows with the entries touched, never with the size of
//! the network.
//!
//! Endpoint and presence changes (a node connects, reports new candidates, disconnects) are not pushed
//! one by one: they mark the node dirty and a flush every [`FLUSH_INTERVAL`] sends one delta per viewer
//! for all of them, so a storm of reconnects costs one delta per affected viewer per flush.
//!
//! A session's outbound queue is bounded. When it is full the delta is dropped and the session is marked
//! for a full map, which the flush sends once the queue has room: a slow node costs memory in proportion
//! to its own map only.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tunnel_core::PublicKey;

use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use tunnel_core::map::{PeerInfo, ResourceInfo};
use tunnel_core::NodeId;
use tunnel_proto::v1 as pb;

use crate::registry::{Entry, Registry};

/// How a session ends from the server's side.
#[derive(Debug)]
pub enum SessionEnd {
    /// Credentials are no longer valid: tell the node why.
    Revoked(String),
    /// The server is stopping: the node should reconnect later.
    Shutdown,
}

/// How often coalesced presence and endpoint changes are flushed.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// Outbound queue length per session.
pub const SESSION_QUEUE: usize = 64;

/// The stream items a session sends.
pub type Outbound = Result<pb::ServerMessage, Status>;

/// One connected node.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    tx: mpsc::Sender<Outbound>,
    version: u64,
    sent_peers: HashMap<NodeId, PeerInfo>,
    sent_resources: HashMap<String, ResourceInfo>,
    needs_full: bool,
    kill: Option<oneshot::Sender<SessionEnd>>,
    /// When the relay capabilities last sent were signed, and for which peer keys (a hash).
    caps: Option<(Instant, u64)>,
    /// The largest message the node decodes: bigger maps and deltas are split to fit.
    max_message: usize,
}

/// Counters for /metrics and the benchmark.
#[derive(Debug, Default, Clone, Copy)]
pub struct HubStats {
    pub deltas_sent: u64,
    pub full_maps_sent: u64,
    pub deltas_dropped: u64,
}

/// All sessions, plus the nodes whose own entries changed since the last flush.
#[derive(Debug, Default)]
pub struct Hub {
    sessions: HashMap<NodeId, Session>,
    dirty: HashSet<NodeId>,
    next_session: u64,
    pub stats: HubStats,
    /// STUN and relays, announced in every map.
    pub services: Option<Arc<PathServices>>,
}

/// The STUN responder and relays nodes are told about, and the key that signs relay capabilities.
pub struct PathServices {
    /// `HOST:PORT` of the STUN responder.
    pub stun_addr: Option<String>,
    /// Relays, in order of preference.
    pub relays: Vec<RelayEndpoint>,
    /// Signs capabilities.
    pub signer: Arc<ring::signature::Ed25519KeyPair>,
    /// How long a capability lives; they are renewed at half of it.
    pub ttl: Duration,
}

impl std::fmt::Debug for PathServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PathServices").field("stun", &self.stun_addr).field("relays", &self.relays).finish()
    }
}

/// A relay as nodes see it.
#[derive(Debug, Clone)]
pub struct RelayEndpoint {
    /// `HOST:PORT` of its QUIC listener, if it has one.
    pub udp: Option<String>,
    /// `HOST:PORT` of its TCP/TLS listener, if it has one.
    pub tcp: Option<String>,
    /// Pin of the relays' TLS key.
    pub pin: tunnel_core::KeyPin,
}

impl PathServices {
    fn relays_for(&self, node: Option<PublicKey>, peers: &HashMap<NodeId, PeerInfo>) -> Vec<pb::Relay> {
        let Some(node) = node else { return vec![] };
        let mut keys: Vec<PublicKey> = peers.values().filter_map(|p| p.public_key).collect();
        keys.sort_unstable();
        let expires = crate::clock::now_ms().max(0) as u64 + self.ttl.as_millis() as u64;
        if keys.len() > tunnel_core::relay::MAX_CAP_PEERS {
            // Loud, not silent: the peers past the cap have no relayed path to this node.
            tracing::error!(
                peers = keys.len(),
                max = tunnel_core::relay::MAX_CAP_PEERS,
                "a node has more peers than one relay capability can name; the rest cannot be relayed"
            );
            keys.truncate(tunnel_core::relay::MAX_CAP_PEERS);
        }
        let cap = tunnel_core::relay::Capability { node, expires_unix_ms: expires, peers: keys }
            .sign(&self.signer)
            .unwrap_or_default();
        self.relays
            .iter()
            .map(|r| pb::Relay {
                addr: r.udp.clone().unwrap_or_default(),
                key_pin: r.pin.0.to_vec(),
                capability: cap.clone(),
                tcp_addr: r.tcp.clone().unwrap_or_default(),
            })
            .collect()
    }
}

fn keys_hash(peers: &HashMap<NodeId, PeerInfo>) -> u64 {
    let mut keys: Vec<PublicKey> = peers.values().filter_map(|p| p.public_key).collect();
    keys.sort_unstable();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    keys.hash(&mut h);
    h.finish()
}

impl Hub {
    /// Number of open sessions.
    pub fn connected(&self) -> usize {
        self.sessions.len()
    }

    /// Whether `id` has an open session.
    pub fn is_connected(&self, id: &NodeId) -> bool {
        self.sessions.contains_key(id)
    }

    /// Registers a session for `id`, ending any older one, and queues its full map. Returns the session
    /// id and the receiver that ends the session when the node is removed or rotated.
    pub fn open(
        &mut self,
        reg: &Registry,
        id: &NodeId,
        tx: mpsc::Sender<Outbound>,
        max_message: usize,
    ) -> (u64, oneshot::Receiver<SessionEnd>) {
        self.next_session += 1;
        let (kill_tx, kill_rx) = oneshot::channel();
        // An older session of the same node is stale (the node reconnected): dropping its kill sender
        // ends it without telling the node its credentials are bad.
        self.sessions.remove(id);
        let mut s = Session {
            id: self.next_session,
            tx,
            version: 0,
            sent_peers: HashMap::new(),
            sent_resources: HashMap::new(),
            needs_full: true,
            kill: Some(kill_tx),
            caps: None,
            max_message,
        };
        send_full(reg, id, &mut s, &mut self.stats, self.services.as_deref());
        self.sessions.insert(id.clone(), s);
        (self.next_session, kill_rx)
    }

    /// Forgets session `session_id` of `id` if it is still the current one.
    pub fn close(&mut self, id: &NodeId, session_id: u64) -> bool {
        if self.sessions.get(id).is_some_and(|s| s.id == session_id) {
            self.sessions.remove(id);
            true
        } else {
            false
        }
    }

    /// Ends `id`'s session with `reason` (node removed, secret rotated).
    pub fn kill(&mut self, id: &NodeId, reason: &str) {
        if let Some(mut s) = self.sessions.remove(id) {
            if let Some(k) = s.kill.take() {
                let _ = k.send(SessionEnd::Revoked(reason.to_owned()));
            }
        }
    }

    /// Ends every session because the server is stopping.
    pub fn close_all(&mut self) {
        for (_, mut s) in self.sessions.drain() {
            if let Some(k) = s.kill.take() {
                let _ = k.send(SessionEnd::Shutdown);
            }
        }
    }

    /// Marks `id`'s own entries (key, candidates, presence) as changed; the next flush sends them.
    pub fn mark_dirty(&mut self, id: &NodeId) {
        self.dirty.insert(id.clone());
    }

    /// A node asked for its full map again. It is built at the next flush, and only once the node's
    /// queue has room: asking many times costs one map, and a node that does not read costs nothing.
    pub fn request_full(&mut self, id: &NodeId) {
        if let Some(s) = self.sessions.get_mut(id) {
            s.needs_full = true;
        }
    }

    /// Sends the deltas for `touched` entries now.
    pub fn distribute(&mut self, reg: &Registry, touched: Vec<(NodeId, Entry)>) {
        let mut by_viewer: BTreeMap<NodeId, BTreeSet<Entry>> = BTreeMap::new();
        for (viewer, entry) in touched {
            if self.sessions.contains_key(&viewer) {
                by_viewer.entry(viewer).or_default().insert(entry);
            }
        }
        for (viewer, entries) in by_viewer {
            if let Some(s) = self.sessions.get_mut(&viewer) {
                send_delta(reg, &viewer, s, entries, &mut self.stats, self.services.as_deref());
            }
        }
    }

    /// Sends everything coalesced since the last flush, and full maps to sessions that need one.
    pub fn flush(&mut self, reg: &Registry) {
        let dirty: Vec<NodeId> = self.dirty.drain().collect();
        let mut touched = Vec::new();
        for id in &dirty {
            touched.extend(reg.entries_showing(id));
        }
        self.distribute(reg, touched);
        let services = self.services.as_deref();
        for (id, s) in self.sessions.iter_mut() {
            if s.needs_full && s.tx.capacity() > 0 {
                send_full(reg, id, s, &mut self.stats, services);
            } else if let (Some(sv), Some((at, _))) = (services, s.caps) {
                // Renew capabilities at half their life, so a node always holds a valid one.
                if at.elapsed() >= sv.ttl / 2 {
                    send_delta(reg, id, s, BTreeSet::new(), &mut self.stats, services);
                }
            }
        }
    }
}

fn send_full(
    reg: &Registry,
    id: &NodeId,
    s: &mut Session,
    stats: &mut HubStats,
    services: Option<&PathServices>,
) {
    let Some(node) = reg.nodes.get(id) else { return };
    let mut peers = HashMap::new();
    let mut resources = HashMap::new();
    for e in reg.all_entries(id) {
        match e {
            Entry::Peer(p) => {
                if let Some(info) = reg.peer_entry(id, &p) {
                    peers.insert(p, info);
                }
            }
            Entry::Resource(r) => {
                if let Some(info) = reg.resource_entry(id, &r) {
                    resources.insert(r, info);
                }
            }
        }
    }
    let version = s.version + 1;
    let mut sorted_peers: Vec<&PeerInfo> = peers.values().collect();
    sorted_peers.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    let mut sorted_res: Vec<&ResourceInfo> = resources.values().collect();
    sorted_res.sort_by(|a, b| a.name.cmp(&b.name));
    let map = pb::NetworkMap {
        version,
        node_id: id.to_string(),
        node_name: node.name.clone(),
        kind: tunnel_wire::kind_to_pb(node.kind) as i32,
        overlay_addr: node.addr.to_string(),
        overlay_cidr: reg.pool.net().to_string(),
        dns_zone: reg.zone.clone(),
        mtu: u32::from(reg.mtu),
        peers: sorted_peers.into_iter().map(tunnel_wire::peer_to_pb).collect(),
        resources: sorted_res.into_iter().map(tunnel_wire::resource_to_pb).collect(),
        relays: services.map(|sv| sv.relays_for(node.public_key, &peers)).unwrap_or_default(),
        stun_addr: services.and_then(|sv| sv.stun_addr.clone()).unwrap_or_default(),
    };
    let caps = services.map(|_| (Instant::now(), keys_hash(&peers)));
    let msgs = split_full(map, budget(s.max_message));
    if s.tx.capacity() < msgs.len() {
        // The flush retries when there is room for all of it.
        s.needs_full = true;
        return;
    }
    let parts = msgs.len() as u64;
    for msg in msgs {
        if s.tx.try_send(Ok(msg)).is_err() {
            // Closed (or raced full): resynchronise with a full map if the session lives on.
            s.needs_full = true;
            return;
        }
    }
    s.version = version + parts - 1;
    s.sent_peers = peers;
    s.sent_resources = resources;
    s.needs_full = false;
    s.caps = caps;
    stats.full_maps_sent += 1;
    tracing::debug!(node = %id, version = s.version, parts, "full map queued");
}

/// What one message may hold for a node that decodes `max_message` bytes: room is left for the
/// message's framing.
fn budget(max_message: usize) -> usize {
    max_message - max_message / 16
}

/// `map` as messages that each fit `budget` bytes: the map itself when it fits; otherwise a full map
/// with the peers and resources that fit, then deltas (versions following on) with the rest. A node
/// of any version applies them as one map arriving in parts.
fn split_full(mut map: pb::NetworkMap, budget: usize) -> Vec<pb::ServerMessage> {
    use prost::Message;
    if map.encoded_len() <= budget {
        return vec![pb::ServerMessage { msg: Some(pb::server_message::Msg::FullMap(map)) }];
    }
    let mut peers = std::mem::take(&mut map.peers).into_iter().peekable();
    let mut resources = std::mem::take(&mut map.resources).into_iter().peekable();
    // The full map holds what fits; the rest follows as deltas.
    let mut size = map.encoded_len();
    let mut took = true;
    take_fitting(&mut peers, &mut map.peers, &mut size, budget, &mut took);
    take_fitting(&mut resources, &mut map.resources, &mut size, budget, &mut took);
    let next = pb::MapDelta { base_version: map.version, version: map.version + 1, ..Default::default() };
    let mut out = vec![pb::ServerMessage { msg: Some(pb::server_message::Msg::FullMap(map)) }];
    if peers.peek().is_some() || resources.peek().is_some() {
        let deltas = chain(next, peers, resources, budget);
        out.extend(
            deltas.into_iter().map(|d| pb::ServerMessage { msg: Some(pb::server_message::Msg::Delta(d)) }),
        );
    }
    out
}

type Items<T> = std::iter::Peekable<std::vec::IntoIter<T>>;

/// Moves items from the front of `items` into `into` while they fit `budget` (counting each item's
/// field framing); with `took` false the first one goes in whatever its size, so every message makes
/// progress. Each item is small (candidates and names are bounded), so an item alone always fits.
fn take_fitting<T: prost::Message>(
    items: &mut Items<T>,
    into: &mut Vec<T>,
    size: &mut usize,
    budget: usize,
    took: &mut bool,
) {
    while let Some(item) = items.next_if(|i| !*took || *size + i.encoded_len() + 8 <= budget) {
        *size += item.encoded_len() + 8;
        *took = true;
        into.push(item);
    }
}

/// `first` and as many following deltas (versions following on) as it takes to carry `peers` and
/// `resources` within `budget` each.
fn chain(
    first: pb::MapDelta,
    mut peers: Items<pb::Peer>,
    mut resources: Items<pb::Resource>,
    budget: usize,
) -> Vec<pb::MapDelta> {
    use prost::Message;
    let mut out = Vec::new();
    let mut cur = first;
    loop {
        let mut size = cur.encoded_len();
        let mut took = false;
        take_fitting(&mut peers, &mut cur.upsert_peers, &mut size, budget, &mut took);
        take_fitting(&mut resources, &mut cur.upsert_resources, &mut size, budget, &mut took);
        let next = cur.version;
        out.push(cur);
        if peers.peek().is_none() && resources.peek().is_none() {
            return out;
        }
        cur = pb::MapDelta { base_version: next, version: next + 1, ..Default::default() };
    }
}

fn send_delta(
    reg: &Registry,
    id: &NodeId,
    s: &mut Session,
    entries: BTreeSet<Entry>,
    stats: &mut HubStats,
    services: Option<&PathServices>,
) {
    if s.needs_full {
        // A full map is pending anyway and will carry these changes.
        return;
    }
    let mut delta = pb::MapDelta { base_version: s.version, version: s.version + 1, ..Default::default() };
    for e in entries {
        match e {
            Entry::Peer(p) => match reg.peer_entry(id, &p) {
                Some(info) => {
                    if s.sent_peers.get(&p) != Some(&info) {
                        delta.upsert_peers.push(tunnel_wire::peer_to_pb(&info));
                        s.sent_peers.insert(p, info);
                    }
                }
                None => {
                    if s.sent_peers.remove(&p).is_some() {
                        delta.remove_peers.push(p.to_string());
                    }
                }
            },
            Entry::Resource(r) => match reg.resource_entry(id, &r) {
                Some(info) => {
                    if s.sent_resources.get(&r) != Some(&info) {
                        delta.upsert_resources.push(tunnel_wire::resource_to_pb(&info));
                        s.sent_resources.insert(r, info);
                    }
                }
                None => {
                    if s.sent_resources.remove(&r).is_some() {
                        delta.remove_resources.push(r);
                    }
                }
            },
        }
    }
    // New capabilities when the set of peer keys changed (a grant, a new key) or the old ones are half
    // way to expiry. Endpoint changes alone do not re-sign anything.
    let mut new_caps = None;
    if let Some(sv) = services {
        let h = keys_hash(&s.sent_peers);
        let stale = s.caps.is_none_or(|(at, old)| old != h || at.elapsed() >= sv.ttl / 2);
        if stale {
            let node_key = reg.nodes.get(id).and_then(|n| n.public_key);
            delta.relays_changed = true;
            delta.relays = sv.relays_for(node_key, &s.sent_peers);
            new_caps = Some((Instant::now(), h));
        }
    }
    if delta.upsert_peers.is_empty()
        && !delta.relays_changed
        && delta.remove_peers.is_empty()
        && delta.upsert_resources.is_empty()
        && delta.remove_resources.is_empty()
    {
        return;
    }
    let parts = split_delta(delta, budget(s.max_message));
    let version = parts.last().map_or(s.version, |d| d.version);
    let fits = s.tx.capacity() >= parts.len();
    let sent = fits
        && parts.into_iter().all(|d| {
            s.tx.try_send(Ok(pb::ServerMessage { msg: Some(pb::server_message::Msg::Delta(d)) })).is_ok()
        });
    if sent {
        s.version = version;
        if new_caps.is_some() {
            s.caps = new_caps;
        }
        stats.deltas_sent += 1;
        tracing::debug!(node = %id, version, "map delta queued");
    } else {
        // What we recorded as sent is now ahead of the node: resynchronise with a full map.
        s.needs_full = true;
        stats.deltas_dropped += 1;
        tracing::debug!(node = %id, "session queue full; a full map will follow");
    }
}

/// `delta` as a chain of deltas that each fit `budget` bytes (the first keeps the removals and the
/// relays; upserts are spread over the rest).
fn split_delta(mut delta: pb::MapDelta, budget: usize) -> Vec<pb::MapDelta> {
    use prost::Message;
    if delta.encoded_len() <= budget {
        return vec![delta];
    }
    let peers = std::mem::take(&mut delta.upsert_peers).into_iter().peekable();
    let resources = std::mem::take(&mut delta.upsert_resources).into_iter().peekable();
    chain(delta, peers, resources, budget)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn peer(i: u32) -> pb::Peer {
        pb::Peer {
            node_id: format!("n{i:06}"),
            name: format!("peer-{i}"),
            public_key: vec![(i % 251) as u8; 32],
            overlay_addr: format!("100.96.{}.{}", i / 250, i % 250 + 1),
            candidates: (0..4)
                .map(|c| pb::Candidate { addr: format!("192.0.2.{c}:51820"), kind: 1 })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_map_too_big_for_the_node_arrives_as_a_full_map_and_deltas_that_each_fit() {
        let map = pb::NetworkMap {
            version: 7,
            node_id: "me".into(),
            peers: (0..3000).map(peer).collect(),
            resources: (0..500)
                .map(|i| pb::Resource { name: format!("r{i}"), ..Default::default() })
                .collect(),
            ..Default::default()
        };
        assert!(map.encoded_len() > 64 << 10);
        let budget = budget(64 << 10);
        let parts = split_full(map.clone(), budget);
        assert!(parts.len() > 2, "{} parts", parts.len());
        let mut peers = Vec::new();
        let mut resources = Vec::new();
        let mut version = 0;
        for (i, m) in parts.iter().enumerate() {
            assert!(m.encoded_len() <= budget, "part {i}: {} bytes", m.encoded_len());
            match m.msg.as_ref().unwrap() {
                pb::server_message::Msg::FullMap(f) => {
                    assert_eq!(i, 0);
                    version = f.version;
                    peers.extend(f.peers.iter().cloned());
                    resources.extend(f.resources.iter().cloned());
                }
                pb::server_message::Msg::Delta(d) => {
                    assert_eq!(d.base_version, version, "deltas follow on");
                    version = d.version;
                    peers.extend(d.upsert_peers.iter().cloned());
                    resources.extend(d.upsert_resources.iter().cloned());
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(peers, map.peers);
        assert_eq!(resources, map.resources);
        // A map that fits is sent as it is.
        assert_eq!(split_full(map.clone(), usize::MAX).len(), 1);
    }

    #[test]
    fn a_big_delta_is_split_into_a_chain() {
        let d = pb::MapDelta {
            base_version: 3,
            version: 4,
            upsert_peers: (0..3000).map(peer).collect(),
            remove_peers: vec!["gone".into()],
            ..Default::default()
        };
        let budget = budget(64 << 10);
        let parts = split_delta(d.clone(), budget);
        assert!(parts.len() > 1);
        assert_eq!(parts[0].remove_peers, vec!["gone".to_owned()]);
        let mut base = 3;
        for p in &parts {
            assert!(p.encoded_len() <= budget);
            assert_eq!((p.base_version, p.version), (base, base + 1));
            base = p.version;
        }
        let all: Vec<pb::Peer> = parts.iter().flat_map(|p| p.upsert_peers.clone()).collect();
        assert_eq!(all, d.upsert_peers);
    }
}
