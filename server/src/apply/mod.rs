//! `Admin.Apply`: make the server match a whole declarative config, all or nothing.
//!
//! The order is that of every admin operation (see [`crate::state`]), for a whole batch at once. Under
//! the write lock: [`plan::plan`] validates the entire request against the model and decides every
//! change, addresses included; the whole change is written in one database transaction
//! ([`crate::store::Store::apply`]); only after the commit does the model take the same change
//! ([`plan::Plan::apply_to`], through the registry calls the single operations use) and the hub push
//! deltas to the nodes whose views changed. A refusal, or a failure anywhere in the transaction,
//! therefore changes nothing anywhere.

pub mod plan;

use tunnel_proto::v1 as pb;

use crate::state::{expiry, now_ms, JoinLimits, OpError, OpResult, Shared};
use crate::store::{ApplyBatch, GrantRow, NodeRow, ResourceRow};

impl Shared {
    /// Plans `req` and, unless it is a dry run or changes nothing, applies it in one transaction.
    /// Returns the plan, and the join tokens of the nodes it created.
    pub async fn apply(&self, req: &pb::ApplyRequest) -> OpResult<pb::ApplyReply> {
        let _w = self.write_lock().await;
        let now = now_ms();
        let mut plan = plan::plan(&self.model().reg, req, now)?;
        if req.dry_run || plan.is_noop() {
            return Ok(pb::ApplyReply { steps: plan.steps, tokens: vec![], applied: !req.dry_run });
        }

        let limits = JoinLimits { ttl_seconds: req.token_ttl_seconds, once: req.token_once };
        let mut secrets = Vec::with_capacity(plan.new_nodes.len());
        for n in &mut plan.new_nodes {
            let secret = Self::new_secret();
            n.secret_hash = self
                .hasher
                .hash(secret.expose().to_owned())
                .await
                .map_err(|e| OpError::Internal(e.to_string()))?;
            n.join_expires_ms = expiry(now, limits.ttl_seconds);
            n.join_once = limits.once;
            secrets.push(secret);
        }

        self.store.apply(&batch(&plan, now), now).await?;

        {
            let mut guard = self.model();
            let m = &mut *guard;
            for (id, kind, name) in &plan.delete_nodes {
                m.hub.kill(id, &format!("{} '{name}' was removed (apply --prune)", kind.as_str()));
            }
            let touched = plan.apply_to(&mut m.reg, now);
            m.hub.distribute(&m.reg, touched);
        }

        let tokens = plan
            .new_nodes
            .iter()
            .zip(secrets)
            .map(|(n, secret)| pb::NewToken {
                kind: tunnel_wire::kind_to_pb(n.kind) as i32,
                name: n.name.clone(),
                join_token: self.token(&n.id, secret).encode(),
            })
            .collect();
        Ok(pb::ApplyReply { steps: plan.steps, tokens, applied: true })
    }
}

/// The plan's changes as database rows.
fn batch(p: &plan::Plan, now: i64) -> ApplyBatch {
    let resource_row = |r: &crate::registry::ResourceRec| ResourceRow {
        name: r.name.clone(),
        site_id: r.site.to_string(),
        target: r.target.to_string(),
        alias: r.alias.clone(),
        overlay_addr: r.addr.to_string(),
        created_ms: r.created_ms,
        health_check: r.health_check.clone(),
    };
    ApplyBatch {
        delete_grants: p.delete_grants.iter().map(|(c, r)| (c.to_string(), r.clone())).collect(),
        delete_resources: p.delete_resources.clone(),
        insert_nodes: p
            .new_nodes
            .iter()
            .map(|n| NodeRow {
                id: n.id.to_string(),
                kind: n.kind.as_str().into(),
                name: n.name.clone(),
                overlay_addr: n.addr.to_string(),
                public_key: None,
                secret_hash: n.secret_hash.clone(),
                generation: 1,
                join_expires_ms: n.join_expires_ms,
                join_once: n.join_once,
                join_used: false,
                created_ms: now,
                last_seen_ms: 0,
                version: String::new(),
            })
            .collect(),
        update_resources: p.update_resources.iter().map(resource_row).collect(),
        delete_nodes: p.delete_nodes.iter().map(|(id, _, _)| id.to_string()).collect(),
        insert_resources: p.new_resources.iter().map(resource_row).collect(),
        insert_grants: p
            .new_grants
            .iter()
            .map(|(c, r)| GrantRow { client_id: c.to_string(), resource_name: r.clone(), created_ms: now })
            .collect(),
    }
}
