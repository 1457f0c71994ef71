//! A [`FlowPort`] over plain buffers: what each flow delivered, what its application has left to
//! send. For tests and simulations, where the application side is a byte vector.

use std::collections::{BTreeMap, BTreeSet};

use super::{FlowId, FlowPort, Outgoing};

/// The application side of every flow, as buffers.
#[derive(Debug, Default)]
pub struct BufferPort {
    /// What each flow delivered to the application.
    pub got: BTreeMap<FlowId, Vec<u8>>,
    /// Flows whose remote side ended its stream.
    pub eos: BTreeSet<FlowId>,
    /// What the application has yet to send, per flow.
    pub out: BTreeMap<FlowId, Vec<u8>>,
    /// Flows whose application closed its sending side (once `out` is empty, FIN).
    pub out_closed: BTreeSet<FlowId>,
    /// Connect results, per flow.
    pub connected: BTreeMap<FlowId, Result<(), String>>,
    /// Flows that ended.
    pub closed: BTreeSet<FlowId>,
}

impl BufferPort {
    /// Forgets what an earlier flow with this id was told: ids are reused once a flow is gone.
    pub fn reuse(&mut self, id: FlowId) {
        self.got.remove(&id);
        self.eos.remove(&id);
        self.out.remove(&id);
        self.out_closed.remove(&id);
        self.connected.remove(&id);
        self.closed.remove(&id);
    }
}

impl FlowPort for BufferPort {
    fn has_room(&mut self, _: FlowId) -> bool {
        true
    }
    fn deliver(&mut self, id: FlowId, chunk: &[u8]) {
        self.got.entry(id).or_default().extend_from_slice(chunk);
    }
    fn end_of_stream(&mut self, id: FlowId) {
        self.eos.insert(id);
    }
    fn outgoing(&mut self, id: FlowId) -> Outgoing<'_> {
        match self.out.get(&id) {
            Some(d) if !d.is_empty() => Outgoing::Data(d),
            _ if self.out_closed.contains(&id) => Outgoing::Closed,
            _ => Outgoing::Idle,
        }
    }
    fn consumed(&mut self, id: FlowId, n: usize) {
        if let Some(d) = self.out.get_mut(&id) {
            d.drain(..n.min(d.len()));
        }
    }
    fn connected(&mut self, id: FlowId, result: Result<(), String>) {
        self.connected.insert(id, result);
    }
    fn closed(&mut self, id: FlowId) {
        self.closed.insert(id);
    }
}
