//! The I/O the engine asks for ([`Effect`]), performed off the loop, and the sockets of a site's UDP
//! flows. The answers come back as inputs: a dial's result through the [`JoinSet`], a STUN server's
//! address and a UDP target's socket and replies through channels.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tunnel_core::engine::{Effect, FlowTuple};

use super::sockets::{dial, udp_dial, udp_flow_reader};
use super::{UdpEvent, DIAL_TIMEOUT};

/// A site's UDP flow on the shell's side: the task that opens the target's socket and reads its
/// replies, and the socket once open.
#[derive(Debug)]
struct UdpTarget {
    task: AbortHandle,
    sock: Option<Arc<UdpSocket>>,
}

impl Drop for UdpTarget {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The tasks the shell runs for the engine and where their answers go.
#[derive(Debug)]
pub(super) struct Tasks {
    /// Dials of TCP targets; aborted with the loop.
    pub(super) dials: JoinSet<(FlowTuple, Result<TcpStream, String>)>,
    stun_resolved: mpsc::Sender<(String, Option<SocketAddr>)>,
    udp_events: mpsc::Sender<UdpEvent>,
    udp_targets: HashMap<FlowTuple, UdpTarget>,
}

impl Tasks {
    pub(super) fn new(
        stun_resolved: mpsc::Sender<(String, Option<SocketAddr>)>,
        udp_events: mpsc::Sender<UdpEvent>,
    ) -> Tasks {
        Tasks { dials: JoinSet::new(), stun_resolved, udp_events, udp_targets: HashMap::new() }
    }

    /// Starts what `effect` asks for.
    pub(super) fn perform(&mut self, effect: Effect) {
        match effect {
            Effect::ResolveStun(name) => {
                // Off the loop: the server may announce a host name.
                let tx = self.stun_resolved.clone();
                tokio::spawn(async move {
                    let addr = match tokio::net::lookup_host(name.as_str()).await {
                        Ok(mut a) => a.find(SocketAddr::is_ipv4),
                        Err(_) => None,
                    };
                    let _ = tx.send((name, addr)).await;
                });
            }
            Effect::DialTcp { flow, target } => {
                self.dials.spawn(async move { (flow, dial(&target).await) });
            }
            Effect::OpenUdp { flow, target } => {
                let events = self.udp_events.clone();
                let task = tokio::spawn(async move {
                    match tokio::time::timeout(DIAL_TIMEOUT, udp_dial(&target)).await {
                        Ok(Ok(sock)) => {
                            let sock = Arc::new(sock);
                            if events.send(UdpEvent::Ready(flow, sock.clone())).await.is_ok() {
                                udp_flow_reader(sock, flow, events).await;
                            }
                        }
                        Ok(Err(e)) => tracing::debug!(%target, error = %e, "UDP target unreachable"),
                        Err(_) => tracing::debug!(%target, "UDP target did not resolve in time"),
                    }
                });
                self.udp_targets.insert(flow, UdpTarget { task: task.abort_handle(), sock: None });
            }
            Effect::CloseUdp { flow } => self.close_udp(&flow),
        }
    }

    /// Ends a UDP flow's target: its socket closes and its reader task is aborted (the entry's drop).
    pub(super) fn close_udp(&mut self, flow: &FlowTuple) {
        self.udp_targets.remove(flow);
    }

    /// A UDP flow's socket is open; false if the flow ended meanwhile (the socket is dropped).
    pub(super) fn udp_ready(&mut self, flow: FlowTuple, sock: Arc<UdpSocket>) -> bool {
        match self.udp_targets.get_mut(&flow) {
            Some(t) => {
                t.sock = Some(sock);
                true
            }
            None => false,
        }
    }

    /// A datagram for a UDP flow's target. A full socket buffer drops it, as a congested link would.
    pub(super) fn send_to_target(&self, flow: &FlowTuple, payload: &[u8]) {
        if let Some(sock) = self.udp_targets.get(flow).and_then(|t| t.sock.as_ref()) {
            let _ = sock.try_send(payload);
        }
    }
}
