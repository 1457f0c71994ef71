//! `/metrics` (Prometheus text) and `/healthz` on `--metrics-listen`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use tokio::task::JoinHandle;
use tunnel_core::map::NodeKind;

use crate::state::Shared;

/// Counters kept outside the model: the STUN responder's and the embedded relay's.
#[derive(Debug, Clone)]
pub struct Extra {
    pub stun: Arc<crate::stun::StunStats>,
    pub relay: Arc<crate::relay::RelayStats>,
}

/// Binds `addr` and serves the metrics routes.
pub async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    extra: Extra,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state((shared, extra));
    listen(addr, app).await
}

/// Serves `app` on `addr`; returns the bound address.
async fn listen(addr: SocketAddr, app: Router) -> Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (metrics)"))?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics listener failed");
        }
    });
    Ok((bound, task))
}

async fn metrics(State((shared, extra)): State<(Arc<Shared>, Extra)>) -> String {
    let mut out = String::new();
    extra.stun.render(&mut out);
    extra.relay.render(&mut out);
    let m = shared.model();
    let count = |k| m.reg.nodes.values().filter(|n| n.kind == k).count();
    let gauges = [
        ("tunnel_server_sites", "Sites known to the server.", count(NodeKind::Site) as u64),
        ("tunnel_server_clients", "Clients known to the server.", count(NodeKind::Client) as u64),
        ("tunnel_server_resources", "Resources known to the server.", m.reg.resources.len() as u64),
        ("tunnel_server_grants", "Grants known to the server.", m.reg.grant_count() as u64),
        ("tunnel_server_sessions", "Open control sessions.", m.hub.connected() as u64),
    ];
    for (name, help, v) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    let counters = [
        ("tunnel_server_map_deltas_total", "Map deltas sent to nodes.", m.hub.stats.deltas_sent),
        ("tunnel_server_full_maps_total", "Full maps sent to nodes.", m.hub.stats.full_maps_sent),
        (
            "tunnel_server_deltas_dropped_total",
            "Deltas dropped on a full session queue (a full map follows).",
            m.hub.stats.deltas_dropped,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    }
    drop(m);
    shared.gate.stats.render(&mut out, shared.gate.inflight.total());
    out
}

/// `/metrics` and `/healthz` for a relay running alone (`tunnel-server relay`).
pub async fn serve_relay(
    addr: SocketAddr,
    stats: Arc<crate::relay::RelayStats>,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(stats): State<Arc<crate::relay::RelayStats>>| async move {
                let mut out = String::new();
                stats.render(&mut out);
                out
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(stats);
    listen(addr, app).await
}
