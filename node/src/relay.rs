//! The node's link to a relay: one QUIC connection (or, where UDP is blocked, TLS over TCP) to the first
//! relay of the map that answers, registered with the capability the control server signed.
//!
//! The data plane hands it WireGuard packets addressed to a peer and gets back packets from peers; it
//! never sees the transport. [`RelayLink::up`] says whether the relay can carry traffic now (connected
//! and registered); the path logic falls back to it only then. A new capability in the map (grants
//! changed, or the old one is half way to expiry) is presented on the live connection without
//! reconnecting; a connection that is up stays up when the control server is away.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tunnel_core::PublicKey;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tunnel_core::map::RelayInfo;
use tunnel_core::relay::{self as wire, Frame};
use tunnel_core::KeyPin;

use tunnel_core::relay::ALPN;
/// How long a QUIC attempt may take before TCP is tried.
const QUIC_TIMEOUT: Duration = Duration::from_secs(3);
/// Packets queued towards the relay.
const OUT_QUEUE: usize = 2048;

/// The relay link's state, as `/status` shows it.
pub use tunnel_core::status::RelayStatus as RelayState;

/// The data plane's side of the link.
#[derive(Debug)]
pub struct RelayLink {
    /// Packets for the relay, in [`wire::encode_packet`] form (destination key first).
    pub out: mpsc::Sender<Vec<u8>>,
    /// Packets from peers: (sender's key, WireGuard packet).
    pub inbound: mpsc::Receiver<(PublicKey, Vec<u8>)>,
    /// State changes.
    pub state: watch::Receiver<RelayState>,
    /// The relays (and capabilities) to use; the data plane updates it with each map.
    pub relays: watch::Sender<Vec<RelayInfo>>,
}

/// Starts the link task; it follows `relays` until aborted.
pub fn start() -> (RelayLink, tokio::task::JoinHandle<()>) {
    let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
    let (in_tx, in_rx) = mpsc::channel(OUT_QUEUE);
    let (state_tx, state_rx) = watch::channel(RelayState::default());
    let (relays_tx, relays_rx) = watch::channel(Vec::new());
    let task = tokio::spawn(run(relays_rx, out_rx, in_tx, state_tx));
    (RelayLink { out: out_tx, inbound: in_rx, state: state_rx, relays: relays_tx }, task)
}

async fn run(
    mut relays: watch::Receiver<Vec<RelayInfo>>,
    mut out: mpsc::Receiver<Vec<u8>>,
    inbound: mpsc::Sender<(PublicKey, Vec<u8>)>,
    state: watch::Sender<RelayState>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let list = relays.borrow_and_update().clone();
        if list.is_empty() {
            state.send_replace(RelayState::default());
            if relays.changed().await.is_err() {
                return;
            }
            continue;
        }
        let mut last_error = None;
        for r in &list {
            let Some(pin) = pin_of(r) else { continue };
            if !r.addr.is_empty() {
                match tokio::time::timeout(QUIC_TIMEOUT, quic_connect(&r.addr, pin, &r.capability)).await {
                    Ok(Ok(conn)) => {
                        backoff = Duration::from_millis(500);
                        state.send_replace(RelayState {
                            relay: Some(r.addr.clone()),
                            transport: Some("quic".into()),
                            up: true,
                            last_error: None,
                        });
                        tracing::info!(relay = %r.addr, transport = "quic", "relay connected");
                        let why = quic_session(conn, &mut relays, &mut out, &inbound).await;
                        tracing::info!(relay = %r.addr, reason = %why, "relay connection ended");
                        last_error = Some(why);
                        break;
                    }
                    Ok(Err(e)) => last_error = Some(format!("{}: {e}", r.addr)),
                    Err(_) => last_error = Some(format!("{}: no answer over QUIC (UDP blocked?)", r.addr)),
                }
            }
            if let Some(tcp) = r.tcp_addr.as_deref().filter(|a| !a.is_empty()) {
                match tokio::time::timeout(Duration::from_secs(10), tcp_connect(tcp, pin, &r.capability))
                    .await
                {
                    Ok(Ok(stream)) => {
                        backoff = Duration::from_millis(500);
                        state.send_replace(RelayState {
                            relay: Some(tcp.to_owned()),
                            transport: Some("tcp".into()),
                            up: true,
                            last_error: None,
                        });
                        tracing::info!(relay = %tcp, transport = "tcp", "relay connected");
                        let why = tcp_session(stream, &mut relays, &mut out, &inbound).await;
                        tracing::info!(relay = %tcp, reason = %why, "relay connection ended");
                        last_error = Some(why);
                        break;
                    }
                    Ok(Err(e)) => last_error = Some(format!("{tcp}: {e}")),
                    Err(_) => last_error = Some(format!("{tcp}: timed out")),
                }
            }
        }
        if let Some(e) = &last_error {
            tracing::debug!(error = %e, "relay unavailable");
        }
        state.send_replace(RelayState { relay: None, transport: None, up: false, last_error });
        // Packets queued while down are stale: drop them rather than burst them later.
        while out.try_recv().is_ok() {}
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            r = relays.changed() => if r.is_err() { return },
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

fn pin_of(r: &RelayInfo) -> Option<KeyPin> {
    let b: [u8; 32] = r.key_pin.as_slice().try_into().ok()?;
    Some(KeyPin(b))
}

async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    let all: Vec<SocketAddr> =
        tokio::net::lookup_host(addr).await.map_err(|e| format!("cannot resolve {addr}: {e}"))?.collect();
    all.iter().find(|a| a.is_ipv4()).or(all.first()).copied().ok_or_else(|| format!("{addr} has no address"))
}

fn host_of(addr: &str) -> String {
    addr.rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
        .unwrap_or_else(|| addr.to_owned())
}

async fn quic_connect(addr: &str, pin: KeyPin, cap: &[u8]) -> Result<quinn::Connection, String> {
    let remote = resolve(addr).await?;
    let tls = crate::tls::pinned_client_config(pin, ALPN)?;
    let qtls = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(qtls));
    cfg.transport_config(Arc::new(tunnel_core::relay_window::transport_config()));
    let bind: SocketAddr =
        if remote.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    // Large socket buffers: quinn sends a fixed window's datagrams in bursts of up to 256, and with
    // the default 208 KiB receive buffer 4% of a clean relayed download was dropped by this host's
    // own kernel (UdpRcvbufErrors in `bench/throughput.sh`, MODES=relay).
    let sock = crate::udp::bind_udp_std(bind).map_err(|e| format!("relay socket: {e}"))?;
    let runtime = quinn::default_runtime().ok_or("relay: no async runtime")?;
    let mut endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, sock, runtime)
        .map_err(|e| format!("relay socket: {e}"))?;
    endpoint.set_default_client_config(cfg);
    let conn = endpoint
        .connect(remote, &host_of(addr))
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("QUIC: {e}"))?;
    quic_register(&conn, cap).await?;
    Ok(conn)
}

async fn quic_register(conn: &quinn::Connection, cap: &[u8]) -> Result<(), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let mut hello = tunnel_core::relay::encode_len(cap.len());
    hello.extend_from_slice(cap);
    send.write_all(&hello).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    let reply = recv.read_to_end(1024).await.map_err(|e| e.to_string())?;
    match reply.split_first() {
        Some((0, _)) => Ok(()),
        Some((_, why)) => Err(format!("relay refused: {}", String::from_utf8_lossy(why))),
        None => Err("relay closed the registration".into()),
    }
}

async fn quic_session(
    conn: quinn::Connection,
    relays: &mut watch::Receiver<Vec<RelayInfo>>,
    out: &mut mpsc::Receiver<Vec<u8>>,
    inbound: &mpsc::Sender<(PublicKey, Vec<u8>)>,
) -> String {
    loop {
        tokio::select! {
            p = out.recv() => {
                let Some(p) = p else { return "stopping".into() };
                match conn.send_datagram(Bytes::from(p)) {
                    Ok(()) => {}
                    Err(quinn::SendDatagramError::ConnectionLost(e)) => return e.to_string(),
                    Err(e) => tracing::trace!(error = %e, "relay datagram not sent"),
                }
            }
            d = conn.read_datagram() => match d {
                Ok(d) => {
                    if let Some((from, wg)) = wire::parse_packet(&d) {
                        let _ = inbound.try_send((from, wg.to_vec()));
                    }
                }
                Err(e) => return e.to_string(),
            },
            r = relays.changed() => {
                if r.is_err() { return "stopping".into(); }
                let list = relays.borrow_and_update().clone();
                let addr = conn.remote_address();
                // Same relay still listed: present the new capability on this connection.
                match list.first() {
                    Some(r) if !r.addr.is_empty() && resolve(&r.addr).await.ok() == Some(addr) => {
                        if let Err(e) = quic_register(&conn, &r.capability).await {
                            tracing::warn!(error = %e, "relay did not accept the renewed capability");
                        }
                    }
                    _ => return "relay list changed".into(),
                }
            }
        }
    }
}

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn tcp_connect(addr: &str, pin: KeyPin, cap: &[u8]) -> Result<TlsStream, String> {
    let remote = resolve(addr).await?;
    let tls = crate::tls::pinned_client_config(pin, ALPN)?;
    let tcp = tokio::net::TcpStream::connect(remote).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(host_of(addr)).map_err(|e| e.to_string())?;
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    stream.write_all(&Frame::Hello(cap.to_vec()).encode()).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("relay closed the connection".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        match Frame::decode(&mut buf)? {
            Some(Frame::Reply(Ok(()))) => break,
            Some(Frame::Reply(Err(why))) => return Err(format!("relay refused: {why}")),
            Some(_) => return Err("unexpected frame from the relay".into()),
            None => {}
        }
    }
    Ok(stream)
}

async fn tcp_session(
    stream: TlsStream,
    relays: &mut watch::Receiver<Vec<RelayInfo>>,
    out: &mut mpsc::Receiver<Vec<u8>>,
    inbound: &mpsc::Sender<(PublicKey, Vec<u8>)>,
) -> String {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut batch = Vec::with_capacity(64 * 1024);
    loop {
        tokio::select! {
            p = out.recv() => {
                let Some(p) = p else { return "stopping".into() };
                batch.clear();
                batch.extend_from_slice(&Frame::Packet(p).encode());
                while batch.len() < 60 * 1024 {
                    match out.try_recv() {
                        Ok(p) => batch.extend_from_slice(&Frame::Packet(p).encode()),
                        Err(_) => break,
                    }
                }
                if let Err(e) = wr.write_all(&batch).await { return e.to_string(); }
                if let Err(e) = wr.flush().await { return e.to_string(); }
            }
            n = rd.read(&mut chunk) => {
                let n = match n { Ok(0) => return "relay closed the connection".into(), Ok(n) => n, Err(e) => return e.to_string() };
                buf.extend_from_slice(&chunk[..n]);
                loop {
                    match Frame::decode(&mut buf) {
                        Ok(Some(Frame::Packet(p))) => {
                            if let Some((from, wg)) = wire::parse_packet(&p) {
                                let _ = inbound.try_send((from, wg.to_vec()));
                            }
                        }
                        Ok(Some(Frame::Reply(Err(why)))) => tracing::warn!(reason = %why, "relay refused a capability"),
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => return e,
                    }
                }
            }
            r = relays.changed() => {
                if r.is_err() { return "stopping".into(); }
                let list = relays.borrow_and_update().clone();
                match list.first() {
                    Some(r) => {
                        if let Err(e) = wr.write_all(&Frame::Hello(r.capability.clone()).encode()).await { return e.to_string(); }
                    }
                    None => return "relay list changed".into(),
                }
            }
        }
    }
}
