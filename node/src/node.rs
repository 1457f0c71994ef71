//! Starting a node: key and state from the state dir, the data plane, the control loop, the status
//! listener. The site agent and `tunnelctl up` both start here.

use std::net::{SocketAddr, UdpSocket as StdUdp};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};
use tunnel_core::map::{Candidate, CandidateKind, NetworkMap, NodeKind};
use tunnel_core::JoinToken;

use crate::control::{self, ControlConfig, LinkState};
use crate::dataplane::{self, Dataplane};
use crate::state::StateDir;

/// How to start a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub kind: NodeKind,
    pub token: JoinToken,
    pub state_dir: PathBuf,
    /// WireGuard UDP port (0: any).
    pub listen_port: u16,
    /// Endpoints the operator says the node can be reached at.
    pub advertise: Vec<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub version: String,
    /// WireGuard persistent keepalive and idle path checks (holds NAT mappings open).
    pub keepalive: std::time::Duration,
    /// Never use a direct path: every peer goes through the relay (for networks where punching
    /// misbehaves).
    pub force_relay: bool,
    /// The userspace TCP stack: congestion control and buffer budgets.
    pub tcp: tunnel_core::netstack::StackOptions,
}

/// TUN mode: the packet channels to the system, set up by the caller.
pub type OsPackets = crate::dataplane::OsPackets;

/// A running node.
#[derive(Debug)]
pub struct RunningNode {
    pub dataplane: Dataplane,
    pub maps: watch::Receiver<Option<Arc<NetworkMap>>>,
    pub link: watch::Receiver<LinkState>,
    pub status_addr: Option<SocketAddr>,
    /// Fields the caller adds to `/status`.
    pub status_extra: crate::http::StatusExtra,
    pub state: StateDir,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The local address this host would use to reach `server` (no packet is sent: a UDP connect only
/// picks a route).
fn local_ip_towards(server: &str) -> Option<std::net::IpAddr> {
    let s = StdUdp::bind("0.0.0.0:0").ok()?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(server).ok()?.find(SocketAddr::is_ipv4)?;
    s.connect(addr).ok()?;
    Some(s.local_addr().ok()?.ip())
}

/// Starts the node; it runs until the returned value is dropped.
pub async fn start(cfg: NodeConfig) -> Result<RunningNode> {
    start_with(cfg, None).await
}

/// Starts the node, with inner packets exchanged with the system through `os` (TUN mode).
pub async fn start_with(cfg: NodeConfig, os: Option<OsPackets>) -> Result<RunningNode> {
    let state = StateDir::open(&cfg.state_dir)?;
    let key = state.private_key().context("cannot load the node's key")?;
    let listen: SocketAddr = ([0, 0, 0, 0], cfg.listen_port).into();
    let (map_tx, map_rx) = watch::channel(state.load_map().map(Arc::new));
    let map_rx_for_health = map_rx.clone();
    // The port is known before binding only when fixed; with port 0 the LAN candidate follows the bind.
    let (cand_tx, cand_rx) = mpsc::channel(4);
    let lan_ip = local_ip_towards(&cfg.token.server);
    let advertised: Vec<Candidate> =
        cfg.advertise.iter().map(|a| Candidate::new(*a, CandidateKind::Advertised)).collect();
    let socket = dataplane::bind_socket(listen)?;
    let port = socket.local_addr()?.port();
    let mut candidates = advertised;
    if let Some(ip) = lan_ip {
        candidates.push(Candidate::new(SocketAddr::new(ip, port), CandidateKind::Lan));
    }
    let opts = dataplane::PathOptions {
        keepalive: cfg.keepalive,
        force_relay: cfg.force_relay,
        base_candidates: candidates.clone(),
        candidates_tx: Some(cand_tx),
        stack: cfg.tcp,
    };
    let (dp, dp_task) = dataplane::start_on(cfg.kind, key, socket, map_rx, os, opts).await?;
    let control_cfg = ControlConfig {
        token: cfg.token.clone(),
        private_key: Some(crate::control::NodeKey(key)),
        public_key: tunnel_core::wg::public_key(key),
        version: cfg.version.clone(),
        candidates,
    };
    // Sites check their resources' targets and report them.
    let (health_rx, health_task) = if cfg.kind == NodeKind::Site {
        let (rx, task) = crate::health::start(map_rx_for_health);
        (Some(rx), Some(task))
    } else {
        (None, None)
    };
    let (mut maps, link, control_task) =
        control::run(control_cfg, Some(state.clone()), cand_rx, health_rx.clone());
    // Forward maps from the control loop to the data plane (the data plane started from the cache).
    let forward = tokio::spawn({
        let mut maps = maps.clone();
        async move {
            while maps.changed().await.is_ok() {
                let m = maps.borrow_and_update().clone();
                if m.is_some() {
                    let _ = map_tx.send(m);
                }
            }
        }
    });
    maps.mark_unchanged();
    let mut tasks = vec![dp_task, control_task, forward];
    tasks.extend(health_task);
    let status_extra = crate::http::StatusExtra::default();
    let status_addr = match cfg.metrics_listen {
        Some(a) => {
            let (bound, t) =
                crate::http::serve(a, dp.clone(), link.clone(), health_rx.clone(), status_extra.clone())
                    .await?;
            state.save_status_addr(bound)?;
            tasks.push(t);
            Some(bound)
        }
        None => None,
    };
    tracing::info!(kind = cfg.kind.as_str(), udp = %dp.local_addr, status = ?status_addr, "node started");
    Ok(RunningNode { dataplane: dp, maps, link, status_addr, status_extra, state, tasks })
}
