//! `tunnel-server`: the control server binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, ValueEnum};
use ipnet::Ipv4Net;

/// The tunnel control server: peer discovery and credential checks over gRPC, STUN, and a relay.
#[derive(Debug, Parser)]
#[command(name = "tunnel-server", version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    server: Args,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Run a relay alone (no control plane, no database): it trusts capabilities signed by the server
    /// whose relay bundle it is given, so restarting the server does not cut relayed tunnels.
    Relay(RelayArgs),
    /// Back up the data dir while the server runs: its keys and a consistent snapshot of its SQLite
    /// database, in one file (gzip-compressed tar, mode 0600). With PostgreSQL: the keys only.
    Backup(BackupArgs),
    /// Restore a backup into an empty data dir (or, with --force, over the files of a stopped server);
    /// a server started on it keeps every token valid.
    Restore(RestoreArgs),
}

#[derive(Debug, clap::Args)]
struct BackupArgs {
    /// The server's data dir.
    #[arg(long, env = "TUNNEL_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// The backup file to write; replaced atomically if it exists.
    #[arg(long, env = "TUNNEL_BACKUP_TO")]
    to: PathBuf,
    /// The server's database URL, if it was started with one. A PostgreSQL database is not backed up:
    /// use pg_dump for it.
    #[arg(long, env = "TUNNEL_DATABASE", hide_env_values = true)]
    database: Option<String>,
}

#[derive(Debug, clap::Args)]
struct RestoreArgs {
    /// The backup file.
    #[arg(long, env = "TUNNEL_RESTORE_FROM")]
    from: PathBuf,
    /// The data dir to restore into: empty or missing, unless --force.
    #[arg(long, env = "TUNNEL_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Restore into a data dir that has files (those the backup holds are replaced). The server on it
    /// must be stopped.
    #[arg(long, env = "TUNNEL_RESTORE_FORCE")]
    force: bool,
}

#[derive(Debug, clap::Args)]
struct RelayArgs {
    /// The server's DATA_DIR/relay.bundle (the relay TLS key and the server's capability key).
    #[arg(long, env = "TUNNEL_RELAY_BUNDLE_FILE")]
    bundle_file: PathBuf,
    /// QUIC relay listener (UDP), or `off`.
    #[arg(long, env = "TUNNEL_RELAY_LISTEN", default_value = "0.0.0.0:21820")]
    relay_listen: Listen,
    /// Relay over TLS for networks that block UDP (TCP), or `off`.
    #[arg(long, env = "TUNNEL_RELAY_TCP_LISTEN", default_value = "0.0.0.0:443")]
    relay_tcp_listen: Listen,
    /// /metrics and /healthz listener.
    #[arg(long, env = "TUNNEL_METRICS_LISTEN", default_value = "127.0.0.1:9183")]
    metrics_listen: SocketAddr,
    #[command(flatten)]
    limits: LimitArgs,
    /// Log format.
    #[arg(long, env = "TUNNEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, clap::Args)]
struct LimitArgs {
    /// Relay: bytes per second one node may send, in Mbit/s.
    #[arg(long, env = "TUNNEL_RELAY_NODE_RATE_MBIT", default_value_t = 2000)]
    relay_node_rate_mbit: u64,
    /// Relay: peers one node may relay to at once.
    #[arg(long, env = "TUNNEL_RELAY_MAX_FLOWS", default_value_t = 256)]
    relay_max_flows: usize,
    /// Relay: connections (QUIC and TCP) from one source address (IPv6: one /64) at once.
    #[arg(long, env = "TUNNEL_RELAY_MAX_CONNS_PER_SOURCE", default_value_t = 64)]
    relay_max_conns_per_source: usize,
    /// Relay: connections at once in all. Each costs about 25 KB while open (bench/load.sh), and
    /// glibc keeps the peak after a burst: 10,000 is about 250 MB at most.
    #[arg(long, env = "TUNNEL_RELAY_MAX_CONNS", default_value_t = 10_000)]
    relay_max_conns: usize,
}

impl LimitArgs {
    fn limits(&self) -> tunnel_server::relay::Limits {
        tunnel_server::relay::Limits {
            bytes_per_sec: self.relay_node_rate_mbit.max(1) * 1_000_000 / 8,
            max_flows: self.relay_max_flows.max(1),
            conns_per_source: self.relay_max_conns_per_source.max(1),
            conns_total: self.relay_max_conns.max(1),
        }
    }
}

/// Limits on logins (SECURITY.md says what each defends).
#[derive(Debug, Clone, clap::Args)]
struct LoginArgs {
    /// Failed join-secret logins one source (an IPv4 address, an IPv6 /64) may make at once; then
    /// --login-failures-per-minute.
    #[arg(long, env = "TUNNEL_LOGIN_FAILURE_BURST", default_value_t = 10)]
    login_failure_burst: u32,
    /// Failed join-secret logins one source may make per minute after its burst.
    #[arg(long, env = "TUNNEL_LOGIN_FAILURES_PER_MINUTE", default_value_t = 10)]
    login_failures_per_minute: u32,
    /// Join-secret logins (argon2 runs) in progress from one source at once.
    #[arg(long, env = "TUNNEL_LOGINS_IN_FLIGHT_PER_SOURCE", default_value_t = 4)]
    logins_in_flight_per_source: usize,
    /// Join-secret logins in progress at once in all.
    #[arg(long, env = "TUNNEL_LOGINS_IN_FLIGHT", default_value_t = 64)]
    logins_in_flight: usize,
    /// Logins (ticket reconnects included) one node may make at once; then --node-logins-per-minute.
    #[arg(long, env = "TUNNEL_NODE_LOGIN_BURST", default_value_t = 6)]
    node_login_burst: u32,
    /// Logins one node may make per minute after its burst.
    #[arg(long, env = "TUNNEL_NODE_LOGINS_PER_MINUTE", default_value_t = 12)]
    node_logins_per_minute: u32,
    /// Wrong admin tokens one source may present at once; then --admin-failures-per-minute. Kept apart
    /// from node logins, so a misconfigured script does not lock out the nodes behind the same address.
    #[arg(long, env = "TUNNEL_ADMIN_FAILURE_BURST", default_value_t = 10)]
    admin_failure_burst: u32,
    /// Wrong admin tokens one source may present per minute after its burst.
    #[arg(long, env = "TUNNEL_ADMIN_FAILURES_PER_MINUTE", default_value_t = 10)]
    admin_failures_per_minute: u32,
    /// Refuse nodes that do not prove they hold the private key of the public key they log in with
    /// (nodes before key-proof-v1). Without it they are accepted and counted in /metrics.
    #[arg(long, env = "TUNNEL_REQUIRE_KEY_PROOF")]
    require_key_proof: bool,
    /// gRPC connections (TLS handshakes included) one source may hold at once.
    #[arg(long, env = "TUNNEL_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 1024)]
    max_connections_per_source: usize,
    /// gRPC connections at once in all.
    #[arg(long, env = "TUNNEL_MAX_CONNECTIONS", default_value_t = 50_000)]
    max_connections: usize,
}

impl LoginArgs {
    fn limits(&self) -> tunnel_server::limits::LoginLimits {
        tunnel_server::limits::LoginLimits {
            failed_burst: self.login_failure_burst,
            failed_per_minute: self.login_failures_per_minute,
            inflight_per_source: self.logins_in_flight_per_source,
            inflight_total: self.logins_in_flight,
            node_burst: self.node_login_burst,
            node_per_minute: self.node_logins_per_minute,
            admin_failed_burst: self.admin_failure_burst,
            admin_failed_per_minute: self.admin_failures_per_minute,
            require_key_proof: self.require_key_proof,
        }
    }
}

/// A retention period, or `off`.
#[derive(Debug, Clone, Copy)]
struct Retention(Option<std::time::Duration>);

fn parse_retention(s: &str) -> Result<Retention, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(Retention(None));
    }
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(Retention(Some(d))),
        Ok(_) => Err("a retention of 0 would delete every entry; use off to keep them for ever".into()),
        Err(e) => Err(format!("'{s}' is not a duration (90d, 12h) or off: {e}")),
    }
}

/// `ADDR:PORT` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Listen(Option<SocketAddr>);

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Listen(None));
        }
        s.parse().map(|a| Listen(Some(a))).map_err(|_| format!("'{s}' is not ADDR:PORT or off"))
    }
}

#[derive(Debug, clap::Args)]
struct Args {
    /// Where the server keeps its key, admin token and (by default) its SQLite database.
    #[arg(long, env = "TUNNEL_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// gRPC listener (TLS).
    #[arg(long, env = "TUNNEL_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// HOST or HOST:PORT that join tokens carry; defaults to this machine's host name and the listen port.
    #[arg(long, env = "TUNNEL_PUBLIC_ADDR")]
    public_addr: Option<String>,
    /// Database URL: sqlite://PATH or postgres://USER:PASS@HOST/DB. Default: DATA_DIR/tunnel.db.
    #[arg(long, env = "TUNNEL_DATABASE", hide_env_values = true)]
    database: Option<String>,
    /// The private DNS zone resources answer in.
    #[arg(long, env = "TUNNEL_DNS_ZONE", default_value = tunnel_core::DEFAULT_DNS_ZONE)]
    dns_zone: String,
    /// The overlay network every node and resource gets an address from.
    #[arg(long, env = "TUNNEL_OVERLAY_CIDR", default_value = tunnel_server::DEFAULT_OVERLAY)]
    overlay_cidr: Ipv4Net,
    /// /metrics and /healthz listener (plain HTTP; keep it on loopback or a private network).
    #[arg(long, env = "TUNNEL_METRICS_LISTEN", default_value = "127.0.0.1:9180")]
    metrics_listen: SocketAddr,
    /// STUN responder (UDP), or `off`.
    #[arg(long, env = "TUNNEL_STUN_LISTEN", default_value = "0.0.0.0:3478")]
    stun_listen: Listen,
    /// The embedded relay's QUIC listener (UDP), or `off`.
    #[arg(long, env = "TUNNEL_RELAY_LISTEN", default_value = "0.0.0.0:21820")]
    relay_listen: Listen,
    /// The embedded relay over TLS, for networks that block UDP (TCP), or `off` [default:
    /// 0.0.0.0:443]. If the default cannot be bound (not root), the server starts without it and says
    /// so; an address given explicitly must be bound.
    #[arg(long, env = "TUNNEL_RELAY_TCP_LISTEN")]
    relay_tcp_listen: Option<Listen>,
    /// A relay running elsewhere (`tunnel-server relay`): HOST:UDPPORT[,HOST:TCPPORT]. Repeat for several;
    /// nodes prefer them in order, after the embedded relay.
    #[arg(long, env = "TUNNEL_EXTERNAL_RELAYS", value_delimiter = ';')]
    external_relay: Vec<tunnel_server::ExternalRelay>,
    /// How long relay capabilities stay valid; the server renews them at half their life. A relayed
    /// tunnel that is up keeps working past it while the server is down.
    #[arg(long, env = "TUNNEL_CAPABILITY_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    capability_ttl: std::time::Duration,
    #[command(flatten)]
    limits: LimitArgs,
    /// How long audit entries are kept: a duration (90d, 12h) or `off` to keep them for ever. Older
    /// entries are deleted at start and every hour.
    #[arg(long, env = "TUNNEL_AUDIT_RETENTION", default_value = "90d", value_parser = parse_retention)]
    audit_retention: Retention,
    #[command(flatten)]
    logins: LoginArgs,
    /// argon2id memory cost (KiB) for new join secrets. Lower it only for benchmarks and tests.
    #[arg(long, env = "TUNNEL_ARGON2_MEMORY_KIB", default_value_t = 19 * 1024, hide = true)]
    argon2_memory_kib: u32,
    /// Log format.
    #[arg(long, env = "TUNNEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TUNNEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: journald and log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

const DEFAULT_RELAY_TCP: &str = "0.0.0.0:443";
const DEFAULT_DATA_DIR: &str = "/var/lib/tunnel-server";

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Some(Cmd::Relay(r)) => {
            init_logs(r.log_format);
            run_relay(r).await
        }
        Some(Cmd::Backup(b)) => run_backup(b).await,
        Some(Cmd::Restore(r)) => run_restore(r).await,
        None => {
            init_logs(cli.server.log_format);
            run(cli.server).await
        }
    };
    if let Err(e) = result {
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    let mut cfg = tunnel_server::ServerConfig::new(args.data_dir);
    cfg.listen = args.listen;
    cfg.public_addr = args.public_addr;
    cfg.database = args.database;
    cfg.dns_zone = args.dns_zone;
    cfg.overlay_cidr = args.overlay_cidr.trunc();
    cfg.metrics_listen = Some(args.metrics_listen);
    cfg.kdf.m_cost = args.argon2_memory_kib.max(8);
    cfg.stun_listen = args.stun_listen.0;
    cfg.relay_listen = args.relay_listen.0;
    cfg.relay_tcp_listen = match args.relay_tcp_listen {
        Some(explicit) => explicit.0,
        None => {
            // Port 443 needs privileges a test or a home install may not have: without an explicit
            // choice, start without the TCP relay rather than not at all.
            let a: std::net::SocketAddr = DEFAULT_RELAY_TCP.parse()?;
            match std::net::TcpListener::bind(a) {
                Ok(_) => Some(a),
                Err(e) => {
                    tracing::warn!(addr = %a, error = %e, "relay over TCP not started (set --relay-tcp-listen to a free port, or off)");
                    None
                }
            }
        }
    };
    cfg.external_relays = args.external_relay;
    cfg.capability_ttl = args.capability_ttl;
    cfg.relay_limits = args.limits.limits();
    cfg.login_limits = args.logins.limits();
    cfg.conn_limits = tunnel_server::tls::ConnLimits {
        per_source: args.logins.max_connections_per_source.max(1),
        total: args.logins.max_connections.max(1),
    };
    cfg.audit_retention = args.audit_retention.0;
    if args.argon2_memory_kib < 19 * 1024 {
        tracing::warn!(
            kib = args.argon2_memory_kib,
            "argon2 memory cost below the default: for benchmarks and tests only"
        );
    }
    let server = tunnel_server::start(cfg.clone()).await?;
    eprintln!(
        "tunnel-server listening on {} (tokens name {}); admin token in {}",
        server.addr,
        server.admin_token.server,
        tunnel_server::identity::admin_token_path(&cfg.data_dir).display()
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

async fn run_relay(args: RelayArgs) -> Result<()> {
    let bundle = tunnel_server::relay::RelayBundle::load(&args.bundle_file)?;
    if args.relay_listen.0.is_none() && args.relay_tcp_listen.0.is_none() {
        anyhow::bail!("both --relay-listen and --relay-tcp-listen are off: nothing to serve");
    }
    let stats = std::sync::Arc::new(tunnel_server::relay::RelayStats::default());
    let cfg = tunnel_server::relay::RelayConfig {
        udp: args.relay_listen.0,
        tcp: args.relay_tcp_listen.0,
        bundle,
        limits: args.limits.limits(),
    };
    let relay = tunnel_server::relay::start(cfg, stats.clone()).await?;
    let (metrics, _task) = tunnel_server::metrics::serve_relay(args.metrics_listen, stats).await?;
    eprintln!(
        "tunnel-server relay: QUIC on {}, TLS on {}, metrics on {metrics}",
        relay.udp_addr.map_or("off".into(), |a| a.to_string()),
        relay.tcp_addr.map_or("off".into(), |a| a.to_string()),
    );
    shutdown_signal().await;
    tracing::info!("relay shutting down");
    relay.shutdown().await;
    Ok(())
}

async fn run_backup(args: BackupArgs) -> Result<()> {
    use tunnel_server::backup;
    let opts = backup::BackupOptions { data_dir: args.data_dir, database: args.database, to: args.to };
    let report = backup::backup(&opts).await?;
    let m = &report.manifest;
    println!("backup written to {} ({} bytes)", report.path.display(), report.bytes);
    println!("pin: {}", m.pin);
    let keys: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).filter(|n| *n != backup::DB_FILE).collect();
    println!("keys: {}", keys.join(", "));
    match report.counts {
        Some(c) => println!("database: SQLite snapshot ({c})"),
        None => {
            println!("database: not included (PostgreSQL)");
            eprintln!(
                "note: the PostgreSQL database is not in this backup: back it up with pg_dump and keep it with this file"
            );
        }
    }
    Ok(())
}

async fn run_restore(args: RestoreArgs) -> Result<()> {
    use tunnel_server::backup;
    let opts = backup::RestoreOptions { from: args.from, data_dir: args.data_dir, force: args.force };
    let report = backup::restore(&opts).await?;
    let m = &report.manifest;
    let dir = report.data_dir.display();
    println!("restored a backup made {} by tunnel-server {} into {dir}", m.created, m.server_version);
    println!("pin: {} (the same as before: tokens issued by the old server stay valid)", m.pin);
    println!("files: {}", report.files.join(", "));
    match report.counts {
        Some(c) => {
            println!("database: {dir}/{} ({c})", backup::DB_FILE);
            println!("next: tunnel-server --data-dir {dir}, reachable at the address the tokens name");
        }
        None => {
            println!("database: not in the backup (PostgreSQL)");
            eprintln!(
                "note: restore the PostgreSQL database with pg_restore, then start tunnel-server --data-dir {dir} \
                 --database postgres://..."
            );
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
