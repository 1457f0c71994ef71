//! Sending on the node's UDP socket: datagrams queued in order and sent in GSO batches (runs of
//! equal-size datagrams to one destination go out as one send, which the kernel cuts).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;

/// Datagrams queued before a send.
const BATCH: usize = 64;

/// The sending side of the node's UDP socket.
#[derive(Debug)]
pub(super) struct UdpOut {
    pub(super) udp: Arc<UdpSocket>,
    /// Batched, offloaded UDP I/O on `udp` (sendmsg with GSO where the kernel has it).
    udp_state: Arc<quinn_udp::UdpSocketState>,
    /// Datagrams waiting to be sent, in order.
    out_batch: Vec<(SocketAddr, Vec<u8>)>,
    gso_buf: Vec<u8>,
}

impl UdpOut {
    pub(super) fn new(udp: Arc<UdpSocket>, udp_state: Arc<quinn_udp::UdpSocketState>) -> UdpOut {
        UdpOut {
            udp,
            udp_state,
            out_batch: Vec::with_capacity(BATCH),
            gso_buf: Vec::with_capacity(64 * 1024),
        }
    }

    /// Queues a datagram; a full batch is sent at once.
    pub(super) async fn push(&mut self, dst: SocketAddr, payload: Vec<u8>) {
        self.out_batch.push((dst, payload));
        if self.out_batch.len() >= BATCH {
            self.flush().await;
        }
    }

    /// Sends the queued WireGuard datagrams: runs of equal-size datagrams to one destination go out as
    /// one GSO send (the kernel cuts them), the rest one by one.
    pub(super) async fn flush(&mut self) {
        let batch = std::mem::take(&mut self.out_batch);
        let max_segments = self.udp_state.max_gso_segments().clamp(1, 64);
        let mut i = 0;
        while i < batch.len() {
            let (dst, first) = (&batch[i].0, &batch[i].1);
            let size = first.len();
            let mut j = i + 1;
            // Equal sizes; the last of a run may be shorter. At most 64 KiB per send.
            while j < batch.len()
                && j - i < max_segments
                && batch[j].0 == *dst
                && batch[j - 1].1.len() == size
                && batch[j].1.len() <= size
                && (j - i + 1) * size <= 65_000
            {
                j += 1;
            }
            if j - i == 1 {
                self.send_udp(first, *dst).await;
            } else {
                self.gso_buf.clear();
                for (_, p) in &batch[i..j] {
                    self.gso_buf.extend_from_slice(p);
                }
                let t = quinn_udp::Transmit {
                    destination: *dst,
                    ecn: None,
                    contents: &self.gso_buf,
                    segment_size: Some(size),
                    src_ip: None,
                };
                loop {
                    let r = self.udp.try_io(tokio::io::Interest::WRITABLE, || {
                        self.udp_state.try_send((&*self.udp).into(), &t)
                    });
                    match r {
                        Ok(()) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if self.udp.writable().await.is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::debug!(dst = %dst, error = %e, "GSO send failed");
                            break;
                        }
                    }
                }
            }
            i = j;
        }
        let mut batch = batch;
        batch.clear();
        self.out_batch = batch;
    }

    async fn send_udp(&self, payload: &[u8], dst: SocketAddr) {
        match self.udp.try_send_to(payload, dst) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let _ = self.udp.send_to(payload, dst).await;
            }
            Err(e) => tracing::debug!(%dst, error = %e, "send failed"),
        }
    }
}
