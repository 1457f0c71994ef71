//! The STUN responder (`--stun-listen`): answers Binding requests with the address it saw, so nodes learn
//! their public (reflexive) endpoint over the very socket that carries their WireGuard traffic, and so
//! standard STUN tools can check a network's NAT.
//!
//! It never sends more bytes than it received ([`tunnel_core::stun::answer`]) and answers each source
//! address at most [`PER_SOURCE_PER_SEC`] times a second, so it cannot be turned into a reflector.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use tokio::task::JoinHandle;

/// Answers per source address per second.
pub const PER_SOURCE_PER_SEC: u32 = 20;
/// Sources tracked at once; the table is cleared when full (a flood of sources costs no memory).
const MAX_SOURCES: usize = 65_536;

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct StunStats {
    pub answered: AtomicU64,
    pub rate_limited: AtomicU64,
    pub ignored: AtomicU64,
}

impl StunStats {
    /// Prometheus text.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP tunnel_stun_requests_total STUN datagrams received, by outcome.\n# TYPE tunnel_stun_requests_total counter"
        );
        for (outcome, a) in
            [("answered", &self.answered), ("rate_limited", &self.rate_limited), ("ignored", &self.ignored)]
        {
            let _ = writeln!(
                out,
                "tunnel_stun_requests_total{{outcome=\"{outcome}\"}} {}",
                a.load(Ordering::Relaxed)
            );
        }
    }
}

/// A UDP socket with large buffers (STUN and the QUIC relay).
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Binds `addr` and answers until the task is aborted.
pub fn start(addr: SocketAddr, stats: Arc<StunStats>) -> Result<(SocketAddr, JoinHandle<()>)> {
    let std_sock = bind_udp(addr).with_context(|| format!("cannot listen on {addr} (STUN)"))?;
    let sock = tokio::net::UdpSocket::from_std(std_sock)?;
    let bound = sock.local_addr()?;
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        let mut seen: HashMap<IpAddr, (Instant, u32)> = HashMap::new();
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else { continue };
            let Some(reply) = tunnel_core::stun::answer(&buf[..n], from) else {
                stats.ignored.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let now = Instant::now();
            if seen.len() >= MAX_SOURCES {
                seen.clear();
            }
            // IPv6 counts by /64, as every per-source limit does.
            let e = seen.entry(crate::limits::source_key(from.ip())).or_insert((now, 0));
            if now.duration_since(e.0).as_secs() >= 1 {
                *e = (now, 0);
            }
            e.1 += 1;
            if e.1 > PER_SOURCE_PER_SEC {
                stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if sock.send_to(&reply, from).await.is_ok() {
                stats.answered.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    tracing::info!(%bound, "STUN responder listening");
    Ok((bound, task))
}
