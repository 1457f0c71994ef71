//! The application ends of the engine's TCP flows: bounded channels to the task that serves each
//! one (a site's target connection, a client's SOCKS connection), behind the engine's [`FlowPort`].
//!
//! When a channel to the application is full the engine stops reading that socket's receive
//! buffer, the TCP window closes, and the sender slows down. Nothing grows without bound.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Notify};
use tunnel_core::engine::{FlowId, FlowPort, Outgoing};

use super::FlowEnds;

/// Chunks queued per flow direction between the loop and the application side.
const FLOW_CHANNEL: usize = 16;

/// The reply to a client's connect, with the ends it hands over once established.
pub(super) type ConnectReply = (oneshot::Sender<Result<FlowEnds, String>>, FlowEnds);

/// One flow's channels, on the loop's side.
#[derive(Debug)]
struct FlowIo {
    to_app: Option<mpsc::Sender<Bytes>>,
    from_app: mpsc::Receiver<Bytes>,
    /// What the application sent that the stack has not taken yet.
    pending: Option<Bytes>,
    connect_reply: Option<ConnectReply>,
}

/// Every flow's channels, by the engine's flow id.
#[derive(Debug)]
pub(super) struct Bridge {
    flows: HashMap<FlowId, FlowIo>,
    /// Pinged by the application tasks after they consume or send, so the loop moves more data.
    pub(super) wake: Arc<Notify>,
}

impl Bridge {
    pub(super) fn new() -> Bridge {
        Bridge { flows: HashMap::new(), wake: Arc::new(Notify::new()) }
    }

    /// Channels for the engine's flow `id`; returns the application's ends. For a client's connect,
    /// `reply` is answered with them once the flow is established.
    pub(super) fn open(
        &mut self,
        id: FlowId,
        reply: Option<oneshot::Sender<Result<FlowEnds, String>>>,
    ) -> Option<FlowEnds> {
        let (to_app_tx, to_app_rx) = mpsc::channel(FLOW_CHANNEL);
        let (from_app_tx, from_app_rx) = mpsc::channel(FLOW_CHANNEL);
        let ends = FlowEnds { tx: from_app_tx, rx: to_app_rx, wake: self.wake.clone() };
        let (connect_reply, ends) = match reply {
            Some(r) => (Some((r, ends)), None),
            None => (None, Some(ends)),
        };
        self.flows.insert(
            id,
            FlowIo { to_app: Some(to_app_tx), from_app: from_app_rx, pending: None, connect_reply },
        );
        ends
    }
}

impl FlowPort for Bridge {
    fn has_room(&mut self, id: FlowId) -> bool {
        // The loop is the only sender, so room seen here is room for the next `deliver`.
        self.flows
            .get(&id)
            .and_then(|f| f.to_app.as_ref())
            .is_some_and(|tx| !tx.is_closed() && tx.capacity() > 0)
    }

    fn deliver(&mut self, id: FlowId, chunk: &[u8]) {
        if let Some(tx) = self.flows.get(&id).and_then(|f| f.to_app.as_ref()) {
            let _ = tx.try_send(Bytes::copy_from_slice(chunk));
        }
    }

    fn end_of_stream(&mut self, id: FlowId) {
        if let Some(f) = self.flows.get_mut(&id) {
            f.to_app = None;
        }
    }

    fn outgoing(&mut self, id: FlowId) -> Outgoing<'_> {
        let Some(f) = self.flows.get_mut(&id) else { return Outgoing::Closed };
        if f.pending.is_none() {
            match f.from_app.try_recv() {
                Ok(b) => f.pending = Some(b),
                Err(mpsc::error::TryRecvError::Empty) => return Outgoing::Idle,
                Err(mpsc::error::TryRecvError::Disconnected) => return Outgoing::Closed,
            }
        }
        match &f.pending {
            Some(p) => Outgoing::Data(p),
            None => Outgoing::Idle,
        }
    }

    fn consumed(&mut self, id: FlowId, n: usize) {
        let Some(f) = self.flows.get_mut(&id) else { return };
        if let Some(p) = f.pending.as_mut() {
            if n >= p.len() {
                f.pending = None;
            } else {
                let rest = p.slice(n..);
                *p = rest;
            }
        }
    }

    fn connected(&mut self, id: FlowId, result: Result<(), String>) {
        let Some((reply, ends)) = self.flows.get_mut(&id).and_then(|f| f.connect_reply.take()) else {
            return;
        };
        let _ = reply.send(result.map(|()| ends));
    }

    fn closed(&mut self, id: FlowId) {
        self.flows.remove(&id);
    }
}
