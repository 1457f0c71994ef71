//! What the loop's handlers decide to have done outside the loop, as data.
//!
//! A handler never spawns: it pushes an [`Effect`], and the loop performs its queue once per
//! wake-up, after the pump. The answers come back as inputs: a dial's result through the loop's
//! [`JoinSet`] (`dialed`), a STUN server's address through a channel (`stun_resolved`), a UDP
//! target's socket and replies through another (`udp_event`). This is the first step of the engine
//! split (docs/plans/engine-split.md, step 2): the decisions can be tested by reading the queue,
//! and the I/O they ask for lives in one place.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

use super::sockets::{bridge_stream, dial, udp_dial, udp_flow_reader};
use super::{FlowEnds, Tuple, UdpEvent, DIAL_TIMEOUT};

/// Something for the shell to do.
#[derive(Debug)]
pub(super) enum Effect {
    /// Resolve the STUN server the map names (`HOST:PORT`); the answer comes to `stun_resolved`.
    ResolveStun(String),
    /// Dial a site's TCP target for a SYN held in `pending_syn`; the result comes to `dialed`.
    DialTcp { tuple: Tuple, target: String },
    /// Open a site's UDP flow to its target and read the target's replies (`udp_event`).
    OpenUdp { tuple: Tuple, target: String },
    /// Move bytes between an accepted flow's target connection and its stack socket.
    Bridge(TcpStream, FlowEnds),
}

/// The shell's side of the effects: the tasks it runs for the loop and where their answers go.
pub(super) struct Tasks {
    /// Dials of TCP targets; aborted with the loop.
    pub(super) dials: JoinSet<(Tuple, Result<TcpStream, String>)>,
    pub(super) stun_resolved: mpsc::Sender<(String, Option<SocketAddr>)>,
    pub(super) udp_events: mpsc::Sender<UdpEvent>,
}

impl Tasks {
    /// Starts what `effect` asks for. For a UDP flow, returns the handle that ends its task.
    pub(super) fn perform(&mut self, effect: Effect) -> Option<(Tuple, AbortHandle)> {
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
                None
            }
            Effect::DialTcp { tuple, target } => {
                self.dials.spawn(async move { (tuple, dial(&target).await) });
                None
            }
            Effect::OpenUdp { tuple, target } => {
                let events = self.udp_events.clone();
                let task = tokio::spawn(async move {
                    match tokio::time::timeout(DIAL_TIMEOUT, udp_dial(&target)).await {
                        Ok(Ok(sock)) => {
                            let sock = Arc::new(sock);
                            if events.send(UdpEvent::Ready(tuple, sock.clone())).await.is_ok() {
                                udp_flow_reader(sock, tuple, events).await;
                            }
                        }
                        Ok(Err(e)) => tracing::debug!(%target, error = %e, "UDP target unreachable"),
                        Err(_) => tracing::debug!(%target, "UDP target did not resolve in time"),
                    }
                });
                Some((tuple, task.abort_handle()))
            }
            Effect::Bridge(stream, ends) => {
                // It ends by itself when either side closes.
                tokio::spawn(bridge_stream(stream, ends));
                None
            }
        }
    }
}
