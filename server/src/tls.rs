//! TLS for the gRPC listener: rustls with the server's own key, HTTP/2 by ALPN, and a connection type
//! that tells tonic the peer's address (for rate limits and the audit log).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::{Connected, TcpConnectInfo};

use std::sync::atomic::{AtomicU64, Ordering};

use crate::identity::Identity;
use crate::limits::{source_key, InFlight, InFlightGuard};

/// The rustls configuration for the gRPC listener: TLS 1.3 only, HTTP/2 only.
pub fn server_config(id: &Identity) -> Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 is not available")?
        .with_no_client_auth()
        .with_single_cert(vec![id.cert_der.clone()], id.key_der())
        .context("the TLS key does not fit the certificate")?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A TLS connection from a node or tunnelctl.
#[derive(Debug)]
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
    /// Its place in the connection caps, given back when tonic drops the connection.
    _slot: InFlightGuard,
}

/// Connections (TLS handshakes included) one source may hold, and all of them together. A node holds
/// one; an idle HTTP/2 connection answers keep-alives by itself, so without a cap a stranger could hold
/// any number. 1,024 per source leaves room for a large office or cluster behind one address.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub per_source: usize,
    pub total: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits { per_source: 1024, total: 50_000 }
    }
}

impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        TcpConnectInfo { local_addr: self.local, remote_addr: self.remote }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently (a slow or silent peer cannot hold
/// up others), handing finished connections to tonic through the returned channel.
pub fn accept_loop(
    listener: TcpListener,
    cfg: rustls::ServerConfig,
    limits: ConnLimits,
    refused: Arc<AtomicU64>,
) -> mpsc::Receiver<io::Result<TlsConn>> {
    let acceptor = TlsAcceptor::from(Arc::new(cfg));
    let conns = InFlight::new(limits.per_source, limits.total);
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            // Stop (and free the port) as soon as the server is gone, not at the next connection.
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => break,
            };
            let (tcp, remote) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(slot) = conns.enter(source_key(remote.ip())) else {
                refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%remote, "gRPC connection refused: too many from this source or in all");
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let local = tcp.local_addr().ok();
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(inner)) => {
                        let conn = TlsConn { inner, local, remote: Some(remote), _slot: slot };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}
