//! `tunnel-agent`: the site agent. The data plane (WireGuard, forwarding to targets) is the next piece
//! of work; this build checks its token and says plainly that it cannot forward yet.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::Parser;

/// The tunnel site agent: one per site, no root, no NET_ADMIN.
#[derive(Debug, Parser)]
#[command(name = "tunnel-agent", version, about)]
struct Args {
    /// The site's join token (prefer --token-file or TUNNEL_TOKEN: flags show in the process list).
    #[arg(long, env = "TUNNEL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the join token.
    #[arg(long, env = "TUNNEL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Where the agent keeps its key and its last network map.
    #[arg(long, env = "TUNNEL_STATE_DIR", default_value = "/var/lib/tunnel-agent")]
    state_dir: PathBuf,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
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
    Err(anyhow!(
        "token for node {} at {} is valid, but this build of tunnel-agent has no data plane yet (state dir {})",
        token.node_id,
        token.server,
        args.state_dir.display()
    ))
}
