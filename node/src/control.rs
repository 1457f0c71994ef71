//! The node's side of `Control.Connect`: one session ([`ControlSession`]) and the loop that keeps one
//! open across server restarts ([`run`]).
//!
//! While the server is away the node keeps its last map (and so every tunnel); it reconnects with
//! capped exponential backoff and jitter, and logs each state change once, not once per attempt.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};
use tunnel_core::keyproof::{self, KEY_PROOF_CAPABILITY};
use tunnel_core::map::{Candidate, NetworkMap};
use tunnel_core::JoinToken;
use tunnel_proto::v1 as pb;
use tunnel_proto::v1::control_client::ControlClient;
use tunnel_wire as wire;

use crate::state::StateDir;
use crate::tls::{self, ConnectError, ServerTarget};

/// Capabilities this node understands.
pub const NODE_CAPABILITIES: &[&str] = tunnel_core::capability::ALL;

/// The largest server message this node decodes, announced in Hello: the server splits bigger maps.
/// (Nodes before this announcement decode 4 MiB, tonic's default.)
pub const MAX_SERVER_MESSAGE: usize = 16 << 20;

/// The node's WireGuard private key, for the login's key proof; never printed.
#[derive(Clone)]
pub struct NodeKey(pub [u8; 32]);

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeKey(<redacted>)")
    }
}

/// What a node needs to hold a control session.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    pub token: JoinToken,
    /// The private key whose public half is `public_key`: it answers the server's key challenge.
    /// `None` logs in as nodes before key-proof-v1 did (tests of old nodes, benchmarks with made-up keys).
    pub private_key: Option<NodeKey>,
    pub public_key: tunnel_core::PublicKey,
    pub version: String,
    pub candidates: Vec<Candidate>,
}

/// Why a session ended or could not start.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The server refused the credentials; retrying with the same ones will not help.
    #[error("the server refused this node: {0}")]
    Rejected(String),
    /// The server ended the session because the node was removed or its secret rotated.
    #[error("the server revoked this node's session: {0}")]
    Revoked(String),
    #[error("control stream ended: {0}")]
    Lost(String),
    #[error(transparent)]
    Malformed(#[from] wire::Malformed),
}

/// One open control session.
#[derive(Debug)]
pub struct ControlSession {
    out: mpsc::Sender<pb::NodeMessage>,
    inbound: Streaming<pb::ServerMessage>,
    /// The server's Welcome.
    pub welcome: pb::Welcome,
    /// The map as of the last message applied.
    pub map: Option<NetworkMap>,
}

impl ControlSession {
    /// Connects, says hello (with `ticket` when there is one, else the join secret), and waits for the
    /// server's Welcome.
    pub async fn open(cfg: &ControlConfig, ticket: Option<&[u8]>) -> Result<ControlSession, SessionError> {
        let target = ServerTarget { server: cfg.token.server.clone(), pin: cfg.token.pin };
        let channel = tls::connect(&target).await?;
        let mut client = ControlClient::new(channel).max_decoding_message_size(MAX_SERVER_MESSAGE);
        let (out, rx) = mpsc::channel(16);
        let hello = pb::Hello {
            node_id: cfg.token.node_id.to_string(),
            secret: if ticket.is_some() { String::new() } else { cfg.token.secret.expose().to_owned() },
            session_ticket: ticket.map(<[u8]>::to_vec).unwrap_or_default(),
            public_key: cfg.public_key.0.to_vec(),
            version: cfg.version.clone(),
            capabilities: NODE_CAPABILITIES
                .iter()
                .filter(|c| cfg.private_key.is_some() || **c != KEY_PROOF_CAPABILITY)
                .map(|s| s.to_string())
                .collect(),
            candidates: cfg.candidates.iter().map(wire::candidate_to_pb).collect(),
            max_message_bytes: MAX_SERVER_MESSAGE as u32,
        };
        out.send(pb::NodeMessage { msg: Some(pb::node_message::Msg::Hello(hello)) })
            .await
            .map_err(|_| SessionError::Lost("stream closed".into()))?;
        let mut inbound = client.connect(ReceiverStream::new(rx)).await.map_err(status_error)?.into_inner();
        let mut challenged = false;
        let welcome = loop {
            match inbound.message().await.map_err(status_error)? {
                Some(pb::ServerMessage { msg: Some(pb::server_message::Msg::Welcome(w)) }) => break w,
                Some(pb::ServerMessage { msg: Some(pb::server_message::Msg::KeyChallenge(c)) })
                    if !challenged =>
                {
                    let Some(key) = &cfg.private_key else {
                        return Err(SessionError::Lost(
                            "the server sent a key challenge this node did not ask for".into(),
                        ));
                    };
                    // Prove we hold the private key of the public key in Hello (tunnel_core::keyproof).
                    challenged = true;
                    let server_public: [u8; 32] =
                        c.server_public.as_slice().try_into().map_err(|_| {
                            SessionError::Lost("the server's key challenge is malformed".into())
                        })?;
                    let mac = keyproof::prove(&key.0, cfg.token.node_id.as_str(), &server_public);
                    let msg = pb::NodeMessage {
                        msg: Some(pb::node_message::Msg::KeyProof(pb::KeyProof { mac: mac.to_vec() })),
                    };
                    out.send(msg).await.map_err(|_| SessionError::Lost("stream closed".into()))?;
                }
                Some(_) => return Err(SessionError::Lost("the server did not start with Welcome".into())),
                None => return Err(SessionError::Lost("the server closed the stream".into())),
            }
        };
        Ok(ControlSession { out, inbound, welcome, map: None })
    }

    /// Waits for the next change and returns the updated map. Gaps are repaired by asking for a full
    /// map; the caller sees only consistent maps.
    pub async fn next_map(&mut self) -> Result<&NetworkMap, SessionError> {
        loop {
            let msg = self.inbound.message().await.map_err(status_error)?;
            let Some(pb::ServerMessage { msg: Some(msg) }) = msg else {
                if msg.is_none() {
                    return Err(SessionError::Lost("the server closed the stream".into()));
                }
                continue;
            };
            match msg {
                pb::server_message::Msg::FullMap(m) => {
                    let m = wire::map_from_pb(&m)?;
                    tracing::info!(
                        version = m.version,
                        peers = m.peers.len(),
                        resources = m.resources.len(),
                        "network map received"
                    );
                    self.map = Some(m);
                }
                pb::server_message::Msg::Delta(d) => {
                    let d = wire::delta_from_pb(&d)?;
                    let Some(map) = self.map.as_mut() else {
                        self.request_full(0).await?;
                        continue;
                    };
                    let version = d.version;
                    if let Err(e) = map.apply(d) {
                        tracing::warn!(error = %e, "map delta out of order; asking for the full map");
                        let have = map.version;
                        self.request_full(have).await?;
                        continue;
                    }
                    tracing::info!(version, "network map updated");
                }
                pb::server_message::Msg::Revoked(r) => return Err(SessionError::Revoked(r.reason)),
                pb::server_message::Msg::Welcome(_) | pb::server_message::Msg::KeyChallenge(_) => continue,
            }
            if self.map.is_some() {
                break;
            }
        }
        self.map.as_ref().ok_or_else(|| SessionError::Lost("no map".into()))
    }

    async fn request_full(&self, have: u64) -> Result<(), SessionError> {
        let msg = pb::NodeMessage {
            msg: Some(pb::node_message::Msg::MapRequest(pb::MapRequest { have_version: have })),
        };
        self.out.send(msg).await.map_err(|_| SessionError::Lost("stream closed".into()))
    }

    /// Reports the health of the site's targets.
    pub async fn send_health(&self, report: &[tunnel_core::map::TargetHealth]) -> Result<(), SessionError> {
        let msg = pb::NodeMessage {
            msg: Some(pb::node_message::Msg::Health(pb::ResourceHealth {
                targets: report.iter().map(wire::health_to_pb).collect(),
            })),
        };
        self.out.send(msg).await.map_err(|_| SessionError::Lost("stream closed".into()))
    }

    /// Reports new candidates.
    pub async fn send_candidates(&self, candidates: &[Candidate]) -> Result<(), SessionError> {
        let msg = pb::NodeMessage {
            msg: Some(pb::node_message::Msg::Endpoints(pb::EndpointUpdate {
                candidates: candidates.iter().map(wire::candidate_to_pb).collect(),
            })),
        };
        self.out.send(msg).await.map_err(|_| SessionError::Lost("stream closed".into()))
    }
}

fn status_error(s: tonic::Status) -> SessionError {
    match s.code() {
        Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument => {
            SessionError::Rejected(s.message().to_owned())
        }
        Code::OutOfRange => {
            // A message over what this node decodes: it would come back on every reconnect, so say
            // it loudly instead of looping quietly on the cached map.
            tracing::error!(
                limit = MAX_SERVER_MESSAGE,
                error = %s.message(),
                "the server sent a message larger than this node accepts; working from the last map"
            );
            SessionError::Lost(format!("message from the server over this node's limit: {}", s.message()))
        }
        _ => SessionError::Lost(if s.message().is_empty() {
            s.code().to_string()
        } else {
            s.message().to_owned()
        }),
    }
}

pub use tunnel_core::status::LinkState;

/// Keeps a control session open for as long as the returned task runs: publishes every map through
/// `maps` (starting with the cached one, if any) and the link state through `link`. New candidates sent
/// on `candidates` are reported to the server, and so are target health reports (`health`, sites only:
/// the latest at every connect, then each change).
pub fn run(
    cfg: ControlConfig,
    state: Option<StateDir>,
    mut candidates: mpsc::Receiver<Vec<Candidate>>,
    mut health: Option<watch::Receiver<Vec<tunnel_core::map::TargetHealth>>>,
) -> (watch::Receiver<Option<Arc<NetworkMap>>>, watch::Receiver<LinkState>, tokio::task::JoinHandle<()>) {
    let cached = state.as_ref().and_then(|s| s.load_map());
    let (map_tx, map_rx) = watch::channel(cached.map(Arc::new));
    let (link_tx, link_rx) = watch::channel(LinkState::Connecting);
    let task = tokio::spawn(async move {
        let mut cfg = cfg;
        let mut backoff = Backoff::new();
        let mut use_ticket = true;
        loop {
            let ticket = if use_ticket { state.as_ref().and_then(StateDir::load_ticket) } else { None };
            let with_ticket = ticket.is_some();
            match ControlSession::open(&cfg, ticket.as_deref()).await {
                Ok(mut session) => {
                    if let Some(s) = &state {
                        if let Err(e) = s.save_ticket(&session.welcome.session_ticket) {
                            tracing::warn!(error = %e, "cannot save the session ticket");
                        }
                    }
                    set_link(&link_tx, LinkState::Connected);
                    backoff.reset();
                    use_ticket = true;
                    let first = health.as_mut().map(|h| h.borrow_and_update().clone()).unwrap_or_default();
                    if !first.is_empty() {
                        let _ = session.send_health(&first).await;
                    }
                    let end = loop {
                        tokio::select! {
                            r = session.next_map() => match r {
                                Ok(map) => {
                                    if let Some(s) = &state {
                                        if let Err(e) = s.save_map(map) {
                                            tracing::warn!(error = %e, "cannot cache the network map");
                                        }
                                    }
                                    let _ = map_tx.send(Some(Arc::new(map.clone())));
                                }
                                Err(e) => break e,
                            },
                            Some(c) = candidates.recv() => {
                                cfg.candidates = c;
                                if let Err(e) = session.send_candidates(&cfg.candidates).await {
                                    break e;
                                }
                            }
                            Ok(report) = async {
                                match health.as_mut() {
                                    Some(h) => h.changed().await.map(|_| h.borrow_and_update().clone()),
                                    None => std::future::pending().await,
                                }
                            } => {
                                if let Err(e) = session.send_health(&report).await {
                                    break e;
                                }
                            }
                        }
                    };
                    match end {
                        SessionError::Revoked(reason) => {
                            set_link(&link_tx, LinkState::Rejected(reason));
                            use_ticket = false;
                            backoff.fail_hard();
                        }
                        other => set_link(&link_tx, LinkState::Disconnected(other.to_string())),
                    }
                }
                Err(SessionError::Rejected(reason)) if with_ticket => {
                    // The ticket is stale (rotated secret, new server data): try the join secret next.
                    tracing::info!(%reason, "session ticket refused; joining with the token");
                    use_ticket = false;
                    continue;
                }
                Err(SessionError::Rejected(reason)) => {
                    set_link(&link_tx, LinkState::Rejected(reason));
                    use_ticket = true;
                    backoff.fail_hard();
                }
                Err(e) => set_link(&link_tx, LinkState::Disconnected(e.to_string())),
            }
            tokio::time::sleep(backoff.next_wait()).await;
        }
    });
    (map_rx, link_rx, task)
}

fn set_link(tx: &watch::Sender<LinkState>, s: LinkState) {
    tx.send_if_modified(|cur| {
        if *cur == s {
            return false;
        }
        match &s {
            LinkState::Connected => tracing::info!("control link up"),
            LinkState::Connecting => {}
            LinkState::Disconnected(reason) => {
                tracing::warn!(%reason, "control link down; keeping tunnels on the cached map and retrying")
            }
            LinkState::Rejected(reason) => tracing::error!(%reason, "the server refused this node"),
        }
        *cur = s;
        true
    });
}

/// Capped exponential backoff with full jitter: 0.5 s doubling to 30 s (5 min after a hard refusal).
#[derive(Debug)]
pub struct Backoff {
    attempt: u32,
    hard: bool,
}

impl Backoff {
    /// A fresh backoff.
    pub fn new() -> Self {
        Backoff { attempt: 0, hard: false }
    }
    /// After a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.hard = false;
    }
    /// After a refusal: retry slowly.
    pub fn fail_hard(&mut self) {
        self.hard = true;
    }
    /// The next wait.
    pub fn next_wait(&mut self) -> Duration {
        let cap = if self.hard { 300.0 } else { 30.0 };
        let base = (0.5 * 2f64.powi(self.attempt.min(16) as i32)).min(cap);
        self.attempt += 1;
        let jittered = rand::thread_rng().gen_range(base / 2.0..=base);
        Duration::from_secs_f64(jittered)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the node keeps what it needs across restarts.
pub fn default_state_dir(kind: &str) -> PathBuf {
    PathBuf::from(format!("/var/lib/tunnel-{kind}"))
}
