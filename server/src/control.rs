//! `Control.Connect`: authenticate a node, open its session, and serve it until it goes away or its
//! credentials stop being valid.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tunnel_core::NodeId;
use tunnel_proto::v1 as pb;
use tunnel_proto::v1::control_server::Control;

use crate::convert;
use crate::hub::{Outbound, SESSION_QUEUE};
use crate::state::{encode_key, now_ms, Shared};

/// How a session ends from the server's side.
#[derive(Debug)]
pub enum SessionEnd {
    /// Credentials are no longer valid: tell the node why.
    Revoked(String),
    /// The server is stopping: the node should reconnect later.
    Shutdown,
}

/// Capabilities this server offers in Welcome.
pub const SERVER_CAPABILITIES: &[&str] = &["delta-v1", "ticket-v1"];

/// The Control service.
#[derive(Debug, Clone)]
pub struct ControlService {
    pub shared: Arc<Shared>,
}

struct Authenticated {
    id: NodeId,
    name: String,
    generation: i64,
    public_key: [u8; 32],
    used_secret: bool,
    /// The join secret is used up after this login (it was already, or this is its single use).
    join_used: bool,
    key_changed: bool,
}

impl ControlService {
    async fn authenticate(&self, hello: &pb::Hello, ip: IpAddr) -> Result<Authenticated, Status> {
        let shared = &self.shared;
        let now = Instant::now();
        let fail = |msg: String| {
            shared.limiter.failed(ip, now);
            Status::unauthenticated(msg)
        };
        let id: NodeId = hello.node_id.parse().map_err(|_| fail("malformed node id".into()))?;
        let public_key: [u8; 32] = hello
            .public_key
            .as_slice()
            .try_into()
            .map_err(|_| Status::invalid_argument("the public key must be 32 bytes (X25519)"))?;
        let (node, key_taken) = {
            let m = shared.model();
            let taken = m.reg.nodes.values().any(|n| n.id != id && n.public_key == Some(public_key));
            (m.reg.nodes.get(&id).cloned(), taken)
        };
        if key_taken {
            // Sites key peers by public key: a second node with the same key would take over the
            // first one's identity on every site.
            return Err(Status::invalid_argument("this public key is already registered to another node"));
        }
        let Some(node) = node else {
            return Err(fail(format!(
                "node {id} is not known to this server: it was removed, or the token belongs to another server"
            )));
        };
        if !hello.session_ticket.is_empty()
            && shared.tickets.check(&hello.session_ticket, id.as_str(), node.generation, &public_key)
        {
            return Ok(Authenticated {
                id,
                name: node.name,
                generation: node.generation,
                key_changed: node.public_key != Some(public_key),
                public_key,
                used_secret: false,
                join_used: node.join_used,
            });
        }
        if hello.secret.is_empty() {
            return Err(fail(
                "the saved session is no longer valid (the node's secret was rotated?); join again with a new token"
                    .into(),
            ));
        }
        if node.join_once && node.join_used {
            return Err(fail(
                "this single-use join token was already used; make a new one with `tunnelctl site|client rotate NAME`"
                    .into(),
            ));
        }
        if node.join_expires_ms != 0 && now_ms() > node.join_expires_ms {
            return Err(fail(
                "this join token has expired; make a new one with `tunnelctl site|client rotate NAME`".into(),
            ));
        }
        if !shared.hasher.verify(hello.secret.clone(), node.secret_hash.clone()).await {
            return Err(fail("wrong secret for this node".into()));
        }
        Ok(Authenticated {
            id,
            name: node.name,
            generation: node.generation,
            key_changed: node.public_key != Some(public_key),
            public_key,
            used_secret: true,
            join_used: node.join_used || node.join_once,
        })
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    type ConnectStream = ReceiverStream<Outbound>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::NodeMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let shared = self.shared.clone();
        let source = request.remote_addr();
        let ip = source.map(|a| a.ip()).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let source_text = source.map(|a| a.to_string()).unwrap_or_else(|| "unknown".into());
        if let Err(wait) = shared.limiter.check(ip, Instant::now()) {
            return Err(Status::resource_exhausted(format!(
                "too many failed logins from {ip}; try again in {}s",
                wait.as_secs().max(1)
            )));
        }
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(Duration::from_secs(15), inbound.message()).await {
            Ok(Ok(Some(pb::NodeMessage { msg: Some(pb::node_message::Msg::Hello(h)) }))) => h,
            Ok(Ok(_)) => return Err(Status::invalid_argument("the first message must be Hello")),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 15s")),
        };
        let auth = match self.authenticate(&hello, ip).await {
            Ok(a) => a,
            Err(status) => {
                shared
                    .audit(
                        &format!("node:{}", hello.node_id),
                        "login",
                        &hello.node_id,
                        &source_text,
                        &format!("denied: {}", status.message()),
                    )
                    .await;
                return Err(status);
            }
        };
        let now = now_ms();
        if auth.used_secret || auth.key_changed {
            // Persist before the session opens: peers must never learn a key the database lacks.
            let _w = shared.write_lock().await;
            let current = shared
                .store
                .record_join(
                    auth.id.as_str(),
                    auth.generation,
                    &encode_key(&auth.public_key),
                    auth.join_used,
                    &hello.version,
                    now,
                )
                .await
                .map_err(|e| Status::unavailable(format!("{e}; try again")))?;
            if !current {
                // Rotated (or removed) while this login was in flight: its credentials are void, and its
                // key must not replace the cleared one.
                return Err(Status::unauthenticated(
                    "the node's secret was rotated during login; join with the new token",
                ));
            }
        }
        shared
            .audit(
                &format!("node:{}", auth.name),
                "login",
                auth.id.as_str(),
                &source_text,
                if auth.used_secret { "ok (join secret)" } else { "ok (session ticket)" },
            )
            .await;

        let (tx, rx) = mpsc::channel::<Outbound>(SESSION_QUEUE);
        let welcome = pb::Welcome {
            server_version: shared.facts.version.clone(),
            capabilities: SERVER_CAPABILITIES.iter().map(|s| s.to_string()).collect(),
            session_ticket: shared.tickets.issue(auth.id.as_str(), auth.generation, &auth.public_key, now),
            server_time_ms: now,
        };
        tx.try_send(Ok(pb::ServerMessage { msg: Some(pb::server_message::Msg::Welcome(welcome)) }))
            .map_err(|_| Status::internal("session queue unavailable"))?;
        let candidates: Vec<_> = hello.candidates.iter().filter_map(convert::candidate_from_pb).collect();
        let (session_id, kill_rx) = {
            let mut guard = shared.model();
            let m = &mut *guard;
            if let Some(n) = m.reg.nodes.get_mut(&auth.id) {
                if n.generation != auth.generation {
                    // Rotated while this login was in flight: the credentials it used are void, and
                    // nothing of it (key, presence) may stick.
                    return Err(Status::unauthenticated(
                        "the node's secret was rotated during login; join with the new token",
                    ));
                }
                n.public_key = Some(auth.public_key);
                n.candidates = candidates;
                n.online = true;
                n.version = hello.version.clone();
                n.last_seen_ms = now;
                n.join_used = auth.join_used;
            } else {
                return Err(Status::unauthenticated("node was removed while joining"));
            }
            m.hub.mark_dirty(&auth.id);
            m.hub.open(&m.reg, &auth.id, tx.clone())
        };
        tracing::info!(node = %auth.id, name = %auth.name, source = %source_text, version = %hello.version, "node connected");
        tokio::spawn(serve_session(shared, auth.id, auth.name, session_id, inbound, tx, kill_rx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn serve_session(
    shared: Arc<Shared>,
    id: NodeId,
    name: String,
    session_id: u64,
    mut inbound: Streaming<pb::NodeMessage>,
    tx: mpsc::Sender<Outbound>,
    mut kill_rx: oneshot::Receiver<SessionEnd>,
) {
    let end = loop {
        tokio::select! {
            end = &mut kill_rx => {
                match end {
                    Ok(SessionEnd::Revoked(reason)) => {
                        let msg = pb::ServerMessage { msg: Some(pb::server_message::Msg::Revoked(pb::Revoked { reason: reason.clone() })) };
                        let _ = tokio::time::timeout(Duration::from_secs(2), tx.send(Ok(msg))).await;
                        break format!("revoked: {reason}");
                    }
                    Ok(SessionEnd::Shutdown) => {
                        let _ = tx.try_send(Err(Status::unavailable("the server is shutting down; reconnect later")));
                        break "server shutdown".to_owned();
                    }
                    Err(_) => break "replaced".to_owned(),
                }
            }
            msg = inbound.message() => match msg {
                Ok(Some(pb::NodeMessage { msg: Some(m) })) => handle(&shared, &id, m),
                Ok(Some(_)) => {}
                Ok(None) => break "node closed the stream".to_owned(),
                Err(e) => break format!("stream error: {}", e.message()),
            }
        }
    };
    let now = now_ms();
    {
        let mut guard = shared.model();
        let m = &mut *guard;
        if m.hub.close(&id, session_id) {
            if let Some(n) = m.reg.nodes.get_mut(&id) {
                n.online = false;
                n.last_seen_ms = now;
            }
            m.hub.mark_dirty(&id);
        }
    }
    shared.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone(), now);
    tracing::info!(node = %id, %name, reason = %end, "node disconnected");
}

fn handle(shared: &Shared, id: &NodeId, msg: pb::node_message::Msg) {
    let mut guard = shared.model();
    let m = &mut *guard;
    match msg {
        pb::node_message::Msg::Endpoints(u) => {
            let candidates: Vec<_> = u.candidates.iter().filter_map(convert::candidate_from_pb).collect();
            if let Some(n) = m.reg.nodes.get_mut(id) {
                if n.candidates != candidates {
                    n.candidates = candidates;
                    m.hub.mark_dirty(id);
                }
            }
        }
        pb::node_message::Msg::MapRequest(r) => {
            tracing::info!(node = %id, have = r.have_version, "node asked for a full map");
            m.hub.request_full(&m.reg, id);
        }
        pb::node_message::Msg::Health(h) => {
            // A site speaks only for its own resources.
            for t in h.targets {
                if m.reg.resources.get(&t.resource).is_none_or(|r| &r.site != id) {
                    continue;
                }
                let state = match pb::HealthState::try_from(t.state) {
                    Ok(pb::HealthState::Healthy) => tunnel_core::map::HealthState::Healthy,
                    Ok(pb::HealthState::Unhealthy) => tunnel_core::map::HealthState::Unhealthy,
                    _ => tunnel_core::map::HealthState::Unknown,
                };
                let detail: String = t.detail.chars().take(200).collect();
                m.reg.health.insert(
                    t.resource.clone(),
                    tunnel_core::map::TargetHealth {
                        resource: t.resource,
                        state,
                        detail,
                        checked_ms: t.checked_ms,
                    },
                );
            }
        }
        pb::node_message::Msg::Hello(_) => {
            tracing::debug!(node = %id, "ignoring a second Hello");
        }
    }
}
