//! Command-line interface of `tunnelctl`.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Parser, Subcommand};
use tunnel_core::status::{LinkState, NodeStatus};
use tunnel_proto::v1 as pb;

use crate::admin;

/// tunnelctl: administer a tunnel server, and run the machine client.
#[derive(Debug, Parser)]
#[command(name = "tunnelctl", version, about, propagate_version = true)]
pub struct Cli {
    /// Admin token (one line from the server's DATA_DIR/admin.token). Prefer --admin-token-file: a
    /// flag is visible in the process list.
    #[arg(long, global = true, env = "TUNNEL_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// File holding the admin token.
    #[arg(long, global = true, env = "TUNNEL_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Log format (logs go to stderr; `TUNNEL_LOG` filters them).
    #[arg(long, global = true, env = "TUNNEL_LOG_FORMAT", value_enum, default_value_t = tunnel_node::process::LogFormat::Text)]
    pub log_format: tunnel_node::process::LogFormat,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Manage sites (where resources live; each runs tunnel-agent).
    Site {
        #[command(subcommand)]
        op: NodeOp,
    },
    /// Manage clients (machines that reach resources).
    Client {
        #[command(subcommand)]
        op: NodeOp,
    },
    /// List sites.
    Sites(ListArgs),
    /// List clients.
    Clients(ListArgs),
    /// List resources.
    Resources(ListArgs),
    /// List grants.
    Grants(ListArgs),
    /// Show the audit log, newest first.
    Audit {
        #[command(flatten)]
        list: ListArgs,
        /// How many entries (fetched from the server a page at a time).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only entries older than this id (the id a previous listing ended at, shown with --json).
        #[arg(long, default_value_t = 0)]
        before: i64,
    },
    /// Show the server's settings and counts.
    Info(ListArgs),
    /// Publish a service on a site as a resource with a private DNS name.
    AddResource {
        /// The site that reaches the target.
        #[arg(long)]
        site: String,
        /// Resource name; it answers as NAME.<zone>.
        #[arg(long)]
        name: String,
        /// HOST:PORT the site dials (resolved by the site's own resolver).
        #[arg(long)]
        target: String,
        /// An extra DNS name the resource answers as.
        #[arg(long)]
        alias: Option<String>,
        /// How the site checks the target: `tcp` (connect, the default) or `http:/PATH` (GET, 2xx/3xx).
        #[arg(long, default_value = "tcp")]
        health_check: String,
    },
    /// Remove a resource (and every grant on it).
    RmResource {
        /// Resource name.
        name: String,
    },
    /// Let a client reach a resource (access is deny by default).
    Grant {
        #[arg(long)]
        client: String,
        #[arg(long)]
        resource: String,
    },
    /// Take a client's access to a resource away.
    Revoke {
        #[arg(long)]
        client: String,
        #[arg(long)]
        resource: String,
    },
    /// Make the server match a config file (YAML: sites, clients, resources, grants), all or nothing.
    ///
    /// Prints the plan, then applies it in one transaction. Running it again changes nothing.
    Apply(ApplyArgs),
    /// Run the machine client: bring up the tunnel to the resources this client was granted.
    Up(UpArgs),
    /// Check the whole chain (token, server DNS, reachability, TLS pin, credentials, tunnels, resources,
    /// names) and say where it breaks and how to fix it. Exit code: 0 ok, 1 failed, 2 degraded.
    Doctor(DoctorArgs),
    /// Show the local client's tunnels (from the `up` daemon found through its state dir).
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The state dir `tunnelctl up` uses.
        #[arg(long, env = "TUNNEL_STATE_DIR", default_value = DEFAULT_CLIENT_STATE)]
        state_dir: PathBuf,
    },
}

/// Default state dir of the machine client.
pub const DEFAULT_CLIENT_STATE: &str = "/var/lib/tunnel-client";

#[derive(Debug, Args)]
pub struct UpArgs {
    /// The client's join token (prefer --token-file or TUNNEL_TOKEN: flags show in the process list).
    #[arg(long, env = "TUNNEL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the join token.
    #[arg(long, env = "TUNNEL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Where the client keeps its key, session ticket and last network map.
    #[arg(long, env = "TUNNEL_STATE_DIR", default_value = DEFAULT_CLIENT_STATE)]
    pub state_dir: PathBuf,
    /// /status, /metrics and /healthz listener.
    #[arg(long, env = "TUNNEL_METRICS_LISTEN", default_value = "127.0.0.1:9182")]
    pub metrics_listen: std::net::SocketAddr,
    /// No root: a userspace stack behind local SOCKS5 and DNS listeners instead of a TUN device.
    #[arg(long, env = "TUNNEL_USERSPACE")]
    pub userspace: bool,
    /// SOCKS5 listener (userspace mode).
    #[arg(long, env = "TUNNEL_SOCKS5", default_value = "127.0.0.1:1080")]
    pub socks5: std::net::SocketAddr,
    /// DNS listener (userspace mode).
    #[arg(long, env = "TUNNEL_DNS_LISTEN", default_value = "127.0.0.1:5353")]
    pub dns_listen: std::net::SocketAddr,
    /// WireGuard UDP port (0: any).
    #[arg(long, env = "TUNNEL_LISTEN_PORT", default_value_t = 0)]
    pub listen_port: u16,
    /// Seconds between keepalives: holds NAT mappings open and checks idle paths.
    #[arg(long, env = "TUNNEL_KEEPALIVE", default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub keepalive: u64,
    /// Send everything through the relay (no hole punching, no direct paths).
    #[arg(long, env = "TUNNEL_FORCE_RELAY")]
    pub force_relay: bool,
    /// TUN mode: how to point the system resolver at the client's DNS server.
    #[arg(long, env = "TUNNEL_DNS_MODE", value_enum, default_value_t = crate::up::resolv::DnsMode::Auto)]
    pub dns_mode: crate::up::resolv::DnsMode,
    /// TUN mode: the device name.
    #[arg(long, env = "TUNNEL_TUN_NAME", default_value = "tunnel0")]
    pub tun_name: String,
    /// Userspace mode: the TCP stack (in TUN mode the system's TCP carries the flows).
    #[command(flatten)]
    pub tcp: tunnel_node::tcp_args::TcpArgs,
    /// DNS queries forwarded upstream at once; more are dropped until one ends.
    #[arg(long, env = "TUNNEL_DNS_MAX_FORWARDS", default_value_t = crate::up::dns::DEFAULT_MAX_FORWARDS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    pub dns_max_forwards: usize,
    /// TUN mode: networks whose hosts the DNS listener answers besides this host and its containers
    /// (sources on a bridge without a physical port, such as docker0), e.g. a routed pod network.
    #[arg(long, env = "TUNNEL_DNS_ALLOW", value_delimiter = ',')]
    pub dns_allow: Vec<ipnet::IpNet>,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The config file (YAML); `-` reads standard input.
    pub file: PathBuf,
    /// Print the plan only; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also delete the sites, clients, resources and grants the file does not name.
    #[arg(long)]
    pub prune: bool,
    /// Write the join tokens of new sites and clients to DIR/site-NAME.token and
    /// DIR/client-NAME.token (mode 0600) instead of printing them.
    #[arg(long, env = "TUNNEL_TOKENS_DIR")]
    pub tokens_dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Join limits for the tokens of new sites and clients.
    #[command(flatten)]
    pub limits: Limits,
}

impl ApplyArgs {
    /// The flags as `tunnelctl apply` takes them.
    fn options(&self) -> crate::apply::Options {
        crate::apply::Options {
            file: self.file.clone(),
            dry_run: self.dry_run,
            prune: self.prune,
            tokens_dir: self.tokens_dir.clone(),
            json: self.json,
            token_ttl: self.limits.ttl,
            token_once: self.limits.once,
        }
    }
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The client's join token (prefer --token-file or TUNNEL_TOKEN: flags show in the process list).
    #[arg(long, env = "TUNNEL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the join token.
    #[arg(long, env = "TUNNEL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The state dir `tunnelctl up` uses (its key, ticket, cached map and status address).
    #[arg(long, env = "TUNNEL_STATE_DIR", default_value = DEFAULT_CLIENT_STATE)]
    pub state_dir: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for each network check.
    #[arg(long, env = "TUNNEL_DOCTOR_TIMEOUT", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub timeout: u64,
}

/// A command's verdict that is not a plain success, with the process exit code it maps to
/// (`tunnelctl doctor`: 1 failed, 2 degraded). Its report is already printed.
#[derive(Debug)]
pub struct Exit {
    pub code: i32,
    pub message: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum NodeOp {
    /// Add one; prints its join token and nothing else.
    Add {
        name: String,
        #[command(flatten)]
        limits: Limits,
    },
    /// Remove one; its live session ends at once.
    Rm { name: String },
    /// Give one a new join token; the old token and the live session stop working at once.
    Rotate {
        name: String,
        #[command(flatten)]
        limits: Limits,
    },
}

#[derive(Debug, Args)]
pub struct Limits {
    /// The token can join only within this time (e.g. 30m, 24h, 7d). Joined nodes stay joined.
    #[arg(long, value_parser = parse_ttl)]
    pub ttl: Option<Duration>,
    /// The token can be used for one join only.
    #[arg(long)]
    pub once: bool,
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = if let Ok(secs) = s.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        humantime::parse_duration(s)
            .map_err(|e| format!("'{s}' is not a duration like 30m, 24h or 7d ({e})"))?
    };
    if d < Duration::from_secs(1) {
        return Err("the TTL must be at least 1s".into());
    }
    Ok(d)
}

/// An error as one line: the context chain joined with ": ".
pub fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

/// Parses `args` and runs the command on a new runtime.
pub fn main_with<I, T>(args: I, out: &mut (dyn Write + Send)) -> Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            write!(out, "{e}")?;
            return Ok(());
        }
        Err(e) => {
            e.print()?;
            std::process::exit(2);
        }
    };
    // `up` is a daemon and logs what it does; the other commands print their result and log only
    // warnings.
    let level = if matches!(cli.cmd, Cmd::Up(_)) { "info" } else { "warn" };
    tunnel_node::process::init_logs_at(cli.log_format, level);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(cli, out))
}

/// Parses `args` (without the program name) and runs the command in the current runtime.
pub async fn run_args(args: &[&str], out: &mut (dyn Write + Send)) -> Result<()> {
    let cli = Cli::try_parse_from(std::iter::once("tunnelctl").chain(args.iter().copied()))
        .map_err(|e| anyhow!("{}", e.to_string().lines().next().unwrap_or("invalid arguments")))?;
    run(cli, out).await
}

fn kind_of(is_site: bool) -> i32 {
    if is_site {
        pb::NodeKind::Site as i32
    } else {
        pb::NodeKind::Client as i32
    }
}

/// Runs a parsed command.
pub async fn run(cli: Cli, out: &mut (dyn Write + Send)) -> Result<()> {
    match cli.cmd {
        Cmd::Up(a) => return up(a, out).await,
        Cmd::Status { json, state_dir } => return status(&state_dir, json, out).await,
        Cmd::Doctor(a) => return doctor(a, out).await,
        _ => {}
    }
    let token = admin::resolve_token(cli.admin_token.as_deref(), cli.admin_token_file.as_deref())?;
    let mut c = admin::connect(&token).await?;
    match cli.cmd {
        Cmd::Site { op } => node_op(&mut c, true, op, out).await,
        Cmd::Client { op } => node_op(&mut c, false, op, out).await,
        Cmd::Sites(l) => {
            let r =
                c.list_nodes(pb::ListNodesRequest { kind: kind_of(true) }).await.map_err(admin::status)?;
            admin::print_nodes(out, &r.into_inner().nodes, l.json)
        }
        Cmd::Clients(l) => {
            let r =
                c.list_nodes(pb::ListNodesRequest { kind: kind_of(false) }).await.map_err(admin::status)?;
            admin::print_nodes(out, &r.into_inner().nodes, l.json)
        }
        Cmd::Resources(l) => {
            let r = c.list_resources(pb::ListResourcesRequest {}).await.map_err(admin::status)?;
            admin::print_resources(out, &r.into_inner().resources, l.json)
        }
        Cmd::Grants(l) => {
            let r = c.list_grants(pb::ListGrantsRequest {}).await.map_err(admin::status)?;
            admin::print_grants(out, &r.into_inner().grants, l.json)
        }
        Cmd::Audit { list, limit, before } => {
            // Pages of at most 500: no call makes the server read or send the whole log.
            let mut events = Vec::new();
            let mut cursor = before;
            while (events.len() as u32) < limit {
                let page = (limit - events.len() as u32).min(500);
                let r = c
                    .list_audit(pb::ListAuditRequest { limit: page, before_id: cursor })
                    .await
                    .map_err(admin::status)?
                    .into_inner();
                events.extend(r.events);
                if r.next_before_id == 0 {
                    break;
                }
                cursor = r.next_before_id;
            }
            admin::print_audit(out, &events, list.json)
        }
        Cmd::Info(l) => {
            let r = c.server_info(pb::ServerInfoRequest {}).await.map_err(admin::status)?;
            admin::print_info(out, &r.into_inner(), l.json)
        }
        Cmd::AddResource { site, name, target, alias, health_check } => {
            let r = c
                .add_resource(pb::AddResourceRequest {
                    site,
                    name,
                    target,
                    alias: alias.unwrap_or_default(),
                    health_check,
                })
                .await
                .map_err(admin::status)?
                .into_inner();
            writeln!(
                out,
                "added resource {} on site {}: {} -> {} ({})",
                r.name,
                r.site,
                r.dns_names.join(", "),
                r.target,
                r.overlay_addr
            )?;
            Ok(())
        }
        Cmd::RmResource { name } => {
            let r = c
                .remove_resource(pb::ResourceRef { name: name.clone() })
                .await
                .map_err(admin::status)?
                .into_inner();
            writeln!(out, "removed resource {name} ({} grants removed)", r.removed_grants)?;
            Ok(())
        }
        Cmd::Grant { client, resource } => {
            let r = c
                .grant(pb::GrantRequest { client: client.clone(), resource: resource.clone() })
                .await
                .map_err(admin::status)?
                .into_inner();
            if r.changed {
                writeln!(out, "granted {client} access to {resource}")?;
            } else {
                writeln!(out, "{client} already had access to {resource}")?;
            }
            Ok(())
        }
        Cmd::Revoke { client, resource } => {
            let r = c
                .revoke(pb::GrantRequest { client: client.clone(), resource: resource.clone() })
                .await
                .map_err(admin::status)?
                .into_inner();
            if r.changed {
                writeln!(out, "revoked {client}'s access to {resource}")?;
            } else {
                writeln!(out, "{client} had no access to {resource}")?;
            }
            Ok(())
        }
        Cmd::Apply(a) => crate::apply::run(&mut c, &a.options(), out).await,
        Cmd::Up(_) | Cmd::Status { .. } | Cmd::Doctor(_) => Ok(()),
    }
}

/// Reads a join token from the flag or the file.
pub fn join_token(token: Option<&str>, file: Option<&std::path::Path>) -> Result<tunnel_core::JoinToken> {
    let text = match (token, file) {
        (Some(t), _) => t.to_owned(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("cannot read token file {}", f.display()))?
        }
        (None, None) => anyhow::bail!("no token: pass --token-file FILE (or --token, or set TUNNEL_TOKEN)"),
    };
    tunnel_core::JoinToken::parse(&text).map_err(|e| anyhow!("invalid join token: {e}"))
}

async fn up(a: UpArgs, out: &mut (dyn Write + Send)) -> Result<()> {
    let token = join_token(a.token.as_deref(), a.token_file.as_deref())?;
    let client = crate::up::start(crate::up::UpConfig {
        token,
        state_dir: a.state_dir,
        metrics_listen: a.metrics_listen,
        userspace: a.userspace,
        socks5: a.socks5,
        dns_listen: a.dns_listen,
        listen_port: a.listen_port,
        keepalive: std::time::Duration::from_secs(a.keepalive),
        force_relay: a.force_relay,
        dns_mode: a.dns_mode,
        tun_name: a.tun_name.clone(),
        resolv_conf: PathBuf::from("/etc/resolv.conf"),
        tcp: a.tcp.options(),
        dns: crate::up::dns::DnsOptions {
            max_forwards: a.dns_max_forwards,
            local_only: false,
            allow: a.dns_allow.clone(),
        },
    })
    .await?;
    let status = client.node.status_addr.map(|a| a.to_string()).unwrap_or_default();
    if a.userspace {
        writeln!(
            out,
            "tunnel up (userspace): SOCKS5 on {}, DNS on {}, status on http://{status}/status",
            client.socks5, client.dns
        )?;
    } else {
        writeln!(
            out,
            "tunnel up on {}: DNS on {}, status on http://{status}/status",
            a.tun_name, client.dns
        )?;
    }
    out.flush()?;
    tunnel_node::process::shutdown_signal().await;
    drop(client);
    Ok(())
}

async fn doctor(a: DoctorArgs, out: &mut (dyn Write + Send)) -> Result<()> {
    let cfg = crate::doctor::DoctorConfig {
        token: a.token,
        token_file: a.token_file,
        state_dir: a.state_dir,
        timeout: Duration::from_secs(a.timeout),
    };
    let r = crate::doctor::report(&cfg, a.json, out).await?;
    match r.status.exit_code() {
        0 => Ok(()),
        code => Err(Exit { code, message: format!("{}: {}", r.status.as_str(), r.summary) }.into()),
    }
}

async fn status(state_dir: &std::path::Path, json_out: bool, out: &mut (dyn Write + Send)) -> Result<()> {
    let v = crate::up::status(state_dir).await?;
    if json_out {
        writeln!(out, "{}", serde_json::to_string_pretty(&v.to_json())?)?;
        return Ok(());
    }
    let mut control = v.control.as_ref().map_or("?", LinkState::state).to_owned();
    if let Some(reason) = v.control.as_ref().map(LinkState::reason).filter(|r| !r.is_empty()) {
        control.push_str(&format!(" ({reason})"));
    }
    writeln!(
        out,
        "node {} ({}) {}  control: {control}  map version {}",
        v.node.as_deref().unwrap_or("?"),
        v.kind.as_str(),
        v.overlay_addr.as_deref().unwrap_or("-"),
        v.map_version.map_or("null".to_owned(), |m| m.to_string())
    )?;
    writeln!(out, "{}", underlay_line(&v))?;
    let mut t = crate::table::Table::new(&["PEER", "PATH", "ENDPOINT", "HANDSHAKE", "RTT", "TX", "RX"]);
    for p in &v.peers {
        t.row(vec![
            p.name.clone(),
            p.path.to_string(),
            p.endpoint.clone().unwrap_or_default(),
            p.last_handshake_secs_ago.map(|s| format!("{s}s ago")).unwrap_or_default(),
            p.rtt_ms.map(|s| format!("{s}ms")).unwrap_or_default(),
            p.tx_bytes.to_string(),
            p.rx_bytes.to_string(),
        ]);
    }
    t.write(out)
}

/// The second line of `tunnelctl status`: the node's public address as the server's STUN responder
/// sees it, and the relay link (what an operator checks when hole punching fails or a relay is down).
fn underlay_line(v: &NodeStatus) -> String {
    let public = match &v.reflexive_addr {
        Some(a) => format!("public address {a} (STUN)"),
        None => "public address unknown (no STUN answer yet)".to_owned(),
    };
    let r = &v.relay;
    let relay = match (r.up, &r.relay, &r.last_error) {
        (true, Some(addr), _) => format!("relay {addr} over {}: up", r.transport.as_deref().unwrap_or("?")),
        (_, _, Some(err)) => format!("relay: down ({err})"),
        (false, _, None) => "relay: none (not connected yet, or the map names no relay)".to_owned(),
        (true, None, None) => "relay: ?".to_owned(),
    };
    format!("{public}  {relay}")
}

async fn node_op<S>(
    c: &mut tunnel_proto::v1::admin_client::AdminClient<S>,
    is_site: bool,
    op: NodeOp,
    out: &mut (dyn Write + Send),
) -> Result<()>
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::Error: Into<tonic::codegen::StdError>,
    S::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <S::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let kind = kind_of(is_site);
    let what = if is_site { "site" } else { "client" };
    match op {
        NodeOp::Add { name, limits } => {
            let r = c
                .add_node(pb::AddNodeRequest {
                    kind,
                    name,
                    ttl_seconds: limits.ttl.map(|d| d.as_secs()).unwrap_or(0),
                    once: limits.once,
                })
                .await
                .map_err(admin::status)?;
            admin::print_token(out, r.into_inner())
        }
        NodeOp::Rm { name } => {
            let r = c
                .remove_node(pb::NodeRef { kind, name: name.clone() })
                .await
                .map_err(admin::status)?
                .into_inner();
            if r.removed_resources.is_empty() {
                writeln!(out, "removed {what} {name}")?;
            } else {
                writeln!(out, "removed {what} {name} and its resources: {}", r.removed_resources.join(", "))?;
            }
            Ok(())
        }
        NodeOp::Rotate { name, limits } => {
            let r = c
                .rotate_node(pb::RotateNodeRequest {
                    kind,
                    name,
                    ttl_seconds: limits.ttl.map(|d| d.as_secs()).unwrap_or(0),
                    once: limits.once,
                })
                .await
                .map_err(admin::status)?;
            admin::print_token(out, r.into_inner())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn help_never_shows_a_secret_from_the_environment() {
        std::env::set_var("TUNNEL_ADMIN_TOKEN", "tadm1.c2VjcmV0.very-secret-value.pin");
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("--admin-token"));
        assert!(!help.contains("very-secret-value"), "{help}");
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("24h").unwrap(), Duration::from_secs(86400));
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("soon").unwrap_err().contains("not a duration"));
    }
}
