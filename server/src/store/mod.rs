//! Durable state: sites, clients, resources, grants, released addresses and the audit log.
//!
//! One code path for both databases through sqlx's `Any` driver: SQLite (one WAL file in the data dir)
//! by default, PostgreSQL when `--database postgres://...` is given. Queries use only types and SQL both
//! understand (TEXT, BIGINT, `$N` parameters). Migrations are embedded in the binary and only expand.

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Row};

mod writes;
use writes::*;

/// A storage failure, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or migrated.
    #[error("cannot open database {url}: {source}")]
    Open {
        /// Redacted URL.
        url: String,
        /// Cause.
        source: sqlx::Error,
    },
    /// The migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("database error while {doing}: {source}")]
    Query {
        /// What the server was doing.
        doing: &'static str,
        /// Cause.
        source: sqlx::Error,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

fn q(doing: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { doing, source }
}

/// Which database is behind the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite file.
    Sqlite,
    /// PostgreSQL server.
    Postgres,
}

/// A node as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRow {
    pub id: String,
    pub kind: String,
    pub name: String,
    pub overlay_addr: String,
    pub public_key: Option<String>,
    pub secret_hash: String,
    pub generation: i64,
    pub join_expires_ms: i64,
    pub join_once: bool,
    pub join_used: bool,
    pub created_ms: i64,
    pub last_seen_ms: i64,
    pub version: String,
}

/// A resource as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceRow {
    pub name: String,
    pub site_id: String,
    pub target: String,
    pub alias: Option<String>,
    pub overlay_addr: String,
    pub created_ms: i64,
    /// `None`: TCP connect; `http:/PATH`: HTTP GET.
    pub health_check: Option<String>,
}

/// A grant as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantRow {
    pub client_id: String,
    pub resource_name: String,
    pub created_ms: i64,
}

/// One audit log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRow {
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub source: String,
    pub outcome: String,
}

/// A successful login, as [`Store::record_join`] writes it.
#[derive(Clone, Debug)]
pub struct JoinRecord<'a> {
    pub id: &'a str,
    /// The secret generation the login used: a rotated node writes nothing.
    pub generation: i64,
    pub public_key: &'a str,
    pub join_used: bool,
    /// The login spends a single-use secret: it writes only if the secret is still unused.
    pub spend_once: bool,
    pub version: &'a str,
    pub now_ms: i64,
}

/// An audit entry as stored, with its id (the paging cursor).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: i64,
    pub row: AuditRow,
}

/// Longest stored audit fields, in characters: what a node or a stranger sends is cut to fit, so the
/// log cannot be used to fill the disk (a denied login's node id was once stored as sent, up to 4 MiB).
pub const AUDIT_FIELD_MAX: usize = 256;

impl AuditRow {
    /// The row with every field cut to [`AUDIT_FIELD_MAX`] characters and control characters
    /// replaced, as it is stored and logged.
    pub fn bounded(&self) -> AuditRow {
        AuditRow {
            at_ms: self.at_ms,
            actor: clip(&self.actor, AUDIT_FIELD_MAX),
            action: clip(&self.action, AUDIT_FIELD_MAX),
            target: clip(&self.target, AUDIT_FIELD_MAX),
            source: clip(&self.source, AUDIT_FIELD_MAX),
            outcome: clip(&self.outcome, AUDIT_FIELD_MAX),
        }
    }
}

/// `s` cut to at most `max` characters (an ellipsis marks the cut), with control characters
/// (newlines, escapes) replaced by `?` so a stored or logged field cannot forge log lines.
pub fn clip(s: &str, max: usize) -> String {
    let mut out: String = s.chars().take(max).map(|c| if c.is_control() { '?' } else { c }).collect();
    if s.chars().nth(max).is_some() {
        out.pop();
        out.push('…');
    }
    out
}

/// Everything the server loads at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub nodes: Vec<NodeRow>,
    pub resources: Vec<ResourceRow>,
    pub grants: Vec<GrantRow>,
    pub released: Vec<(String, i64)>,
    pub overlay_cidr: Option<String>,
}

/// What removing a node took with it.
#[derive(Debug, Default)]
pub struct Removed {
    pub resources: Vec<String>,
    pub grants: u64,
}

/// A node's new join secret (rotation): a new hash, a new generation, new join limits; its key is
/// forgotten.
#[derive(Debug, Clone)]
pub struct SecretRow {
    pub id: String,
    pub secret_hash: String,
    pub generation: i64,
    pub join_expires_ms: i64,
    pub join_once: bool,
}

/// Every change of one admin operation (a single one, or a whole `Admin.Apply`), written in one
/// transaction by [`Store::apply`].
#[derive(Debug, Default)]
pub struct ApplyBatch {
    /// (client id, resource name).
    pub delete_grants: Vec<(String, String)>,
    /// Resource names; their grants go too (the batch lists them anyway).
    pub delete_resources: Vec<String>,
    pub insert_nodes: Vec<NodeRow>,
    /// Resources whose site, target or alias changed, as they should be now (same name).
    pub update_resources: Vec<ResourceRow>,
    /// Node ids; the batch has already moved or deleted everything that refers to them.
    pub delete_nodes: Vec<String>,
    pub insert_resources: Vec<ResourceRow>,
    pub insert_grants: Vec<GrantRow>,
    pub rotate_secrets: Vec<SecretRow>,
}

impl ApplyBatch {
    /// Whether the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.delete_grants.is_empty()
            && self.delete_resources.is_empty()
            && self.insert_nodes.is_empty()
            && self.update_resources.is_empty()
            && self.delete_nodes.is_empty()
            && self.insert_resources.is_empty()
            && self.insert_grants.is_empty()
            && self.rotate_secrets.is_empty()
    }
}

/// The database handle. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    url_redacted: String,
}

impl Store {
    /// Opens (creating if needed) the database at `url`, or the SQLite file `DATA_DIR/tunnel.db` when
    /// `url` is `None`, and runs the migrations.
    pub async fn open(url: Option<&str>, data_dir: &Path) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let url = match url {
            Some(u) => u.to_owned(),
            None => format!("sqlite://{}?mode=rwc", data_dir.join("tunnel.db").display()),
        };
        let url_redacted = redact_url(&url);
        let open_err = |source| StoreError::Open { url: url_redacted.clone(), source };
        let backend = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(open_err(sqlx::Error::Configuration(
                "the database URL must start with sqlite:// or postgres://".into(),
            )));
        };
        let opts = AnyConnectOptions::from_str(&url).map_err(open_err)?;
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 8 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers run beside the writer. FULL syncs the log at every commit:
                        // NORMAL survives a process crash but a power loss can undo the last commits,
                        // and those are a revoke, an `rm` or a used single-use token the operator saw
                        // succeed. Writes are rare (admin calls, logins), so the fsync costs nothing.
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = FULL",
                            "PRAGMA busy_timeout = 5000",
                            "PRAGMA foreign_keys = ON",
                        ] {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect_with(opts)
            .await
            .map_err(open_err)?;
        let store = Store { pool, backend, url_redacted };
        store.migrator().run(&store.pool).await?;
        Ok(store)
    }

    fn migrator(&self) -> Migrator {
        let sql: [&'static str; 3] = match self.backend {
            Backend::Sqlite => [
                include_str!("migrations/sqlite/0001_init.sql"),
                include_str!("migrations/sqlite/0002_health_check.sql"),
                include_str!("migrations/sqlite/0003_audit_index.sql"),
            ],
            Backend::Postgres => [
                include_str!("migrations/postgres/0001_init.sql"),
                include_str!("migrations/postgres/0002_health_check.sql"),
                include_str!("migrations/postgres/0003_audit_index.sql"),
            ],
        };
        let names = ["init", "health_check", "audit_index"];
        let migrations = sql
            .iter()
            .zip(names)
            .enumerate()
            .map(|(i, (sql, name))| {
                Migration::new(
                    i as i64 + 1,
                    Cow::Borrowed(name),
                    MigrationType::Simple,
                    Cow::Borrowed(*sql),
                    false,
                )
            })
            .collect();
        Migrator { migrations: Cow::Owned(migrations), ignore_missing: true, locking: true, no_tx: false }
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL with any password removed, for logs and status.
    pub fn describe(&self) -> &str {
        &self.url_redacted
    }

    /// Loads everything, dropping released addresses older than `quarantine_cutoff_ms`.
    pub async fn load(&self, quarantine_cutoff_ms: i64) -> Result<Snapshot> {
        sqlx::query("DELETE FROM released_addresses WHERE released_ms < $1")
            .bind(quarantine_cutoff_ms)
            .execute(&self.pool)
            .await
            .map_err(q("pruning released addresses"))?;
        let nodes = sqlx::query(
            "SELECT id, kind, name, overlay_addr, public_key, secret_hash, generation, join_expires_ms, \
             join_once, join_used, created_ms, last_seen_ms, version FROM nodes ORDER BY created_ms, id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q("loading nodes"))?
        .into_iter()
        .map(|r| {
            Ok(NodeRow {
                id: r.try_get("id")?,
                kind: r.try_get("kind")?,
                name: r.try_get("name")?,
                overlay_addr: r.try_get("overlay_addr")?,
                public_key: r.try_get("public_key")?,
                secret_hash: r.try_get("secret_hash")?,
                generation: r.try_get("generation")?,
                join_expires_ms: r.try_get("join_expires_ms")?,
                join_once: r.try_get::<i64, _>("join_once")? != 0,
                join_used: r.try_get::<i64, _>("join_used")? != 0,
                created_ms: r.try_get("created_ms")?,
                last_seen_ms: r.try_get("last_seen_ms")?,
                version: r.try_get("version")?,
            })
        })
        .collect::<std::result::Result<Vec<_>, sqlx::Error>>()
        .map_err(q("reading nodes"))?;
        let resources = sqlx::query(
            "SELECT name, site_id, target, alias, overlay_addr, created_ms, health_check FROM resources ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q("loading resources"))?
        .into_iter()
        .map(|r| {
            Ok(ResourceRow {
                name: r.try_get("name")?,
                site_id: r.try_get("site_id")?,
                target: r.try_get("target")?,
                alias: r.try_get("alias")?,
                overlay_addr: r.try_get("overlay_addr")?,
                created_ms: r.try_get("created_ms")?,
                health_check: r.try_get("health_check")?,
            })
        })
        .collect::<std::result::Result<Vec<_>, sqlx::Error>>()
        .map_err(q("reading resources"))?;
        let grants = sqlx::query("SELECT client_id, resource_name, created_ms FROM grants")
            .fetch_all(&self.pool)
            .await
            .map_err(q("loading grants"))?
            .into_iter()
            .map(|r| {
                Ok(GrantRow {
                    client_id: r.try_get("client_id")?,
                    resource_name: r.try_get("resource_name")?,
                    created_ms: r.try_get("created_ms")?,
                })
            })
            .collect::<std::result::Result<Vec<_>, sqlx::Error>>()
            .map_err(q("reading grants"))?;
        let released = sqlx::query("SELECT addr, released_ms FROM released_addresses")
            .fetch_all(&self.pool)
            .await
            .map_err(q("loading released addresses"))?
            .into_iter()
            .map(|r| Ok((r.try_get("addr")?, r.try_get("released_ms")?)))
            .collect::<std::result::Result<Vec<_>, sqlx::Error>>()
            .map_err(q("reading released addresses"))?;
        let overlay_cidr = self.meta("overlay_cidr").await?;
        Ok(Snapshot { nodes, resources, grants, released, overlay_cidr })
    }

    /// Reads one server_meta value.
    pub async fn meta(&self, key: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM server_meta WHERE key = $1")
            .bind(key.to_owned())
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading server metadata"))?;
        row.map(|r| r.try_get::<String, _>("value")).transpose().map_err(q("reading server metadata"))
    }

    /// Writes one server_meta value.
    pub async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(q("writing server metadata"))?;
        sqlx::query("DELETE FROM server_meta WHERE key = $1")
            .bind(key.to_owned())
            .execute(&mut *tx)
            .await
            .map_err(q("writing server metadata"))?;
        sqlx::query("INSERT INTO server_meta (key, value) VALUES ($1, $2)")
            .bind(key.to_owned())
            .bind(value.to_owned())
            .execute(&mut *tx)
            .await
            .map_err(q("writing server metadata"))?;
        tx.commit().await.map_err(q("writing server metadata"))
    }

    /// Adds a node.
    #[cfg(test)]
    pub async fn insert_node(&self, n: &NodeRow) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(q("adding a node"))?;
        insert_node(&mut tx, n).await?;
        tx.commit().await.map_err(q("adding a node"))
    }

    /// Replaces a node's join secret (rotation): a new hash, a new generation, new join limits.
    #[cfg(test)]
    pub async fn update_secret(&self, s: &SecretRow) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(q("rotating a node's secret"))?;
        update_secret(&mut tx, s).await?;
        tx.commit().await.map_err(q("rotating a node's secret"))
    }

    /// Records a successful join: the node's public key, whether the join secret is now used up, and
    /// the software version it runs.
    /// Records a login's key, only if the node's secret generation is still `generation`. Returns
    /// false when it is not (the node was rotated or removed while the login was in flight).
    pub async fn record_join(&self, j: &JoinRecord<'_>) -> Result<bool> {
        // With `spend_once` the check that a single-use secret is unused and the mark that it is used
        // are this one statement: of two logins racing with the same token, one updates the row and
        // the other finds it already spent.
        let r = sqlx::query(
            "UPDATE nodes SET public_key = $1, join_used = $2, version = $3, last_seen_ms = $4 \
             WHERE id = $5 AND generation = $6 AND ($7 = 0 OR join_used = 0)",
        )
        .bind(j.public_key.to_owned())
        .bind(i64::from(j.join_used))
        .bind(j.version.to_owned())
        .bind(j.now_ms)
        .bind(j.id.to_owned())
        .bind(j.generation)
        .bind(i64::from(j.spend_once))
        .execute(&self.pool)
        .await
        .map_err(q("recording a join"))?;
        Ok(r.rows_affected() > 0)
    }

    /// Writes last-seen times in one transaction (they are batched: a reconnect storm is one write).
    pub async fn touch_last_seen(&self, seen: &[(String, i64)]) -> Result<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(q("recording last-seen times"))?;
        for (id, ms) in seen {
            sqlx::query("UPDATE nodes SET last_seen_ms = $1 WHERE id = $2")
                .bind(*ms)
                .bind(id.clone())
                .execute(&mut *tx)
                .await
                .map_err(q("recording last-seen times"))?;
        }
        tx.commit().await.map_err(q("recording last-seen times"))
    }

    /// Removes a node with its grants and, for a site, its resources (and their grants); every
    /// overlay address freed goes into quarantine. All in one transaction.
    #[cfg(test)]
    pub async fn delete_node(&self, id: &str, now_ms: i64) -> Result<Removed> {
        let mut tx = self.pool.begin().await.map_err(q("removing a node"))?;
        let removed = delete_node(&mut tx, id, now_ms).await?;
        tx.commit().await.map_err(q("removing a node"))?;
        Ok(removed)
    }

    /// Adds a resource.
    #[cfg(test)]
    pub async fn insert_resource(&self, r: &ResourceRow) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(q("adding a resource"))?;
        insert_resource(&mut tx, r).await?;
        tx.commit().await.map_err(q("adding a resource"))
    }

    /// Removes a resource and its grants; its address goes into quarantine.
    #[cfg(test)]
    pub async fn delete_resource(&self, name: &str, now_ms: i64) -> Result<u64> {
        let mut tx = self.pool.begin().await.map_err(q("removing a resource"))?;
        let grants = delete_resource(&mut tx, name, now_ms).await?;
        tx.commit().await.map_err(q("removing a resource"))?;
        Ok(grants)
    }

    /// Adds a grant.
    #[cfg(test)]
    pub async fn insert_grant(&self, g: &GrantRow) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(q("adding a grant"))?;
        insert_grant(&mut tx, g).await?;
        tx.commit().await.map_err(q("adding a grant"))
    }

    /// Removes a grant.
    #[cfg(test)]
    pub async fn delete_grant(&self, client_id: &str, resource_name: &str) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(q("removing a grant"))?;
        delete_grant(&mut tx, client_id, resource_name).await?;
        tx.commit().await.map_err(q("removing a grant"))
    }

    /// Writes a whole [`ApplyBatch`] in one transaction: every change lands, or (on any failure,
    /// wherever it happens) none does.
    pub async fn apply(&self, b: &ApplyBatch, now_ms: i64) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(q("applying a config"))?;
        // Order matters for the constraints: dependents go before what they depend on, and names and
        // aliases are freed before they are taken again.
        for (client_id, resource) in &b.delete_grants {
            delete_grant(&mut tx, client_id, resource).await?;
        }
        for name in &b.delete_resources {
            delete_resource(&mut tx, name, now_ms).await?;
        }
        for n in &b.insert_nodes {
            insert_node(&mut tx, n).await?;
        }
        // Aliases may move between updated resources (even swap): free them all first.
        for r in &b.update_resources {
            sqlx::query("UPDATE resources SET alias = NULL WHERE name = $1")
                .bind(r.name.clone())
                .execute(&mut *tx)
                .await
                .map_err(q("updating a resource"))?;
        }
        for r in &b.update_resources {
            update_resource(&mut tx, r, now_ms).await?;
        }
        for id in &b.delete_nodes {
            delete_node(&mut tx, id, now_ms).await?;
        }
        for r in &b.insert_resources {
            insert_resource(&mut tx, r).await?;
        }
        for g in &b.insert_grants {
            insert_grant(&mut tx, g).await?;
        }
        for s in &b.rotate_secrets {
            update_secret(&mut tx, s).await?;
        }
        tx.commit().await.map_err(q("applying a config"))
    }

    /// Appends to the audit log.
    pub async fn audit(&self, e: &AuditRow) -> Result<()> {
        self.audit_many(std::slice::from_ref(e)).await
    }

    /// Appends several entries to the audit log in one transaction.
    pub async fn audit_many(&self, rows: &[AuditRow]) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(q("writing the audit log"))?;
        for e in rows {
            insert_audit(&mut tx, e).await?;
        }
        tx.commit().await.map_err(q("writing the audit log"))
    }

    /// Up to `limit` audit entries older than entry `before_id` (0: from the newest), newest first.
    pub async fn list_audit(&self, limit: u32, before_id: i64) -> Result<Vec<AuditEntry>> {
        let before = if before_id <= 0 { i64::MAX } else { before_id };
        sqlx::query(
            "SELECT id, at_ms, actor, action, target, source, outcome FROM audit_log WHERE id < $1 \
             ORDER BY id DESC LIMIT $2",
        )
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(q("reading the audit log"))?
        .into_iter()
        .map(|r| {
            Ok(AuditEntry {
                id: r.try_get("id")?,
                row: AuditRow {
                    at_ms: r.try_get("at_ms")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    source: r.try_get("source")?,
                    outcome: r.try_get("outcome")?,
                },
            })
        })
        .collect::<std::result::Result<Vec<_>, sqlx::Error>>()
        .map_err(q("reading the audit log"))
    }

    /// Deletes audit entries written before `before_ms`; returns how many.
    pub async fn prune_audit(&self, before_ms: i64) -> Result<u64> {
        let r = sqlx::query("DELETE FROM audit_log WHERE at_ms < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await
            .map_err(q("pruning the audit log"))?;
        Ok(r.rows_affected())
    }

    /// Closes the pool (tests use this to restart a server on the same file).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Drops the password from a database URL.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &url[..s], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests;
