//! `tunnel-server`: the control server binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, ValueEnum};
use ipnet::Ipv4Net;

/// The tunnel control server: peer discovery and credential checks over gRPC.
#[derive(Debug, Parser)]
#[command(name = "tunnel-server", version, about)]
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

#[tokio::main]
async fn main() {
    let args = Args::parse();
    init_logs(args.log_format);
    if let Err(e) = run(args).await {
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
