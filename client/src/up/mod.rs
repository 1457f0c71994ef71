//! `tunnelctl up`: the machine client.
//!
//! `--userspace` (no root): the tunnel terminates in a userspace TCP/IP stack, reached through a local
//! SOCKS5 listener, with a local DNS listener for the private names.

pub mod dns;
pub mod socks;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::watch;
use tunnel_core::dns::PrivateZone;
use tunnel_core::map::NodeKind;
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
}

/// A running client.
#[derive(Debug)]
pub struct Client {
    pub node: RunningNode,
    pub socks5: SocketAddr,
    pub dns: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Client {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts the client.
pub async fn start(cfg: UpConfig) -> Result<Client> {
    if !cfg.userspace {
        bail!("TUN mode is not available in this build yet; run `tunnelctl up --userspace` (SOCKS5 and DNS on loopback, no root)");
    }
    let node = node::start(NodeConfig {
        kind: NodeKind::Client,
        token: cfg.token,
        state_dir: cfg.state_dir,
        listen_port: cfg.listen_port,
        advertise: vec![],
        metrics_listen: Some(cfg.metrics_listen),
        version: env!("CARGO_PKG_VERSION").into(),
    })
    .await?;
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
    let (dns_addr, dns_task) = dns::serve(cfg.dns_listen, zone_rx.clone(), upstreams).await?;
    let (socks_addr, socks_task) =
        socks::serve(cfg.socks5, node.dataplane.clone(), node.maps.clone(), zone_rx).await?;
    Ok(Client { node, socks5: socks_addr, dns: dns_addr, tasks: vec![zone_task, dns_task, socks_task] })
}

/// `tunnelctl status`: asks the local `up` daemon (found through its state dir) for its status.
pub async fn status(state_dir: &std::path::Path) -> Result<serde_json::Value> {
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
    serde_json::from_str(&body).context("the status listener sent something that is not JSON")
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
