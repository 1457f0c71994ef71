//! The relay: forwards WireGuard packets between nodes that cannot reach each other directly, over
//! QUIC datagrams (`--relay-listen`) or TCP/TLS frames (`--relay-tcp-listen`) for networks that block
//! UDP. Wire formats are in [`tunnel_core::relay`].
//!
//! The relay holds no WireGuard key and no database. A node registers by presenting a capability the
//! control server signed (its key, the peers it may reach, an expiry); the relay checks the signature
//! with the server's public key and then forwards a packet only when the sender's capability names the
//! destination *and* the destination's names the sender, unless one of the two capabilities is the
//! older: then the newer one decides (the newest word of the server wins: a grant made a moment ago
//! reaches the relay first through whichever node renews first, in both directions, and a revocation
//! through the node that lost the peer). A registration lives as long as its connection:
//! an established pair keeps flowing while the control server is away and capabilities cannot be
//! renewed; only a new registration needs a capability that has not expired. Per node, bytes are
//! rate-limited and the number of peers it relays to at once is capped.

pub mod bundle;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tunnel_core::PublicKey;

use anyhow::{Context, Result};
use bytes::Bytes;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tunnel_core::relay::{self as wire, Capability, Frame};

use crate::limits::{source_key, Full, InFlight, InFlightGuard};

pub use bundle::{RelayBundle, RelayKeys};

pub use tunnel_core::relay::{ALPN, QUIC_MTU};
/// Packets queued per TCP connection before the relay drops (as a congested link would).
const TCP_QUEUE: usize = 1024;
/// A peer counts as one of a node's relayed flows for this long after its last packet.
const FLOW_IDLE: Duration = Duration::from_secs(60);
/// How long a new connection has to present a valid capability before it is closed. Until then
/// nothing it sends is forwarded or kept (QUIC datagrams are read and dropped).
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Read size of a registered TCP connection, and of one that has not registered yet.
const TCP_CHUNK: usize = 64 * 1024;
const TCP_CHUNK_UNREGISTERED: usize = 4 * 1024;

/// Limits per node and per source.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes per second a node may send through the relay (burst: one second's worth).
    pub bytes_per_sec: u64,
    /// Peers a node may relay to at once.
    pub max_flows: usize,
    /// Connections (QUIC and TCP together) from one source address (IPv6: one /64) at once.
    pub conns_per_source: usize,
    /// Connections at once in all.
    pub conns_total: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // 2 Gbit/s: far above a fair share of one core, so it only stops a runaway or abusive node.
        // 64 connections per source: an office or a cluster egress with that many relayed nodes
        // behind one address; 20,000 in all keeps a small VPS's memory bounded (a few hundred KiB each
        // at most, most of it QUIC buffers that fill only under load).
        Limits { bytes_per_sec: 250_000_000, max_flows: 256, conns_per_source: 64, conns_total: 20_000 }
    }
}

/// Where and how a relay listens.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// QUIC (UDP) listener.
    pub udp: Option<SocketAddr>,
    /// TCP/TLS listener.
    pub tcp: Option<SocketAddr>,
    /// Keys.
    pub bundle: RelayBundle,
    /// Per-node limits.
    pub limits: Limits,
}

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub sessions: AtomicU64,
    pub registrations: AtomicU64,
    pub registrations_refused: AtomicU64,
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    pub refused_not_allowed: AtomicU64,
    pub refused_no_peer: AtomicU64,
    pub refused_rate: AtomicU64,
    pub refused_flows: AtomicU64,
    pub refused_malformed: AtomicU64,
    /// Connections refused: too many from the source.
    pub conns_refused_source: AtomicU64,
    /// Connections refused: too many in all.
    pub conns_refused_total: AtomicU64,
    /// Connections closed for presenting no valid capability within [`REGISTER_TIMEOUT`].
    pub register_timeouts: AtomicU64,
    /// Datagrams dropped because they came before the connection registered.
    pub early_datagrams: AtomicU64,
    /// Registrations refused because the node is registered with a newer capability.
    pub refused_older: AtomicU64,
    /// Open connections.
    pub conns: AtomicU64,
}

impl RelayStats {
    /// Prometheus text.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP tunnel_relay_sessions Nodes registered with the relay now.\n# TYPE tunnel_relay_sessions gauge\ntunnel_relay_sessions {}",
            g(&self.sessions)
        );
        for (name, help, v) in [
            ("tunnel_relay_registrations_total", "Registrations accepted.", g(&self.registrations)),
            (
                "tunnel_relay_registrations_refused_total",
                "Registrations refused (bad or expired capability).",
                g(&self.registrations_refused),
            ),
            ("tunnel_relay_packets_total", "Packets forwarded.", g(&self.packets)),
            ("tunnel_relay_bytes_total", "Bytes forwarded (WireGuard packets).", g(&self.bytes)),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP tunnel_relay_refused_packets_total Packets not forwarded, by reason.\n# TYPE tunnel_relay_refused_packets_total counter"
        );
        for (reason, a) in [
            ("not_allowed", &self.refused_not_allowed),
            ("no_peer", &self.refused_no_peer),
            ("rate_limited", &self.refused_rate),
            ("too_many_flows", &self.refused_flows),
            ("malformed", &self.refused_malformed),
            ("unregistered", &self.early_datagrams),
        ] {
            let _ = writeln!(out, "tunnel_relay_refused_packets_total{{reason=\"{reason}\"}} {}", g(a));
        }
        let _ = writeln!(
            out,
            "# HELP tunnel_relay_connections Connections open now.\n# TYPE tunnel_relay_connections gauge\ntunnel_relay_connections {}",
            g(&self.conns)
        );
        let _ = writeln!(
            out,
            "# HELP tunnel_relay_connections_refused_total Connections refused or closed, by reason.\n# TYPE tunnel_relay_connections_refused_total counter"
        );
        for (reason, a) in [
            ("per_source", &self.conns_refused_source),
            ("total", &self.conns_refused_total),
            ("no_capability", &self.register_timeouts),
            ("older_capability", &self.refused_older),
        ] {
            let _ = writeln!(out, "tunnel_relay_connections_refused_total{{reason=\"{reason}\"}} {}", g(a));
        }
    }
}

#[derive(Clone)]
enum Handle {
    Quic(quinn::Connection),
    Tcp(mpsc::Sender<Bytes>),
}

#[derive(Clone)]
struct Registration {
    conn_id: u64,
    handle: Handle,
    allowed: Arc<HashSet<PublicKey>>,
    /// Expiry of the capability it registered with: a later expiry is a newer capability.
    expires_ms: u64,
}

#[derive(Default)]
struct Table {
    nodes: RwLock<HashMap<PublicKey, Registration>>,
    next_conn: AtomicU64,
}

/// One connection's forwarding state: who it is, and its limits.
struct Sender {
    node: PublicKey,
    allowed: Arc<HashSet<PublicKey>>,
    expires_ms: u64,
    tokens: f64,
    last_refill: Instant,
    flows: HashMap<PublicKey, Instant>,
}

struct Relay {
    table: Table,
    trust_key: Vec<u8>,
    limits: Limits,
    stats: Arc<RelayStats>,
    conns: InFlight,
}

/// A connection's place in the relay's connection caps; leaves on drop.
struct ConnSlot {
    _slot: InFlightGuard,
    stats: Arc<RelayStats>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.stats.conns.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Relay {
    /// A slot for a new connection from `from`, or `None` (counted) when a cap is reached.
    fn admit(&self, from: SocketAddr) -> Option<ConnSlot> {
        match self.conns.try_enter(source_key(from.ip())) {
            Ok(slot) => {
                self.stats.conns.fetch_add(1, Ordering::Relaxed);
                Some(ConnSlot { _slot: slot, stats: self.stats.clone() })
            }
            Err(Full::PerSource) => {
                self.stats.conns_refused_source.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%from, "relay connection refused: too many from this source");
                None
            }
            Err(Full::Total) => {
                self.stats.conns_refused_total.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%from, "relay connection refused: too many in all");
                None
            }
        }
    }

    fn register(&self, cap: &[u8], handle: Handle, conn_id: u64) -> Result<Sender, String> {
        let now_ms = crate::state::now_ms().max(0) as u64;
        let cap = Capability::verify(cap, &self.trust_key, now_ms).map_err(|e| {
            self.stats.registrations_refused.fetch_add(1, Ordering::Relaxed);
            e.to_string()
        })?;
        let allowed: Arc<HashSet<PublicKey>> = Arc::new(cap.peers.iter().copied().collect());
        let mut nodes = self.table.nodes.write().unwrap_or_else(|e| e.into_inner());
        if nodes
            .get(&cap.node)
            .is_some_and(|old| old.conn_id != conn_id && old.expires_ms > cap.expires_unix_ms)
        {
            // Someone replaying an older capability of this node (a thief, or a stale process) must
            // not take its registration away from the connection holding the newer one.
            drop(nodes);
            self.stats.refused_older.fetch_add(1, Ordering::Relaxed);
            self.stats.registrations_refused.fetch_add(1, Ordering::Relaxed);
            return Err("this node is registered with a newer capability".into());
        }
        let fresh = nodes
            .insert(
                cap.node,
                Registration { conn_id, handle, allowed: allowed.clone(), expires_ms: cap.expires_unix_ms },
            )
            .is_none_or(|old| old.conn_id != conn_id);
        drop(nodes);
        self.stats.registrations.fetch_add(1, Ordering::Relaxed);
        if fresh {
            self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(node = %short(&cap.node), peers = cap.peers.len(), "relay registration");
        Ok(Sender {
            node: cap.node,
            allowed,
            expires_ms: cap.expires_unix_ms,
            tokens: self.limits.bytes_per_sec as f64,
            last_refill: Instant::now(),
            flows: HashMap::new(),
        })
    }

    fn unregister(&self, node: &PublicKey, conn_id: u64) {
        let mut nodes = self.table.nodes.write().unwrap_or_else(|e| e.into_inner());
        if nodes.get(node).is_some_and(|r| r.conn_id == conn_id) {
            nodes.remove(node);
            self.stats.sessions.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Forwards one packet (`encode_packet` form, naming the destination) from `s`.
    fn forward(&self, s: &mut Sender, data: &[u8]) {
        let Some((dst, payload)) = wire::parse_packet(data) else {
            self.stats.refused_malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let target = {
            let nodes = self.table.nodes.read().unwrap_or_else(|e| e.into_inner());
            nodes.get(&dst).cloned()
        };
        if !s.allowed.contains(&dst) {
            // Only a newer capability of the destination that names the sender lets it through: a
            // grant the server made a moment ago, which the sender has not heard of yet (the new
            // client's first handshake is answered at once, not after its 5 s retry).
            let newer_grant =
                target.as_ref().is_some_and(|r| r.allowed.contains(&s.node) && r.expires_ms > s.expires_ms);
            if !newer_grant {
                self.stats.refused_not_allowed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let now = Instant::now();
        let rate = self.limits.bytes_per_sec as f64;
        s.tokens = (s.tokens + now.duration_since(s.last_refill).as_secs_f64() * rate).min(rate);
        s.last_refill = now;
        if s.tokens < payload.len() as f64 {
            self.stats.refused_rate.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !s.flows.contains_key(&dst) {
            if s.flows.len() >= self.limits.max_flows {
                s.flows.retain(|_, t| now.duration_since(*t) < FLOW_IDLE);
            }
            if s.flows.len() >= self.limits.max_flows {
                self.stats.refused_flows.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        s.flows.insert(dst, now);
        let Some(reg) = target else {
            self.stats.refused_no_peer.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !reg.allowed.contains(&s.node) && reg.expires_ms >= s.expires_ms {
            self.stats.refused_not_allowed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        s.tokens -= payload.len() as f64;
        let out = wire::encode_packet(&s.node, payload);
        let sent = match &reg.handle {
            Handle::Quic(c) => c.send_datagram(Bytes::from(out)).is_ok(),
            Handle::Tcp(tx) => tx.try_send(Bytes::from(Frame::Packet(out).encode())).is_ok(),
        };
        if sent {
            self.stats.packets.fetch_add(1, Ordering::Relaxed);
            self.stats.bytes.fetch_add(payload.len() as u64, Ordering::Relaxed);
        }
    }
}

fn short(k: &PublicKey) -> String {
    k.0[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// A running relay.
#[derive(Debug)]
pub struct RunningRelay {
    /// Where QUIC is bound.
    pub udp_addr: Option<SocketAddr>,
    /// Where TCP/TLS is bound.
    pub tcp_addr: Option<SocketAddr>,
    /// Counters.
    pub stats: Arc<RelayStats>,
    tasks: Vec<JoinHandle<()>>,
    endpoint: Option<quinn::Endpoint>,
}

impl RunningRelay {
    /// Stops: tells every connected node the relay is going away (so they fail over at once instead of
    /// after their idle timeout), then waits briefly for those goodbyes to be sent.
    pub async fn shutdown(mut self) {
        if let Some(e) = self.endpoint.take() {
            e.close(0u32.into(), b"relay stopping");
            let _ = tokio::time::timeout(Duration::from_secs(2), e.wait_idle()).await;
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        if let Some(e) = &self.endpoint {
            e.close(0u32.into(), b"relay stopping");
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn tls_config(bundle: &RelayBundle) -> Result<rustls::ServerConfig> {
    let kp = rcgen::KeyPair::from_pem(&bundle.tls_key_pem).context("relay TLS key")?;
    let mut params = rcgen::CertificateParams::new(vec!["tunnel-relay".to_owned()])?;
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let cert = params.self_signed(&kp).context("cannot sign the relay certificate")?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(kp.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 is not available")?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(cert.der().to_vec())], key)
        .context("the relay key does not fit its certificate")?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// Starts the relay's listeners.
pub async fn start(cfg: RelayConfig, stats: Arc<RelayStats>) -> Result<RunningRelay> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let relay = Arc::new(Relay {
        table: Table::default(),
        trust_key: cfg.bundle.trust_key.clone(),
        limits: cfg.limits,
        stats: stats.clone(),
        conns: InFlight::new(cfg.limits.conns_per_source, cfg.limits.conns_total),
    });
    let tls = tls_config(&cfg.bundle)?;
    let mut tasks = Vec::new();
    let mut endpoint = None;
    let mut udp_addr = None;
    if let Some(addr) = cfg.udp {
        let qcfg = quinn::crypto::rustls::QuicServerConfig::try_from(tls.clone())
            .context("QUIC TLS configuration")?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(qcfg));
        server.transport_config(Arc::new(tunnel_core::relay_window::transport_config()));
        server.migration(true);
        let sock =
            crate::stun::bind_udp(addr).with_context(|| format!("cannot listen on {addr} (relay, UDP)"))?;
        let ep = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            sock,
            Arc::new(quinn::TokioRuntime),
        )
        .with_context(|| format!("cannot start the QUIC relay on {addr}"))?;
        udp_addr = Some(ep.local_addr()?);
        let r = relay.clone();
        let accept_ep = ep.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(incoming) = accept_ep.accept().await {
                let Some(slot) = r.admit(incoming.remote_address()) else {
                    incoming.refuse();
                    continue;
                };
                let r = r.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    // REGISTER_TIMEOUT covers the QUIC handshake and the capability together, as
                    // for TCP: a stranger that starts handshakes and never finishes them holds a
                    // slot for 5 s, not for the 30 s idle timeout.
                    let register_by = tokio::time::Instant::now() + REGISTER_TIMEOUT;
                    match tokio::time::timeout_at(register_by, incoming).await {
                        Ok(Ok(conn)) => quic_conn(r, conn, register_by).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "relay QUIC handshake failed"),
                        Err(_) => {
                            r.stats.register_timeouts.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!("relay QUIC handshake not done within 5s");
                        }
                    }
                });
            }
        }));
        endpoint = Some(ep);
    }
    let mut tcp_addr = None;
    if let Some(addr) = cfg.tcp {
        let listener =
            TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (relay, TCP)"))?;
        tcp_addr = Some(listener.local_addr()?);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let r = relay.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((tcp, from)) = listener.accept().await else { continue };
                let Some(slot) = r.admit(from) else {
                    drop(tcp);
                    continue;
                };
                let acceptor = acceptor.clone();
                let r = r.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let _ = tcp.set_nodelay(true);
                    // REGISTER_TIMEOUT covers the TLS handshake and the capability together.
                    let register_by = tokio::time::Instant::now() + REGISTER_TIMEOUT;
                    match tokio::time::timeout_at(register_by, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tcp_conn(r, tls, register_by).await,
                        Ok(Err(e)) => tracing::debug!(%from, error = %e, "relay TLS handshake failed"),
                        Err(_) => {
                            r.stats.register_timeouts.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%from, "relay TLS handshake not done within 5s");
                        }
                    }
                });
            }
        }));
    }
    tracing::info!(udp = ?udp_addr, tcp = ?tcp_addr, "relay listening");
    Ok(RunningRelay { udp_addr, tcp_addr, stats, tasks, endpoint })
}

async fn quic_conn(relay: Arc<Relay>, conn: quinn::Connection, register_by: tokio::time::Instant) {
    let conn_id = relay.table.next_conn.fetch_add(1, Ordering::Relaxed);
    // The first bidirectional stream carries the registration; later ones renew it. Until it is
    // accepted, datagrams are read and dropped (quinn would otherwise buffer them, up to its datagram
    // receive buffer per connection) and the connection has REGISTER_TIMEOUT to get there.
    let drain = async {
        while conn.read_datagram().await.is_ok() {
            relay.stats.early_datagrams.fetch_add(1, Ordering::Relaxed);
        }
        std::future::pending::<()>().await;
    };
    let first = tokio::select! {
        r = tokio::time::timeout_at(register_by, quic_register(&relay, &conn, conn_id)) => r,
        _ = drain => return,
    };
    let sender = match first {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(_) => {
            relay.stats.register_timeouts.fetch_add(1, Ordering::Relaxed);
            conn.close(1u32.into(), b"no capability within 5s");
            return;
        }
    };
    let node = sender.node;
    let sender = Arc::new(std::sync::Mutex::new(sender));
    let renew = {
        let relay = relay.clone();
        let conn = conn.clone();
        let sender = sender.clone();
        async move {
            loop {
                match quic_register(&relay, &conn, conn_id).await {
                    Some(s) => {
                        let mut cur = sender.lock().unwrap_or_else(|e| e.into_inner());
                        if s.node == cur.node {
                            cur.allowed = s.allowed;
                            cur.expires_ms = s.expires_ms;
                        }
                    }
                    None => {
                        if conn.close_reason().is_some() {
                            return;
                        }
                    }
                }
            }
        }
    };
    let forward = async {
        loop {
            match conn.read_datagram().await {
                Ok(d) => {
                    let mut s = sender.lock().unwrap_or_else(|e| e.into_inner());
                    relay.forward(&mut s, &d);
                }
                Err(_) => return,
            }
        }
    };
    tokio::select! {
        _ = renew => {}
        _ = forward => {}
    }
    relay.unregister(&node, conn_id);
}

async fn quic_register(relay: &Relay, conn: &quinn::Connection, conn_id: u64) -> Option<Sender> {
    let (mut send, mut recv) = conn.accept_bi().await.ok()?;
    let mut len = [0u8; 2];
    recv.read_exact(&mut len).await.ok()?;
    let len = match u16::from_be_bytes(len) {
        0 => {
            let mut wide = [0u8; 4];
            recv.read_exact(&mut wide).await.ok()?;
            u32::from_be_bytes(wide) as usize
        }
        n => n as usize,
    };
    if len == 0 || len > wire::MAX_FRAME {
        relay.stats.refused_malformed.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    let mut cap = vec![0u8; len];
    recv.read_exact(&mut cap).await.ok()?;
    match relay.register(&cap, Handle::Quic(conn.clone()), conn_id) {
        Ok(s) => {
            let _ = send.write_all(&[0]).await;
            let _ = send.finish();
            Some(s)
        }
        Err(why) => {
            tracing::info!(remote = %conn.remote_address(), reason = %why, "relay registration refused");
            let _ = send.write_all(&[[1u8].as_slice(), why.as_bytes()].concat()).await;
            let _ = send.finish();
            // Let the reason reach the node before the connection goes away.
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            None
        }
    }
}

async fn tcp_conn(
    relay: Arc<Relay>,
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    register_by: tokio::time::Instant,
) {
    let conn_id = relay.table.next_conn.fetch_add(1, Ordering::Relaxed);
    let (mut rd, mut wr) = tokio::io::split(tls);
    let (tx, mut rx) = mpsc::channel::<Bytes>(TCP_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                return;
            }
            // Write whatever else is queued before flushing: fewer TLS records under load.
            while let Ok(b) = rx.try_recv() {
                if wr.write_all(&b).await.is_err() {
                    return;
                }
            }
            if wr.flush().await.is_err() {
                return;
            }
        }
    });
    // Small until the connection registers: a stranger's connection costs little more than TLS.
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; TCP_CHUNK_UNREGISTERED];
    let mut sender: Option<Sender> = None;
    'conn: loop {
        // Until a capability is accepted the connection lives REGISTER_TIMEOUT at most.
        let wait = match sender {
            Some(_) => tunnel_core::relay_window::IDLE_TIMEOUT,
            None => register_by.saturating_duration_since(tokio::time::Instant::now()),
        };
        let n = match tokio::time::timeout(wait, rd.read(&mut chunk)).await {
            Err(_) if sender.is_none() => {
                relay.stats.register_timeouts.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match Frame::decode(&mut buf) {
                Ok(Some(Frame::Hello(cap))) => match relay.register(&cap, Handle::Tcp(tx.clone()), conn_id) {
                    Ok(s) => {
                        sender = Some(s);
                        chunk.resize(TCP_CHUNK, 0);
                        let _ = tx.try_send(Bytes::from(Frame::Reply(Ok(())).encode()));
                    }
                    Err(why) => {
                        let _ = tx.try_send(Bytes::from(Frame::Reply(Err(why)).encode()));
                        if sender.is_none() {
                            break 'conn;
                        }
                    }
                },
                Ok(Some(Frame::Packet(p))) => match sender.as_mut() {
                    Some(s) => relay.forward(s, &p),
                    None => break 'conn,
                },
                Ok(Some(Frame::Reply(_))) => {}
                Ok(None) => break,
                Err(_) => {
                    relay.stats.refused_malformed.fetch_add(1, Ordering::Relaxed);
                    break 'conn;
                }
            }
        }
    }
    if let Some(s) = sender {
        relay.unregister(&s.node, conn_id);
    }
    // Let queued replies (a refusal) go out before the connection closes.
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}
