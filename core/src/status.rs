//! The `/status` document of a node, typed: the data plane builds it, `/status` serves it as JSON,
//! and `/metrics`, `tunnelctl status`, `tunnelctl doctor` and the tests read it back through these
//! types rather than by string keys. Field names are the document's contract (DESIGN.md: every
//! peer has `path` = `direct` | `relay` | `down`); a golden file in the tests pins them.
//!
//! Reading is lenient where versions may differ: a field an older node does not send takes its
//! default, and one a newer node adds is ignored.

use serde::{Deserialize, Serialize};

use crate::map::{NodeKind, TargetHealth};
use crate::netstack::StackStats;
use crate::wg::DropCounts;

/// A node's whole status document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's name in the map; `None` before the first map.
    #[serde(default)]
    pub node: Option<String>,
    pub kind: NodeKind,
    #[serde(default)]
    pub overlay_addr: Option<String>,
    #[serde(default)]
    pub map_version: Option<u64>,
    #[serde(default)]
    pub peers: Vec<PeerStatus>,
    /// TCP flows through the userspace stack.
    #[serde(default)]
    pub flows: usize,
    /// A site's UDP flows to its targets.
    #[serde(default)]
    pub udp_flows: usize,
    /// A site's dials of targets not answered yet.
    #[serde(default)]
    pub pending_dials: usize,
    #[serde(default)]
    pub refused: Refused,
    #[serde(default)]
    pub tcp: StackStats,
    #[serde(default)]
    pub drops: DropCounts,
    #[serde(default)]
    pub counters: Counters,
    /// Path probes that failed their check.
    #[serde(default)]
    pub bad_probes: u64,
    /// The node's address as STUN saw it.
    #[serde(default)]
    pub reflexive_addr: Option<String>,
    /// The WireGuard socket's local address.
    #[serde(default)]
    pub listen: Option<String>,
    #[serde(default)]
    pub uptime_secs: u64,
    #[serde(default)]
    pub relay: RelayStatus,
    /// The control link; `None` from a bare data plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<LinkState>,
    /// A site's target health checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Vec<TargetHealth>>,
    /// A client's DNS listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsStatus>,
    /// A client's mode and listeners, which `tunnelctl doctor` needs to test the tunnel the way
    /// applications use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientInfo>,
}

impl NodeStatus {
    /// An empty document for a node of `kind`.
    pub fn new(kind: NodeKind) -> NodeStatus {
        NodeStatus {
            node: None,
            kind,
            overlay_addr: None,
            map_version: None,
            peers: vec![],
            flows: 0,
            udp_flows: 0,
            pending_dials: 0,
            refused: Refused::default(),
            tcp: StackStats::default(),
            drops: DropCounts::default(),
            counters: Counters::default(),
            bad_probes: 0,
            reflexive_addr: None,
            listen: None,
            uptime_secs: 0,
            relay: RelayStatus::default(),
            control: None,
            resources: None,
            dns: None,
            client: None,
        }
    }

    /// The document as served: a JSON object with its keys in sorted order at every level, as
    /// `/status` and `tunnelctl status --json` have always printed it (scripts and the runbook's
    /// `jq -c` lines see the same bytes).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// The peer named `name`.
    pub fn peer(&self, name: &str) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.name == name)
    }
}

/// How a peer is reached now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathState {
    /// Over a direct UDP path that answered probes.
    Direct,
    /// Through the relay, while it is up.
    Relay,
    /// No working path (or no session).
    Down,
}

impl PathState {
    /// Every state, in the order `/metrics` lists them.
    pub const ALL: [PathState; 3] = [PathState::Direct, PathState::Relay, PathState::Down];

    /// `direct`, `relay` or `down`.
    pub fn as_str(self) -> &'static str {
        match self {
            PathState::Direct => "direct",
            PathState::Relay => "relay",
            PathState::Down => "down",
        }
    }
}

impl std::fmt::Display for PathState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One peer as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub node_id: String,
    pub path: PathState,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub last_handshake_secs_ago: Option<u64>,
    #[serde(default)]
    pub tx_bytes: u64,
    #[serde(default)]
    pub rx_bytes: u64,
    /// WireGuard's handshake round trip.
    #[serde(default)]
    pub rtt_ms: Option<u32>,
    /// The direct path's probe round trip.
    #[serde(default)]
    pub path_rtt_us: Option<u64>,
    #[serde(default)]
    pub path_changes: u64,
    #[serde(default)]
    pub punch_attempts: u64,
    #[serde(default)]
    pub punch_successes: u64,
    #[serde(default)]
    pub relay_tx_bytes: u64,
    #[serde(default)]
    pub relay_rx_bytes: u64,
}

/// New flows a site refused because a flow limit was reached, by kind and by limit.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Refused {
    pub pending_dial_peer: u64,
    pub pending_dial_node: u64,
    pub udp_peer: u64,
    pub udp_node: u64,
}

/// Packets refused and flows opened.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
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

/// The relay link.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RelayStatus {
    /// `HOST:PORT` of the relay in use.
    pub relay: Option<String>,
    /// `quic` or `tcp`.
    pub transport: Option<String>,
    /// Registered and able to carry traffic.
    pub up: bool,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

/// The control link's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum LinkState {
    Connecting,
    Connected,
    /// Lost; working from the cached map while retrying.
    Disconnected(String),
    /// Refused or revoked: retrying slowly in case the operator fixes it.
    Rejected(String),
}

impl LinkState {
    /// `connecting`, `connected`, `disconnected` or `rejected`.
    pub fn state(&self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Connected => "connected",
            LinkState::Disconnected(_) => "disconnected",
            LinkState::Rejected(_) => "rejected",
        }
    }

    /// Why it is down; empty while up or connecting.
    pub fn reason(&self) -> &str {
        match self {
            LinkState::Connecting | LinkState::Connected => "",
            LinkState::Disconnected(r) | LinkState::Rejected(r) => r,
        }
    }
}

/// A client's DNS listener: what it forwarded and what it refused.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DnsStatus {
    /// Queries from a source it does not answer (TUN mode answers only this host).
    pub refused_source: u64,
    /// Queries refused because too many were in flight.
    pub refused_busy: u64,
    /// Queries being forwarded to the system's nameservers now.
    pub forwards: u64,
}

/// How a client brings the tunnel to applications.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum ClientInfo {
    /// A SOCKS5 proxy and a DNS listener on loopback.
    Userspace {
        /// The SOCKS5 listener.
        socks5: String,
        /// The DNS listener.
        dns: String,
    },
    /// A TUN device and DNS on the overlay address.
    Tun {
        device: String,
        dns: String,
        /// How the system resolver was pointed at the private zone.
        dns_mode: String,
    },
}

impl ClientInfo {
    /// `userspace` or `tun`.
    pub fn mode(&self) -> &'static str {
        match self {
            ClientInfo::Userspace { .. } => "userspace",
            ClientInfo::Tun { .. } => "tun",
        }
    }

    /// The DNS listener, either mode.
    pub fn dns(&self) -> &str {
        match self {
            ClientInfo::Userspace { dns, .. } | ClientInfo::Tun { dns, .. } => dns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::HealthState;

    /// A document with every field set, so the golden file shows every name.
    fn full() -> NodeStatus {
        NodeStatus {
            node: Some("laptop".into()),
            overlay_addr: Some("100.96.0.2".into()),
            map_version: Some(7),
            peers: vec![PeerStatus {
                name: "home".into(),
                node_id: "n-home".into(),
                path: PathState::Direct,
                endpoint: Some("198.51.100.7:51820".into()),
                last_handshake_secs_ago: Some(12),
                tx_bytes: 1,
                rx_bytes: 2,
                rtt_ms: Some(3),
                path_rtt_us: Some(4),
                path_changes: 5,
                punch_attempts: 6,
                punch_successes: 7,
                relay_tx_bytes: 8,
                relay_rx_bytes: 9,
            }],
            flows: 1,
            udp_flows: 2,
            pending_dials: 3,
            refused: Refused { pending_dial_peer: 1, pending_dial_node: 2, udp_peer: 3, udp_node: 4 },
            tcp: StackStats {
                retransmitted_segments: 1,
                lost_segments: 2,
                recoveries: 3,
                tail_loss_probes: 4,
                timeouts: 5,
                buffer_bytes: 6,
                refused_budget: 7,
                refused_peer_flows: 8,
                refused_node_flows: 9,
                rx_dropped: 10,
                acks_merged: 11,
            },
            drops: DropCounts {
                malformed: 1,
                unknown_peer: 2,
                crypto: 3,
                bad_source: 4,
                no_route: 5,
                no_endpoint: 6,
                handshake_rate: 7,
                relay_sender: 8,
            },
            counters: Counters {
                not_granted: 1,
                unsolicited: 2,
                wrong_destination: 3,
                wrong_port: 4,
                unparsable: 5,
                dial_failures: 6,
                flows_opened: 7,
            },
            bad_probes: 4,
            reflexive_addr: Some("203.0.113.9:40000".into()),
            listen: Some("0.0.0.0:51820".into()),
            uptime_secs: 99,
            relay: RelayStatus {
                relay: Some("192.0.2.1:3479".into()),
                transport: Some("quic".into()),
                up: true,
                last_error: None,
            },
            control: Some(LinkState::Disconnected("server unreachable".into())),
            resources: Some(vec![TargetHealth {
                resource: "web".into(),
                state: HealthState::Healthy,
                detail: "connected".into(),
                checked_ms: 1_700_000_000_000,
            }]),
            dns: Some(DnsStatus { refused_source: 1, refused_busy: 2, forwards: 3 }),
            client: Some(ClientInfo::Userspace {
                socks5: "127.0.0.1:1080".into(),
                dns: "127.0.0.1:5353".into(),
            }),
            ..NodeStatus::new(NodeKind::Client)
        }
    }

    /// The document's field names are a contract (DESIGN.md, and every script that reads
    /// `/status`): this file pins them. After a deliberate change, regenerate it with
    /// `UPDATE_GOLDEN=1 cargo test -p tunnel-core status::tests`.
    #[test]
    fn the_status_document_matches_its_golden_file() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/status.json");
        let got = serde_json::to_string_pretty(&full().to_json()).unwrap() + "\n";
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(path, &got).unwrap();
        }
        let want = std::fs::read_to_string(path).unwrap();
        assert_eq!(got, want, "the /status document changed; see the test's doc comment");
        let back: NodeStatus = serde_json::from_str(&want).unwrap();
        assert_eq!(back, full(), "the golden file reads back as the document it was made from");
    }

    #[test]
    fn a_document_from_an_older_or_newer_node_still_reads() {
        // An older node: only the fields that were always there.
        let old =
            r#"{"kind":"site","peers":[{"name":"a","node_id":"n","path":"relay"}],"relay":{"up":true}}"#;
        let st: NodeStatus = serde_json::from_str(old).unwrap();
        assert_eq!((st.kind, st.peers[0].path, st.relay.up), (NodeKind::Site, PathState::Relay, true));
        assert_eq!(st.drops, DropCounts::default());
        // A newer one: fields this version does not know are ignored.
        let new = r#"{"kind":"client","future":{"x":1},"peers":[],"drops":{"malformed":3,"later":1}}"#;
        let st: NodeStatus = serde_json::from_str(new).unwrap();
        assert_eq!(st.drops.malformed, 3);
        // A path that is none of the three is an error, not a silent "down".
        let bad = r#"{"kind":"client","peers":[{"name":"a","node_id":"n","path":"sideways"}]}"#;
        assert!(serde_json::from_str::<NodeStatus>(bad).is_err());
    }
}
