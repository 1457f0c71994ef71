//! `Control.Connect`: authenticate a node, open its session, and serve it until it goes away or its
//! credentials stop being valid.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tunnel_core::{NodeId, PublicKey};
use tunnel_proto::v1 as pb;
use tunnel_proto::v1::control_server::Control;

use rand::RngCore;
use tunnel_core::keyproof::{KeyChallenge, KEY_PROOF_CAPABILITY};
use tunnel_core::Secret;

use crate::convert;
use crate::hub::{Outbound, SessionEnd, SESSION_QUEUE};
use crate::limits::{bump, source_key, Refusal};
use crate::state::{now_ms, Shared};
use crate::store::{clip, JoinRecord};

/// Capabilities this server offers in Welcome.
pub const SERVER_CAPABILITIES: &[&str] = tunnel_core::capability::ALL;

/// How long a node has to send Hello, and to answer a key challenge.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
const PROOF_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest node version string kept (it is stored, logged and shown).
const VERSION_MAX: usize = 64;

/// The largest message an older node (one that does not say) decodes: tonic's default.
pub const DEFAULT_NODE_MAX_MESSAGE: usize = 4 << 20;

/// Endpoint updates a session may apply at once, and then one per this interval; the latest held
/// back is applied when the budget allows, so none is lost, but a node cannot make the server push a
/// map change to every peer many times a second.
const ENDPOINT_BURST: f64 = 5.0;
const ENDPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// The Control service.
#[derive(Debug, Clone)]
pub struct ControlService {
    pub shared: Arc<Shared>,
}

struct Authenticated {
    id: NodeId,
    name: String,
    generation: i64,
    public_key: PublicKey,
    used_secret: bool,
    /// The join secret is used up after this login (it was already, or this is its single use).
    join_used: bool,
    /// This login spends a single-use secret: the database must see it unused as it marks it.
    spends_once: bool,
    key_changed: bool,
    proved_key: bool,
}

/// A login's stream, its source and what it said first.
struct Login<'a> {
    shared: &'a Shared,
    hello: &'a pb::Hello,
    inbound: &'a mut Streaming<pb::NodeMessage>,
    tx: &'a mpsc::Sender<Outbound>,
    /// The source as every per-source limit counts it.
    key: IpAddr,
    source: &'a str,
}

fn exhausted(what: &str, r: Refusal) -> Status {
    Status::resource_exhausted(format!("{what}; {r}"))
}

impl Login<'_> {
    /// Takes a token from the source's failed-login budget: the attempt is charged before any work.
    fn charge_source(&self) -> Result<(), Status> {
        self.shared.gate.failed.take(&self.key, Instant::now()).map_err(|r| {
            bump(&self.shared.gate.stats.refused_source);
            exhausted(&format!("too many failed (or unfinished) logins from {}", self.key), r)
        })
    }

    /// Spends one of the node's logins (a successful one): reconnects are cheap to check but each
    /// one builds and signs a map, so even a node with valid credentials cannot log in in a loop.
    fn spend_node_budget(&self, id: &NodeId) -> Result<(), Status> {
        self.shared.gate.per_node.take(&id.to_string(), Instant::now()).map_err(|r| {
            bump(&self.shared.gate.stats.refused_node);
            exhausted(&format!("too many logins for node {id}"), r)
        })
    }

    /// Sends a challenge and checks the answer.
    async fn prove_key(&mut self, id: &NodeId, public_key: &[u8; 32]) -> Result<(), Status> {
        let mut random = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut random);
        let challenge = KeyChallenge::new(random);
        let msg = pb::ServerMessage {
            msg: Some(pb::server_message::Msg::KeyChallenge(pb::KeyChallenge {
                server_public: challenge.public().to_vec(),
            })),
        };
        self.tx.send(Ok(msg)).await.map_err(|_| Status::cancelled("the node went away"))?;
        let proof = match tokio::time::timeout(PROOF_TIMEOUT, self.inbound.message()).await {
            Ok(Ok(Some(pb::NodeMessage { msg: Some(pb::node_message::Msg::KeyProof(p)) }))) => p.mac,
            Ok(Ok(_)) => Vec::new(),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Status::deadline_exceeded("no key proof within 10s")),
        };
        if challenge.verify(id.as_str(), public_key, &proof) {
            Ok(())
        } else {
            bump(&self.shared.gate.stats.refused_key_proof);
            Err(Status::unauthenticated(
                "the node could not prove it holds the private key of its public key",
            ))
        }
    }

    async fn authenticate(&mut self) -> Result<Authenticated, Status> {
        let shared = self.shared;
        let hello = self.hello;
        let Ok(id) = hello.node_id.parse::<NodeId>() else {
            self.charge_source()?;
            return Err(Status::unauthenticated("malformed node id"));
        };
        let public_key = match PublicKey::from_slice(&hello.public_key) {
            Some(k) => k,
            None => {
                self.charge_source()?;
                return Err(Status::invalid_argument("the public key must be 32 bytes (X25519)"));
            }
        };
        let (node, key_taken) = {
            let m = shared.model();
            let taken = m.reg.nodes.values().any(|n| n.id != id && n.public_key == Some(public_key));
            (m.reg.nodes.get(&id).cloned(), taken)
        };
        let Some(node) = node else {
            self.charge_source()?;
            return Err(Status::unauthenticated(format!(
                "node {id} is not known to this server: it was removed, or the token belongs to another server"
            )));
        };
        // A node whose login budget is spent is refused before any check. Only logins that succeed
        // spend it (see `spend_node_budget`): a stranger who knows a node's id cannot lock it out.
        if !shared.gate.per_node.has_token(&id.to_string(), Instant::now()) {
            bump(&shared.gate.stats.refused_node);
            return Err(Status::resource_exhausted(format!(
                "too many logins for node {id}; try again in a minute"
            )));
        }
        if key_taken {
            // Sites key peers by public key: a second node with the same key would take over the
            // first one's identity on every site.
            return Err(Status::invalid_argument("this public key is already registered to another node"));
        }
        let proved_key = hello.capabilities.iter().any(|c| c == KEY_PROOF_CAPABILITY);
        if proved_key {
            self.prove_key(&id, public_key.as_bytes()).await?;
        } else if shared.gate.limits.require_key_proof {
            bump(&shared.gate.stats.refused_key_proof);
            return Err(Status::permission_denied(
                "this server requires nodes to prove they hold their key (--require-key-proof): upgrade this node",
            ));
        }
        if !hello.session_ticket.is_empty()
            && shared.tickets.check(
                &hello.session_ticket,
                id.as_str(),
                node.generation,
                public_key.as_bytes(),
            )
        {
            self.spend_node_budget(&id)?;
            return Ok(Authenticated {
                id,
                name: node.name,
                generation: node.generation,
                key_changed: node.public_key != Some(public_key),
                public_key,
                used_secret: false,
                join_used: node.join_used,
                spends_once: false,
                proved_key,
            });
        }
        if hello.secret.is_empty() {
            // A stale or forged ticket. It cost one HMAC, so the source's failed-login budget is left
            // alone (a fleet behind one NAT reconnecting after a rotation must not lock out its
            // neighbours); a per-node budget of failures keeps a stream of them from being written
            // to the audit log one by one.
            if shared.gate.ticket_failed.take(&id.to_string(), Instant::now()).is_err() {
                bump(&shared.gate.stats.refused_node);
                return Err(Status::resource_exhausted(format!(
                    "too many stale session tickets for node {id}"
                )));
            }
            return Err(Status::unauthenticated(
                "the saved session is no longer valid (the node's secret was rotated?); join again with a new token",
            ));
        }
        // A join secret: charged to the source on admission, given back if it is right.
        self.charge_source()?;
        if !Secret::well_formed(&hello.secret) {
            bump(&shared.gate.stats.refused_malformed);
            return Err(Status::unauthenticated("wrong secret for this node"));
        }
        if node.join_once && node.join_used {
            return Err(Status::unauthenticated(
                "this single-use join token was already used; make a new one with `tunnelctl site|client rotate NAME`",
            ));
        }
        if node.join_expires_ms != 0 && now_ms() > node.join_expires_ms {
            return Err(Status::unauthenticated(
                "this join token has expired; make a new one with `tunnelctl site|client rotate NAME`",
            ));
        }
        let Some(_slot) = shared.gate.inflight.enter(self.key) else {
            bump(&shared.gate.stats.refused_inflight);
            // The token stays spent: given back, a flood from many sources would keep the cap full
            // for ever (seen in bench/load.sh: 1 real join in 8 got through), while a real node
            // retrying after its backoff has budget to spare.
            return Err(Status::resource_exhausted(
                "too many logins in progress; try again in a few seconds",
            ));
        };
        if !shared.hasher.verify(hello.secret.clone(), node.secret_hash.clone()).await {
            return Err(Status::unauthenticated("wrong secret for this node"));
        }
        shared.gate.failed.refund(&self.key, Instant::now());
        self.spend_node_budget(&id)?;
        Ok(Authenticated {
            id,
            name: node.name,
            generation: node.generation,
            key_changed: node.public_key != Some(public_key),
            public_key,
            used_secret: true,
            join_used: node.join_used || node.join_once,
            spends_once: node.join_once,
            proved_key,
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
        let key = source_key(ip);
        // A source with no failed-login budget left is refused before it can send anything, unless it
        // may be a fleet reconnecting with tickets (they are limited per node, after Hello).
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(pb::NodeMessage { msg: Some(pb::node_message::Msg::Hello(h)) }))) => h,
            Ok(Ok(_)) => return Err(Status::invalid_argument("the first message must be Hello")),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 15s")),
        };
        // The response stream opens at once: a key challenge has to travel on it. Whatever the login
        // decides reaches the node as the stream's first item (an error ends it).
        let (tx, rx) = mpsc::channel::<Outbound>(SESSION_QUEUE);
        tokio::spawn(async move {
            let login = Login {
                shared: &shared,
                hello: &hello,
                inbound: &mut inbound,
                tx: &tx,
                key,
                source: &source_text,
            };
            match open_session(login).await {
                Ok((auth, session_id, kill_rx)) => {
                    serve_session(
                        shared.clone(),
                        auth.id,
                        auth.name,
                        session_id,
                        inbound,
                        tx,
                        kill_rx,
                        key.is_loopback(),
                    )
                    .await;
                }
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Authenticates the login, records it, and opens its session.
async fn open_session(
    mut login: Login<'_>,
) -> Result<(Authenticated, u64, oneshot::Receiver<SessionEnd>), Status> {
    let shared = login.shared;
    let hello = login.hello;
    let source_text = login.source.to_owned();
    let version = clip(&hello.version, VERSION_MAX);
    let auth = match login.authenticate().await {
        Ok(a) => a,
        Err(status) => {
            // Refusals by a limit are counted, not written: a flood must not become audit rows.
            if status.code() != tonic::Code::ResourceExhausted {
                let who = match hello.node_id.parse::<NodeId>() {
                    Ok(id) => id.to_string(),
                    Err(_) => format!("(malformed node id, {} bytes)", hello.node_id.len()),
                };
                shared
                    .audit(
                        &format!("node:{who}"),
                        "login",
                        &who,
                        &source_text,
                        &format!("denied: {}", status.message()),
                    )
                    .await;
            }
            return Err(status);
        }
    };
    if !auth.proved_key {
        bump(&shared.gate.stats.without_key_proof);
    }
    let now = now_ms();
    if auth.used_secret || auth.key_changed {
        // Persist before the session opens: peers must never learn a key the database lacks.
        let _w = shared.write_lock().await;
        let current = shared
            .store
            .record_join(&JoinRecord {
                id: auth.id.as_str(),
                generation: auth.generation,
                public_key: &auth.public_key.to_base64(),
                join_used: auth.join_used,
                spend_once: auth.spends_once,
                version: &version,
                now_ms: now,
            })
            .await
            .map_err(|e| Status::unavailable(format!("{e}; try again")))?;
        if !current {
            // Rotated (or removed) while this login was in flight, or its single-use secret was spent
            // by a login that got there first: its credentials are void, and its key must not replace
            // the current one.
            return Err(Status::unauthenticated(
                "the node's secret was rotated or its single-use token used during this login; join with a new token",
            ));
        }
    }
    shared
        .audit(
            &format!("node:{}", auth.name),
            "login",
            auth.id.as_str(),
            &source_text,
            match (auth.used_secret, auth.proved_key) {
                (true, true) => "ok (join secret, key proved)",
                (true, false) => "ok (join secret, no key proof: old node)",
                (false, true) => "ok (session ticket, key proved)",
                (false, false) => "ok (session ticket, no key proof: old node)",
            },
        )
        .await;

    let welcome = pb::Welcome {
        server_version: shared.facts.version.clone(),
        capabilities: SERVER_CAPABILITIES.iter().map(|s| s.to_string()).collect(),
        session_ticket: shared.tickets.issue(
            auth.id.as_str(),
            auth.generation,
            auth.public_key.as_bytes(),
            now,
        ),
        server_time_ms: now,
    };
    login
        .tx
        .try_send(Ok(pb::ServerMessage { msg: Some(pb::server_message::Msg::Welcome(welcome)) }))
        .map_err(|_| Status::internal("session queue unavailable"))?;
    let overlay = shared.model().reg.pool.net();
    let (candidates, dropped) =
        convert::candidates_from_pb(&hello.candidates, overlay, login.key.is_loopback());
    note_dropped(shared, &auth.id, dropped);
    let max_message = match hello.max_message_bytes {
        0 => DEFAULT_NODE_MAX_MESSAGE,
        n => (n as usize).clamp(64 << 10, crate::MAX_OUTBOUND),
    };
    let (session_id, kill_rx) = {
        let mut guard = shared.model();
        let m = &mut *guard;
        let Some(n) = m.reg.nodes.get_mut(&auth.id) else {
            return Err(Status::unauthenticated("node was removed while joining"));
        };
        if n.generation != auth.generation {
            // Rotated while this login was in flight: the credentials it used are void, and nothing
            // of it (key, presence) may stick.
            return Err(Status::unauthenticated(
                "the node's secret was rotated during login; join with the new token",
            ));
        }
        if auth.spends_once && n.join_used {
            // Checked in the database already; the model says the same or something is wrong.
            return Err(Status::unauthenticated("this single-use join token was already used"));
        }
        n.public_key = Some(auth.public_key);
        n.candidates = candidates;
        n.online = true;
        n.version = version.clone();
        n.last_seen_ms = now;
        n.join_used = auth.join_used;
        m.hub.mark_dirty(&auth.id);
        m.hub.open(&m.reg, &auth.id, login.tx.clone(), max_message)
    };
    tracing::info!(node = %auth.id, name = %auth.name, source = %source_text, version = %version, "node connected");
    Ok((auth, session_id, kill_rx))
}

/// Counts and reports candidates dropped from a node's report: loud, since a node that reports
/// loopback or hundreds of addresses is misconfigured or compromised.
fn note_dropped(shared: &Shared, id: &NodeId, dropped: usize) {
    if dropped > 0 {
        shared.gate.stats.candidates_dropped.fetch_add(dropped as u64, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(node = %id, dropped, "candidates dropped: refused address, over the cap, or repeated");
    }
}

#[allow(clippy::too_many_arguments)] // one session's parts, passed once from open_session
async fn serve_session(
    shared: Arc<Shared>,
    id: NodeId,
    name: String,
    session_id: u64,
    mut inbound: Streaming<pb::NodeMessage>,
    tx: mpsc::Sender<Outbound>,
    mut kill_rx: oneshot::Receiver<SessionEnd>,
    from_loopback: bool,
) {
    // Endpoint updates: a token bucket; one held back waits for the next token (only the latest).
    let mut tokens = ENDPOINT_BURST;
    let mut refilled = Instant::now();
    let mut held: Option<Vec<pb::Candidate>> = None;
    let end = loop {
        let wake = match held {
            Some(_) => {
                tokio::time::Instant::from_std(refilled + ENDPOINT_INTERVAL.mul_f64((1.0 - tokens).max(0.0)))
            }
            None => tokio::time::Instant::now() + Duration::from_secs(3600),
        };
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
            _ = tokio::time::sleep_until(wake), if held.is_some() => {}
            msg = inbound.message() => match msg {
                Ok(Some(pb::NodeMessage { msg: Some(pb::node_message::Msg::Endpoints(u)) })) => {
                    if held.replace(u.candidates).is_some() {
                        bump(&shared.gate.stats.endpoint_updates_deferred);
                    }
                }
                Ok(Some(pb::NodeMessage { msg: Some(m) })) => handle(&shared, &id, m),
                Ok(Some(_)) => {}
                Ok(None) => break "node closed the stream".to_owned(),
                Err(e) => break format!("stream error: {}", e.message()),
            }
        }
        let now = Instant::now();
        tokens = (tokens + now.duration_since(refilled).as_secs_f64() / ENDPOINT_INTERVAL.as_secs_f64())
            .min(ENDPOINT_BURST);
        refilled = now;
        if tokens >= 1.0 {
            if let Some(list) = held.take() {
                tokens -= 1.0;
                set_candidates(&shared, &id, &list, from_loopback);
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

/// Applies a node's reported candidates (bounded) to the model; peers learn them at the next flush.
fn set_candidates(shared: &Shared, id: &NodeId, list: &[pb::Candidate], from_loopback: bool) {
    let mut guard = shared.model();
    let m = &mut *guard;
    let (candidates, dropped) = convert::candidates_from_pb(list, m.reg.pool.net(), from_loopback);
    if let Some(n) = m.reg.nodes.get_mut(id) {
        if n.candidates != candidates {
            n.candidates = candidates;
            m.hub.mark_dirty(id);
        }
    }
    drop(guard);
    note_dropped(shared, id, dropped);
}

fn handle(shared: &Shared, id: &NodeId, msg: pb::node_message::Msg) {
    let mut guard = shared.model();
    let m = &mut *guard;
    match msg {
        pb::node_message::Msg::Endpoints(u) => {
            drop(guard);
            set_candidates(shared, id, &u.candidates, false);
        }
        pb::node_message::Msg::MapRequest(r) => {
            tracing::info!(node = %id, have = r.have_version, "node asked for a full map");
            m.hub.request_full(id);
        }
        pb::node_message::Msg::Health(h) => {
            // A site speaks only for its own resources.
            for t in h.targets {
                if m.reg.resources.get(&t.resource).is_none_or(|r| &r.site != id) {
                    continue;
                }
                let mut report = tunnel_wire::health_from_pb(&t);
                report.detail = report.detail.chars().take(200).collect();
                m.reg.health.insert(t.resource, report);
            }
        }
        pb::node_message::Msg::Hello(_) => {
            tracing::debug!(node = %id, "ignoring a second Hello");
        }
        pb::node_message::Msg::KeyProof(_) => {
            tracing::debug!(node = %id, "ignoring a key proof outside a login");
        }
    }
}
