//! The writes, one function each, inside the caller's transaction ([`super::Store::apply`]): every
//! admin operation, single or a whole `Admin.Apply`, runs these statements through one batch.

use sqlx::Row;

use super::{q, AuditRow, GrantRow, NodeRow, Removed, ResourceRow, Result, SecretRow, StoreError};

pub(super) type Tx<'c> = sqlx::Transaction<'c, sqlx::Any>;

pub(super) async fn insert_node(tx: &mut Tx<'_>, n: &NodeRow) -> Result<()> {
    sqlx::query("DELETE FROM released_addresses WHERE addr = $1")
        .bind(n.overlay_addr.clone())
        .execute(&mut **tx)
        .await
        .map_err(q("adding a node"))?;
    sqlx::query(
        "INSERT INTO nodes (id, kind, name, overlay_addr, public_key, secret_hash, generation, \
         join_expires_ms, join_once, join_used, created_ms, last_seen_ms, version) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(n.id.clone())
    .bind(n.kind.clone())
    .bind(n.name.clone())
    .bind(n.overlay_addr.clone())
    .bind(n.public_key.clone())
    .bind(n.secret_hash.clone())
    .bind(n.generation)
    .bind(n.join_expires_ms)
    .bind(i64::from(n.join_once))
    .bind(i64::from(n.join_used))
    .bind(n.created_ms)
    .bind(n.last_seen_ms)
    .bind(n.version.clone())
    .execute(&mut **tx)
    .await
    .map_err(q("adding a node"))?;
    Ok(())
}

pub(super) async fn delete_node(tx: &mut Tx<'_>, id: &str, now_ms: i64) -> Result<Removed> {
    let resources: Vec<(String, String)> =
        sqlx::query("SELECT name, overlay_addr FROM resources WHERE site_id = $1")
            .bind(id.to_owned())
            .fetch_all(&mut **tx)
            .await
            .map_err(q("removing a node"))?
            .into_iter()
            .map(|r| Ok((r.try_get("name")?, r.try_get("overlay_addr")?)))
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(q("removing a node"))?;
    let mut grants = 0;
    for (name, addr) in &resources {
        grants += sqlx::query("DELETE FROM grants WHERE resource_name = $1")
            .bind(name.clone())
            .execute(&mut **tx)
            .await
            .map_err(q("removing a node"))?
            .rows_affected();
        sqlx::query("DELETE FROM resources WHERE name = $1")
            .bind(name.clone())
            .execute(&mut **tx)
            .await
            .map_err(q("removing a node"))?;
        release(tx, addr, now_ms).await?;
    }
    grants += sqlx::query("DELETE FROM grants WHERE client_id = $1")
        .bind(id.to_owned())
        .execute(&mut **tx)
        .await
        .map_err(q("removing a node"))?
        .rows_affected();
    let addr: Option<String> = sqlx::query("SELECT overlay_addr FROM nodes WHERE id = $1")
        .bind(id.to_owned())
        .fetch_optional(&mut **tx)
        .await
        .map_err(q("removing a node"))?
        .map(|r| r.try_get("overlay_addr"))
        .transpose()
        .map_err(q("removing a node"))?;
    sqlx::query("DELETE FROM nodes WHERE id = $1")
        .bind(id.to_owned())
        .execute(&mut **tx)
        .await
        .map_err(q("removing a node"))?;
    if let Some(addr) = addr {
        release(tx, &addr, now_ms).await?;
    }
    Ok(Removed { resources: resources.into_iter().map(|(n, _)| n).collect(), grants })
}

pub(super) async fn insert_resource(tx: &mut Tx<'_>, r: &ResourceRow) -> Result<()> {
    sqlx::query("DELETE FROM released_addresses WHERE addr = $1")
        .bind(r.overlay_addr.clone())
        .execute(&mut **tx)
        .await
        .map_err(q("adding a resource"))?;
    sqlx::query(
        "INSERT INTO resources (name, site_id, target, alias, overlay_addr, created_ms, health_check) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(r.name.clone())
    .bind(r.site_id.clone())
    .bind(r.target.clone())
    .bind(r.alias.clone())
    .bind(r.overlay_addr.clone())
    .bind(r.created_ms)
    .bind(r.health_check.clone())
    .execute(&mut **tx)
    .await
    .map_err(q("adding a resource"))?;
    Ok(())
}

/// Sets a resource's site, target, alias and address; a replaced address goes into quarantine.
pub(super) async fn update_resource(tx: &mut Tx<'_>, r: &ResourceRow, now_ms: i64) -> Result<()> {
    let old: Option<String> = sqlx::query("SELECT overlay_addr FROM resources WHERE name = $1")
        .bind(r.name.clone())
        .fetch_optional(&mut **tx)
        .await
        .map_err(q("updating a resource"))?
        .map(|row| row.try_get("overlay_addr"))
        .transpose()
        .map_err(q("updating a resource"))?;
    let Some(old) = old else {
        // Someone else removed it since the plan was made: the whole apply must fail.
        return Err(StoreError::Query { doing: "updating a resource", source: sqlx::Error::RowNotFound });
    };
    if old != r.overlay_addr {
        sqlx::query("DELETE FROM released_addresses WHERE addr = $1")
            .bind(r.overlay_addr.clone())
            .execute(&mut **tx)
            .await
            .map_err(q("updating a resource"))?;
    }
    sqlx::query(
        "UPDATE resources SET site_id = $1, target = $2, alias = $3, overlay_addr = $4, health_check = $5 \
         WHERE name = $6",
    )
    .bind(r.site_id.clone())
    .bind(r.target.clone())
    .bind(r.alias.clone())
    .bind(r.overlay_addr.clone())
    .bind(r.health_check.clone())
    .bind(r.name.clone())
    .execute(&mut **tx)
    .await
    .map_err(q("updating a resource"))?;
    if old != r.overlay_addr {
        release(tx, &old, now_ms).await?;
    }
    Ok(())
}

pub(super) async fn delete_resource(tx: &mut Tx<'_>, name: &str, now_ms: i64) -> Result<u64> {
    let grants = sqlx::query("DELETE FROM grants WHERE resource_name = $1")
        .bind(name.to_owned())
        .execute(&mut **tx)
        .await
        .map_err(q("removing a resource"))?
        .rows_affected();
    let addr: Option<String> = sqlx::query("SELECT overlay_addr FROM resources WHERE name = $1")
        .bind(name.to_owned())
        .fetch_optional(&mut **tx)
        .await
        .map_err(q("removing a resource"))?
        .map(|r| r.try_get("overlay_addr"))
        .transpose()
        .map_err(q("removing a resource"))?;
    sqlx::query("DELETE FROM resources WHERE name = $1")
        .bind(name.to_owned())
        .execute(&mut **tx)
        .await
        .map_err(q("removing a resource"))?;
    if let Some(addr) = addr {
        release(tx, &addr, now_ms).await?;
    }
    Ok(grants)
}

pub(super) async fn insert_grant(tx: &mut Tx<'_>, g: &GrantRow) -> Result<()> {
    sqlx::query("INSERT INTO grants (client_id, resource_name, created_ms) VALUES ($1, $2, $3)")
        .bind(g.client_id.clone())
        .bind(g.resource_name.clone())
        .bind(g.created_ms)
        .execute(&mut **tx)
        .await
        .map_err(q("adding a grant"))?;
    Ok(())
}

pub(super) async fn delete_grant(tx: &mut Tx<'_>, client_id: &str, resource_name: &str) -> Result<()> {
    sqlx::query("DELETE FROM grants WHERE client_id = $1 AND resource_name = $2")
        .bind(client_id.to_owned())
        .bind(resource_name.to_owned())
        .execute(&mut **tx)
        .await
        .map_err(q("removing a grant"))?;
    Ok(())
}

pub(super) async fn update_secret(tx: &mut Tx<'_>, s: &SecretRow) -> Result<()> {
    sqlx::query(
        "UPDATE nodes SET secret_hash = $1, generation = $2, join_expires_ms = $3, join_once = $4, \
         join_used = 0, public_key = NULL WHERE id = $5",
    )
    .bind(s.secret_hash.clone())
    .bind(s.generation)
    .bind(s.join_expires_ms)
    .bind(i64::from(s.join_once))
    .bind(s.id.clone())
    .execute(&mut **tx)
    .await
    .map_err(q("rotating a node's secret"))?;
    Ok(())
}

pub(super) async fn insert_audit(tx: &mut Tx<'_>, e: &AuditRow) -> Result<()> {
    let e = &e.bounded();
    sqlx::query(
        "INSERT INTO audit_log (at_ms, actor, action, target, source, outcome) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(e.at_ms)
    .bind(e.actor.clone())
    .bind(e.action.clone())
    .bind(e.target.clone())
    .bind(e.source.clone())
    .bind(e.outcome.clone())
    .execute(&mut **tx)
    .await
    .map_err(q("writing the audit log"))?;
    Ok(())
}

pub(super) async fn release(tx: &mut Tx<'_>, addr: &str, now_ms: i64) -> Result<()> {
    sqlx::query("DELETE FROM released_addresses WHERE addr = $1")
        .bind(addr.to_owned())
        .execute(&mut **tx)
        .await
        .map_err(q("releasing an address"))?;
    sqlx::query("INSERT INTO released_addresses (addr, released_ms) VALUES ($1, $2)")
        .bind(addr.to_owned())
        .bind(now_ms)
        .execute(&mut **tx)
        .await
        .map_err(q("releasing an address"))?;
    Ok(())
}
