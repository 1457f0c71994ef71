//! How much memory TCP socket buffers may take, per flow, per peer and per node, and how many flows
//! of each kind a peer and the node may hold.
//!
//! A flow starts small and its buffers double while it uses them (the sender fills the receive
//! window we advertise; the application keeps the send buffer full while the congestion window
//! would take more), up to [`BufferLimits::max`], as long as its peer's and the node's budgets have
//! room. The window scale is fixed at the SYN from the maximum, so growing later costs nothing on
//! the wire. What the budget counts is capacity (what could be written), which is what a busy flow
//! ends up committing; a new flow that cannot get its initial buffers is refused.
//!
//! Memory is not all a flow costs: on a site each TCP flow also holds a connection to its target (a
//! file descriptor and a task), a SYN waiting for its target's dial holds a dial, and a UDP flow a
//! socket and a task. [`FlowLimits`] bounds how many of each one peer and the node may hold, counted
//! with [`FlowCount`]: the stack counts its TCP flows, the data plane its pending dials and UDP flows.

use crate::PublicKey;
use std::collections::HashMap;

/// Limits on TCP socket buffers (each flow has one receive and one send buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLimits {
    /// Size of each buffer of a new flow.
    pub initial: usize,
    /// Largest size a buffer grows to. The default holds the bandwidth-delay product of a path of
    /// 50 ms at about 1.3 Gbit/s.
    pub max: usize,
    /// All buffers of all flows of one peer.
    pub per_peer: usize,
    /// All buffers of all flows of the node.
    pub per_node: usize,
}

impl Default for BufferLimits {
    fn default() -> Self {
        BufferLimits {
            initial: 128 * 1024,
            max: 8 * 1024 * 1024,
            per_peer: 64 * 1024 * 1024,
            per_node: 256 * 1024 * 1024,
        }
    }
}

impl BufferLimits {
    /// The limits with every figure at least the 4 KiB a flow needs, and consistent with each other.
    pub fn sane(self) -> Self {
        let initial = self.initial.max(4096);
        let max = self.max.max(initial);
        let per_peer = self.per_peer.max(2 * initial);
        let per_node = self.per_node.max(per_peer);
        BufferLimits { initial, max, per_peer, per_node }
    }
}

/// Who a flow's buffers are charged to: the peer on the other end of the tunnel.
pub type Owner = PublicKey;

/// How many flows of each kind one peer, and the node in all, may hold at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLimits {
    /// TCP SYNs of one peer held while the site dials their targets.
    pub pending_dials_per_peer: usize,
    /// TCP SYNs held while their targets are dialled, over all peers.
    pub pending_dials: usize,
    /// TCP flows of one peer (the memory budget may bind first: a flow takes at least two initial
    /// buffers).
    pub tcp_per_peer: usize,
    /// TCP flows of the node.
    pub tcp: usize,
    /// UDP flows of one peer (each a socket and a task on a site).
    pub udp_per_peer: usize,
    /// UDP flows of the node.
    pub udp: usize,
}

impl Default for FlowLimits {
    fn default() -> Self {
        FlowLimits {
            pending_dials_per_peer: 64,
            pending_dials: 1024,
            tcp_per_peer: 1024,
            tcp: 4096,
            udp_per_peer: 256,
            udp: 4096,
        }
    }
}

impl FlowLimits {
    /// The limits with every figure at least 1 and no per-peer figure above its node total.
    pub fn sane(self) -> Self {
        let pair = |per_peer: usize, total: usize| {
            let total = total.max(1);
            (per_peer.clamp(1, total), total)
        };
        let (pending_dials_per_peer, pending_dials) = pair(self.pending_dials_per_peer, self.pending_dials);
        let (tcp_per_peer, tcp) = pair(self.tcp_per_peer, self.tcp);
        let (udp_per_peer, udp) = pair(self.udp_per_peer, self.udp);
        FlowLimits { pending_dials_per_peer, pending_dials, tcp_per_peer, tcp, udp_per_peer, udp }
    }
}

/// Which limit refused a new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// The peer holds as many as one peer may.
    Peer,
    /// The node holds as many as it may.
    Node,
}

impl Limit {
    /// `peer` or `node`, for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Peer => "peer",
            Limit::Node => "node",
        }
    }
}

/// Flows of one kind held now, per owner and in all, under a per-owner and a total limit. Flows
/// without an owner count in the total only.
#[derive(Debug, Default)]
pub struct FlowCount {
    per_owner: usize,
    limit: usize,
    total: usize,
    by_owner: HashMap<Owner, usize>,
}

impl FlowCount {
    /// A count that admits `per_owner` flows per owner and `total` in all.
    pub fn new(per_owner: usize, total: usize) -> Self {
        FlowCount { per_owner, limit: total, total: 0, by_owner: HashMap::new() }
    }

    /// Whether one more flow of `owner` fits, and if not, which limit says no.
    pub fn check(&self, owner: Option<&Owner>) -> Result<(), Limit> {
        if owner.is_some_and(|o| self.of(o) >= self.per_owner) {
            return Err(Limit::Peer);
        }
        if self.total >= self.limit {
            return Err(Limit::Node);
        }
        Ok(())
    }

    /// Counts one more flow of `owner` if it fits.
    pub fn add(&mut self, owner: Option<&Owner>) -> Result<(), Limit> {
        self.check(owner)?;
        if let Some(o) = owner {
            *self.by_owner.entry(*o).or_insert(0) += 1;
        }
        self.total += 1;
        Ok(())
    }

    /// Counts one flow of `owner` less.
    pub fn remove(&mut self, owner: Option<&Owner>) {
        self.total = self.total.saturating_sub(1);
        if let Some(o) = owner {
            if let Some(n) = self.by_owner.get_mut(o) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.by_owner.remove(o);
                }
            }
        }
    }

    /// Flows `owner` holds now.
    pub fn of(&self, owner: &Owner) -> usize {
        self.by_owner.get(owner).copied().unwrap_or(0)
    }

    /// Flows held now, over all owners.
    pub fn total(&self) -> usize {
        self.total
    }
}

/// Bytes of buffer capacity handed out, in total and per owner, and the TCP flows holding them.
#[derive(Debug, Default)]
pub(super) struct Budget {
    limits: BufferLimits,
    used: usize,
    by_owner: HashMap<Owner, usize>,
    /// TCP flows, under [`FlowLimits::tcp_per_peer`] and [`FlowLimits::tcp`].
    pub flows: FlowCount,
}

impl Budget {
    pub fn new(limits: BufferLimits, flows: FlowLimits) -> Self {
        let flows = flows.sane();
        Budget {
            limits: limits.sane(),
            used: 0,
            by_owner: HashMap::new(),
            flows: FlowCount::new(flows.tcp_per_peer, flows.tcp),
        }
    }

    pub fn limits(&self) -> BufferLimits {
        self.limits
    }

    /// Bytes handed out now.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Whether `bytes` more for `owner` fit both budgets.
    pub fn fits(&self, owner: Option<&Owner>, bytes: usize) -> bool {
        let mine = owner.and_then(|o| self.by_owner.get(o)).copied().unwrap_or(0);
        self.used + bytes <= self.limits.per_node && (owner.is_none() || mine + bytes <= self.limits.per_peer)
    }

    /// Takes `bytes` for `owner` if both budgets have room.
    pub fn take(&mut self, owner: Option<&Owner>, bytes: usize) -> bool {
        if !self.fits(owner, bytes) {
            return false;
        }
        if let Some(o) = owner {
            *self.by_owner.entry(*o).or_insert(0) += bytes;
        }
        self.used += bytes;
        true
    }

    /// Gives back what [`Budget::take`] took.
    pub fn give_back(&mut self, owner: Option<&Owner>, bytes: usize) {
        self.used = self.used.saturating_sub(bytes);
        if let Some(o) = owner {
            if let Some(mine) = self.by_owner.get_mut(o) {
                *mine = mine.saturating_sub(bytes);
                if *mine == 0 {
                    self.by_owner.remove(o);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_and_node_budgets_both_bind() {
        let limits = BufferLimits { initial: 4096, max: 16384, per_peer: 10_000, per_node: 15_000 };
        let mut b = Budget::new(limits, FlowLimits::default());
        let (p, q) = ([1u8; 32], [2u8; 32]);
        assert!(b.take(Some(&crate::PublicKey(p)), 8000));
        assert!(!b.take(Some(&crate::PublicKey(p)), 4000), "peer budget");
        assert!(b.take(Some(&crate::PublicKey(q)), 7000));
        assert!(!b.take(Some(&crate::PublicKey(q)), 1000), "node budget");
        b.give_back(Some(&crate::PublicKey(p)), 8000);
        assert!(b.take(Some(&crate::PublicKey(q)), 1000));
        assert_eq!(b.used(), 8000);
        b.give_back(Some(&crate::PublicKey(q)), 8000);
        assert_eq!(b.used(), 0);
        assert!(b.by_owner.is_empty(), "nothing left behind for owners without flows");
    }

    #[test]
    fn flow_counts_bind_per_owner_and_in_total() {
        let mut c = FlowCount::new(2, 3);
        let (p, q) = ([1u8; 32], [2u8; 32]);
        assert_eq!((c.add(Some(&crate::PublicKey(p))), c.add(Some(&crate::PublicKey(p)))), (Ok(()), Ok(())));
        assert_eq!(c.add(Some(&crate::PublicKey(p))), Err(Limit::Peer));
        assert_eq!(c.add(Some(&crate::PublicKey(q))), Ok(()));
        assert_eq!(c.add(Some(&crate::PublicKey(q))), Err(Limit::Node));
        assert_eq!(c.add(None), Err(Limit::Node), "ownerless flows count in the total");
        c.remove(Some(&crate::PublicKey(p)));
        assert_eq!(c.check(Some(&crate::PublicKey(q))), Ok(()));
        assert_eq!((c.of(&crate::PublicKey(p)), c.of(&crate::PublicKey(q)), c.total()), (1, 1, 2));
        c.remove(Some(&crate::PublicKey(p)));
        c.remove(Some(&crate::PublicKey(q)));
        c.remove(Some(&crate::PublicKey(q)));
        assert_eq!(c.total(), 0);
        assert!(c.by_owner.is_empty(), "nothing left behind, and removing too much does not wrap");
    }

    #[test]
    fn flow_limits_are_made_consistent() {
        let l = FlowLimits {
            pending_dials_per_peer: 0,
            pending_dials: 0,
            tcp_per_peer: 10,
            tcp: 5,
            udp_per_peer: 3,
            udp: 7,
        }
        .sane();
        assert_eq!((l.pending_dials_per_peer, l.pending_dials), (1, 1));
        assert_eq!((l.tcp_per_peer, l.tcp), (5, 5));
        assert_eq!((l.udp_per_peer, l.udp), (3, 7));
    }

    #[test]
    fn limits_are_made_consistent() {
        let l = BufferLimits { initial: 0, max: 0, per_peer: 0, per_node: 0 }.sane();
        assert!(l.initial >= 4096 && l.max >= l.initial && l.per_peer >= 2 * l.initial);
        assert!(l.per_node >= l.per_peer);
    }
}
