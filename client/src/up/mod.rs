//! `tunnelctl up`: the machine client.
//!
//! `--userspace` (no root): the tunnel terminates in a userspace TCP/IP stack, reached through a local
//! SOCKS5 listener, with a local DNS listener for the private names.

pub mod dns;
pub mod dns_sources;
pub mod resolv;
pub mod socks;
pub mod tun;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::watch;
use tunnel_core::dns::PrivateZone;
use tunnel_core::map::NodeKind;
use tunnel_core::status::ClientInfo;
use tunnel_node::node::{self, NodeConfig, RunningNode};

/// Settings for `up`.
#[derive(Debug, Clone)]
pub struct UpConfig {
    pub token: tunnel_core::JoinToken,
    pub state_dir: PathBuf,
    pub metrics_listen: SocketAddr,
    pub userspace: bool,
    pub socks5: SocketAddr,
    pub dns_listen: SocketAddr,
    pub listen_port: u16,
    /// Keepalive interval.
    pub keepalive: std::time::Duration,
    /// Relay only.
    pub force_relay: bool,
    /// TUN mode: how to point the system resolver at the client.
    pub dns_mode: resolv::DnsMode,
    /// TUN mode: the device name.
    pub tun_name: String,
    /// TUN mode: the resolv.conf to edit in `resolv-conf` mode.
    pub resolv_conf: PathBuf,
    /// Userspace mode: the TCP stack's congestion control and buffer budgets.
    pub tcp: tunnel_core::netstack::StackOptions,
    /// The DNS listener's limits (TUN mode also answers only this host and its containers).
    pub dns: dns::DnsOptions,
}

/// A running client.
#[derive(Debug)]
pub struct Client {
    pub node: RunningNode,
    /// Userspace mode: the SOCKS5 listener.
    pub socks5: SocketAddr,
    pub dns: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    dns_applied: Option<resolv::Applied>,
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(a) = self.dns_applied.take() {
            match resolv::undo(&a) {
                Ok(()) => tracing::info!("system DNS configuration restored"),
                Err(e) => tracing::error!(error = %e, "could not restore the system DNS configuration"),
            }
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Writes a 0600 file.
pub fn write_private_file(path: &std::path::Path, contents: &[u8]) -> Result<()> {
    tunnel_node::state::write_private(path, contents)
}

fn node_config(cfg: &UpConfig) -> NodeConfig {
    NodeConfig {
        kind: NodeKind::Client,
        token: cfg.token.clone(),
        state_dir: cfg.state_dir.clone(),
        listen_port: cfg.listen_port,
        advertise: vec![],
        metrics_listen: Some(cfg.metrics_listen),
        version: env!("CARGO_PKG_VERSION").into(),
        keepalive: cfg.keepalive,
        force_relay: cfg.force_relay,
        tcp: cfg.tcp,
    }
}

/// Starts the client.
pub async fn start(cfg: UpConfig) -> Result<Client> {
    if !cfg.userspace {
        return start_tun(cfg).await;
    }
    let node = node::start(node_config(&cfg)).await?;
    let initial = node.maps.borrow().as_ref().map(|m| PrivateZone::from_map(m)).unwrap_or_default();
    let (zone_tx, zone_rx) = watch::channel(Arc::new(initial));
    let mut maps = node.maps.clone();
    let zone_task = tokio::spawn(async move {
        while maps.changed().await.is_ok() {
            if let Some(m) = maps.borrow_and_update().clone() {
                let _ = zone_tx.send(Arc::new(PrivateZone::from_map(&m)));
            }
        }
    });
    let upstreams = dns::nameservers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
    let (dns_addr, dns_task, dns_stats) =
        dns::serve(cfg.dns_listen, zone_rx.clone(), upstreams, cfg.dns.clone()).await?;
    node.status_extra.set_dns(move || dns_stats.snapshot());
    let (socks_addr, socks_task) =
        socks::serve(cfg.socks5, node.dataplane.clone(), node.maps.clone(), zone_rx).await?;
    node.status_extra
        .set_client(ClientInfo::Userspace { socks5: socks_addr.to_string(), dns: dns_addr.to_string() });
    Ok(Client {
        node,
        socks5: socks_addr,
        dns: dns_addr,
        tasks: vec![zone_task, dns_task, socks_task],
        dns_applied: None,
    })
}

async fn start_tun(cfg: UpConfig) -> Result<Client> {
    tun::may_create()?;
    let state = tunnel_node::StateDir::open(&cfg.state_dir)?;
    let backup = state.path().join("resolv.conf.orig");
    resolv::recover(&cfg.resolv_conf, &backup)?;
    // Upstreams are read before anything is changed, and never include our own listener. Under
    // systemd-resolved, /etc/resolv.conf names its stub (127.0.0.53), which routes our domains back to
    // us: ask the servers resolved itself uses instead.
    let uses_resolved = match cfg.dns_mode {
        resolv::DnsMode::Resolved => true,
        resolv::DnsMode::Auto => resolv::resolved_running(),
        _ => false,
    };
    let upstream_conf = if uses_resolved {
        PathBuf::from("/run/systemd/resolve/resolv.conf")
    } else {
        cfg.resolv_conf.clone()
    };
    let upstreams = dns::nameservers(&std::fs::read_to_string(&upstream_conf).unwrap_or_default());
    let (os, from_os_tx, to_os_rx) = tun::channels();
    let node = node::start_with(node_config(&cfg), Some(os)).await?;
    let mut maps = node.maps.clone();
    let map = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            if let Some(m) = maps.borrow_and_update().clone() {
                return Some(m);
            }
            if maps.changed().await.is_err() {
                return None;
            }
        }
    })
    .await
    .ok()
    .flatten()
    .ok_or_else(|| anyhow!("no network map: the server did not answer within 20 s and there is no cached map in the state dir"))?;
    let addr = tunnel_core::map::ipv4(map.overlay_addr)
        .ok_or_else(|| anyhow!("the map's overlay address {} is not IPv4", map.overlay_addr))?;
    let overlay = tunnel_core::map::ipv4_net(map.overlay_cidr)
        .ok_or_else(|| anyhow!("the map's overlay CIDR {} is not IPv4", map.overlay_cidr))?;
    tun::check_routes(overlay, &cfg.tun_name)?;
    let tun_task = tun::create(&cfg.tun_name, addr, overlay, map.mtu, from_os_tx, to_os_rx)?;
    let zone0 = Arc::new(PrivateZone::from_map(&map));
    let (zone_tx, zone_rx) = watch::channel(zone0.clone());
    let dns_listen = SocketAddr::from((addr, 53));
    let upstreams: Vec<SocketAddr> =
        upstreams.into_iter().filter(|u| u.ip() != std::net::IpAddr::V4(addr)).collect();
    // On the overlay address anyone who routes to it could ask: only this host and its containers.
    let dns_opts = dns::DnsOptions { local_only: true, ..cfg.dns.clone() };
    let (dns_addr, dns_task, dns_stats) = dns::serve(dns_listen, zone_rx, upstreams, dns_opts).await?;
    node.status_extra.set_dns(move || dns_stats.snapshot());
    let applied = resolv::apply(
        cfg.dns_mode,
        &cfg.tun_name,
        addr,
        &zone0.routing_domains(),
        &cfg.resolv_conf,
        &backup,
    )?;
    tracing::info!(device = %cfg.tun_name, %addr, dns = %dns_addr, mode = ?applied, "TUN up");
    node.status_extra.set_client(ClientInfo::Tun {
        device: cfg.tun_name.clone(),
        dns: dns_addr.to_string(),
        dns_mode: applied.mode_name().to_owned(),
    });
    let domains_applied = matches!(applied, resolv::Applied::Resolved { .. });
    let link = cfg.tun_name.clone();
    let zone_task = tokio::spawn(async move {
        let mut last = zone0.routing_domains();
        while maps.changed().await.is_ok() {
            if let Some(m) = maps.borrow_and_update().clone() {
                let z = Arc::new(PrivateZone::from_map(&m));
                let domains = z.routing_domains();
                if domains_applied && domains != last {
                    if let Err(e) =
                        resolv::update_domains(&resolv::Applied::Resolved { link: link.clone() }, &domains)
                    {
                        tracing::warn!(error = %e, "could not update resolved's routing domains");
                    }
                    last = domains;
                }
                let _ = zone_tx.send(z);
            }
        }
    });
    Ok(Client {
        node,
        socks5: SocketAddr::from(([0, 0, 0, 0], 0)),
        dns: dns_addr,
        tasks: vec![tun_task, dns_task, zone_task],
        dns_applied: Some(applied),
    })
}

/// `tunnelctl status`: asks the local `up` daemon (found through its state dir) for its status.
pub async fn status(state_dir: &std::path::Path) -> Result<tunnel_core::status::NodeStatus> {
    let state = tunnel_node::StateDir::open(state_dir)?;
    let addr = state.status_addr().ok_or_else(|| {
        anyhow!(
            "no running client found in {} (is `tunnelctl up` running with this --state-dir?)",
            state_dir.display()
        )
    })?;
    let body = http_get(addr, "/status").await.with_context(|| {
        format!("the client's status listener at {addr} does not answer; is `tunnelctl up` running?")
    })?;
    serde_json::from_str(&body).context("the status listener sent something that is not a status document")
}

/// A minimal HTTP/1.0 GET against a local status listener.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(std::time::Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
        .await??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_string(&mut out)).await??;
    let (head, body) = out.split_once("\r\n\r\n").ok_or_else(|| anyhow!("malformed HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{}", head.lines().next().unwrap_or("bad response"));
    }
    Ok(body.to_owned())
}
