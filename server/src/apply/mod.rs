//! Every admin change, single or a whole `Admin.Apply`, goes one way: under the write lock, a
//! [`plan::Plan`] validates the change against the model and decides it, addresses included
//! ([`plan::plan`] for an apply, [`ops`] for each single operation); [`Shared::commit`] then writes
//! the whole change in one database transaction ([`crate::store::Store::apply`]), and only after the
//! commit does the model take the same change ([`plan::Plan::apply_to`]) and the hub push deltas to
//! the nodes whose views changed. A refusal, or a failure anywhere in the transaction, therefore
//! changes nothing anywhere. The single operations keep their own gRPC codes, messages and audit
//! entries; the rules and the commit are shared.

mod ops;
pub mod plan;

use tunnel_core::Secret;
use tunnel_proto::v1 as pb;

use crate::state::{expiry, now_ms, JoinLimits, OpError, OpResult, Shared};
use crate::store::{ApplyBatch, GrantRow, NodeRow, ResourceRow, SecretRow};

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
        let secrets = self.commit(&mut plan, limits, now, "apply --prune").await?;
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

    /// Commits a validated plan; the caller holds the write lock. New nodes and rotated ones get
    /// fresh join secrets under `limits` (returned in the plan's order: new nodes, then rotations);
    /// the sessions of deleted nodes end, saying `how` (when not empty) in the reason, and those of
    /// rotated nodes end too.
    pub(crate) async fn commit(
        &self,
        plan: &mut plan::Plan,
        limits: JoinLimits,
        now: i64,
        how: &str,
    ) -> OpResult<Vec<Secret>> {
        let expires = expiry(now, limits.ttl_seconds);
        let mut secrets = Vec::with_capacity(plan.new_nodes.len() + plan.rotations.len());
        let hashes = plan
            .new_nodes
            .iter_mut()
            .map(|n| (&mut n.secret_hash, &mut n.join_expires_ms, &mut n.join_once))
            .chain(
                plan.rotations
                    .iter_mut()
                    .map(|r| (&mut r.secret_hash, &mut r.join_expires_ms, &mut r.join_once)),
            );
        for (hash, join_expires_ms, join_once) in hashes {
            let secret = Self::new_secret();
            *hash = self
                .hasher
                .hash(secret.expose().to_owned())
                .await
                .map_err(|e| OpError::Internal(e.to_string()))?;
            *join_expires_ms = expires;
            *join_once = limits.once;
            secrets.push(secret);
        }

        self.store.apply(&batch(plan, now), now).await?;

        {
            let mut guard = self.model();
            let m = &mut *guard;
            for (id, kind, name) in &plan.delete_nodes {
                let mut why = format!("{} '{name}' was removed", kind.as_str());
                if !how.is_empty() {
                    why.push_str(&format!(" ({how})"));
                }
                m.hub.kill(id, &why);
            }
            let touched = plan.apply_to(&mut m.reg, now);
            for r in &plan.rotations {
                m.hub.kill(&r.id, "the node's secret was rotated; join again with the new token");
                m.hub.mark_dirty(&r.id);
            }
            m.hub.distribute(&m.reg, touched);
        }
        // Two machines fighting over a leaked identity spend its login budget; the rightful one,
        // given the new token, must not then wait out the thief's logins.
        for r in &plan.rotations {
            self.gate.per_node.forget(&r.id.to_string());
        }
        Ok(secrets)
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
        rotate_secrets: p
            .rotations
            .iter()
            .map(|r| SecretRow {
                id: r.id.to_string(),
                secret_hash: r.secret_hash.clone(),
                generation: r.generation,
                join_expires_ms: r.join_expires_ms,
                join_once: r.join_once,
            })
            .collect(),
    }
}
