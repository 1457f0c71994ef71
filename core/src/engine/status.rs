//! The engine's part of a node's `/status` document ([`NodeStatus`]). The shell adds what only it
//! knows (its socket's address, uptime, the relay link), the node program the control link and the
//! rest.

use super::Node;
use crate::map::NodeKind;
use crate::netstack::Limit;
use crate::path::Via;
use crate::status::{NodeStatus, PathState, PeerStatus, Refused};

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

impl Node {
    /// The shared half's status; the role fills in its own fields.
    pub(super) fn status(&self, kind: NodeKind) -> NodeStatus {
        let mut peers = Vec::new();
        for (key, (name, id)) in &self.peer_names {
            let st = self.device.peer_stats(key);
            let hs = st.as_ref().and_then(|s| s.last_handshake_secs);
            // A session is up while its last handshake is younger than WireGuard's reject-after time;
            // it is direct only over a path that answered probes, relayed only while the relay is up.
            let alive = hs.is_some_and(|secs| secs < 180);
            let path = match self.paths.current(key) {
                Some(Via::Direct(_)) if alive && self.paths.is_direct(key) => PathState::Direct,
                Some(Via::Relay) if alive && self.relay_up => PathState::Relay,
                // A guessed, unproven endpoint is not a path yet.
                _ => PathState::Down,
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
        NodeStatus {
            node: self.map.as_ref().map(|m| m.node_name.clone()),
            overlay_addr: self.own_addr.map(|a| a.to_string()),
            map_version: self.map.as_ref().map(|m| m.version),
            peers,
            flows: self.flows.len(),
            tcp: self.stack.as_ref().map(|s| s.stats()).unwrap_or_default(),
            drops: self.device.drops,
            counters: self.counters,
            bad_probes: self.paths.bad_probes,
            reflexive_addr: self.stun.reflexive.map(|a| a.to_string()),
            ..NodeStatus::new(kind)
        }
    }
}
