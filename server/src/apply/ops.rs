//! The single admin operations, each a plan of one change committed by [`Shared::commit`], like a
//! whole apply. What stays theirs: their gRPC codes and messages (`site add` of an existing name is
//! `AlreadyExists`, where apply's create is idempotent), their replies, and idempotent grants.

use tunnel_core::map::NodeKind;
use tunnel_core::{names, NodeId, Secret, Target};
use tunnel_proto::v1 as pb;

use super::plan::{self, NewNode, Plan, Rotation};
use crate::registry::{Registry, ResourceRec};
use crate::state::{
    node_info, now_ms, parse_health_check, resource_info, JoinLimits, OpError, OpResult, Shared,
};

fn unknown_node(reg: &Registry, kind: NodeKind, name: &str) -> OpError {
    let known = reg.names_of(kind);
    let list = if known.is_empty() { "none yet".to_owned() } else { known.join(", ") };
    OpError::NotFound(format!("unknown {} '{name}' (known: {list})", kind.as_str()))
}

fn unknown_resource(reg: &Registry, name: &str) -> OpError {
    let known: Vec<&str> = reg.resources.keys().map(String::as_str).collect();
    let list = if known.is_empty() { "none yet".to_owned() } else { known.join(", ") };
    OpError::NotFound(format!("unknown resource '{name}' (known: {list})"))
}

fn exhausted(e: impl std::fmt::Display) -> OpError {
    OpError::Exhausted(e.to_string())
}

/// `site add` / `client add`: one new node.
fn add_node(reg: &Registry, kind: NodeKind, name: &str, now: i64) -> OpResult<Plan> {
    names::check_label(kind.as_str(), name).map_err(|e| OpError::Invalid(e.to_string()))?;
    if reg.node_by_name(kind, name).is_some() {
        return Err(OpError::AlreadyExists(format!("{} '{name}' already exists", kind.as_str())));
    }
    let addr = reg.pool.clone().next_free(now).map_err(exhausted)?;
    let node = NewNode {
        id: plan::new_id(),
        kind,
        name: name.to_owned(),
        addr,
        secret_hash: String::new(),
        join_expires_ms: 0,
        join_once: false,
    };
    Ok(Plan { new_nodes: vec![node], ..Plan::default() })
}

/// A validated resource for `add-resource`.
struct NewResource<'a> {
    site: &'a str,
    name: &'a str,
    target: Target,
    alias: Option<String>,
    health_check: Option<String>,
}

/// `add-resource`: one new resource, with the same rules as an apply's (name, target, alias, health
/// check, one owner per DNS name, names inside the zone).
fn add_resource(reg: &Registry, r: NewResource<'_>, now: i64) -> OpResult<Plan> {
    let site =
        reg.node_by_name(NodeKind::Site, r.site).ok_or_else(|| unknown_node(reg, NodeKind::Site, r.site))?;
    let name = r.name;
    if let Some(cur) = reg.resources.get(name) {
        let on = reg.nodes.get(&cur.site).map(|n| n.name.clone()).unwrap_or_default();
        return Err(OpError::AlreadyExists(format!("resource '{name}' already exists (on site '{on}')")));
    }
    let fqdn = reg.fqdn(name);
    if let Some(owner) = reg.dns_owner(&fqdn) {
        return Err(OpError::AlreadyExists(format!(
            "the name {fqdn} is already the alias of resource '{owner}'"
        )));
    }
    if let Some(a) = &r.alias {
        if let Some(owner) = reg.dns_owner(a) {
            return Err(OpError::AlreadyExists(format!("alias {a} is already used by resource '{owner}'")));
        }
        if let Some(why) = plan::alias_in_zone(&reg.zone, name, a) {
            return Err(OpError::Invalid(why));
        }
    }
    let rec = ResourceRec {
        name: name.to_owned(),
        site: site.id.clone(),
        target: r.target,
        alias: r.alias,
        addr: reg.pool.clone().next_free(now).map_err(exhausted)?,
        created_ms: now,
        health_check: r.health_check,
    };
    Ok(Plan { new_resources: vec![rec], ..Plan::default() })
}

fn grant_ends(reg: &Registry, client: &str, resource: &str) -> OpResult<NodeId> {
    let c = reg
        .node_by_name(NodeKind::Client, client)
        .ok_or_else(|| unknown_node(reg, NodeKind::Client, client))?;
    if !reg.resources.contains_key(resource) {
        return Err(unknown_resource(reg, resource));
    }
    Ok(c.id.clone())
}

impl Shared {
    /// Adds a site or client and returns its join token.
    pub async fn add_node(
        &self,
        kind: NodeKind,
        name: &str,
        limits: JoinLimits,
    ) -> OpResult<pb::JoinTokenReply> {
        let _w = self.write_lock().await;
        let now = now_ms();
        let mut p = add_node(&self.model().reg, kind, name, now)?;
        let secrets = self.commit(&mut p, limits, now, "").await?;
        self.token_reply(&p.new_nodes[0].id, secrets)
    }

    /// Removes a node. Its live session ends at once; its peers lose it; a site's resources and every
    /// grant of the node go with it.
    pub async fn remove_node(&self, kind: NodeKind, name: &str) -> OpResult<pb::RemoveNodeReply> {
        let _w = self.write_lock().await;
        let now = now_ms();
        let (mut p, info, removed_resources, removed_grants) = {
            let m = self.model();
            let n = m.reg.node_by_name(kind, name).ok_or_else(|| unknown_node(&m.reg, kind, name))?;
            let id = n.id.clone();
            let resources = m.reg.resources_of_site(&id);
            let grants = resources.iter().map(|r| m.reg.clients_of(r).len()).sum::<usize>()
                + m.reg.grants_of_client(&id).len();
            let p = Plan { delete_nodes: vec![(id.clone(), kind, name.to_owned())], ..Plan::default() };
            (p, node_info(&m, &id), resources, grants as u64)
        };
        self.commit(&mut p, JoinLimits::default(), now, "").await?;
        Ok(pb::RemoveNodeReply { node: info, removed_resources, removed_grants })
    }

    /// Gives a node a new join secret; the old secret and every ticket stop working and its live
    /// session ends at once.
    pub async fn rotate_node(
        &self,
        kind: NodeKind,
        name: &str,
        limits: JoinLimits,
    ) -> OpResult<pb::JoinTokenReply> {
        let _w = self.write_lock().await;
        let now = now_ms();
        let mut p = {
            let m = self.model();
            let n = m.reg.node_by_name(kind, name).ok_or_else(|| unknown_node(&m.reg, kind, name))?;
            let r = Rotation {
                id: n.id.clone(),
                generation: n.generation + 1,
                secret_hash: String::new(),
                join_expires_ms: 0,
                join_once: false,
            };
            Plan { rotations: vec![r], ..Plan::default() }
        };
        let secrets = self.commit(&mut p, limits, now, "").await?;
        self.token_reply(&p.rotations[0].id, secrets)
    }

    /// The reply of a one-node plan that issued a join secret: the node and its token.
    fn token_reply(&self, id: &NodeId, mut secrets: Vec<Secret>) -> OpResult<pb::JoinTokenReply> {
        let secret = secrets.pop().ok_or_else(|| OpError::Internal("no join secret was issued".into()))?;
        let info = node_info(&self.model(), id);
        Ok(pb::JoinTokenReply { node: info, join_token: self.token(id, secret).encode() })
    }

    /// Adds a resource on a site.
    pub async fn add_resource(
        &self,
        site: &str,
        name: &str,
        target: &str,
        alias: &str,
        health_check: &str,
    ) -> OpResult<pb::ResourceInfo> {
        names::check_label("resource name", name).map_err(|e| OpError::Invalid(e.to_string()))?;
        let health_check = parse_health_check(health_check)?;
        let target = Target::parse(target).map_err(|e| OpError::Invalid(e.to_string()))?;
        let alias = match alias.trim() {
            "" => None,
            a => Some(names::check_alias(a).map_err(|e| OpError::Invalid(e.to_string()))?),
        };
        let _w = self.write_lock().await;
        let now = now_ms();
        let r = NewResource { site, name, target, alias, health_check };
        let mut p = add_resource(&self.model().reg, r, now)?;
        self.commit(&mut p, JoinLimits::default(), now, "").await?;
        Ok(resource_info(&self.model(), name))
    }

    /// Removes a resource with its grants.
    pub async fn remove_resource(&self, name: &str) -> OpResult<pb::RemoveResourceReply> {
        let _w = self.write_lock().await;
        let now = now_ms();
        let (info, grants) = {
            let m = self.model();
            if !m.reg.resources.contains_key(name) {
                return Err(unknown_resource(&m.reg, name));
            }
            (resource_info(&m, name), m.reg.clients_of(name).len() as u64)
        };
        let mut p = Plan { delete_resources: vec![name.to_owned()], ..Plan::default() };
        self.commit(&mut p, JoinLimits::default(), now, "").await?;
        Ok(pb::RemoveResourceReply { resource: Some(info), removed_grants: grants })
    }

    /// Grants `client` access to `resource`. Idempotent: `Ok(false)` when it was already granted.
    pub async fn grant(&self, client: &str, resource: &str) -> OpResult<bool> {
        let _w = self.write_lock().await;
        let cid = {
            let m = self.model();
            let cid = grant_ends(&m.reg, client, resource)?;
            if m.reg.has_grant(&cid, resource) {
                return Ok(false);
            }
            cid
        };
        let mut p = Plan { new_grants: vec![(cid, resource.to_owned())], ..Plan::default() };
        self.commit(&mut p, JoinLimits::default(), now_ms(), "").await?;
        Ok(true)
    }

    /// Revokes a grant. Idempotent: `Ok(false)` when there was none.
    pub async fn revoke(&self, client: &str, resource: &str) -> OpResult<bool> {
        let _w = self.write_lock().await;
        let cid = {
            let m = self.model();
            let cid = grant_ends(&m.reg, client, resource)?;
            if !m.reg.has_grant(&cid, resource) {
                return Ok(false);
            }
            cid
        };
        let mut p = Plan { delete_grants: vec![(cid, resource.to_owned())], ..Plan::default() };
        self.commit(&mut p, JoinLimits::default(), now_ms(), "").await?;
        Ok(true)
    }
}
