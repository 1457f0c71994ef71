//! `/status` (JSON), `/metrics` (Prometheus text) and `/healthz` for agents and clients.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;

use crate::control::LinkState;
use crate::dataplane::Dataplane;

/// A status field computed when the document is made (counters kept outside the data plane).
type LiveField = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Top-level fields the program around the node adds to `/status` (the client's mode and listeners,
/// which `tunnelctl doctor` needs to test the tunnel the way applications use it; the DNS listener's
/// counters).
#[derive(Clone, Default)]
pub struct StatusExtra {
    fixed: Arc<Mutex<serde_json::Map<String, serde_json::Value>>>,
    live: Arc<Mutex<Vec<(String, LiveField)>>>,
}

impl std::fmt::Debug for StatusExtra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusExtra").field("fixed", &self.fixed).finish_non_exhaustive()
    }
}

impl StatusExtra {
    /// Sets (or replaces) the field `key` of the status document.
    pub fn set(&self, key: &str, value: serde_json::Value) {
        self.fixed.lock().unwrap_or_else(|e| e.into_inner()).insert(key.to_owned(), value);
    }

    /// Makes the field `key` whatever `value` returns each time the document is made.
    pub fn set_live(&self, key: &str, value: impl Fn() -> serde_json::Value + Send + Sync + 'static) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|(k, _)| k != key);
        live.push((key.to_owned(), Arc::new(value)));
    }

    fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = self.fixed.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let live: Vec<(String, LiveField)> = self.live.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (k, f) in live {
            m.insert(k, f());
        }
        m
    }
}

#[derive(Clone)]
struct Ctx {
    dp: Dataplane,
    link: watch::Receiver<LinkState>,
    health: Option<watch::Receiver<Vec<tunnel_core::map::TargetHealth>>>,
    extra: StatusExtra,
}

/// Serves the status routes on `addr`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    dp: Dataplane,
    link: watch::Receiver<LinkState>,
    health: Option<watch::Receiver<Vec<tunnel_core::map::TargetHealth>>>,
    extra: StatusExtra,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (metrics)"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(Ctx { dp, link, health, extra });
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "status listener failed");
        }
    });
    Ok((bound, task))
}

async fn document(ctx: &Ctx) -> serde_json::Value {
    let mut v = ctx.dp.status().await.unwrap_or_else(|| serde_json::json!({}));
    if let Some(o) = v.as_object_mut() {
        o.insert("control".into(), serde_json::to_value(&*ctx.link.borrow()).unwrap_or_default());
        if let Some(h) = &ctx.health {
            o.insert("resources".into(), serde_json::to_value(&*h.borrow()).unwrap_or_default());
        }
        o.extend(ctx.extra.fields());
    }
    v
}

async fn status(State(ctx): State<Ctx>) -> Json<serde_json::Value> {
    Json(document(&ctx).await)
}

async fn healthz(State(ctx): State<Ctx>) -> (axum::http::StatusCode, &'static str) {
    match ctx.dp.status().await {
        Some(_) => (axum::http::StatusCode::OK, "ok\n"),
        None => (axum::http::StatusCode::SERVICE_UNAVAILABLE, "data plane stopped\n"),
    }
}

async fn metrics(State(ctx): State<Ctx>) -> String {
    let v = document(&ctx).await;
    let mut out = String::new();
    let n = |p: &serde_json::Value| p.as_u64().unwrap_or(0);
    let _ = writeln!(out, "# HELP tunnel_node_control_connected Whether the control link is up.\n# TYPE tunnel_node_control_connected gauge");
    let up = v["control"]["state"] == "connected";
    let _ = writeln!(out, "tunnel_node_control_connected {}", u8::from(up));
    let _ = writeln!(
        out,
        "# HELP tunnel_node_map_version Network map version applied.\n# TYPE tunnel_node_map_version gauge"
    );
    let _ = writeln!(out, "tunnel_node_map_version {}", n(&v["map_version"]));
    let _ = writeln!(
        out,
        "# HELP tunnel_node_flows Open TCP flows.\n# TYPE tunnel_node_flows gauge\ntunnel_node_flows {}",
        n(&v["flows"])
    );
    let _ = writeln!(out, "# HELP tunnel_node_dropped_packets_total Packets dropped, by reason.\n# TYPE tunnel_node_dropped_packets_total counter");
    if let Some(d) = v["drops"].as_object() {
        for (reason, count) in d {
            let _ = writeln!(out, "tunnel_node_dropped_packets_total{{reason=\"{reason}\"}} {}", n(count));
        }
    }
    for reason in ["not_granted", "wrong_port", "unparsable", "unsolicited", "wrong_destination"] {
        let _ = writeln!(
            out,
            "tunnel_node_dropped_packets_total{{reason=\"{reason}\"}} {}",
            n(&v["counters"][reason])
        );
    }
    let _ = writeln!(
        out,
        "tunnel_node_dropped_packets_total{{reason=\"stack_queue_full\"}} {}",
        n(&v["tcp"]["rx_dropped"])
    );
    let tcp = [
        ("retransmitted_segments", "Segments the userspace TCP stack sent again."),
        ("lost_segments", "Segments the userspace TCP stack found lost."),
        ("recoveries", "Loss recovery episodes of the userspace TCP stack."),
        ("tail_loss_probes", "Tail loss probes the userspace TCP stack sent."),
        ("timeouts", "Retransmission timeouts in the userspace TCP stack."),
        ("acks_merged", "Duplicate ACKs of the userspace TCP stack merged into a later one."),
    ];
    for (key, help) in tcp {
        let _ = writeln!(
            out,
            "# HELP tunnel_node_tcp_{key}_total {help}\n# TYPE tunnel_node_tcp_{key}_total counter\ntunnel_node_tcp_{key}_total {}",
            n(&v["tcp"][key])
        );
    }
    let _ = writeln!(
        out,
        "# HELP tunnel_node_tcp_buffer_bytes Socket buffer capacity the open flows hold.\n# TYPE tunnel_node_tcp_buffer_bytes gauge\ntunnel_node_tcp_buffer_bytes {}",
        n(&v["tcp"]["buffer_bytes"])
    );
    let _ = writeln!(
        out,
        "# HELP tunnel_node_tcp_refused_total New flows refused, by reason.\n# TYPE tunnel_node_tcp_refused_total counter\ntunnel_node_tcp_refused_total{{reason=\"memory\"}} {}",
        n(&v["tcp"]["refused_budget"])
    );
    let _ = writeln!(
        out,
        "# HELP tunnel_node_udp_flows Open UDP flows (site).\n# TYPE tunnel_node_udp_flows gauge\ntunnel_node_udp_flows {}",
        n(&v["udp_flows"])
    );
    let _ = writeln!(
        out,
        "# HELP tunnel_node_pending_dials TCP SYNs held while their targets are dialled (site).\n# TYPE tunnel_node_pending_dials gauge\ntunnel_node_pending_dials {}",
        n(&v["pending_dials"])
    );
    let _ = writeln!(
        out,
        "# HELP tunnel_node_flows_refused_total New flows refused, by kind and by the limit that refused them.\n# TYPE tunnel_node_flows_refused_total counter"
    );
    let refused = [
        ("pending_dial", "peer", &v["refused"]["pending_dial_peer"]),
        ("pending_dial", "node", &v["refused"]["pending_dial_node"]),
        ("tcp", "peer", &v["tcp"]["refused_peer_flows"]),
        ("tcp", "node", &v["tcp"]["refused_node_flows"]),
        ("tcp", "memory", &v["tcp"]["refused_budget"]),
        ("udp", "peer", &v["refused"]["udp_peer"]),
        ("udp", "node", &v["refused"]["udp_node"]),
    ];
    for (kind, limit, count) in refused {
        let _ = writeln!(
            out,
            "tunnel_node_flows_refused_total{{kind=\"{kind}\",limit=\"{limit}\"}} {}",
            n(count)
        );
    }
    // One family at a time (Prometheus text wants each family's samples together).
    let peers: Vec<&serde_json::Value> = v["peers"].as_array().into_iter().flatten().collect();
    let name = |p: &serde_json::Value| p["name"].as_str().unwrap_or("?").replace(['"', '\\', '\n'], "_");
    let _ = writeln!(
        out,
        "# HELP tunnel_node_peer_up Whether the tunnel to a peer is up.\n# TYPE tunnel_node_peer_up gauge"
    );
    for p in &peers {
        let _ =
            writeln!(out, "tunnel_node_peer_up{{peer=\"{}\"}} {}", name(p), u8::from(p["path"] != "down"));
    }
    let families = [
        ("tunnel_node_peer_tx_bytes_total", "Bytes sent to a peer.", "tx_bytes"),
        ("tunnel_node_peer_rx_bytes_total", "Bytes received from a peer.", "rx_bytes"),
        (
            "tunnel_node_peer_relay_tx_bytes_total",
            "Bytes sent to a peer through the relay.",
            "relay_tx_bytes",
        ),
        (
            "tunnel_node_peer_relay_rx_bytes_total",
            "Bytes received from a peer through the relay.",
            "relay_rx_bytes",
        ),
        ("tunnel_node_peer_path_changes_total", "Times a peer's path changed.", "path_changes"),
        (
            "tunnel_node_peer_punch_attempts_total",
            "Hole-punching rounds started towards a peer.",
            "punch_attempts",
        ),
        (
            "tunnel_node_peer_punch_successes_total",
            "Punching rounds that proved a direct path.",
            "punch_successes",
        ),
    ];
    for (family, help, key) in families {
        let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} counter");
        for p in &peers {
            let _ = writeln!(out, "{family}{{peer=\"{}\"}} {}", name(p), n(&p[key]));
        }
    }
    let _ = writeln!(
        out,
        "# HELP tunnel_node_peer_path The path in use to a peer (1 for the current one).\n# TYPE tunnel_node_peer_path gauge"
    );
    for p in &peers {
        for path in ["direct", "relay", "down"] {
            let _ = writeln!(
                out,
                "tunnel_node_peer_path{{peer=\"{}\",path=\"{path}\"}} {}",
                name(p),
                u8::from(p["path"] == path)
            );
        }
    }
    if v["dns"].is_object() {
        let _ = writeln!(
            out,
            "# HELP tunnel_node_dns_refused_total DNS queries the client's listener dropped, by reason (source: not this host or its containers; busy: too many forwards in flight).\n# TYPE tunnel_node_dns_refused_total counter"
        );
        for (reason, key) in [("source", "refused_source"), ("busy", "refused_busy")] {
            let _ =
                writeln!(out, "tunnel_node_dns_refused_total{{reason=\"{reason}\"}} {}", n(&v["dns"][key]));
        }
        let _ = writeln!(
            out,
            "# HELP tunnel_node_dns_forwards DNS queries being forwarded upstream now.\n# TYPE tunnel_node_dns_forwards gauge\ntunnel_node_dns_forwards {}",
            n(&v["dns"]["forwards"])
        );
    }
    if let Some(targets) = v["resources"].as_array() {
        let _ = writeln!(
            out,
            "# HELP tunnel_node_resource_health A resource's target health on this site (1 for the current state).\n# TYPE tunnel_node_resource_health gauge"
        );
        for t in targets {
            let r = t["resource"].as_str().unwrap_or("?").replace(['"', '\\', '\n'], "_");
            for state in ["healthy", "unhealthy", "unknown"] {
                let _ = writeln!(
                    out,
                    "tunnel_node_resource_health{{resource=\"{r}\",state=\"{state}\"}} {}",
                    u8::from(t["state"] == state)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP tunnel_node_relay_up Whether the relay link is up.\n# TYPE tunnel_node_relay_up gauge\ntunnel_node_relay_up {}",
        u8::from(v["relay"]["up"] == true)
    );
    out
}
