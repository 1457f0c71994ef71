//! `tunnel-server`: the control server. gRPC control and admin API over TLS, storage, credentials.
//!
//! [`start`] runs a server inside the caller's runtime and returns a handle; the binary and the
//! in-process tests use the same entry point.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod admin;
pub mod apply;
pub mod auth;
pub mod backup;
pub mod clock;
pub mod control;
pub mod convert;
pub mod hub;
pub mod identity;
pub mod limits;
pub mod metrics;
pub mod registry;
pub mod relay;
pub mod state;
pub mod store;
pub mod stun;
pub mod tls;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tunnel_core::AdminToken;
use tunnel_proto::v1::admin_server::AdminServer;
use tunnel_proto::v1::control_server::ControlServer;

use crate::auth::{KdfParams, SecretHasher, Tickets};
use crate::identity::Identity;
use crate::registry::{AddressPool, Registry, ResourceRec};
use crate::state::{node_rec_from_row, now_ms, ServerFacts, Shared};
use crate::store::Store;

/// The server's version, sent in Welcome.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Default overlay: a /16 inside 100.64.0.0/10 that is not Tailscale's usual range start.
pub const DEFAULT_OVERLAY: &str = "100.96.0.0/16";

/// How long a released overlay address rests before it is handed out again.
pub const ADDRESS_QUARANTINE: Duration = Duration::from_secs(3600);

/// How long audit entries are kept by default.
pub const AUDIT_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);

/// The largest message the control service accepts from a node: a hello or an endpoint update with
/// the most candidates allowed, a health report for a large site. A stranger's message over it is
/// refused while it is being read, before any of it is parsed.
pub const CONTROL_MAX_INBOUND: usize = 1 << 20;

/// The largest message the server sends: a full map or a delta for the largest network. Maps for a node
/// that accepts less are split to fit what it said it accepts ([`hub`]).
pub const MAX_OUTBOUND: usize = 64 << 20;

/// The largest admin request (an `apply` of a whole config).
pub const ADMIN_MAX_INBOUND: usize = 8 << 20;

/// Everything [`start`] needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// `HOST` or `HOST:PORT` that tokens carry; defaults to the host name and the listen port.
    pub public_addr: Option<String>,
    pub database: Option<String>,
    pub dns_zone: String,
    pub overlay_cidr: Ipv4Net,
    pub metrics_listen: Option<SocketAddr>,
    pub kdf: KdfParams,
    pub address_quarantine: Duration,
    /// STUN responder (UDP).
    pub stun_listen: Option<SocketAddr>,
    /// The embedded relay's QUIC listener.
    pub relay_listen: Option<SocketAddr>,
    /// The embedded relay's TCP/TLS listener.
    pub relay_tcp_listen: Option<SocketAddr>,
    /// Relays running elsewhere (`tunnel-server relay`), announced after the embedded one.
    pub external_relays: Vec<ExternalRelay>,
    /// How long relay capabilities live.
    pub capability_ttl: Duration,
    /// Per-node limits of the embedded relay.
    pub relay_limits: relay::Limits,
    /// Login admission limits.
    pub login_limits: limits::LoginLimits,
    /// How long audit entries are kept (`None`: for ever).
    pub audit_retention: Option<Duration>,
    /// gRPC connections per source and in all.
    pub conn_limits: tls::ConnLimits,
}

/// A relay running apart from the server, as nodes should reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalRelay {
    /// `HOST:PORT` of its QUIC listener.
    pub udp: String,
    /// `HOST:PORT` of its TCP/TLS listener.
    pub tcp: Option<String>,
}

impl std::str::FromStr for ExternalRelay {
    type Err = String;
    /// `HOST:UDPPORT[,HOST:TCPPORT]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (udp, tcp) = match s.split_once(',') {
            Some((u, t)) => (u.trim(), Some(t.trim())),
            None => (s.trim(), None),
        };
        let ok = |a: &str| a.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !ok(udp) || tcp.is_some_and(|t| !ok(t)) {
            return Err(format!("'{s}' is not HOST:UDPPORT[,HOST:TCPPORT]"));
        }
        Ok(ExternalRelay { udp: udp.to_owned(), tcp: tcp.map(str::to_owned) })
    }
}

impl ServerConfig {
    /// Defaults for a server keeping its state in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            data_dir: data_dir.into(),
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 8443)),
            public_addr: None,
            database: None,
            dns_zone: tunnel_core::DEFAULT_DNS_ZONE.into(),
            overlay_cidr: DEFAULT_OVERLAY.parse().expect("valid default overlay"),
            metrics_listen: None,
            kdf: KdfParams::default(),
            address_quarantine: ADDRESS_QUARANTINE,
            stun_listen: None,
            relay_listen: None,
            relay_tcp_listen: None,
            external_relays: vec![],
            capability_ttl: Duration::from_secs(3600),
            relay_limits: relay::Limits::default(),
            login_limits: limits::LoginLimits::default(),
            audit_retention: Some(AUDIT_RETENTION),
            conn_limits: tls::ConnLimits::default(),
        }
    }
}

/// A running server.
#[derive(Debug)]
pub struct RunningServer {
    /// Where the gRPC listener is bound.
    pub addr: SocketAddr,
    /// Where /metrics is served, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// Where the STUN responder is bound.
    pub stun_addr: Option<SocketAddr>,
    /// The embedded relay, if enabled.
    pub relay: Option<relay::RunningRelay>,
    /// The admin token (also written to `DATA_DIR/admin.token`).
    pub admin_token: AdminToken,
    pub shared: Arc<Shared>,
    /// Held until the server is dropped: no second server, and no restore, on the same data dir.
    _lock: identity::DataDirLock,
    stop: Option<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
    serve: Option<JoinHandle<()>>,
}

impl RunningServer {
    /// Stops the server: ends every session (nodes will reconnect), stops listening, flushes state.
    pub async fn shutdown(mut self) {
        self.shared.model().hub.close_all();
        if let Some(r) = self.relay.take() {
            r.shutdown().await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(serve) = self.serve.take() {
            if tokio::time::timeout(Duration::from_secs(5), serve).await.is_err() {
                tracing::warn!("gRPC connections did not close in time");
            }
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
        flush_last_seen(&self.shared).await;
        self.shared.store.close().await;
    }

    /// Stops abruptly, like a crash: every control stream breaks, the port closes, nothing is flushed.
    pub fn kill(mut self) {
        self.shared.model().hub.close_all();
        if let Some(serve) = self.serve.take() {
            serve.abort();
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(serve) = self.serve.take() {
            serve.abort();
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

/// Opens the data dir and database, loads the model, and starts serving.
pub async fn start(cfg: ServerConfig) -> Result<RunningServer> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let lock = match identity::DataDirLock::acquire(&cfg.data_dir)? {
        Ok(lock) => lock,
        Err(holder) => bail!(
            "another tunnel-server ({}) is using the data dir {}: {} is locked",
            if holder.is_empty() { "or a restore" } else { holder.as_str() },
            cfg.data_dir.display(),
            identity::LOCK_FILE
        ),
    };
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {} (gRPC)", cfg.listen))?;
    let addr = listener.local_addr()?;
    let public_addr = public_addr(&cfg, addr)?;
    let cert_name =
        public_addr.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or("tunnel-server");
    let identity = Identity::load_or_create(&cfg.data_dir, cert_name)?;
    let store = Store::open(cfg.database.as_deref(), &cfg.data_dir).await?;
    let reg = load_registry(&store, &cfg).await?;
    let admin_token = identity.write_admin_token(&cfg.data_dir, &public_addr)?;
    let relay_keys = relay::RelayKeys::load_or_create(&cfg.data_dir)?;
    let public_host = public_addr.rsplit_once(':').map(|(h, _)| h.to_owned()).unwrap_or(public_addr.clone());
    let announce = |a: SocketAddr| format!("{public_host}:{}", a.port());
    let mut tasks = Vec::new();
    let stun_stats = Arc::new(stun::StunStats::default());
    let stun_addr = match cfg.stun_listen {
        Some(a) => {
            let (bound, task) = stun::start(a, stun_stats.clone())?;
            tasks.push(task);
            Some(bound)
        }
        None => None,
    };
    let relay_stats = Arc::new(relay::RelayStats::default());
    let relay = if cfg.relay_listen.is_some() || cfg.relay_tcp_listen.is_some() {
        let rcfg = relay::RelayConfig {
            udp: cfg.relay_listen,
            tcp: cfg.relay_tcp_listen,
            bundle: relay_keys.bundle.clone(),
            limits: cfg.relay_limits,
        };
        Some(relay::start(rcfg, relay_stats.clone()).await?)
    } else {
        None
    };
    let mut relays = Vec::new();
    if let Some(r) = &relay {
        relays.push(hub::RelayEndpoint {
            udp: r.udp_addr.map(announce),
            tcp: r.tcp_addr.map(announce),
            pin: relay_keys.pin,
        });
    }
    for e in &cfg.external_relays {
        relays.push(hub::RelayEndpoint { udp: Some(e.udp.clone()), tcp: e.tcp.clone(), pin: relay_keys.pin });
    }
    let services = Arc::new(hub::PathServices {
        stun_addr: stun_addr.map(announce),
        relays,
        signer: relay_keys.signer.clone(),
        ttl: cfg.capability_ttl,
    });
    let facts = ServerFacts { public_addr: public_addr.clone(), pin: identity.pin, version: VERSION.into() };
    let shared = Arc::new(Shared::new(
        facts,
        identity.admin_secret.clone(),
        store,
        reg,
        SecretHasher::new(cfg.kdf),
        Tickets::new(identity.ticket_key),
        cfg.login_limits,
    ));
    shared.model().hub.services = Some(services);

    let tls = tls::server_config(&identity)?;
    let incoming = ReceiverStream::new(tls::accept_loop(
        listener,
        tls,
        cfg.conn_limits,
        shared.gate.stats.conns_refused.clone(),
    ));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(15)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true)
        .add_service(
            ControlServer::new(control::ControlService { shared: shared.clone() })
                .max_decoding_message_size(CONTROL_MAX_INBOUND)
                .max_encoding_message_size(MAX_OUTBOUND),
        )
        .add_service(
            AdminServer::new(admin::AdminService { shared: shared.clone() })
                .max_decoding_message_size(ADMIN_MAX_INBOUND)
                .max_encoding_message_size(MAX_OUTBOUND),
        );
    let serve = tokio::spawn(async move {
        let stop = async {
            let _ = stop_rx.await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });

    let s = shared.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(hub::FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut guard = s.model();
            let m = &mut *guard;
            m.hub.flush(&m.reg);
        }
    }));
    let s = shared.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            flush_last_seen(&s).await;
        }
    }));
    if let Some(keep) = cfg.audit_retention {
        let s = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tick.tick().await;
                prune_audit(&s, keep).await;
            }
        }));
    }
    let metrics_addr = match cfg.metrics_listen {
        Some(a) => {
            let extra = metrics::Extra { stun: stun_stats.clone(), relay: relay_stats.clone() };
            let (bound, task) = metrics::serve(a, shared.clone(), extra).await?;
            tasks.push(task);
            Some(bound)
        }
        None => None,
    };
    tracing::info!(%addr, public = %public_addr, pin = %identity.pin, database = %shared.store.describe(), "tunnel-server started");
    Ok(RunningServer {
        addr,
        metrics_addr,
        stun_addr,
        relay,
        admin_token,
        shared,
        _lock: lock,
        stop: Some(stop_tx),
        tasks,
        serve: Some(serve),
    })
}

async fn flush_last_seen(shared: &Shared) {
    let batch: Vec<(String, i64)> = {
        let mut seen = shared.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.drain().map(|(id, ms)| (id.to_string(), ms)).collect()
    };
    if let Err(e) = shared.store.touch_last_seen(&batch).await {
        tracing::warn!(error = %e, "could not record last-seen times");
    }
}

/// Deletes audit entries older than `keep`; a failure is logged and retried at the next tick.
async fn prune_audit(shared: &Shared, keep: Duration) {
    let before = now_ms() - keep.as_millis().min(i64::MAX as u128) as i64;
    match shared.store.prune_audit(before).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(deleted = n, "audit entries past the retention deleted"),
        Err(e) => tracing::warn!(error = %e, "could not prune the audit log"),
    }
}

fn public_addr(cfg: &ServerConfig, bound: SocketAddr) -> Result<String> {
    let port = bound.port();
    let host_port = |h: &str| if h.contains(':') { format!("[{h}]:{port}") } else { format!("{h}:{port}") };
    Ok(match &cfg.public_addr {
        Some(p) if p.starts_with('[') && p.contains("]:") => p.clone(),
        Some(p) if p.starts_with('[') => format!("{p}:{port}"),
        Some(p) if p.matches(':').count() == 1 => {
            let (_, pp) = p.split_once(':').unwrap_or_default();
            if pp.parse::<u16>().is_err() {
                bail!("--public-addr '{p}' has an invalid port");
            }
            p.clone()
        }
        Some(p) => host_port(p),
        None => {
            let h =
                hostname::get().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into());
            host_port(&h)
        }
    })
}

async fn load_registry(store: &Store, cfg: &ServerConfig) -> Result<Registry> {
    let now = now_ms();
    let quarantine_ms = cfg.address_quarantine.as_millis() as i64;
    let snap = store.load(now - quarantine_ms).await?;
    match &snap.overlay_cidr {
        Some(c) if c != &cfg.overlay_cidr.to_string() => bail!(
            "this database was created with --overlay-cidr {c}; starting with {} would move every address. \
             Start with --overlay-cidr {c}",
            cfg.overlay_cidr
        ),
        Some(_) => {}
        None => store.set_meta("overlay_cidr", &cfg.overlay_cidr.to_string()).await?,
    }
    let mut reg = Registry::new(
        cfg.dns_zone.trim_end_matches('.').to_ascii_lowercase(),
        tunnel_core::DEFAULT_MTU,
        AddressPool::new(cfg.overlay_cidr, quarantine_ms),
    );
    for row in &snap.nodes {
        reg.insert_node(node_rec_from_row(row).map_err(anyhow::Error::msg)?);
    }
    for r in &snap.resources {
        let rec = ResourceRec {
            name: r.name.clone(),
            site: r
                .site_id
                .parse()
                .map_err(|_| anyhow::anyhow!("resource {} has a damaged site id", r.name))?,
            target: tunnel_core::Target::parse(&r.target)
                .map_err(|e| anyhow::anyhow!("resource {}: stored target: {e}", r.name))?,
            alias: r.alias.clone(),
            addr: r
                .overlay_addr
                .parse()
                .with_context(|| format!("resource {} has a damaged address", r.name))?,
            created_ms: r.created_ms,
            health_check: r.health_check.clone(),
        };
        reg.insert_resource(rec);
    }
    for g in &snap.grants {
        let cid = g.client_id.parse().map_err(|_| anyhow::anyhow!("grant has a damaged client id"))?;
        reg.insert_grant(&cid, &g.resource_name, g.created_ms);
    }
    for (addr, at) in &snap.released {
        if let Ok(a) = addr.parse() {
            reg.pool.release(a, *at);
        }
    }
    Ok(reg)
}
