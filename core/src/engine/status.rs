//! The engine's part of a node's `/status` document. The shell adds what only it knows (its
//! socket's address, uptime, the relay link); field names are the document's (DESIGN.md).

use serde::Serialize;

use super::Node;
use crate::map::NodeKind;
use crate::netstack::{Limit, StackStats};
use crate::path::Via;
use crate::wg::DropCounts;

/// New flows a site refused because a flow limit was reached, by kind and by limit.
#[derive(Default, Debug, Clone, Copy, Serialize)]
pub struct Refused {
    pub pending_dial_peer: u64,
    pub pending_dial_node: u64,
    pub udp_peer: u64,
    pub udp_node: u64,
}

impl Refused {
    pub(super) fn pending_dial(&mut self, l: Limit) {
        match l {
            Limit::Peer => self.pending_dial_peer += 1,
            Limit::Node => self.pending_dial_node += 1,
        }
    }

    pub(super) fn udp(&mut self, l: Limit) {
        match l {
            Limit::Peer => self.udp_peer += 1,
            Limit::Node => self.udp_node += 1,
        }
    }
}

/// Packets refused and flows opened.
#[derive(Default, Debug, Clone, Copy, Serialize)]
pub struct Counters {
    pub not_granted: u64,
    /// TUN client: a packet from a site that answers nothing this client sent.
    pub unsolicited: u64,
    /// TUN client: a packet from a site for another address than the client's own.
    pub wrong_destination: u64,
    pub wrong_port: u64,
    pub unparsable: u64,
    pub dial_failures: u64,
    pub flows_opened: u64,
}

/// One peer as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub name: String,
    pub node_id: String,
    /// `direct`, `relay` or `down`.
    pub path: &'static str,
    pub endpoint: Option<String>,
    pub last_handshake_secs_ago: Option<u64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub rtt_ms: Option<u32>,
    pub path_rtt_us: Option<u64>,
    pub path_changes: u64,
    pub punch_attempts: u64,
    pub punch_successes: u64,
    pub relay_tx_bytes: u64,
    pub relay_rx_bytes: u64,
}

/// The engine's part of `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct EngineStatus {
    pub node: Option<String>,
    pub kind: &'static str,
    pub overlay_addr: Option<String>,
    pub map_version: Option<u64>,
    pub peers: Vec<PeerStatus>,
    pub flows: usize,
    pub udp_flows: usize,
    pub pending_dials: usize,
    pub refused: Refused,
    pub tcp: StackStats,
    pub drops: DropCounts,
    pub counters: Counters,
    pub bad_probes: u64,
    pub reflexive_addr: Option<String>,
}

impl Node {
    /// The shared half's status; the role fills in its own fields.
    pub(super) fn status(&self, kind: NodeKind) -> EngineStatus {
        let mut peers = Vec::new();
        for (key, (name, id)) in &self.peer_names {
            let st = self.device.peer_stats(key);
            let hs = st.as_ref().and_then(|s| s.last_handshake_secs);
            // A session is up while its last handshake is younger than WireGuard's reject-after time;
            // it is direct only over a path that answered probes, relayed only while the relay is up.
            let alive = hs.is_some_and(|secs| secs < 180);
            let path = match self.paths.current(key) {
                Some(Via::Direct(_)) if alive && self.paths.is_direct(key) => "direct",
                Some(Via::Relay) if alive && self.relay_up => "relay",
                // A guessed, unproven endpoint is not a path yet.
                _ => "down",
            };
            let ps = self.paths.stats(key).unwrap_or_default();
            let rb = self.relay_bytes.get(key).copied().unwrap_or_default();
            peers.push(PeerStatus {
                name: name.clone(),
                node_id: id.clone(),
                path,
                endpoint: st.as_ref().and_then(|s| s.endpoint).map(|e| e.to_string()),
                last_handshake_secs_ago: hs,
                tx_bytes: st.as_ref().map(|s| s.tx_bytes).unwrap_or(0),
                rx_bytes: st.as_ref().map(|s| s.rx_bytes).unwrap_or(0),
                rtt_ms: st.as_ref().and_then(|s| s.rtt_ms),
                path_rtt_us: ps.rtt_us,
                path_changes: ps.path_changes,
                punch_attempts: ps.punch_attempts,
                punch_successes: ps.punch_successes,
                relay_tx_bytes: rb.tx,
                relay_rx_bytes: rb.rx,
            });
        }
        EngineStatus {
            node: self.map.as_ref().map(|m| m.node_name.clone()),
            kind: kind.as_str(),
            overlay_addr: self.own_addr.map(|a| a.to_string()),
            map_version: self.map.as_ref().map(|m| m.version),
            peers,
            flows: self.flows.len(),
            udp_flows: 0,
            pending_dials: 0,
            refused: Refused::default(),
            tcp: self.stack.as_ref().map(|s| s.stats()).unwrap_or_default(),
            drops: self.device.drops,
            counters: self.counters,
            bad_probes: self.paths.bad_probes,
            reflexive_addr: self.stun.reflexive.map(|a| a.to_string()),
        }
    }
}
