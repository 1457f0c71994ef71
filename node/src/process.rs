//! Process plumbing shared by `tunnel-agent` and `tunnelctl up`: logs and the signals that stop them.

/// Log format of a node's process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logs to stderr, filtered by `TUNNEL_LOG` (default `info`).
pub fn init_logs(format: LogFormat) {
    init_logs_at(format, "info");
}

/// Logs to stderr, filtered by `TUNNEL_LOG` (default `default`).
pub fn init_logs_at(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TUNNEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: journald and log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
}

/// Resolves when the process is asked to stop (SIGINT or SIGTERM), so state can be put back first.
pub async fn shutdown_signal() {
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
