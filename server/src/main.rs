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
}

impl LimitArgs {
    fn limits(&self) -> tunnel_server::relay::Limits {
        tunnel_server::relay::Limits {
            bytes_per_sec: self.relay_node_rate_mbit.max(1) * 1_000_000 / 8,
            max_flows: self.relay_max_flows.max(1),
        }
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
    #[arg(long, env = "TUNNEL_DATA_DIR", default_value = "/var/lib/tunnel-server")]
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
    /// The embedded relay over TLS, for networks that block UDP (TCP), or `off`. If the default port
    /// cannot be bound (not root), the server starts without it and says so.
    #[arg(long, env = "TUNNEL_RELAY_TCP_LISTEN", default_value = DEFAULT_RELAY_TCP)]
    relay_tcp_listen: Listen,
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
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

const DEFAULT_RELAY_TCP: &str = "0.0.0.0:443";

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Some(Cmd::Relay(r)) => {
            init_logs(r.log_format);
            run_relay(r).await
        }
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
    cfg.relay_tcp_listen = args.relay_tcp_listen.0;
    if let Some(a) = cfg.relay_tcp_listen {
        // Port 443 needs privileges a test or a home install may not have: without an explicit choice,
        // start without the TCP relay rather than not at all.
        if Some(a) == DEFAULT_RELAY_TCP.parse().ok() {
            if let Err(e) = std::net::TcpListener::bind(a) {
                tracing::warn!(addr = %a, error = %e, "relay over TCP not started (set --relay-tcp-listen to a free port, or off)");
                cfg.relay_tcp_listen = None;
            }
        }
    }
    cfg.external_relays = args.external_relay;
    cfg.capability_ttl = args.capability_ttl;
    cfg.relay_limits = args.limits.limits();
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
    drop(relay);
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
