//! The node's UDP sockets (the WireGuard socket and the relay's QUIC socket), bound with buffers
//! large enough for a full TCP window's bursts. Shared by the data plane and the relay link, and
//! importing neither.

use std::net::SocketAddr;

use tokio::net::UdpSocket;

/// Binds the node's one UDP socket (WireGuard, STUN, probes).
pub fn bind_socket(listen: SocketAddr) -> anyhow::Result<UdpSocket> {
    bind_udp(listen).map_err(|e| anyhow::anyhow!("cannot bind the WireGuard UDP socket on {listen}: {e}"))
}

/// Socket buffers asked for the WireGuard and relay sockets: bursts of a full TCP window must not
/// overflow the kernel's default (about 200 KiB). The kernel grants at most `net.core.rmem_max`.
const UDP_BUFFER: usize = 8 * 1024 * 1024;

fn bind_udp(listen: SocketAddr) -> std::io::Result<UdpSocket> {
    UdpSocket::from_std(bind_udp_std(listen)?)
}

/// A non-blocking UDP socket with `UDP_BUFFER`-sized buffers (the kernel caps them at
/// `net.core.rmem_max` / `wmem_max`): the WireGuard socket, and the relay's QUIC socket, whose
/// bursts overflowed the default 208 KiB receive buffer.
pub fn bind_udp_std(listen: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let domain = if listen.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(UDP_BUFFER);
    let _ = s.set_send_buffer_size(UDP_BUFFER);
    // Linux reports twice what it granted; a host with the default 208 KiB cap drops bursts. Said
    // once per process (the relay socket is bound again on every reconnect).
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let got = s.recv_buffer_size().unwrap_or(UDP_BUFFER);
    if got < UDP_BUFFER && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            granted = got,
            wanted = UDP_BUFFER,
            "UDP receive buffer capped by the host: raise net.core.rmem_max and net.core.wmem_max to 8388608 \
             on the host (not settable from a container) or fast transfers lose packets here"
        );
    }
    s.set_nonblocking(true)?;
    s.bind(&listen.into())?;
    Ok(s.into())
}
