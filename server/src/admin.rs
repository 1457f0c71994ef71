//! The Admin service: every call is checked against the admin secret, audited, and mapped to an
//! operation in [`crate::state`].

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status};
use tunnel_core::map::NodeKind;
use tunnel_proto::v1 as pb;
use tunnel_proto::v1::admin_server::Admin;

use crate::limits::source_key;
use crate::state::{now_ms, JoinLimits, OpError, Shared};
use crate::store::AuditRow;
use tunnel_wire::kind_from_pb;

/// The most audit entries one `ListAudit` call returns; `tunnelctl audit` pages through more.
pub const AUDIT_PAGE_MAX: u32 = 1000;

/// The Admin service.
#[derive(Debug, Clone)]
pub struct AdminService {
    pub shared: Arc<Shared>,
}

struct Caller {
    source: String,
}

impl AdminService {
    /// Checks the bearer secret; failures count against the source's login budget.
    fn check<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let source = req.remote_addr();
        let ip = source.map(|a| a.ip()).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let now = Instant::now();
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let expected = self.shared.admin_secret.expose().as_bytes();
        if presented.is_empty() || !bool::from(presented.as_bytes().ct_eq(expected)) {
            // The admin secret is 256 random bits and cheap to compare, so the right one always gets
            // in; wrong ones are counted, and a source over its budget is told to wait.
            // Its own budget, apart from node logins: a script with a stale token behind a shared NAT
            // must not lock out the nodes there.
            if let Err(r) = self.shared.gate.admin.take(&source_key(ip), now) {
                crate::limits::bump(&self.shared.gate.stats.refused_admin);
                return Err(Status::resource_exhausted(format!(
                    "too many wrong admin tokens from {ip}; {r}"
                )));
            }
            let src = source.map(|a| a.to_string()).unwrap_or_default();
            tracing::warn!(target: "audit", source = %src, "admin call with a wrong admin token");
            return Err(Status::unauthenticated("wrong admin token for this server"));
        }
        Ok(Caller { source: source.map(|a| a.to_string()).unwrap_or_else(|| "unknown".into()) })
    }

    async fn audited<T>(
        &self,
        c: &Caller,
        action: &str,
        target: &str,
        r: Result<T, OpError>,
    ) -> Result<T, Status> {
        let outcome = match &r {
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("refused: {e}"),
        };
        self.shared.audit("admin", action, target, &c.source, &outcome).await;
        r.map_err(OpError::into_status)
    }
}

fn plan_kind(k: pb::PlanKind) -> &'static str {
    match k {
        pb::PlanKind::Site => "site",
        pb::PlanKind::Client => "client",
        pb::PlanKind::Resource => "resource",
        pb::PlanKind::Grant => "grant",
        pb::PlanKind::Unspecified => "?",
    }
}

fn plan_action(a: pb::PlanAction) -> &'static str {
    match a {
        pb::PlanAction::Create => "create",
        pb::PlanAction::Update => "update",
        pb::PlanAction::Delete => "delete",
        pb::PlanAction::Unchanged => "unchanged",
        pb::PlanAction::Unspecified => "?",
    }
}

fn kind(k: i32) -> Result<NodeKind, Status> {
    kind_from_pb(k).ok_or_else(|| Status::invalid_argument("node kind must be site or client"))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn server_info(
        &self,
        req: Request<pb::ServerInfoRequest>,
    ) -> Result<Response<pb::ServerInfoReply>, Status> {
        self.check(&req)?;
        Ok(Response::new(self.shared.info()))
    }

    async fn add_node(
        &self,
        req: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::JoinTokenReply>, Status> {
        let c = self.check(&req)?;
        let r = req.into_inner();
        let k = kind(r.kind)?;
        let limits = JoinLimits { ttl_seconds: r.ttl_seconds, once: r.once };
        let out = self.shared.add_node(k, &r.name, limits).await;
        let action = format!("{} add", k.as_str());
        self.audited(&c, &action, &r.name, out).await.map(Response::new)
    }

    async fn remove_node(&self, req: Request<pb::NodeRef>) -> Result<Response<pb::RemoveNodeReply>, Status> {
        let c = self.check(&req)?;
        let r = req.into_inner();
        let k = kind(r.kind)?;
        let out = self.shared.remove_node(k, &r.name).await;
        let action = format!("{} rm", k.as_str());
        self.audited(&c, &action, &r.name, out).await.map(Response::new)
    }

    async fn rotate_node(
        &self,
        req: Request<pb::RotateNodeRequest>,
    ) -> Result<Response<pb::JoinTokenReply>, Status> {
        let c = self.check(&req)?;
        let r = req.into_inner();
        let k = kind(r.kind)?;
        let limits = JoinLimits { ttl_seconds: r.ttl_seconds, once: r.once };
        let out = self.shared.rotate_node(k, &r.name, limits).await;
        let action = format!("{} rotate", k.as_str());
        self.audited(&c, &action, &r.name, out).await.map(Response::new)
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesReply>, Status> {
        self.check(&req)?;
        let k = kind(req.get_ref().kind)?;
        Ok(Response::new(pb::ListNodesReply { nodes: self.shared.list_nodes(k) }))
    }

    async fn add_resource(
        &self,
        req: Request<pb::AddResourceRequest>,
    ) -> Result<Response<pb::ResourceInfo>, Status> {
        let c = self.check(&req)?;
        let r = req.into_inner();
        let out = self.shared.add_resource(&r.site, &r.name, &r.target, &r.alias, &r.health_check).await;
        self.audited(&c, "add-resource", &r.name, out).await.map(Response::new)
    }

    async fn remove_resource(
        &self,
        req: Request<pb::ResourceRef>,
    ) -> Result<Response<pb::RemoveResourceReply>, Status> {
        let c = self.check(&req)?;
        let r = req.into_inner();
        let out = self.shared.remove_resource(&r.name).await;
        self.audited(&c, "rm-resource", &r.name, out).await.map(Response::new)
    }

    async fn list_resources(
        &self,
        req: Request<pb::ListResourcesRequest>,
    ) -> Result<Response<pb::ListResourcesReply>, Status> {
        self.check(&req)?;
        Ok(Response::new(pb::ListResourcesReply { resources: self.shared.list_resources() }))
    }

    async fn grant(&self, req: Request<pb::GrantRequest>) -> Result<Response<pb::GrantReply>, Status> {
        let c = self.check(&req)?;
        let r = req.into_inner();
        let out = self.shared.grant(&r.client, &r.resource).await;
        let target = format!("{} -> {}", r.client, r.resource);
        self.audited(&c, "grant", &target, out).await.map(|changed| Response::new(pb::GrantReply { changed }))
    }

    async fn revoke(&self, req: Request<pb::GrantRequest>) -> Result<Response<pb::GrantReply>, Status> {
        let c = self.check(&req)?;
        let r = req.into_inner();
        let out = self.shared.revoke(&r.client, &r.resource).await;
        let target = format!("{} -> {}", r.client, r.resource);
        self.audited(&c, "revoke", &target, out)
            .await
            .map(|changed| Response::new(pb::GrantReply { changed }))
    }

    async fn list_grants(
        &self,
        req: Request<pb::ListGrantsRequest>,
    ) -> Result<Response<pb::ListGrantsReply>, Status> {
        self.check(&req)?;
        Ok(Response::new(pb::ListGrantsReply { grants: self.shared.list_grants() }))
    }

    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyReply>, Status> {
        let c = self.check(&req)?;
        let r = req.into_inner();
        let out = self.shared.apply(&r).await;
        if r.dry_run && out.is_ok() {
            // A dry run reads; like the list calls it leaves no trace. A refused one is logged, since
            // tunnelctl sends its dry run first and a refused config never gets further.
            return out.map(Response::new).map_err(OpError::into_status);
        }
        let action = if r.dry_run { "apply --dry-run" } else { "apply" };
        // One entry for the call, and one per change, so the log answers "who removed site X".
        let target = format!(
            "config of {} sites, {} clients, {} resources, {} grants{}",
            r.sites.len(),
            r.clients.len(),
            r.resources.len(),
            r.grants.len(),
            if r.prune { ", prune" } else { "" }
        );
        let now = now_ms();
        let row = |action: String, target: String, outcome: String| AuditRow {
            at_ms: now,
            actor: "admin".into(),
            action,
            target,
            source: c.source.clone(),
            outcome,
        };
        let mut rows = Vec::new();
        match &out {
            Ok(reply) => {
                let changes: Vec<&pb::PlanStep> =
                    reply.steps.iter().filter(|s| s.action() != pb::PlanAction::Unchanged).collect();
                let count = |a| changes.iter().filter(|s| s.action() == a).count();
                rows.push(row(
                    "apply".into(),
                    target,
                    format!(
                        "ok: {} created, {} updated, {} deleted",
                        count(pb::PlanAction::Create),
                        count(pb::PlanAction::Update),
                        count(pb::PlanAction::Delete)
                    ),
                ));
                for s in changes {
                    let action = format!("apply: {} {}", plan_kind(s.kind()), plan_action(s.action()));
                    rows.push(row(action, s.name.clone(), "ok".into()));
                }
            }
            Err(e) => rows.push(row(action.into(), target, format!("refused: {e}"))),
        }
        self.shared.audit_many(&rows).await;
        out.map(Response::new).map_err(OpError::into_status)
    }

    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditReply>, Status> {
        self.check(&req)?;
        let limit = match req.get_ref().limit {
            0 => 100,
            n => n.min(AUDIT_PAGE_MAX),
        };
        let before = req.get_ref().before_id;
        let rows =
            self.shared.store.list_audit(limit, before).await.map_err(|e| OpError::from(e).into_status())?;
        let next_before_id = if rows.len() as u32 == limit { rows.last().map_or(0, |e| e.id) } else { 0 };
        let events = rows
            .into_iter()
            .map(|e| pb::AuditEvent {
                id: e.id,
                at_ms: e.row.at_ms,
                actor: e.row.actor,
                action: e.row.action,
                target: e.row.target,
                source: e.row.source,
                outcome: e.row.outcome,
            })
            .collect();
        Ok(Response::new(pb::ListAuditReply { events, next_before_id }))
    }
}
