//! One node's data plane without I/O: WireGuard, paths, STUN, the userspace stack, and what a site or
//! a client decides about each packet.
//!
//! The shell (`node/src/dataplane.rs`) owns the sockets, channels and tasks. It hands every input to
//! a `handle_*` method with the time it read once for that wake-up, then runs [`Engine::drive`]
//! until nothing moves, draining the outputs after each round: [`Engine::poll_transmit`] (datagrams
//! for the socket or the relay), [`Engine::poll_deliver`] (packets for the TUN device, a userspace
//! UDP association or a site's UDP target), [`Engine::poll_effect`] (dials, UDP opens, STUN lookups:
//! I/O the shell performs and answers through `handle_*`) and [`Engine::poll_event`] (candidates
//! for the control link). Then [`Engine::settle`], and [`Engine::next_deadline`] says when to wake
//! up at the latest.
//!
//! The engine is generic over its [`Role`]: [`Site`] and [`Client`] share the [`Node`] half
//! (WireGuard, paths, STUN, the stack) and keep what only they decide; the inputs only one role
//! has are inherent methods of `Engine<Site>` or `Engine<Client>`.
//!
//! The engine never spawns and never reads the clock; its randomness comes from
//! [`EngineConfig::seed`]. boringtun, inside [`Device`], reads its own clock for its session timers
//! (see DESIGN-NOTES: WireGuard's timers are left to the real-time tests).
//!
//! The application ends of TCP flows (a site's target connection, a client's SOCKS connection) are
//! reached through a [`FlowPort`] the shell implements over its channels; the engine keeps each
//! flow's protocol state (who it belongs to, its timeouts, whether each side has ended).

use crate::PublicKey;
use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::map::{Candidate, CandidateKind, NetworkMap, NodeKind};
use crate::netstack::{NetStack, StackOptions};
use crate::path::{Origin, PathEvent, Paths, PeerCandidates, Via};
use crate::wg::{Device, PeerConfig};
use crate::{probe, stun};

mod buffer_port;
mod client;
mod flows;
mod site;
mod status;
mod stun_client;
#[cfg(test)]
mod tests;

pub use crate::status::{Counters, NodeStatus, PeerStatus, Refused};
pub use buffer_port::BufferPort;
pub use client::Client;
pub use flows::{FlowPort, Outgoing, CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, LISTEN_TIMEOUT};
pub use site::Site;

use flows::FlowState;
use stun_client::StunClient;

/// A TCP flow through the userspace stack: the handle of its socket.
pub type FlowId = smoltcp::iface::SocketHandle;

/// A site's flow as the client addressed it: the client's overlay address and port, and the
/// resource's.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct FlowTuple {
    /// The client's end.
    pub src: SocketAddrV4,
    /// The resource's end.
    pub dst: SocketAddrV4,
}

/// UDP flows on a site end after this long without traffic.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// Datagrams a site's UDP flow holds while its target is being resolved.
const UDP_QUEUED: usize = 16;
/// Rounds of [`Engine::drive`] per wake-up at most, so one wake-up cannot go on for ever.
pub const DRIVE_ROUNDS: usize = 64;

/// What the engine is given once.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This node's WireGuard key.
    pub private_key: [u8; 32],
    /// Every random choice of the engine derives from it.
    pub seed: u64,
    /// Clients: inner packets go to and from the system (a TUN device) rather than the userspace
    /// stack. Sites ignore it.
    pub tun: bool,
    /// WireGuard's persistent keepalive (clients) and the idle path check.
    pub keepalive: Duration,
    /// Relay only: no punching, no direct paths.
    pub force_relay: bool,
    /// Candidates the node always offers; the reflexive address learned through STUN is added.
    pub base_candidates: Vec<Candidate>,
    /// The userspace TCP stack.
    pub stack: StackOptions,
}

/// A datagram for the network.
#[derive(Debug, PartialEq, Eq)]
pub enum Transmit {
    /// On the node's UDP socket: WireGuard, path probes, STUN.
    Udp { dst: SocketAddr, payload: Vec<u8> },
    /// Through the relay, to `peer` (the shell frames it).
    Relay { peer: PublicKey, payload: Vec<u8> },
}

/// Something for the local side.
#[derive(Debug, PartialEq, Eq)]
pub enum Deliver {
    /// A TUN client: an inner packet for the system.
    Os(Vec<u8>),
    /// A userspace client: a datagram for the UDP association on `local_port`.
    UdpReply { local_port: u16, from: SocketAddrV4, payload: Vec<u8> },
    /// A site: a datagram for the target of one of its UDP flows.
    Target { flow: FlowTuple, payload: Vec<u8> },
}

/// I/O the engine asks the shell for; the answers come back through `handle_*`.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// Resolve the STUN server the map names (`HOST:PORT`): [`Engine::handle_stun_resolved`].
    ResolveStun(String),
    /// Dial a site's TCP target for a SYN held meanwhile: [`Engine::handle_dial_result`].
    DialTcp { flow: FlowTuple, target: String },
    /// Open a site's UDP flow to its target: [`Engine::handle_udp_ready`], then
    /// [`Engine::handle_udp_reply`] for each datagram the target sends back.
    OpenUdp { flow: FlowTuple, target: String },
    /// A site's UDP flow ended (idle, revoked): close its socket.
    CloseUdp { flow: FlowTuple },
}

/// News for the control plane.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// The node's candidates changed (a new reflexive address): report them.
    Candidates(Vec<Candidate>),
}

/// Relay traffic per peer.
#[derive(Debug, Default, Clone, Copy)]
struct RelayBytes {
    tx: u64,
    rx: u64,
}

/// What a site or a client decides on its own; the rest of the engine is the same for both.
/// Implemented by [`Site`] and [`Client`] only.
pub trait Role: Sized + std::fmt::Debug {
    /// Which one it is, for the status document.
    const KIND: NodeKind;
    /// The userspace stack answers for any address (a site's resources) rather than only its own.
    const STACK_ANY_IP: bool;
    /// WireGuard's persistent keepalive on every peer (clients keep their NAT mappings open).
    const PERSISTENT_KEEPALIVE: bool;
    /// A role for this configuration.
    fn new(cfg: &EngineConfig) -> Self;
    /// The node has an overlay address, first or new.
    fn on_address(&mut self, _addr: Ipv4Addr) {}
    /// A map was applied to the shared half: the role's own state follows it.
    fn on_map(&mut self, node: &mut Node, map: &NetworkMap);
    /// A decrypted packet from `peer`.
    fn on_inbound(&mut self, node: &mut Node, peer: PublicKey, packet: Vec<u8>, now: Instant);
    /// The end of a wake-up.
    fn on_settle(&mut self, _node: &mut Node, _now: Instant) {}
    /// The role's part of the status document.
    fn status(&self, _out: &mut NodeStatus) {}
}

/// The half of an engine both roles share: WireGuard, paths, STUN, the stack and its flows, the
/// output queues.
pub struct Node {
    device: Device,
    stack: Option<NetStack>,
    own_addr: Option<Ipv4Addr>,
    map: Option<Arc<NetworkMap>>,
    peer_names: BTreeMap<PublicKey, (String, String)>,
    flows: BTreeMap<FlowId, FlowState>,
    counters: Counters,
    seed: u64,
    /// All the engine's own randomness after construction (STUN transaction ids).
    rng: StdRng,
    paths: Paths,
    keepalive: Duration,
    force_relay: bool,
    relay_up: bool,
    relay_bytes: BTreeMap<PublicKey, RelayBytes>,
    stun: StunClient,
    base_candidates: Vec<Candidate>,
    next_flow_trace: Instant,
    next_rtt_hints: Instant,
    stack_options: StackOptions,
    transmits: VecDeque<Transmit>,
    delivers: VecDeque<Deliver>,
    effects: VecDeque<Effect>,
    events: VecDeque<Event>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("own_addr", &self.own_addr)
            .field("peers", &self.peer_names.len())
            .field("flows", &self.flows.len())
            .finish_non_exhaustive()
    }
}

/// One node's data plane (module docs): the shared [`Node`] and a site's or a client's [`Role`].
#[derive(Debug)]
pub struct Engine<R: Role> {
    node: Node,
    role: R,
}

/// `::ffff:a.b.c.d` as `a.b.c.d`: a dual-stack socket reports IPv4 peers that way (DESIGN.md).
pub fn normalize(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => a,
        },
        v4 => v4,
    }
}

impl Node {
    fn new(cfg: EngineConfig, now: Instant) -> Node {
        let seed = cfg.seed;
        Node {
            device: Device::new(cfg.private_key, seed as u32),
            stack: None,
            own_addr: None,
            map: None,
            peer_names: BTreeMap::new(),
            flows: BTreeMap::new(),
            counters: Counters::default(),
            seed,
            rng: StdRng::seed_from_u64(seed.rotate_left(31)),
            paths: Paths::new(cfg.private_key, cfg.keepalive, seed.rotate_left(17), now),
            keepalive: cfg.keepalive,
            force_relay: cfg.force_relay,
            relay_up: false,
            relay_bytes: BTreeMap::new(),
            stun: StunClient::default(),
            base_candidates: cfg.base_candidates,
            next_flow_trace: now,
            next_rtt_hints: now,
            stack_options: cfg.stack,
            transmits: VecDeque::new(),
            delivers: VecDeque::new(),
            effects: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    fn next_deadline(&mut self, now: Instant) -> Instant {
        let mut d = now + Duration::from_secs(1);
        if let Some((t, _why)) = self.device.poll_timeout() {
            d = d.min(t);
        }
        if let Some((t, _why)) = self.paths.poll_timeout() {
            d = d.min(t);
        }
        if let Some(t) = self.stun.next {
            d = d.min(t);
        }
        if let Some(s) = self.stack.as_mut() {
            if let Some(delay) = s.poll_delay(now) {
                d = d.min(now + delay);
            }
        }
        d
    }

    /// The shared half of a new map: the stack (rebuilt, its flows' ends closed through `port`,
    /// when the overlay address changed: the new address is returned), the peers of the device and
    /// the paths, STUN.
    fn apply_map(
        &mut self,
        map: &NetworkMap,
        any_ip: bool,
        persistent_keepalive: bool,
        port: &mut impl FlowPort,
        now: Instant,
    ) -> Option<Ipv4Addr> {
        let mut new_addr = None;
        let own: Option<Ipv4Addr> = crate::map::ipv4(map.overlay_addr);
        if self.stack.is_none() || own != self.own_addr {
            if let Some(addr) = own {
                let prefix = crate::map::ipv4_net(map.overlay_cidr).map_or(16, |n| n.prefix_len());
                let (seed, opts) = (self.seed, self.stack_options);
                self.stack = Some(NetStack::with_options(addr, prefix, map.mtu, any_ip, seed, now, opts));
                for (h, _) in std::mem::take(&mut self.flows) {
                    port.closed(h);
                }
                self.own_addr = own;
                new_addr = own;
            }
        }
        let mut peers = Vec::new();
        let mut path_peers = Vec::new();
        self.peer_names.clear();
        for p in map.peers.values() {
            let Some(key) = p.public_key else { continue };
            let allowed: Vec<_> = p.allowed_ips.iter().filter_map(|n| crate::map::ipv4_net(*n)).collect();
            // The path logic picks the endpoint; the device starts without one.
            let keepalive = persistent_keepalive.then_some(self.keepalive.as_secs().clamp(1, 600) as u16);
            peers.push(PeerConfig { key, allowed, endpoint: None, keepalive });
            let candidates = p
                .candidates
                .iter()
                .filter(|_| !self.force_relay)
                .map(|c| (normalize(c.addr), Origin::from(c.kind)))
                .collect();
            path_peers.push(PeerCandidates { key, candidates });
            self.peer_names.insert(key, (p.name.clone(), p.node_id.to_string()));
        }
        self.device.set_peers(peers, now);
        self.paths.set_peers(path_peers, now);
        self.relay_bytes.retain(|k, _| self.peer_names.contains_key(k));
        if let Some(name) = self.stun.set_server(map.stun_addr.clone()) {
            self.effects.push_back(Effect::ResolveStun(name));
        }
        new_addr
    }

    /// A datagram on the node's UDP socket: a path probe, a STUN answer, or WireGuard.
    fn handle_datagram(&mut self, from: SocketAddr, data: &[u8], now: Instant) {
        if probe::is_probe(data) {
            if !self.force_relay {
                self.paths.handle_probe(from, data, now);
            }
        } else if stun::is_stun(data) {
            if self.stun.handle_answer(data, now) {
                self.report_candidates();
                // Our peers are about to learn the new address from the server: punch towards them now.
                self.paths.punch_all(now);
            }
        } else if let Some(auth) = self.device.handle_datagram(Via::Direct(from), data) {
            if auth.initiation {
                self.paths.handle_initiation(&auth.peer, from, now);
            }
            self.paths.handle_rx(&auth.peer, from, now);
        }
    }

    /// A WireGuard packet the relay brought from peer `from`.
    fn handle_relayed(&mut self, from: PublicKey, data: &[u8]) {
        if let Some(b) = self.relay_bytes.get_mut(&from) {
            b.rx += data.len() as u64;
        } else if self.peer_names.contains_key(&from) {
            self.relay_bytes.insert(from, RelayBytes { tx: 0, rx: data.len() as u64 });
        }
        // The relay names the sender: its handshakes count against its own budget only.
        self.device.handle_relayed(&from, data);
    }

    /// The relay link went up or down.
    fn handle_relay_up(&mut self, up: bool, now: Instant) {
        self.relay_up = up;
        self.paths.set_relay(up, now);
    }

    /// The answer to [`Effect::ResolveStun`].
    fn handle_stun_resolved(&mut self, name: String, addr: Option<SocketAddr>, now: Instant) {
        self.stun.resolved(name, addr, now);
    }

    /// Timers: WireGuard's, the paths', STUN's, the flows' RTT hints and trace. A no-op when nothing
    /// is due.
    fn handle_timeout(&mut self, now: Instant) {
        self.device.handle_timeout(now);
        self.paths.handle_timeout(now);
        if let Some((server, request)) = self.stun.tick(&mut self.rng, now) {
            self.transmits.push_back(Transmit::Udp { dst: server, payload: request });
        }
        if now >= self.next_rtt_hints {
            // The tunnel's round trip to each peer sizes the receive buffers of its flows.
            self.next_rtt_hints = now + Duration::from_secs(1);
            if let Some(stack) = self.stack.as_mut() {
                for key in self.peer_names.keys() {
                    let direct =
                        matches!(self.paths.current(key), Some(Via::Direct(_))) && self.paths.is_direct(key);
                    let rtt = self.paths.stats(key).and_then(|s| s.rtt_us).filter(|_| direct);
                    tracing::trace!(peer = ?self.peer_names.get(key), rtt_us = ?rtt, "rtt hint");
                    stack.set_rtt_hint(key, rtt.map(Duration::from_micros), now);
                }
                let names = &self.peer_names;
                stack.retain_rtt_hints(|k| names.contains_key(k));
            }
        }
        if tracing::enabled!(tracing::Level::TRACE) && now >= self.next_flow_trace {
            self.next_flow_trace = now + Duration::from_millis(100);
            if let Some(stack) = self.stack.as_mut() {
                for h in self.flows.keys() {
                    let s = stack.socket(*h);
                    tracing::trace!(
                        flow = ?s.remote_endpoint(),
                        state = ?s.sender_state(),
                        recovery = ?s.recovery_stats(),
                        queued = s.send_queue(),
                        rx_capacity = s.recv_capacity(),
                        rx_queued = s.recv_queue(),
                        rx_delivered = s.rx_delivered(),
                        rx_filled = s.rx_window_filled(),
                        "tcp flow"
                    );
                }
            }
        }
    }

    /// The stack's part of a round: polled, flow bytes moved through `port`, its output encrypted,
    /// path changes applied. Whether anything moved.
    fn drive_stack(&mut self, port: &mut impl FlowPort, now: Instant) -> bool {
        let mut moved = false;
        if let Some(stack) = self.stack.as_mut() {
            stack.poll(now);
            moved |= flows::service(stack, &mut self.flows, port, now);
            stack.poll(now);
            while let Some(p) = stack.pop_outbound() {
                moved = true;
                self.device.handle_outbound(&p);
            }
        }
        while let Some(ev) = self.paths.poll_event() {
            self.path_changed(ev, now);
        }
        moved
    }

    /// The next datagram to send. Probes and STUN requests come first, then the device's
    /// WireGuard datagrams, handed over as boringtun made them.
    fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if let Some(t) = self.transmits.pop_front() {
            return Some(t);
        }
        if let Some((dst, payload)) = self.paths.poll_transmit() {
            return Some(Transmit::Udp { dst, payload });
        }
        loop {
            let t = self.device.poll_transmit()?;
            if let Some(peer) = t.peer {
                self.paths.handle_tx(&peer, now);
            }
            match (t.dst, t.peer) {
                (Via::Direct(dst), _) => return Some(Transmit::Udp { dst, payload: t.payload }),
                (Via::Relay, Some(peer)) => {
                    self.relay_bytes.entry(peer).or_default().tx += t.payload.len() as u64;
                    return Some(Transmit::Relay { peer, payload: t.payload });
                }
                (Via::Relay, None) => continue,
            }
        }
    }

    fn report_candidates(&mut self) {
        let mut c = self.base_candidates.clone();
        if let Some(r) = self.stun.reflexive {
            if !c.iter().any(|x| x.addr == r) {
                c.push(Candidate::new(r, CandidateKind::Reflexive));
            }
        }
        self.events.push_back(Event::Candidates(c));
    }

    fn path_changed(&mut self, ev: PathEvent, now: Instant) {
        self.device.set_endpoint(&ev.key, ev.via, !ev.proven);
        let name = self.peer_names.get(&ev.key).map(|n| n.0.as_str()).unwrap_or("?");
        match ev.via {
            Some(Via::Direct(a)) if ev.proven => {
                tracing::info!(peer = %name, path = "direct", endpoint = %a, "path changed")
            }
            Some(Via::Direct(a)) => {
                tracing::debug!(peer = %name, endpoint = %a, "trying an unproven endpoint")
            }
            Some(Via::Relay) => {
                tracing::info!(peer = %name, path = "relay", "path changed");
                // The direct path may have died because our public address moved: ask again now.
                self.stun.ask_now(now);
            }
            None => tracing::info!(peer = %name, path = "down", "path changed"),
        }
    }
}

impl<R: Role> Engine<R> {
    /// An engine that has seen no map yet.
    pub fn new(cfg: EngineConfig, now: Instant) -> Engine<R> {
        Engine { role: R::new(&cfg), node: Node::new(cfg, now) }
    }

    /// The latest time the shell must call [`Engine::handle_timeout`] by; at most a second ahead,
    /// which paces the flows' listen, handshake and connect timeouts.
    pub fn next_deadline(&mut self, now: Instant) -> Instant {
        self.node.next_deadline(now)
    }

    /// A new network map. Flows that cannot go on end here: all of them when the overlay address
    /// changed (their ends are closed through `port`), a site's flows of peers that lost their
    /// grant, a client's flows to resources it lost.
    pub fn handle_map(&mut self, map: Arc<NetworkMap>, port: &mut impl FlowPort, now: Instant) {
        if let Some(addr) = self.node.apply_map(&map, R::STACK_ANY_IP, R::PERSISTENT_KEEPALIVE, port, now) {
            self.role.on_address(addr);
        }
        self.role.on_map(&mut self.node, &map);
        tracing::info!(
            version = map.version,
            peers = map.peers.len(),
            resources = map.resources.len(),
            "network map applied"
        );
        self.node.map = Some(map);
    }

    /// A datagram on the node's UDP socket: a path probe, a STUN answer, or WireGuard.
    pub fn handle_datagram(&mut self, from: SocketAddr, data: &[u8], now: Instant) {
        self.node.handle_datagram(from, data, now);
    }

    /// A WireGuard packet the relay brought from peer `from`.
    pub fn handle_relayed(&mut self, from: PublicKey, data: &[u8]) {
        self.node.handle_relayed(from, data);
    }

    /// The relay link went up or down.
    pub fn handle_relay_up(&mut self, up: bool, now: Instant) {
        self.node.handle_relay_up(up, now);
    }

    /// The answer to [`Effect::ResolveStun`].
    pub fn handle_stun_resolved(&mut self, name: String, addr: Option<SocketAddr>, now: Instant) {
        self.node.handle_stun_resolved(name, addr, now);
    }

    /// Timers: WireGuard's, the paths', STUN's, the flows' RTT hints and trace. A no-op when nothing
    /// is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.node.handle_timeout(now);
    }

    /// One round: decrypted packets to the role, the stack polled, flow bytes moved through `port`,
    /// the stack's output encrypted, path changes applied. Whether anything moved; the shell drains
    /// the outputs after each round and runs another while something did (at most
    /// [`DRIVE_ROUNDS`]), counting a round that had transmits as one that moved.
    pub fn drive(&mut self, port: &mut impl FlowPort, now: Instant) -> bool {
        let mut moved = false;
        while let Some(inb) = self.node.device.poll_inbound() {
            moved = true;
            self.role.on_inbound(&mut self.node, inb.peer, inb.packet, now);
        }
        moved | self.node.drive_stack(port, now)
    }

    /// The end of a wake-up (a site's UDP flows idle for [`UDP_IDLE`] end).
    pub fn settle(&mut self, now: Instant) {
        self.role.on_settle(&mut self.node, now);
    }

    /// The next datagram to send. Probes and STUN requests come first, then the device's
    /// WireGuard datagrams, handed over as boringtun made them.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.node.poll_transmit(now)
    }

    /// The next packet or datagram for the local side.
    pub fn poll_deliver(&mut self) -> Option<Deliver> {
        self.node.delivers.pop_front()
    }

    /// The next I/O to perform.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.node.effects.pop_front()
    }

    /// The next event for the control plane.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.node.events.pop_front()
    }

    /// This node's overlay address, once a map gave it.
    pub fn own_addr(&self) -> Option<Ipv4Addr> {
        self.node.own_addr
    }

    /// A snapshot of the engine for `/status`.
    pub fn status(&self) -> NodeStatus {
        let mut st = self.node.status(R::KIND);
        self.role.status(&mut st);
        st
    }
}
