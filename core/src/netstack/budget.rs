//! How much memory TCP socket buffers may take, per flow, per peer and per node.
//!
//! A flow starts small and its buffers double while it uses them (the sender fills the receive
//! window we advertise; the application keeps the send buffer full while the congestion window
//! would take more), up to [`BufferLimits::max`], as long as its peer's and the node's budgets have
//! room. The window scale is fixed at the SYN from the maximum, so growing later costs nothing on
//! the wire. What the budget counts is capacity (what could be written), which is what a busy flow
//! ends up committing; a new flow that cannot get its initial buffers is refused.

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
pub type Owner = [u8; 32];

/// Bytes of buffer capacity handed out, in total and per owner.
#[derive(Debug, Default)]
pub(super) struct Budget {
    limits: BufferLimits,
    used: usize,
    by_owner: HashMap<Owner, usize>,
}

impl Budget {
    pub fn new(limits: BufferLimits) -> Self {
        Budget { limits: limits.sane(), used: 0, by_owner: HashMap::new() }
    }

    pub fn limits(&self) -> BufferLimits {
        self.limits
    }

    /// Bytes handed out now.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Takes `bytes` for `owner` if both budgets have room.
    pub fn take(&mut self, owner: Option<&Owner>, bytes: usize) -> bool {
        if self.used + bytes > self.limits.per_node {
            return false;
        }
        if let Some(o) = owner {
            let mine = self.by_owner.get(o).copied().unwrap_or(0);
            if mine + bytes > self.limits.per_peer {
                return false;
            }
            self.by_owner.insert(*o, mine + bytes);
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
        let mut b = Budget::new(limits);
        let (p, q) = ([1u8; 32], [2u8; 32]);
        assert!(b.take(Some(&p), 8000));
        assert!(!b.take(Some(&p), 4000), "peer budget");
        assert!(b.take(Some(&q), 7000));
        assert!(!b.take(Some(&q), 1000), "node budget");
        b.give_back(Some(&p), 8000);
        assert!(b.take(Some(&q), 1000));
        assert_eq!(b.used(), 8000);
        b.give_back(Some(&q), 8000);
        assert_eq!(b.used(), 0);
        assert!(b.by_owner.is_empty(), "nothing left behind for owners without flows");
    }

    #[test]
    fn limits_are_made_consistent() {
        let l = BufferLimits { initial: 0, max: 0, per_peer: 0, per_node: 0 }.sane();
        assert!(l.initial >= 4096 && l.max >= l.initial && l.per_peer >= 2 * l.initial);
        assert!(l.per_node >= l.per_peer);
    }
}
