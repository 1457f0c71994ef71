//! The TCP flows of the userspace stack: their lifecycle here, their bytes through the shell's
//! [`FlowPort`].

use crate::PublicKey;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use smoltcp::socket::tcp::State as TcpState;

use super::FlowId;
use crate::netstack::NetStack;

/// Chunk size when draining a socket's receive buffer.
const CHUNK: usize = 16 * 1024;
/// A site's listening socket that has not taken its SYN by then is dropped.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
/// A site's flow still in SYN-RECEIVED by then (the client never acknowledged the SYN-ACK) is reset
/// and frees its target connection and buffers. Without it smoltcp keeps retrying for its 120 s
/// timeout.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client's connection still in SYN-SENT by then is given up: the site may take up to its 10 s
/// dial timeout before it answers.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// What the application has for a flow.
#[derive(Debug)]
pub enum Outgoing<'a> {
    /// Bytes to send; [`FlowPort::consumed`] says how many the stack took.
    Data(&'a [u8]),
    /// Nothing now.
    Idle,
    /// The application closed its sending side (the stack sends FIN).
    Closed,
}

/// The application ends of the stack's flows, kept by the shell (its channels to the target
/// connections and SOCKS clients). Generic, so the calls inline.
pub trait FlowPort {
    /// Whether the application can take another chunk now (its queue has room).
    fn has_room(&mut self, id: FlowId) -> bool;
    /// Bytes from the tunnel for the application, at most 16 KiB at a time.
    fn deliver(&mut self, id: FlowId, chunk: &[u8]);
    /// The remote side closed: end of stream for the application.
    fn end_of_stream(&mut self, id: FlowId);
    /// What the application has to send.
    fn outgoing(&mut self, id: FlowId) -> Outgoing<'_>;
    /// The stack took `n` bytes of what [`FlowPort::outgoing`] gave.
    fn consumed(&mut self, id: FlowId, n: usize);
    /// A client's connect finished: established, or why not.
    fn connected(&mut self, id: FlowId, result: Result<(), String>);
    /// The flow is gone: drop its ends.
    fn closed(&mut self, id: FlowId);
}

/// A flow's protocol state.
#[derive(Debug)]
pub(super) struct FlowState {
    /// Site flows: the peer whose grant it rides on.
    pub(super) peer: Option<PublicKey>,
    /// Site flows: the socket has left Listen (accepted its SYN).
    accepted: bool,
    created: Instant,
    /// A client's connect not answered yet.
    connecting: bool,
    /// The application's receiving side is open (no end of stream given yet).
    to_app_open: bool,
    /// The application closed its sending side.
    app_done: bool,
}

impl FlowState {
    /// A site's flow for `peer`, listening for its SYN.
    pub(super) fn site(peer: PublicKey, now: Instant) -> FlowState {
        FlowState {
            peer: Some(peer),
            accepted: false,
            created: now,
            connecting: false,
            to_app_open: true,
            app_done: false,
        }
    }

    /// A client's flow, connecting.
    pub(super) fn client(now: Instant) -> FlowState {
        FlowState {
            peer: None,
            accepted: false,
            created: now,
            connecting: true,
            to_app_open: true,
            app_done: false,
        }
    }
}

/// Moves data between sockets and the application's ends; drops finished flows. Returns whether
/// anything moved.
pub(super) fn service(
    stack: &mut NetStack,
    flows: &mut BTreeMap<FlowId, FlowState>,
    port: &mut impl FlowPort,
    now: Instant,
) -> bool {
    let mut moved = false;
    let mut done = Vec::new();
    for (h, f) in flows.iter_mut() {
        let h = *h;
        let s = stack.socket(h);
        if f.peer.is_some() {
            // A site socket listens for exactly one connection. Back in Listen after a reset, or never
            // taken, it must not wait for (and hand the target to) somebody else's SYN.
            if s.state() != TcpState::Listen {
                f.accepted = true;
            } else if f.accepted || now.saturating_duration_since(f.created) > LISTEN_TIMEOUT {
                s.abort();
                done.push(h);
                continue;
            }
        }
        // Half-open: the other end never completed the handshake.
        let half_open = match s.state() {
            TcpState::SynReceived => now.saturating_duration_since(f.created) > HANDSHAKE_TIMEOUT,
            TcpState::SynSent => now.saturating_duration_since(f.created) > CONNECT_TIMEOUT,
            _ => false,
        };
        if half_open {
            if f.connecting {
                f.connecting = false;
                port.connected(h, Err("the resource did not answer the connection (timed out)".into()));
            }
            // Removed on the next pass, after the stack has sent the reset.
            s.abort();
            moved = true;
            continue;
        }
        if f.connecting {
            match s.state() {
                TcpState::Established => {
                    f.connecting = false;
                    port.connected(h, Ok(()));
                }
                TcpState::Closed | TcpState::TimeWait => {
                    f.connecting = false;
                    port.connected(h, Err("connection refused by the resource".into()));
                    done.push(h);
                    continue;
                }
                _ => continue,
            }
        }
        // Tunnel -> application.
        if f.to_app_open {
            while s.can_recv() && port.has_room(h) {
                let n = s
                    .recv(|b| {
                        let n = b.len().min(CHUNK);
                        if n > 0 {
                            port.deliver(h, &b[..n]);
                        }
                        (n, n)
                    })
                    .unwrap_or(0);
                if n == 0 {
                    break;
                }
                moved = true;
            }
            let opening = matches!(s.state(), TcpState::Listen | TcpState::SynSent | TcpState::SynReceived);
            if !opening && !s.may_recv() && !s.can_recv() {
                // The remote side sent FIN (or the socket died): end of stream for the application.
                f.to_app_open = false;
                port.end_of_stream(h);
                moved = true;
            }
        }
        // Application -> tunnel.
        while !f.app_done {
            let (n, len) = match port.outgoing(h) {
                Outgoing::Idle => break,
                Outgoing::Closed => {
                    f.app_done = true;
                    s.close();
                    moved = true;
                    break;
                }
                Outgoing::Data(d) => {
                    if !s.can_send() {
                        break;
                    }
                    match s.send_slice(d) {
                        Ok(n) if n > 0 => (n, d.len()),
                        _ => break,
                    }
                }
            };
            moved = true;
            port.consumed(h, n);
            if n < len {
                break;
            }
        }
        if matches!(s.state(), TcpState::Closed | TcpState::TimeWait) && (!f.to_app_open || !s.is_open()) {
            done.push(h);
        }
    }
    for h in done {
        flows.remove(&h);
        stack.remove(h);
        port.closed(h);
        moved = true;
    }
    moved
}
