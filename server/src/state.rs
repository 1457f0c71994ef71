//! The server's shared state, and the views of it the admin API shows.
//!
//! The administrative operations live in [`crate::apply`]: each takes the write lock (operations are
//! serialised, so validation and commit see the same state), plans its change against the model,
//! commits it to the database, then applies the same change to the model and pushes the touched
//! entries to the connected nodes. A failed database write (a full disk, a lost connection) therefore
//! changes nothing anywhere.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard};

use rand::RngCore;
use tunnel_core::map::NodeKind;
use tunnel_core::{JoinToken, KeyPin, NodeId, PublicKey, Secret};
use tunnel_proto::v1 as pb;

use crate::auth::{SecretHasher, Tickets};
use crate::hub::Hub;
use crate::limits::{LoginGate, LoginLimits};
use crate::registry::{NodeRec, Registry};
use crate::store::{AuditRow, NodeRow, Store, StoreError};

pub use crate::clock::now_ms;

/// Why an operation was refused. Mapped to a gRPC status in one place ([`OpError::into_status`]).
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Exhausted(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl OpError {
    /// The gRPC status for this error.
    pub fn into_status(self) -> tonic::Status {
        use tonic::Status;
        match self {
            OpError::NotFound(m) => Status::not_found(m),
            OpError::AlreadyExists(m) => Status::already_exists(m),
            OpError::Invalid(m) => Status::invalid_argument(m),
            OpError::Exhausted(m) => Status::resource_exhausted(m),
            OpError::Store(e) => Status::unavailable(format!("{e}; nothing was changed")),
            OpError::Internal(m) => Status::internal(m),
        }
    }
}

pub(crate) type OpResult<T> = Result<T, OpError>;

/// The model and the sessions, locked together so a change and its distribution are one step.
#[derive(Debug)]
pub struct Model {
    pub reg: Registry,
    pub hub: Hub,
}

/// Fixed facts about this server.
#[derive(Debug, Clone)]
pub struct ServerFacts {
    /// `HOST:PORT` that tokens carry.
    pub public_addr: String,
    pub pin: KeyPin,
    pub version: String,
}

/// Everything the gRPC services share.
#[derive(Debug)]
pub struct Shared {
    pub facts: ServerFacts,
    pub admin_secret: Secret,
    pub store: Store,
    model: Mutex<Model>,
    write: tokio::sync::Mutex<()>,
    pub hasher: SecretHasher,
    pub tickets: Tickets,
    /// Login admission: per-source, per-node and in-flight limits.
    pub gate: LoginGate,
    /// Last-seen times waiting for the next batched write.
    pub seen: Mutex<HashMap<NodeId, i64>>,
}

/// A node's join-secret limits.
#[derive(Debug, Clone, Copy, Default)]
pub struct JoinLimits {
    pub ttl_seconds: u64,
    pub once: bool,
}

impl Shared {
    /// Shared state over a loaded model.
    pub fn new(
        facts: ServerFacts,
        admin_secret: Secret,
        store: Store,
        reg: Registry,
        hasher: SecretHasher,
        tickets: Tickets,
        limits: LoginLimits,
    ) -> Self {
        Shared {
            facts,
            admin_secret,
            store,
            model: Mutex::new(Model { reg, hub: Hub::default() }),
            write: tokio::sync::Mutex::new(()),
            hasher,
            tickets,
            gate: LoginGate::new(limits),
            seen: Mutex::default(),
        }
    }

    /// The model, locked. Never hold this across an `.await`.
    pub fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The write lock that serialises changes.
    pub async fn write_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.write.lock().await
    }

    /// Records an audit event in the log table and in the `audit` tracing target.
    pub async fn audit(&self, actor: &str, action: &str, target: &str, source: &str, outcome: &str) {
        let row = AuditRow {
            at_ms: now_ms(),
            actor: actor.into(),
            action: action.into(),
            target: target.into(),
            source: source.into(),
            outcome: outcome.into(),
        };
        self.audit_many(std::slice::from_ref(&row)).await;
    }

    /// Records several audit events at once (one transaction), e.g. every change of an apply. Fields
    /// are cut to [`crate::store::AUDIT_FIELD_MAX`] in the log as in the table.
    pub async fn audit_many(&self, rows: &[AuditRow]) {
        for r in rows.iter().map(AuditRow::bounded) {
            tracing::info!(target: "audit", actor = %r.actor, action = %r.action, target = %r.target,
                source = %r.source, outcome = %r.outcome, "audit");
        }
        if let Err(e) = self.store.audit_many(rows).await {
            tracing::warn!(error = %e, "could not write the audit log");
        }
    }

    pub(crate) fn new_secret() -> Secret {
        let mut b = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut b);
        Secret::from_random(b)
    }

    pub(crate) fn token(&self, id: &NodeId, secret: Secret) -> JoinToken {
        JoinToken { server: self.facts.public_addr.clone(), node_id: id.clone(), secret, pin: self.facts.pin }
    }

    /// Nodes of one kind, sorted by name.
    pub fn list_nodes(&self, kind: NodeKind) -> Vec<pb::NodeInfo> {
        let m = self.model();
        let mut v: Vec<pb::NodeInfo> =
            m.reg.nodes.values().filter(|n| n.kind == kind).filter_map(|n| node_info(&m, &n.id)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// All resources, sorted by name.
    pub fn list_resources(&self) -> Vec<pb::ResourceInfo> {
        let m = self.model();
        m.reg.resources.keys().map(|n| resource_info(&m, n)).collect()
    }

    /// All grants, sorted by client then resource.
    pub fn list_grants(&self) -> Vec<pb::GrantInfo> {
        let m = self.model();
        let mut v: Vec<pb::GrantInfo> = m
            .reg
            .grant_created
            .iter()
            .map(|((c, r), at)| pb::GrantInfo {
                client: m.reg.nodes.get(c).map(|n| n.name.clone()).unwrap_or_default(),
                resource: r.clone(),
                created_ms: *at,
            })
            .collect();
        v.sort_by(|a, b| (&a.client, &a.resource).cmp(&(&b.client, &b.resource)));
        v
    }

    /// Counts and settings for `ServerInfo`.
    pub fn info(&self) -> pb::ServerInfoReply {
        let m = self.model();
        let count = |k| m.reg.nodes.values().filter(|n| n.kind == k).count() as u64;
        pb::ServerInfoReply {
            version: self.facts.version.clone(),
            public_addr: self.facts.public_addr.clone(),
            dns_zone: m.reg.zone.clone(),
            overlay_cidr: m.reg.pool.net().to_string(),
            mtu: u32::from(m.reg.mtu),
            sites: count(NodeKind::Site),
            clients: count(NodeKind::Client),
            resources: m.reg.resources.len() as u64,
            grants: m.reg.grant_count() as u64,
            connected_nodes: m.hub.connected() as u64,
            database: self.store.describe().to_owned(),
        }
    }
}

pub(crate) fn expiry(now: i64, ttl_seconds: u64) -> i64 {
    if ttl_seconds == 0 {
        0
    } else {
        now.saturating_add(i64::try_from(ttl_seconds).unwrap_or(i64::MAX / 2000).saturating_mul(1000))
    }
}

/// A stored node row as a model record.
pub fn node_rec_from_row(r: &NodeRow) -> Result<NodeRec, String> {
    let kind = match r.kind.as_str() {
        "site" => NodeKind::Site,
        "client" => NodeKind::Client,
        other => return Err(format!("node {} has unknown kind '{other}'", r.id)),
    };
    let public_key = match &r.public_key {
        Some(k) => {
            Some(PublicKey::from_base64(k).ok_or_else(|| format!("node {} has a damaged public key", r.id))?)
        }
        None => None,
    };
    Ok(NodeRec {
        id: r.id.parse().map_err(|_| format!("node id '{}' is damaged", r.id))?,
        kind,
        name: r.name.clone(),
        addr: r
            .overlay_addr
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("node {} has a damaged address", r.id))?,
        public_key,
        secret_hash: r.secret_hash.clone(),
        generation: r.generation,
        join_expires_ms: r.join_expires_ms,
        join_once: r.join_once,
        join_used: r.join_used,
        created_ms: r.created_ms,
        last_seen_ms: r.last_seen_ms,
        version: r.version.clone(),
        candidates: vec![],
        online: false,
    })
}

/// A node as the admin API shows it.
pub fn node_info(m: &Model, id: &NodeId) -> Option<pb::NodeInfo> {
    let n = m.reg.nodes.get(id)?;
    let resources = match n.kind {
        NodeKind::Site => m.reg.resources_of_site(id),
        NodeKind::Client => m.reg.grants_of_client(id),
    };
    Some(pb::NodeInfo {
        id: n.id.to_string(),
        name: n.name.clone(),
        kind: tunnel_wire::kind_to_pb(n.kind) as i32,
        overlay_addr: n.addr.to_string(),
        public_key: n.public_key.map(|k| k.to_base64()).unwrap_or_default(),
        online: m.hub.is_connected(id),
        last_seen_ms: n.last_seen_ms,
        candidates: n.candidates.iter().map(tunnel_wire::candidate_to_pb).collect(),
        created_ms: n.created_ms,
        join_expires_ms: n.join_expires_ms,
        join_once: n.join_once,
        join_used: n.join_used,
        resources,
        version: n.version.clone(),
    })
}

/// `""` or `tcp` (a TCP connect) or `http:/PATH`.
pub fn parse_health_check(s: &str) -> OpResult<Option<String>> {
    let s = s.trim();
    if s.is_empty() || s.eq_ignore_ascii_case("tcp") {
        return Ok(None);
    }
    match s.strip_prefix("http:") {
        Some(path) if path.starts_with('/') && !path.contains(char::is_whitespace) && path.len() < 256 => {
            Ok(Some(s.to_owned()))
        }
        _ => Err(OpError::Invalid(format!(
            "health check '{s}' is not 'tcp' or 'http:/PATH' (e.g. http:/healthz)"
        ))),
    }
}

/// A resource as the admin API shows it.
pub fn resource_info(m: &Model, name: &str) -> pb::ResourceInfo {
    let Some(r) = m.reg.resources.get(name) else { return pb::ResourceInfo::default() };
    let mut dns_names = vec![m.reg.fqdn(name)];
    dns_names.extend(r.alias.clone());
    let mut clients: Vec<String> =
        m.reg.clients_of(name).iter().filter_map(|c| m.reg.nodes.get(c).map(|n| n.name.clone())).collect();
    clients.sort();
    // What the site last said, while the site is connected; unknown otherwise.
    let site_online = m.reg.nodes.get(&r.site).is_some_and(|n| n.online);
    let health = m
        .reg
        .health
        .get(name)
        .filter(|_| site_online)
        .map(|h| (tunnel_wire::health_state_to_pb(h.state), h.detail.as_str(), h.checked_ms));
    pb::ResourceInfo {
        name: r.name.clone(),
        site: m.reg.nodes.get(&r.site).map(|n| n.name.clone()).unwrap_or_default(),
        target: r.target.to_string(),
        alias: r.alias.clone().unwrap_or_default(),
        overlay_addr: r.addr.to_string(),
        dns_names,
        clients,
        created_ms: r.created_ms,
        health_check: r.health_check.clone().unwrap_or_else(|| "tcp".into()),
        health: health.map(|h| h.0).unwrap_or(pb::HealthState::Unknown) as i32,
        health_detail: health.map(|h| h.1.to_owned()).unwrap_or_default(),
        health_checked_ms: health.map(|h| h.2).unwrap_or_default(),
    }
}
