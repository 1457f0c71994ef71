//! A userspace TCP stack (smoltcp) fed with inner IPv4 packets, without I/O.
//!
//! The site agent uses it to terminate the TCP flows clients open to resource addresses (it accepts
//! on any address: resources are many and change with the map); the userspace client uses it to open
//! flows to resources. Packets go in with [`NetStack::push_inbound`], out with
//! [`NetStack::pop_outbound`]; [`NetStack::poll`] runs the stack until nothing moves. The MSS follows
//! the device MTU, which is the tunnel MTU.
//!
//! smoltcp carries a loss-recovery patch (vendor/smoltcp/PATCHES.md): SACK with RACK-TLP, a 200 ms
//! minimum RTO, and buffers that grow while a flow uses them, within the budgets of [`budget`], which
//! also caps the number of flows per peer and per node.

mod ack_thin;
mod budget;

pub use budget::{BufferLimits, FlowCount, FlowLimits, Limit, Owner};
pub use smoltcp::socket::tcp::RecoveryStats;

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};

/// How often buffer sizes are revisited.
const TUNE_EVERY: Duration = Duration::from_millis(5);
/// The receive rate is measured over this long.
const RATE_PERIOD: Duration = Duration::from_millis(50);
/// A receive buffer is sized to hold two round trips at the flow's receive rate (what a sender
/// limited by our window would need to double its rate). A receiver cannot measure the RTT without
/// TCP timestamps, so it takes the tunnel's: the round trip of the path to the peer
/// ([`NetStack::set_rtt_hint`]), at least `RTT_FLOOR`, or `RTT_UNKNOWN` when none is known (a
/// relayed peer, or before the first path probe).
const RTT_FLOOR: Duration = Duration::from_millis(1);
const RTT_UNKNOWN: Duration = Duration::from_millis(50);
/// The hint kept is the smallest round trip seen over this long: a path probe waits behind the
/// flow's own packets, so the latest sample grows with the queue a large buffer lets the sender
/// build, and sizing the buffer from it fed back (seen: 84 µs to 1.6 ms on one path during an
/// upload, the receive buffer growing from 128 KiB to 1 MiB at 1% loss and the rate falling).
const RTT_WINDOW: Duration = Duration::from_secs(10);

/// Upper bound on packets waiting to enter the stack; beyond it new packets are dropped (TCP
/// retransmits), which is the backpressure a router gives.
const RX_QUEUE: usize = 4096;
/// Packets the stack may queue for the tunnel between two drains.
const TX_QUEUE: usize = 4096;

#[derive(Debug)]
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _t: smoltcp::time::Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _t: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        // A full queue stops the stack's egress for this poll: whatever a socket does, one poll
        // never queues more than this.
        if self.tx.len() >= TX_QUEUE {
            return None;
        }
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = self.mtu;
        c
    }
}

/// A socket's buffers as the budget sees them.
#[derive(Debug)]
struct Buffers {
    owner: Option<Owner>,
    rx: usize,
    tx: usize,
    /// The socket's `rx_delivered` at the start of the current rate period, and when that was.
    rx_mark: u64,
    rx_mark_at: Instant,
    /// The socket's `rx_window_filled` when last looked at.
    filled_seen: u32,
}

/// The congestion control of the stack's TCP senders.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// BBR (v1, paced): follows the measured bottleneck rate, so random loss on a WAN or radio
    /// link does not shrink the window.
    #[default]
    Bbr,
    /// CUBIC: loss-based, as Linux's default elsewhere; halves its rate at a few percent loss.
    Cubic,
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bbr" => Ok(Congestion::Bbr),
            "cubic" => Ok(Congestion::Cubic),
            other => Err(format!("unknown congestion control {other:?} (bbr or cubic)")),
        }
    }
}

/// How a stack's TCP senders behave, how much buffer memory its flows may hold, and how many flows
/// (of every kind the node handles) a peer and the node may hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StackOptions {
    /// Congestion control of new flows.
    pub congestion: Congestion,
    /// Buffer sizes and budgets.
    pub limits: BufferLimits,
    /// Flows per peer and per node: the stack enforces the TCP figures, the data plane the rest.
    pub flows: FlowLimits,
}

/// What the stack has done, for `/status` and `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StackStats {
    /// Segments sent again by loss recovery, over all flows so far.
    pub retransmitted_segments: u64,
    /// Segments found lost (RACK or NewReno).
    pub lost_segments: u64,
    /// Recovery episodes (each reduces a congestion window once).
    pub recoveries: u64,
    /// Tail loss probes sent.
    pub tail_loss_probes: u64,
    /// Retransmission timeouts.
    pub timeouts: u64,
    /// Socket buffer capacity the open flows hold now.
    pub buffer_bytes: u64,
    /// New flows refused because a buffer budget was reached.
    pub refused_budget: u64,
    /// New flows refused because their peer held as many as one peer may.
    pub refused_peer_flows: u64,
    /// New flows refused because the node held as many as it may.
    pub refused_node_flows: u64,
    /// Inbound packets dropped because the stack's queue was full.
    pub rx_dropped: u64,
    /// Duplicate ACKs left unsent because a later one, sent in the same batch, covered them.
    #[serde(default)]
    pub acks_merged: u64,
}

/// Why a new socket was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SocketError {
    /// The peer's or the node's buffer budget cannot hold another flow.
    #[error("no buffer memory left for another connection (peer or node budget reached)")]
    Budget,
    /// The peer holds as many flows as one peer may.
    #[error("too many connections with one peer (the flow limit per peer is reached)")]
    PeerFlows,
    /// The node holds as many flows as it may.
    #[error("too many connections on this node (its flow limit is reached)")]
    NodeFlows,
    /// smoltcp refused the endpoint.
    #[error("the stack cannot use that address")]
    Unaddressable,
}

/// The userspace TCP/IP stack of one node.
pub struct NetStack {
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: Queues,
    epoch: Instant,
    next_port: u16,
    budget: budget::Budget,
    buffers: HashMap<SocketHandle, Buffers>,
    next_tune: Instant,
    congestion: Congestion,
    /// Per owner: the smallest hint of the current window, and when it was taken.
    rtt_hints: HashMap<Owner, (Duration, Instant)>,
    /// Inbound packets dropped because the stack's queue was full.
    pub rx_dropped: u64,
    /// New flows refused because a buffer budget was reached.
    pub refused_budget: u64,
    /// New flows refused by a flow limit: the peer's, the node's.
    pub refused_flows: (u64, u64),
    /// Loss recovery of the flows already removed.
    closed: RecoveryStats,
    /// Merges the duplicate ACKs a batch of out-of-order segments produces.
    acks: ack_thin::AckThinner,
}

impl std::fmt::Debug for NetStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetStack").field("rx_queue", &self.dev.rx.len()).finish_non_exhaustive()
    }
}

impl NetStack {
    /// A stack that owns `addr/prefix` and, with `any_ip`, accepts packets for any address (the agent).
    pub fn new(addr: Ipv4Addr, prefix: u8, mtu: u16, any_ip: bool, seed: u64, now: Instant) -> Self {
        Self::with_options(addr, prefix, mtu, any_ip, seed, now, StackOptions::default())
    }

    /// Like [`NetStack::new`], with options other than the defaults.
    pub fn with_options(
        addr: Ipv4Addr,
        prefix: u8,
        mtu: u16,
        any_ip: bool,
        seed: u64,
        now: Instant,
        options: StackOptions,
    ) -> Self {
        let mut dev = Queues { rx: VecDeque::new(), tx: VecDeque::new(), mtu: usize::from(mtu) };
        let mut cfg = Config::new(HardwareAddress::Ip);
        cfg.random_seed = seed;
        let epoch = now;
        let mut iface = Interface::new(cfg, &mut dev, smoltcp::time::Instant::from_micros(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(addr), prefix));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(addr);
        iface.set_any_ip(any_ip);
        NetStack {
            iface,
            sockets: SocketSet::new(vec![]),
            dev,
            epoch,
            next_port: 40000 + (seed % 20000) as u16,
            budget: budget::Budget::new(options.limits, options.flows),
            buffers: HashMap::new(),
            next_tune: now,
            congestion: options.congestion,
            rtt_hints: HashMap::new(),
            rx_dropped: 0,
            refused_budget: 0,
            refused_flows: (0, 0),
            closed: RecoveryStats::default(),
            acks: ack_thin::AckThinner::default(),
        }
    }

    fn ts(&self, now: Instant) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(now.saturating_duration_since(self.epoch).as_micros() as i64)
    }

    /// Queues an inbound IPv4 packet for the stack.
    pub fn push_inbound(&mut self, packet: Vec<u8>) {
        if self.dev.rx.len() >= RX_QUEUE {
            self.rx_dropped += 1;
            return;
        }
        self.dev.rx.push_back(packet);
    }

    /// Runs the stack until it has nothing more to do; returns whether any socket may have changed.
    pub fn poll(&mut self, now: Instant) -> bool {
        let ts = self.ts(now);
        let mut changed = false;
        loop {
            let r = self.iface.poll(ts, &mut self.dev, &mut self.sockets);
            if r == smoltcp::iface::PollResult::SocketStateChanged {
                changed = true;
            }
            if self.dev.rx.is_empty() || r == smoltcp::iface::PollResult::None {
                break;
            }
        }
        self.acks.thin(&mut self.dev.tx);
        if now >= self.next_tune {
            self.next_tune = now + TUNE_EVERY;
            self.grow_buffers(now);
        }
        changed
    }

    /// The round trip of the tunnel to `owner`, which sizes the receive buffers of its flows; `None`
    /// when it is not known (relayed, or not measured yet). The stack keeps the smallest sample of
    /// the last `RTT_WINDOW`.
    pub fn set_rtt_hint(&mut self, owner: &Owner, rtt: Option<Duration>, now: Instant) {
        match rtt {
            Some(r) => {
                let r = r.max(RTT_FLOOR);
                let e = self.rtt_hints.entry(*owner).or_insert((r, now));
                if r <= e.0 || now.saturating_duration_since(e.1) >= RTT_WINDOW {
                    *e = (r, now);
                }
            }
            None => {
                self.rtt_hints.remove(owner);
            }
        }
    }

    /// Forgets the hints of owners no longer known.
    pub fn retain_rtt_hints(&mut self, keep: impl Fn(&Owner) -> bool) {
        self.rtt_hints.retain(|o, _| keep(o));
    }

    /// Doubles the buffers that limit their flow, as far as the budgets allow: a receive buffer
    /// smaller than two round trips at the flow's receive rate, or smaller than four whose window
    /// the sender filled while a hole was open (loss recovery needs room for what arrives behind
    /// the hole); a send
    /// buffer the application keeps full while the congestion window would take more than half.
    fn grow_buffers(&mut self, now: Instant) {
        let max = self.budget.limits().max;
        for (h, b) in self.buffers.iter_mut() {
            let rtt = b.owner.and_then(|o| self.rtt_hints.get(&o).map(|h| h.0)).unwrap_or(RTT_UNKNOWN);
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            let elapsed = now.saturating_duration_since(b.rx_mark_at);
            if elapsed >= RATE_PERIOD {
                let received = s.rx_delivered() - b.rx_mark;
                b.rx_mark = s.rx_delivered();
                b.rx_mark_at = now;
                let needed = 2 * received as u128 * rtt.as_micros() / elapsed.as_micros().max(1);
                let filled = s.rx_window_filled() != b.filled_seen;
                b.filled_seen = s.rx_window_filled();
                // Behind a hole a receiver holds what arrives for about a round trip more, so
                // the hole rule stops at twice the rate rule's size: unbounded, a sender that
                // fills every window (a kernel's BBR does) grew a 1 ms path's buffer to 8 MiB, a
                // queue of its own that cost a third of the throughput.
                if needed > b.rx as u128 || (filled && (b.rx as u128) < 2 * needed) {
                    double(&mut self.budget, b.owner.as_ref(), &mut b.rx, max, |v| s.grow_rx_buffer(v));
                }
            }
            let full = s.send_queue() * 8 >= b.tx * 7;
            if full && s.congestion_window() * 2 > b.tx {
                double(&mut self.budget, b.owner.as_ref(), &mut b.tx, max, |v| s.grow_tx_buffer(v));
            }
        }
    }

    /// The next packet the stack wants sent.
    pub fn pop_outbound(&mut self) -> Option<Vec<u8>> {
        self.dev.tx.pop_front()
    }

    /// How long until the stack needs polling for its own timers.
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        let ts = self.ts(now);
        self.iface.poll_delay(ts, &self.sockets).map(|d| Duration::from_micros(d.total_micros()))
    }

    /// Whether a new flow of `owner` fits the flow limits and the buffer budgets now; a refusal is
    /// counted. A site asks before it dials a target, so that no target connection is made for a
    /// flow the stack would refuse.
    pub fn admit(&mut self, owner: Option<&Owner>) -> Result<(), SocketError> {
        match self.budget.flows.check(owner) {
            Ok(()) => {}
            Err(Limit::Peer) => {
                self.refused_flows.0 += 1;
                return Err(SocketError::PeerFlows);
            }
            Err(Limit::Node) => {
                self.refused_flows.1 += 1;
                return Err(SocketError::NodeFlows);
            }
        }
        if !self.budget.fits(owner, 2 * self.budget.limits().initial) {
            self.refused_budget += 1;
            return Err(SocketError::Budget);
        }
        Ok(())
    }

    /// Gives back the flow and the initial buffers of a socket that was never added.
    fn give_back_new(&mut self, owner: Option<&Owner>) {
        self.budget.give_back(owner, 2 * self.budget.limits().initial);
        self.budget.flows.remove(owner);
    }

    /// A socket with initial buffers charged to `owner`, counted as one of its flows, unless a limit
    /// or a budget is reached.
    fn new_socket(&mut self, owner: Option<&Owner>) -> Result<tcp::Socket<'static>, SocketError> {
        self.admit(owner)?;
        let limits = self.budget.limits();
        if !self.budget.take(owner, 2 * limits.initial) || self.budget.flows.add(owner).is_err() {
            // admit() just said both fit; nothing between could change that.
            self.refused_budget += 1;
            return Err(SocketError::Budget);
        }
        // vec![0; n] comes from calloc: pages are committed as data first reaches them.
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; limits.initial]),
            tcp::SocketBuffer::new(vec![0; limits.initial]),
        );
        s.set_rx_buffer_max(limits.max);
        s.set_nagle_enabled(false);
        // Without congestion control a full window is sent at once and overruns the receiving socket.
        s.set_congestion_control(match self.congestion {
            Congestion::Bbr => tcp::CongestionControl::Bbr,
            Congestion::Cubic => tcp::CongestionControl::Cubic,
        });
        // Linux's floor: a link with a sub-millisecond RTT must not wait a second for a timeout.
        s.set_rto_min(smoltcp::time::Duration::from_millis(200));
        s.set_keep_alive(Some(smoltcp::time::Duration::from_secs(30)));
        s.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
        Ok(s)
    }

    fn add(&mut self, s: tcp::Socket<'static>, owner: Option<&Owner>) -> SocketHandle {
        let initial = self.budget.limits().initial;
        let h = self.sockets.add(s);
        let b = Buffers {
            owner: owner.copied(),
            rx: initial,
            tx: initial,
            rx_mark: 0,
            rx_mark_at: self.next_tune,
            filled_seen: 0,
        };
        self.buffers.insert(h, b);
        h
    }

    /// A socket listening on `local`, to accept exactly one connection there; its buffers are
    /// charged to `owner`.
    pub fn listen(
        &mut self,
        local: SocketAddrV4,
        owner: Option<&Owner>,
    ) -> Result<SocketHandle, SocketError> {
        let mut s = self.new_socket(owner)?;
        let endpoint = IpListenEndpoint { addr: Some(IpAddress::Ipv4(*local.ip())), port: local.port() };
        if s.listen(endpoint).is_err() {
            self.give_back_new(owner);
            return Err(SocketError::Unaddressable);
        }
        Ok(self.add(s, owner))
    }

    /// A socket connecting from this stack's address to `remote`; its buffers are charged to
    /// `owner`.
    pub fn connect(
        &mut self,
        local_addr: Ipv4Addr,
        remote: SocketAddrV4,
        owner: Option<&Owner>,
    ) -> Result<SocketHandle, SocketError> {
        let mut s = self.new_socket(owner)?;
        self.next_port = if self.next_port >= 65000 { 40000 } else { self.next_port + 1 };
        let local = IpEndpoint::new(IpAddress::Ipv4(local_addr), self.next_port);
        let remote = IpEndpoint::new(IpAddress::Ipv4(*remote.ip()), remote.port());
        if s.connect(self.iface.context(), remote, local).is_err() {
            self.give_back_new(owner);
            return Err(SocketError::Unaddressable);
        }
        Ok(self.add(s, owner))
    }

    /// The congestion control of sockets made from now on.
    pub fn set_congestion(&mut self, c: Congestion) {
        self.congestion = c;
    }

    /// Bytes of socket buffer capacity the flows hold now.
    pub fn buffer_bytes(&self) -> usize {
        self.budget.used()
    }

    /// TCP flows held now: by `owner`, and in all.
    pub fn flows(&self, owner: &Owner) -> (usize, usize) {
        (self.budget.flows.of(owner), self.budget.flows.total())
    }

    /// A socket.
    pub fn socket(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    /// What the stack did so far: loss recovery over every flow (removed ones included), buffers,
    /// refusals and drops.
    pub fn stats(&self) -> StackStats {
        let mut t = self.closed;
        for (h, _) in self.buffers.iter() {
            add_stats(&mut t, &self.sockets.get::<tcp::Socket>(*h).recovery_stats());
        }
        StackStats {
            retransmitted_segments: t.retransmitted_segments,
            lost_segments: t.lost_segments,
            recoveries: t.recoveries,
            tail_loss_probes: t.tail_loss_probes,
            timeouts: t.timeouts,
            buffer_bytes: self.budget.used() as u64,
            refused_budget: self.refused_budget,
            refused_peer_flows: self.refused_flows.0,
            refused_node_flows: self.refused_flows.1,
            rx_dropped: self.rx_dropped,
            acks_merged: self.acks.thinned,
        }
    }

    /// Drops a socket and gives its buffers back to the budget.
    pub fn remove(&mut self, h: SocketHandle) {
        let s = self.sockets.remove(h);
        // Only TCP sockets exist here (smoltcp is built with TCP alone).
        #[allow(irrefutable_let_patterns)]
        if let smoltcp::socket::Socket::Tcp(s) = s {
            add_stats(&mut self.closed, &s.recovery_stats());
        }
        if let Some(b) = self.buffers.remove(&h) {
            self.budget.give_back(b.owner.as_ref(), b.rx + b.tx);
            self.budget.flows.remove(b.owner.as_ref());
        }
    }
}

/// Doubles a buffer of `*size` bytes (up to `max`) if the budget has room, with `grow` replacing the
/// socket's buffer by the larger storage it is given.
fn double(
    budget: &mut budget::Budget,
    owner: Option<&Owner>,
    size: &mut usize,
    max: usize,
    grow: impl FnOnce(Vec<u8>) -> bool,
) {
    let want = (*size * 2).min(max);
    if want <= *size || !budget.take(owner, want - *size) {
        return;
    }
    if grow(vec![0u8; want]) {
        *size = want;
    } else {
        budget.give_back(owner, want - *size);
    }
}

fn add_stats(total: &mut RecoveryStats, s: &RecoveryStats) {
    total.retransmitted_segments += s.retransmitted_segments;
    total.lost_segments += s.lost_segments;
    total.recoveries += s.recoveries;
    total.tail_loss_probes += s.tail_loss_probes;
    total.timeouts += s.timeouts;
}

#[cfg(test)]
mod tests;
