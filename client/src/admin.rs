//! The administration commands: one gRPC call each against the server named in the admin token.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tunnel_core::AdminToken;
use tunnel_node::tls::{self, ServerTarget};
use tunnel_proto::v1 as pb;
use tunnel_proto::v1::admin_client::AdminClient;

use crate::table::Table;

/// An admin API client that sends the admin secret with every call.
pub type Client = AdminClient<InterceptedService<Channel, Auth>>;

/// Adds the admin secret to every call.
#[derive(Clone)]
pub struct Auth(MetadataValue<tonic::metadata::Ascii>);

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth(<redacted>)")
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// Reads the admin token from the flag, the file, or the environment (clap has merged the env vars).
pub fn resolve_token(token: Option<&str>, file: Option<&Path>) -> Result<AdminToken> {
    let text = match (token, file) {
        (Some(t), _) => t.to_owned(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read admin token file {}", f.display()))?,
        (None, None) => bail!(
            "no admin token: pass --admin-token-file DATA_DIR/admin.token (or --admin-token, or set TUNNEL_ADMIN_TOKEN)"
        ),
    };
    AdminToken::parse(&text).map_err(|e| anyhow!("invalid admin token: {e}"))
}

/// Connects to the server the token names.
pub async fn connect(token: &AdminToken) -> Result<Client> {
    let channel = tls::connect(&ServerTarget { server: token.server.clone(), pin: token.pin }).await?;
    let mut value: MetadataValue<tonic::metadata::Ascii> = format!("Bearer {}", token.secret.expose())
        .parse()
        .map_err(|_| anyhow!("invalid admin token: the secret has characters a header cannot carry"))?;
    value.set_sensitive(true);
    Ok(AdminClient::with_interceptor(channel, Auth(value)))
}

/// A gRPC status as a one-line error: the server's message is written for people already.
pub fn status(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unavailable if s.message().is_empty() => anyhow!("the server is unavailable"),
        _ if s.message().is_empty() => anyhow!("the server refused: {}", s.code()),
        _ => anyhow!("{}", s.message()),
    }
}

/// `site add` / `client add` / `rotate`: prints the join token and nothing else.
pub fn print_token(out: &mut dyn Write, reply: pb::JoinTokenReply) -> Result<()> {
    writeln!(out, "{}", reply.join_token)?;
    Ok(())
}

fn kind_name(k: i32) -> &'static str {
    match pb::NodeKind::try_from(k) {
        Ok(pb::NodeKind::Site) => "site",
        Ok(pb::NodeKind::Client) => "client",
        _ => "?",
    }
}

fn when(ms: i64) -> String {
    if ms <= 0 {
        return "never".into();
    }
    let t = UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `sites` / `clients`.
pub fn print_nodes(out: &mut dyn Write, nodes: &[pb::NodeInfo], json_out: bool) -> Result<()> {
    if json_out {
        let v: Vec<_> = nodes
            .iter()
            .map(|n| {
                json!({
                    "name": n.name, "id": n.id, "kind": kind_name(n.kind), "overlay_addr": n.overlay_addr,
                    "public_key": n.public_key, "online": n.online, "last_seen_ms": n.last_seen_ms,
                    "created_ms": n.created_ms, "version": n.version, "resources": n.resources,
                    "join_expires_ms": n.join_expires_ms, "join_once": n.join_once, "join_used": n.join_used,
                    "candidates": n.candidates.iter().map(|c| c.addr.clone()).collect::<Vec<_>>(),
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    let is_site = nodes.first().map(|n| kind_name(n.kind) == "site").unwrap_or(true);
    let mut t = Table::new(&[
        "NAME",
        "ADDRESS",
        "ONLINE",
        "LAST SEEN",
        if is_site { "RESOURCES" } else { "GRANTS" },
        "VERSION",
    ]);
    for n in nodes {
        t.row(vec![
            n.name.clone(),
            n.overlay_addr.clone(),
            if n.online { "yes".into() } else { "no".into() },
            if n.online { "now".into() } else { when(n.last_seen_ms) },
            n.resources.join(","),
            n.version.clone(),
        ]);
    }
    t.write(out)
}

/// `resources`.
pub fn print_resources(out: &mut dyn Write, rs: &[pb::ResourceInfo], json_out: bool) -> Result<()> {
    if json_out {
        let v: Vec<_> = rs
            .iter()
            .map(|r| {
                json!({
                    "name": r.name, "site": r.site, "target": r.target,
                    "alias": if r.alias.is_empty() { None } else { Some(&r.alias) },
                    "overlay_addr": r.overlay_addr, "dns_names": r.dns_names, "clients": r.clients,
                    "created_ms": r.created_ms,
                    "health_check": r.health_check,
                    "health": health_name(r.health),
                    "health_detail": r.health_detail,
                    "health_checked_ms": r.health_checked_ms,
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    let mut t = Table::new(&["NAME", "SITE", "TARGET", "HEALTH", "ADDRESS", "DNS NAMES", "CLIENTS"]);
    for r in rs {
        let health = match (health_name(r.health), r.health_detail.as_str()) {
            ("unhealthy", d) if !d.is_empty() => format!("unhealthy ({d})"),
            (h, _) => h.to_owned(),
        };
        t.row(vec![
            r.name.clone(),
            r.site.clone(),
            r.target.clone(),
            health,
            r.overlay_addr.clone(),
            r.dns_names.join(","),
            r.clients.join(","),
        ]);
    }
    t.write(out)
}

fn health_name(v: i32) -> &'static str {
    tunnel_wire::health_state_from_pb(v).as_str()
}

/// `grants`.
pub fn print_grants(out: &mut dyn Write, gs: &[pb::GrantInfo], json_out: bool) -> Result<()> {
    if json_out {
        let v: Vec<_> = gs
            .iter()
            .map(|g| json!({"client": g.client, "resource": g.resource, "created_ms": g.created_ms}))
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    let mut t = Table::new(&["CLIENT", "RESOURCE", "SINCE"]);
    for g in gs {
        t.row(vec![g.client.clone(), g.resource.clone(), when(g.created_ms)]);
    }
    t.write(out)
}

/// `audit`.
pub fn print_audit(out: &mut dyn Write, es: &[pb::AuditEvent], json_out: bool) -> Result<()> {
    if json_out {
        let v: Vec<_> = es
            .iter()
            .map(|e| {
                json!({"id": e.id, "at_ms": e.at_ms, "actor": e.actor, "action": e.action, "target": e.target,
                       "source": e.source, "outcome": e.outcome})
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    let mut t = Table::new(&["WHEN", "ACTOR", "ACTION", "TARGET", "SOURCE", "OUTCOME"]);
    for e in es {
        t.row(vec![
            when(e.at_ms),
            e.actor.clone(),
            e.action.clone(),
            e.target.clone(),
            e.source.clone(),
            e.outcome.clone(),
        ]);
    }
    t.write(out)
}

/// `info`.
pub fn print_info(out: &mut dyn Write, i: &pb::ServerInfoReply, json_out: bool) -> Result<()> {
    if json_out {
        let v = json!({
            "version": i.version, "public_addr": i.public_addr, "dns_zone": i.dns_zone,
            "overlay_cidr": i.overlay_cidr, "mtu": i.mtu, "sites": i.sites, "clients": i.clients,
            "resources": i.resources, "grants": i.grants, "connected_nodes": i.connected_nodes,
            "database": i.database,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    writeln!(out, "server       {} (version {})", i.public_addr, i.version)?;
    writeln!(out, "database     {}", i.database)?;
    writeln!(out, "overlay      {}  zone {}  mtu {}", i.overlay_cidr, i.dns_zone, i.mtu)?;
    writeln!(out, "sites        {}", i.sites)?;
    writeln!(out, "clients      {}", i.clients)?;
    writeln!(out, "resources    {}", i.resources)?;
    writeln!(out, "grants       {}", i.grants)?;
    writeln!(out, "connected    {}", i.connected_nodes)?;
    Ok(())
}
