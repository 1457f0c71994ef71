//! `/status` (JSON), `/metrics` (Prometheus text) and `/healthz` for agents and clients.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;

use tunnel_core::map::HealthState;
use tunnel_core::status::{ClientInfo, DnsStatus, LinkState, NodeStatus, PathState, PeerStatus};

use crate::dataplane::Dataplane;

/// The parts of `/status` the program around the node adds: the client's mode and listeners
/// (which `tunnelctl doctor` needs to test the tunnel the way applications use it) and its DNS
/// listener's counters, read each time the document is made.
#[derive(Clone, Default)]
pub struct StatusExtra {
    client: Arc<Mutex<Option<ClientInfo>>>,
    dns: Arc<Mutex<Option<DnsField>>>,
}

/// Reads the DNS listener's counters.
type DnsField = Arc<dyn Fn() -> DnsStatus + Send + Sync>;

impl std::fmt::Debug for StatusExtra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusExtra").field("client", &self.client).finish_non_exhaustive()
    }
}

impl StatusExtra {
    /// Sets (or replaces) the client's mode and listeners.
    pub fn set_client(&self, info: ClientInfo) {
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(info);
    }

    /// Makes the `dns` part whatever `read` returns each time the document is made.
    pub fn set_dns(&self, read: impl Fn() -> DnsStatus + Send + Sync + 'static) {
        *self.dns.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(read));
    }

    fn fill(&self, st: &mut NodeStatus) {
        st.client = self.client.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let dns = self.dns.lock().unwrap_or_else(|e| e.into_inner()).clone();
        st.dns = dns.map(|read| read());
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

async fn document(ctx: &Ctx) -> NodeStatus {
    let mut st = ctx.dp.status().await.unwrap_or_else(|| NodeStatus::new(ctx.dp.kind));
    st.control = Some(ctx.link.borrow().clone());
    if let Some(h) = &ctx.health {
        st.resources = Some(h.borrow().clone());
    }
    ctx.extra.fill(&mut st);
    st
}

async fn status(State(ctx): State<Ctx>) -> Json<serde_json::Value> {
    Json(document(&ctx).await.to_json())
}

async fn healthz(State(ctx): State<Ctx>) -> (axum::http::StatusCode, &'static str) {
    match ctx.dp.status().await {
        Some(_) => (axum::http::StatusCode::OK, "ok\n"),
        None => (axum::http::StatusCode::SERVICE_UNAVAILABLE, "data plane stopped\n"),
    }
}

async fn metrics(State(ctx): State<Ctx>) -> String {
    render_metrics(&document(&ctx).await)
}

/// The Prometheus text of a status document.
fn render_metrics(v: &NodeStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# HELP tunnel_node_control_connected Whether the control link is up.\n# TYPE tunnel_node_control_connected gauge");
    let up = v.control == Some(LinkState::Connected);
    let _ = writeln!(out, "tunnel_node_control_connected {}", u8::from(up));
    let _ = writeln!(
        out,
        "# HELP tunnel_node_map_version Network map version applied.\n# TYPE tunnel_node_map_version gauge"
    );
    let _ = writeln!(out, "tunnel_node_map_version {}", v.map_version.unwrap_or(0));
    let _ = writeln!(
        out,
        "# HELP tunnel_node_flows Open TCP flows.\n# TYPE tunnel_node_flows gauge\ntunnel_node_flows {}",
        v.flows
    );
    let _ = writeln!(out, "# HELP tunnel_node_dropped_packets_total Packets dropped, by reason.\n# TYPE tunnel_node_dropped_packets_total counter");
    // Every drop reason the device counts, by its field name: a new one shows without a change here.
    if let Ok(serde_json::Value::Object(d)) = serde_json::to_value(v.drops) {
        for (reason, count) in d {
            let _ = writeln!(out, "tunnel_node_dropped_packets_total{{reason=\"{reason}\"}} {count}");
        }
    }
    let c = &v.counters;
    let counted = [
        ("not_granted", c.not_granted),
        ("wrong_port", c.wrong_port),
        ("unparsable", c.unparsable),
        ("unsolicited", c.unsolicited),
        ("wrong_destination", c.wrong_destination),
        ("stack_queue_full", v.tcp.rx_dropped),
    ];
    for (reason, count) in counted {
        let _ = writeln!(out, "tunnel_node_dropped_packets_total{{reason=\"{reason}\"}} {count}");
    }
    let t = &v.tcp;
    let tcp = [
        ("retransmitted_segments", "Segments the userspace TCP stack sent again.", t.retransmitted_segments),
        ("lost_segments", "Segments the userspace TCP stack found lost.", t.lost_segments),
        ("recoveries", "Loss recovery episodes of the userspace TCP stack.", t.recoveries),
        ("tail_loss_probes", "Tail loss probes the userspace TCP stack sent.", t.tail_loss_probes),
        ("timeouts", "Retransmission timeouts in the userspace TCP stack.", t.timeouts),
        ("acks_merged", "Duplicate ACKs of the userspace TCP stack merged into a later one.", t.acks_merged),
    ];
    for (key, help, count) in tcp {
        let _ = writeln!(
            out,
            "# HELP tunnel_node_tcp_{key}_total {help}\n# TYPE tunnel_node_tcp_{key}_total counter\ntunnel_node_tcp_{key}_total {count}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP tunnel_node_tcp_buffer_bytes Socket buffer capacity the open flows hold.\n# TYPE tunnel_node_tcp_buffer_bytes gauge\ntunnel_node_tcp_buffer_bytes {}",
        t.buffer_bytes
    );
    let _ = writeln!(
        out,
        "# HELP tunnel_node_tcp_refused_total New flows refused, by reason.\n# TYPE tunnel_node_tcp_refused_total counter\ntunnel_node_tcp_refused_total{{reason=\"memory\"}} {}",
        t.refused_budget
    );
    let _ = writeln!(
        out,
        "# HELP tunnel_node_udp_flows Open UDP flows (site).\n# TYPE tunnel_node_udp_flows gauge\ntunnel_node_udp_flows {}",
        v.udp_flows
    );
    let _ = writeln!(
        out,
        "# HELP tunnel_node_pending_dials TCP SYNs held while their targets are dialled (site).\n# TYPE tunnel_node_pending_dials gauge\ntunnel_node_pending_dials {}",
        v.pending_dials
    );
    let _ = writeln!(
        out,
        "# HELP tunnel_node_flows_refused_total New flows refused, by kind and by the limit that refused them.\n# TYPE tunnel_node_flows_refused_total counter"
    );
    let r = &v.refused;
    let refused = [
        ("pending_dial", "peer", r.pending_dial_peer),
        ("pending_dial", "node", r.pending_dial_node),
        ("tcp", "peer", t.refused_peer_flows),
        ("tcp", "node", t.refused_node_flows),
        ("tcp", "memory", t.refused_budget),
        ("udp", "peer", r.udp_peer),
        ("udp", "node", r.udp_node),
    ];
    for (kind, limit, count) in refused {
        let _ = writeln!(out, "tunnel_node_flows_refused_total{{kind=\"{kind}\",limit=\"{limit}\"}} {count}");
    }
    // One family at a time (Prometheus text wants each family's samples together).
    let label = |s: &str| s.replace(['"', '\\', '\n'], "_");
    let _ = writeln!(
        out,
        "# HELP tunnel_node_peer_up Whether the tunnel to a peer is up.\n# TYPE tunnel_node_peer_up gauge"
    );
    for p in &v.peers {
        let _ = writeln!(
            out,
            "tunnel_node_peer_up{{peer=\"{}\"}} {}",
            label(&p.name),
            u8::from(p.path != PathState::Down)
        );
    }
    type Field = fn(&PeerStatus) -> u64;
    let families: [(&str, &str, Field); 7] = [
        ("tunnel_node_peer_tx_bytes_total", "Bytes sent to a peer.", |p| p.tx_bytes),
        ("tunnel_node_peer_rx_bytes_total", "Bytes received from a peer.", |p| p.rx_bytes),
        ("tunnel_node_peer_relay_tx_bytes_total", "Bytes sent to a peer through the relay.", |p| {
            p.relay_tx_bytes
        }),
        ("tunnel_node_peer_relay_rx_bytes_total", "Bytes received from a peer through the relay.", |p| {
            p.relay_rx_bytes
        }),
        ("tunnel_node_peer_path_changes_total", "Times a peer's path changed.", |p| p.path_changes),
        ("tunnel_node_peer_punch_attempts_total", "Hole-punching rounds started towards a peer.", |p| {
            p.punch_attempts
        }),
        ("tunnel_node_peer_punch_successes_total", "Punching rounds that proved a direct path.", |p| {
            p.punch_successes
        }),
    ];
    for (family, help, field) in families {
        let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} counter");
        for p in &v.peers {
            let _ = writeln!(out, "{family}{{peer=\"{}\"}} {}", label(&p.name), field(p));
        }
    }
    let _ = writeln!(
        out,
        "# HELP tunnel_node_peer_path The path in use to a peer (1 for the current one).\n# TYPE tunnel_node_peer_path gauge"
    );
    for p in &v.peers {
        for path in PathState::ALL {
            let _ = writeln!(
                out,
                "tunnel_node_peer_path{{peer=\"{}\",path=\"{path}\"}} {}",
                label(&p.name),
                u8::from(p.path == path)
            );
        }
    }
    if let Some(dns) = &v.dns {
        let _ = writeln!(
            out,
            "# HELP tunnel_node_dns_refused_total DNS queries the client's listener dropped, by reason (source: not this host or its containers; busy: too many forwards in flight).\n# TYPE tunnel_node_dns_refused_total counter"
        );
        for (reason, count) in [("source", dns.refused_source), ("busy", dns.refused_busy)] {
            let _ = writeln!(out, "tunnel_node_dns_refused_total{{reason=\"{reason}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "# HELP tunnel_node_dns_forwards DNS queries being forwarded upstream now.\n# TYPE tunnel_node_dns_forwards gauge\ntunnel_node_dns_forwards {}",
            dns.forwards
        );
    }
    if let Some(targets) = &v.resources {
        let _ = writeln!(
            out,
            "# HELP tunnel_node_resource_health A resource's target health on this site (1 for the current state).\n# TYPE tunnel_node_resource_health gauge"
        );
        for t in targets {
            let r = label(&t.resource);
            for state in [HealthState::Healthy, HealthState::Unhealthy, HealthState::Unknown] {
                let _ = writeln!(
                    out,
                    "tunnel_node_resource_health{{resource=\"{r}\",state=\"{}\"}} {}",
                    state.as_str(),
                    u8::from(t.state == state)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP tunnel_node_relay_up Whether the relay link is up.\n# TYPE tunnel_node_relay_up gauge\ntunnel_node_relay_up {}",
        u8::from(v.relay.up)
    );
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tunnel_core::map::{NodeKind, TargetHealth};

    use super::*;

    const GOLDEN_STATUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../core/tests/golden/status.json");

    /// Every field path of a JSON document (`peers[].path`, `relay.up`, ...), arrays by their
    /// elements.
    fn paths(v: &serde_json::Value, at: &str, out: &mut BTreeSet<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let p = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                    out.insert(p.clone());
                    paths(v, &p, out);
                }
            }
            serde_json::Value::Array(a) => {
                for v in a {
                    paths(v, &format!("{at}[]"), out);
                }
            }
            _ => {}
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.split_once("\r\n\r\n").unwrap().1.to_owned()
    }

    /// What a running node serves on `/status` has exactly the golden file's field names: the file
    /// is not only what the type prints, it is what operators' scripts see.
    #[tokio::test]
    async fn a_running_node_serves_the_golden_documents_fields() {
        let own = tunnel_core::NodeId::from_random([1; 10]);
        let peer = tunnel_core::map::PeerInfo {
            node_id: tunnel_core::NodeId::from_random([2; 10]),
            name: "home".into(),
            kind: NodeKind::Site,
            public_key: Some(tunnel_core::wg::public_key([3; 32])),
            overlay_addr: "100.96.0.1".parse().unwrap(),
            allowed_ips: vec!["100.96.0.1/32".parse().unwrap()],
            candidates: vec![],
            online: true,
            resources: vec![],
        };
        let map = tunnel_core::NetworkMap {
            version: 1,
            node_id: own,
            node_name: "laptop".into(),
            kind: NodeKind::Client,
            overlay_addr: "100.96.0.2".parse().unwrap(),
            overlay_cidr: "100.96.0.0/16".parse().unwrap(),
            dns_zone: "tunnel.internal".into(),
            mtu: 1280,
            peers: [(peer.node_id.clone(), peer)].into(),
            resources: Default::default(),
            relays: vec![],
            stun_addr: None,
        };
        let (_maps_tx, maps) = watch::channel(Some(Arc::new(map)));
        let (dp, _task) =
            crate::dataplane::start(NodeKind::Client, [4; 32], "127.0.0.1:0".parse().unwrap(), maps)
                .await
                .unwrap();
        // Down with a reason, so that field shows too.
        let (_link_tx, link) = watch::channel(LinkState::Disconnected("server unreachable".into()));
        let health = TargetHealth {
            resource: "web".into(),
            state: HealthState::Unknown,
            detail: String::new(),
            checked_ms: 0,
        };
        let (_health_tx, health) = watch::channel(vec![health]);
        let extra = StatusExtra::default();
        extra.set_client(ClientInfo::Userspace { socks5: "127.0.0.1:1".into(), dns: "127.0.0.1:2".into() });
        extra.set_dns(DnsStatus::default);
        let (addr, _http) =
            serve("127.0.0.1:0".parse().unwrap(), dp, link, Some(health), extra).await.unwrap();

        let served: serde_json::Value = serde_json::from_str(&get(addr, "/status").await).unwrap();
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(GOLDEN_STATUS).unwrap()).unwrap();
        let (mut got, mut want) = (BTreeSet::new(), BTreeSet::new());
        paths(&served, "", &mut got);
        paths(&golden, "", &mut want);
        assert_eq!(got, want, "the served document's fields differ from the golden file's");
        // And it reads back as the type every consumer uses.
        let st: NodeStatus = serde_json::from_value(served).unwrap();
        assert_eq!(
            (st.kind, st.peers[0].path, st.control),
            (NodeKind::Client, PathState::Down, Some(LinkState::Disconnected("server unreachable".into())))
        );
    }

    /// `/metrics` from the golden document: every family and label, pinned beside the JSON. After a
    /// deliberate change, regenerate with `UPDATE_GOLDEN=1 cargo test -p tunnel-node http::tests`.
    #[test]
    fn the_metrics_of_the_golden_document_match_their_golden_file() {
        let st: NodeStatus = serde_json::from_str(&std::fs::read_to_string(GOLDEN_STATUS).unwrap()).unwrap();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/metrics.txt");
        let got = render_metrics(&st);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden")).unwrap();
            std::fs::write(path, &got).unwrap();
        }
        assert_eq!(
            got,
            std::fs::read_to_string(path).unwrap(),
            "/metrics changed; see the test's doc comment"
        );
    }
}
