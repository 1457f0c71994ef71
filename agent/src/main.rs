//! `tunnel-agent`: the site agent. One per site, no root, no NET_ADMIN, no TUN: it holds one UDP socket
//! for WireGuard, terminates clients' flows in a userspace TCP/IP stack, and re-dials each resource's
//! target on the site's own network.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use tunnel_core::map::NodeKind;
use tunnel_node::process::LogFormat;

/// The tunnel site agent.
#[derive(Debug, Parser)]
#[command(name = "tunnel-agent", version, about)]
struct Args {
    /// The site's join token (prefer --token-file or TUNNEL_TOKEN: flags show in the process list).
    #[arg(long, env = "TUNNEL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the join token.
    #[arg(long, env = "TUNNEL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Where the agent keeps its key, session ticket and last network map.
    #[arg(long, env = "TUNNEL_STATE_DIR", default_value = "/var/lib/tunnel-agent")]
    state_dir: PathBuf,
    /// /status, /metrics and /healthz listener.
    #[arg(long, env = "TUNNEL_METRICS_LISTEN", default_value = "127.0.0.1:9181")]
    metrics_listen: SocketAddr,
    /// UDP port for WireGuard (0: any free port). Fix it when a router forwards a port to the agent.
    #[arg(long, env = "TUNNEL_LISTEN_PORT", default_value_t = 0)]
    listen_port: u16,
    /// An IP:PORT where peers can reach this agent (a forwarded port, a Kubernetes hostPort).
    #[arg(long, env = "TUNNEL_ADVERTISE_ENDPOINT", value_delimiter = ',')]
    advertise_endpoint: Vec<SocketAddr>,
    /// Seconds between keepalives: holds NAT mappings open and checks idle paths.
    #[arg(long, env = "TUNNEL_KEEPALIVE", default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=600))]
    keepalive: u64,
    /// Send everything through the relay (no hole punching, no direct paths).
    #[arg(long, env = "TUNNEL_FORCE_RELAY")]
    force_relay: bool,
    /// Log format.
    #[arg(long, env = "TUNNEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    tcp: tunnel_node::tcp_args::TcpArgs,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    tunnel_node::process::init_logs(args.log_format);
    if let Err(e) = run(args).await {
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    let text = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?
        }
        (None, None) => {
            return Err(anyhow!("no token: pass --token-file FILE (or --token, or set TUNNEL_TOKEN)"))
        }
    };
    let token = tunnel_core::JoinToken::parse(&text).map_err(|e| anyhow!("invalid join token: {e}"))?;
    let node = tunnel_node::node::start(tunnel_node::node::NodeConfig {
        kind: NodeKind::Site,
        token,
        state_dir: args.state_dir,
        listen_port: args.listen_port,
        advertise: args.advertise_endpoint,
        metrics_listen: Some(args.metrics_listen),
        version: env!("CARGO_PKG_VERSION").into(),
        keepalive: std::time::Duration::from_secs(args.keepalive),
        force_relay: args.force_relay,
        tcp: args.tcp.options(),
    })
    .await?;
    eprintln!(
        "tunnel-agent running: WireGuard on udp {}, status on http://{}/status",
        node.dataplane.local_addr,
        node.status_addr.map(|a| a.to_string()).unwrap_or_default()
    );
    tunnel_node::process::shutdown_signal().await;
    tracing::info!("shutting down");
    drop(node);
    Ok(())
}
