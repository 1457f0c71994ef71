//! The data-plane event loop shared by the site agent and the userspace client.
//!
//! One task owns the UDP socket, the WireGuard [`Device`] and the userspace [`NetStack`]. It waits on
//! the socket, on commands (new outbound flows, status requests), on the network map, on flow data from
//! application tasks and on timers; after each wake-up it pumps everything until nothing moves, with a
//! budget on datagrams per wake-up so one busy source cannot starve the rest.
//!
//! Application sides (a target connection on a site, a SOCKS client on a client) run in their own
//! tasks and talk to the loop through bounded channels: when a channel is full the loop stops reading
//! that socket's receive buffer, the TCP window closes, and the sender slows down. Nothing grows
//! without bound.
//!
//! On a site the loop enforces grants itself: a packet must come from a peer whose inner source is
//! its own overlay address (checked by the device) and go to a resource that peer was granted;
//! anything else is dropped and counted.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State as TcpState;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tunnel_core::map::{Candidate, NetworkMap, NodeKind, RelayInfo};
use tunnel_core::netstack::{FlowCount, Limit, NetStack};
use tunnel_core::packet::filter::{InboundFilter, Refusal};
use tunnel_core::packet::{self, Proto};
use tunnel_core::path::{CandidateKind, Paths, PeerCandidates, Via};
use tunnel_core::wg::{Device, PeerConfig};
use tunnel_core::{probe, stun};

use crate::relay::{RelayLink, RelayState};

mod effects;
mod sockets;

use effects::{Effect, Tasks};
pub(crate) use sockets::bind_udp_std;
pub use sockets::{bind_socket, bridge_stream};

/// Datagrams handled per wake-up before the loop services its other inputs.
const DATAGRAM_BUDGET: usize = 256;
/// Chunks queued per flow direction between the loop and the application side.
const FLOW_CHANNEL: usize = 16;
/// Chunk size when draining a socket's receive buffer.
const CHUNK: usize = 16 * 1024;
/// UDP flows on a site end after this long without traffic.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// How long a site waits for a target's name to resolve and the target to accept.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// A site's listening socket that has not taken its SYN by then is dropped.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
/// A site's flow still in SYN-RECEIVED by then (the client never acknowledged the SYN-ACK) is reset
/// and frees its target connection and buffers. Without it smoltcp keeps retrying for its 120 s
/// timeout.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client's connection still in SYN-SENT by then is given up: the site may take up to
/// [`DIAL_TIMEOUT`] to dial the target before it answers.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Default keepalive: WireGuard's persistent keepalive and the idle path check, holding NAT mappings open.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(25);
/// How often the node asks the STUN responder for its public address.
const STUN_EVERY: Duration = Duration::from_secs(25);
/// A STUN request with no answer is retried after this long.
const STUN_RETRY: Duration = Duration::from_secs(1);

/// How the node finds paths to its peers.
#[derive(Debug)]
pub struct PathOptions {
    /// Keepalive interval (WireGuard persistent keepalive, idle path checks).
    pub keepalive: Duration,
    /// Relay only: no punching, no direct paths.
    pub force_relay: bool,
    /// Candidates the node always offers (LAN address, advertised endpoints); the reflexive address
    /// learned through STUN is added to them.
    pub base_candidates: Vec<Candidate>,
    /// Where to report the node's candidates when they change (the control link).
    pub candidates_tx: Option<mpsc::Sender<Vec<Candidate>>>,
    /// The userspace TCP stack (it rides on the paths: its congestion control and buffers).
    pub stack: tunnel_core::netstack::StackOptions,
}

impl Default for PathOptions {
    fn default() -> Self {
        PathOptions {
            keepalive: DEFAULT_KEEPALIVE,
            force_relay: false,
            base_candidates: vec![],
            candidates_tx: None,
            stack: Default::default(),
        }
    }
}

/// Relay traffic per peer.
#[derive(Debug, Default, Clone, Copy)]
struct RelayBytes {
    tx: u64,
    rx: u64,
}

/// The application ends of one TCP flow through the tunnel.
#[derive(Debug)]
pub struct FlowEnds {
    /// Bytes to send into the tunnel. Drop it to close the sending side (FIN).
    pub tx: mpsc::Sender<Bytes>,
    /// Bytes from the tunnel; `None` when the remote side closed.
    pub rx: mpsc::Receiver<Bytes>,
    /// Ping this after consuming from `rx` or sending on `tx`, so the loop moves more data.
    pub wake: Arc<Notify>,
}

/// A request to the loop.
#[derive(Debug)]
pub enum Command {
    /// Open a TCP flow to an overlay address (client).
    Connect { remote: SocketAddrV4, reply: oneshot::Sender<Result<FlowEnds, String>> },
    /// Send one UDP datagram from `local_port` to `remote` (client); replies arrive on `replies`.
    UdpSend {
        local_port: u16,
        remote: SocketAddrV4,
        payload: Vec<u8>,
        replies: mpsc::Sender<(SocketAddrV4, Vec<u8>)>,
    },
    /// The UDP association using `local_port` ended (client).
    UdpClose { local_port: u16 },
    /// A snapshot for `/status`.
    Status { reply: oneshot::Sender<serde_json::Value> },
}

/// Handle to a running data plane.
#[derive(Debug, Clone)]
pub struct Dataplane {
    /// Commands to the loop.
    pub commands: mpsc::Sender<Command>,
    /// The UDP socket's local address.
    pub local_addr: SocketAddr,
}

impl Dataplane {
    /// Opens a TCP flow to `remote` through the tunnel.
    pub async fn connect(&self, remote: SocketAddrV4) -> Result<FlowEnds, String> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Connect { remote, reply })
            .await
            .map_err(|_| "data plane stopped".to_string())?;
        // A little longer than the loop's own CONNECT_TIMEOUT, which then answers with the reason.
        match tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(2), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("data plane stopped".into()),
            Err(_) => Err(format!("connection to {remote} timed out (no answer through the tunnel)")),
        }
    }

    /// The status document.
    pub async fn status(&self) -> Option<serde_json::Value> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Status { reply }).await.ok()?;
        rx.await.ok()
    }
}

struct Flow {
    to_app: Option<mpsc::Sender<Bytes>>,
    from_app: mpsc::Receiver<Bytes>,
    pending: Option<Bytes>,
    app_done: bool,
    connect_reply: Option<(oneshot::Sender<Result<FlowEnds, String>>, FlowEnds)>,
    peer: Option<[u8; 32]>,
    /// Site flows: the socket has left Listen (accepted its SYN).
    accepted: bool,
    created: Instant,
}

impl Flow {
    /// A flow and the application's ends of its channels. `peer` is set for a site's flows.
    fn new(peer: Option<[u8; 32]>, wake: Arc<Notify>, now: Instant) -> (Flow, FlowEnds) {
        let (to_app_tx, to_app_rx) = mpsc::channel(FLOW_CHANNEL);
        let (from_app_tx, from_app_rx) = mpsc::channel(FLOW_CHANNEL);
        let flow = Flow {
            to_app: Some(to_app_tx),
            from_app: from_app_rx,
            pending: None,
            app_done: false,
            connect_reply: None,
            peer,
            accepted: false,
            created: now,
        };
        (flow, FlowEnds { tx: from_app_tx, rx: to_app_rx, wake })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Tuple {
    src: SocketAddrV4,
    dst: SocketAddrV4,
}

struct UdpFlow {
    /// The peer whose grant this flow rides on.
    peer: [u8; 32],
    /// `None` while the target is being resolved; datagrams wait in `queued` meanwhile.
    sock: Option<Arc<UdpSocket>>,
    queued: Vec<Vec<u8>>,
    last: Instant,
    /// The task that dials the target and reads its replies, once the shell started it
    /// ([`Effect::OpenUdp`]); it ends with the flow.
    task: Option<tokio::task::AbortHandle>,
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

enum UdpEvent {
    Ready(Tuple, Arc<UdpSocket>),
    Data(Tuple, Vec<u8>),
}

/// A resource as the site serves it.
#[derive(Clone, Debug)]
struct ServedResource {
    target: String,
    port: u16,
}

/// New flows a site refused because a flow limit was reached, by kind and by limit.
#[derive(Default, Debug, Clone, Copy, serde::Serialize)]
struct Refused {
    pending_dial_peer: u64,
    pending_dial_node: u64,
    udp_peer: u64,
    udp_node: u64,
}

impl Refused {
    fn pending_dial(&mut self, l: Limit) {
        match l {
            Limit::Peer => self.pending_dial_peer += 1,
            Limit::Node => self.pending_dial_node += 1,
        }
    }

    fn udp(&mut self, l: Limit) {
        match l {
            Limit::Peer => self.udp_peer += 1,
            Limit::Node => self.udp_node += 1,
        }
    }
}

#[derive(Default, Debug, Clone, Copy, serde::Serialize)]
struct Counters {
    not_granted: u64,
    /// TUN client: a packet from a site that answers nothing this client sent.
    unsolicited: u64,
    /// TUN client: a packet from a site for another address than the client's own.
    wrong_destination: u64,
    wrong_port: u64,
    unparsable: u64,
    dial_failures: u64,
    flows_opened: u64,
}

struct Loop {
    /// TUN mode: decrypted packets go here instead of into the userspace stack.
    to_os: Option<mpsc::Sender<Vec<u8>>>,
    /// TUN mode: what this client started, so that only replies to it come in, and only for its
    /// own address.
    filter: InboundFilter,
    kind: NodeKind,
    udp: Arc<UdpSocket>,
    /// Batched, offloaded UDP I/O on `udp` (recvmmsg with GRO, sendmsg with GSO where the kernel has it).
    udp_state: Arc<quinn_udp::UdpSocketState>,
    /// WireGuard datagrams waiting to be sent, in order; flushed in GSO batches.
    out_batch: Vec<(SocketAddr, Vec<u8>)>,
    gso_buf: Vec<u8>,
    device: Device,
    stack: Option<NetStack>,
    own_addr: Option<Ipv4Addr>,
    map: Option<Arc<NetworkMap>>,
    /// Site: peer key -> resource addresses it may reach.
    grants: HashMap<[u8; 32], Vec<Ipv4Addr>>,
    /// Site: resource address -> what to dial.
    served: HashMap<Ipv4Addr, ServedResource>,
    peer_names: BTreeMap<[u8; 32], (String, String)>,
    flows: HashMap<SocketHandle, Flow>,
    /// Site: SYNs held while their targets are dialled, counted in `pending_count`.
    pending_syn: HashMap<Tuple, ([u8; 32], Vec<u8>)>,
    pending_count: FlowCount,
    /// Site: UDP flows, counted in `udp_count`.
    udp_flows: HashMap<Tuple, UdpFlow>,
    udp_count: FlowCount,
    refused: Refused,
    /// What the handlers asked the shell to do, performed after each pump ([`effects`]).
    effects: VecDeque<Effect>,
    client_udp: HashMap<u16, mpsc::Sender<(SocketAddrV4, Vec<u8>)>>,
    wake: Arc<Notify>,
    counters: Counters,
    seed: u64,
    /// All the loop's own randomness (STUN transaction ids), from `seed`.
    rng: StdRng,
    started: Instant,
    paths: Paths,
    keepalive: Duration,
    force_relay: bool,
    relay_out: mpsc::Sender<Vec<u8>>,
    relay_list: watch::Sender<Vec<RelayInfo>>,
    relay_state: RelayState,
    relay_bytes: HashMap<[u8; 32], RelayBytes>,
    stun: StunClient,
    base_candidates: Vec<Candidate>,
    candidates_tx: Option<mpsc::Sender<Vec<Candidate>>>,
    next_flow_trace: Instant,
    next_rtt_hints: Instant,
    stack_options: tunnel_core::netstack::StackOptions,
}

/// Learns the node's reflexive address over its WireGuard socket.
#[derive(Debug, Default)]
struct StunClient {
    /// `HOST:PORT` as the map names it, and its address once resolved.
    server: Option<(String, Option<SocketAddr>)>,
    /// A resolution of `server`'s name was asked for and has not answered yet.
    resolving: bool,
    outstanding: Option<stun::TxId>,
    next: Option<Instant>,
    reflexive: Option<SocketAddr>,
}

/// Starts the data plane on `listen` with this node's private key; it follows the maps published on
/// `maps` until the returned task is aborted.
/// Packets exchanged with the operating system (a TUN device) instead of the userspace stack.
#[derive(Debug)]
pub struct OsPackets {
    /// Packets the system wants sent through the tunnel.
    pub from_os: mpsc::Receiver<Vec<u8>>,
    /// Packets from the tunnel for the system.
    pub to_os: mpsc::Sender<Vec<u8>>,
}

pub async fn start(
    kind: NodeKind,
    private_key: [u8; 32],
    listen: SocketAddr,
    maps: watch::Receiver<Option<Arc<NetworkMap>>>,
) -> anyhow::Result<(Dataplane, tokio::task::JoinHandle<()>)> {
    start_with(kind, private_key, listen, maps, None, PathOptions::default()).await
}

/// Like [`start`], with inner packets going to and from the system (`os`) rather than the userspace
/// stack.
pub async fn start_with(
    kind: NodeKind,
    private_key: [u8; 32],
    listen: SocketAddr,
    maps: watch::Receiver<Option<Arc<NetworkMap>>>,
    os: Option<OsPackets>,
    opts: PathOptions,
) -> anyhow::Result<(Dataplane, tokio::task::JoinHandle<()>)> {
    let socket = bind_socket(listen)?;
    start_on(kind, private_key, socket, maps, os, opts).await
}

/// Like [`start_with`], on a socket bound already.
pub async fn start_on(
    kind: NodeKind,
    private_key: [u8; 32],
    socket: UdpSocket,
    mut maps: watch::Receiver<Option<Arc<NetworkMap>>>,
    os: Option<OsPackets>,
    opts: PathOptions,
) -> anyhow::Result<(Dataplane, tokio::task::JoinHandle<()>)> {
    let udp = Arc::new(socket);
    let udp_state = Arc::new(
        quinn_udp::UdpSocketState::new((&*udp).into())
            .map_err(|e| anyhow::anyhow!("cannot set up the WireGuard UDP socket: {e}"))?,
    );
    let local_addr = udp.local_addr()?;
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Command>(64);
    let (udp_reply_tx, mut udp_reply_rx) = mpsc::channel(1024);
    let (mut from_os, to_os) = match os {
        Some(o) => (Some(o.from_os), Some(o.to_os)),
        None => (None, None),
    };
    let (relay, relay_task) = crate::relay::start();
    let RelayLink { out: relay_out, inbound: mut relay_in, state: mut relay_state, relays: relay_list } =
        relay;
    let (stun_resolve_tx, mut stun_resolve_rx) = mpsc::channel(4);
    let mut lp =
        Loop::new(kind, private_key, udp.clone(), udp_state.clone(), to_os, opts, relay_out, relay_list);
    let task = tokio::spawn(async move {
        // The relay link lives and dies with the loop.
        struct AbortOnDrop(tokio::task::JoinHandle<()>);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _relay_task = AbortOnDrop(relay_task);
        // One buffer per datagram of a recvmmsg batch; with GRO each may hold many datagrams.
        let mut bufs: Vec<Vec<u8>> = (0..quinn_udp::BATCH_SIZE).map(|_| vec![0u8; 65_536]).collect();
        let mut metas = vec![quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
        let mut tasks = Tasks {
            dials: tokio::task::JoinSet::new(),
            stun_resolved: stun_resolve_tx,
            udp_events: udp_reply_tx,
        };
        if let Some(m) = maps.borrow_and_update().clone() {
            lp.apply_map(m, Instant::now());
            lp.perform_effects(&mut tasks);
        }
        loop {
            // The clock is read once per wake-up, when the wait ends: every handler and the pump
            // after it see that time (the handlers saw the time before the wait, which could be
            // seconds old).
            let mut now = Instant::now();
            let deadline = lp.next_deadline(now);
            let wake = lp.wake.clone();
            tokio::select! {
                r = udp.readable() => {
                    now = Instant::now();
                    if r.is_ok() {
                        let mut handled = 0;
                        while handled < DATAGRAM_BUDGET {
                            let mut iovs: Vec<std::io::IoSliceMut<'_>> =
                                bufs.iter_mut().map(|b| std::io::IoSliceMut::new(b)).collect();
                            let got = udp.try_io(tokio::io::Interest::READABLE, || {
                                udp_state.recv((&*udp).into(), &mut iovs, &mut metas)
                            });
                            let n = match got {
                                Ok(n) => n,
                                Err(e) => {
                                    if e.kind() != std::io::ErrorKind::WouldBlock {
                                        tracing::debug!(error = %e, "UDP receive failed");
                                    }
                                    break;
                                }
                            };
                            for (meta, buf) in metas.iter().zip(bufs.iter()).take(n) {
                                let from = normalize(meta.addr);
                                let stride = if meta.stride == 0 { meta.len } else { meta.stride };
                                for d in buf[..meta.len].chunks(stride.max(1)) {
                                    lp.datagram(from, d, now);
                                    handled += 1;
                                }
                            }
                        }
                    }
                }
                Some((from, p)) = relay_in.recv() => {
                    now = Instant::now();
                    lp.relayed(from, &p);
                    for _ in 1..DATAGRAM_BUDGET {
                        match relay_in.try_recv() {
                            Ok((from, p)) => lp.relayed(from, &p),
                            Err(_) => break,
                        }
                    }
                }
                r = relay_state.changed() => {
                    now = Instant::now();
                    if r.is_ok() {
                        let st = relay_state.borrow_and_update().clone();
                        lp.paths.set_relay(st.up, now);
                        lp.relay_state = st;
                    }
                }
                Some((name, addr)) = stun_resolve_rx.recv() => {
                    now = Instant::now();
                    lp.stun_resolved(name, addr, now);
                }
                c = cmd_rx.recv() => match c {
                    Some(c) => {
                        now = Instant::now();
                        lp.command(c, now);
                    }
                    None => break,
                },
                r = maps.changed() => {
                    if r.is_err() { break; }
                    now = Instant::now();
                    if let Some(m) = maps.borrow_and_update().clone() { lp.apply_map(m, now); }
                }
                Some(p) = async { match from_os.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                    now = Instant::now();
                    lp.send_from_os(&p, now);
                    if let Some(r) = from_os.as_mut() {
                        for _ in 1..DATAGRAM_BUDGET {
                            match r.try_recv() {
                                Ok(p) => lp.send_from_os(&p, now),
                                Err(_) => break,
                            }
                        }
                    }
                }
                Some(r) = tasks.dials.join_next(), if !tasks.dials.is_empty() => {
                    now = Instant::now();
                    // A dial task cannot panic short of a bug; it is then dropped with its SYN,
                    // which the pending-dial timeout of the client's connect covers.
                    if let Ok((tuple, result)) = r {
                        lp.dialed(tuple, result, now);
                    }
                }
                Some(ev) = udp_reply_rx.recv() => {
                    now = Instant::now();
                    lp.udp_event(ev, now);
                }
                _ = wake.notified() => now = Instant::now(),
                _ = tokio::time::sleep_until(deadline.into()) => now = Instant::now(),
            }
            lp.pump(now).await;
            lp.perform_effects(&mut tasks);
        }
    });
    Ok((Dataplane { commands: cmd_tx, local_addr }, task))
}

impl Loop {
    /// A loop on `udp` that has seen no map yet; its relay link is `relay_out` and `relay_list`.
    #[allow(clippy::too_many_arguments)]
    fn new(
        kind: NodeKind,
        private_key: [u8; 32],
        udp: Arc<UdpSocket>,
        udp_state: Arc<quinn_udp::UdpSocketState>,
        to_os: Option<mpsc::Sender<Vec<u8>>>,
        opts: PathOptions,
        relay_out: mpsc::Sender<Vec<u8>>,
        relay_list: watch::Sender<Vec<RelayInfo>>,
    ) -> Loop {
        let seed: u64 = rand::random();
        let now = Instant::now();
        let flow_limits = opts.stack.flows.sane();
        Loop {
            to_os,
            filter: InboundFilter::default(),
            kind,
            udp,
            udp_state,
            out_batch: Vec::with_capacity(64),
            gso_buf: Vec::with_capacity(64 * 1024),
            device: Device::new(private_key, seed as u32),
            stack: None,
            own_addr: None,
            map: None,
            grants: HashMap::new(),
            served: HashMap::new(),
            peer_names: BTreeMap::new(),
            flows: HashMap::new(),
            pending_syn: HashMap::new(),
            pending_count: FlowCount::new(flow_limits.pending_dials_per_peer, flow_limits.pending_dials),
            udp_flows: HashMap::new(),
            udp_count: FlowCount::new(flow_limits.udp_per_peer, flow_limits.udp),
            refused: Refused::default(),
            effects: VecDeque::new(),
            client_udp: HashMap::new(),
            wake: Arc::new(Notify::new()),
            counters: Counters::default(),
            seed,
            rng: StdRng::seed_from_u64(seed.rotate_left(31)),
            started: now,
            paths: Paths::new(private_key, opts.keepalive, seed.rotate_left(17), now),
            keepalive: opts.keepalive,
            force_relay: opts.force_relay,
            relay_out,
            relay_list,
            relay_state: RelayState::default(),
            relay_bytes: HashMap::new(),
            stun: StunClient::default(),
            base_candidates: opts.base_candidates,
            candidates_tx: opts.candidates_tx,
            next_flow_trace: now,
            next_rtt_hints: now,
            stack_options: opts.stack,
        }
    }
}

fn normalize(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => a,
        },
        v4 => v4,
    }
}

fn parse_net(s: &str) -> Option<ipnet::Ipv4Net> {
    s.parse().ok().or_else(|| s.parse::<Ipv4Addr>().ok().map(ipnet::Ipv4Net::from))
}

impl Loop {
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

    fn apply_map(&mut self, map: Arc<NetworkMap>, now: Instant) {
        let own: Option<Ipv4Addr> = map.overlay_addr.parse().ok();
        if self.stack.is_none() || own != self.own_addr {
            if let Some(addr) = own {
                let prefix = map.overlay_cidr.parse::<ipnet::Ipv4Net>().map(|n| n.prefix_len()).unwrap_or(16);
                let any_ip = self.kind == NodeKind::Site;
                let (seed, opts) = (self.seed, self.stack_options);
                self.stack = Some(NetStack::with_options(addr, prefix, map.mtu, any_ip, seed, now, opts));
                self.flows.clear();
                self.own_addr = own;
                self.filter.set_address(addr);
            }
        }
        let mut peers = Vec::new();
        let mut path_peers = Vec::new();
        self.grants.clear();
        self.peer_names.clear();
        let addr_of: HashMap<&str, Ipv4Addr> = map
            .resources
            .values()
            .filter_map(|r| Some((r.name.as_str(), r.overlay_addr.parse().ok()?)))
            .collect();
        for p in map.peers.values() {
            let Some(key) = p.public_key else { continue };
            let allowed: Vec<_> = p.allowed_ips.iter().filter_map(|s| parse_net(s)).collect();
            // The path logic picks the endpoint; the device starts without one.
            let keepalive =
                (self.kind == NodeKind::Client).then_some(self.keepalive.as_secs().clamp(1, 600) as u16);
            peers.push(PeerConfig { key, allowed, endpoint: None, keepalive });
            let candidates = p
                .candidates
                .iter()
                .filter(|_| !self.force_relay)
                .filter_map(|c| {
                    let addr: SocketAddr = c.addr.parse().ok()?;
                    Some((normalize(addr), CandidateKind::from_name(&c.kind)?))
                })
                .collect();
            path_peers.push(PeerCandidates { key, candidates });
            if self.kind == NodeKind::Site {
                self.grants.insert(
                    key,
                    p.resources.iter().filter_map(|r| addr_of.get(r.as_str()).copied()).collect(),
                );
            }
            self.peer_names.insert(key, (p.name.clone(), p.node_id.to_string()));
        }
        self.served.clear();
        if self.kind == NodeKind::Site {
            for r in map.resources.values() {
                if let (Ok(addr), Some(target)) = (r.overlay_addr.parse(), r.target.clone()) {
                    self.served.insert(addr, ServedResource { target, port: r.port });
                }
            }
        }
        self.device.set_peers(peers, now);
        self.paths.set_peers(path_peers, now);
        self.relay_bytes.retain(|k, _| self.peer_names.contains_key(k));
        if *self.relay_list.borrow() != map.relays {
            self.relay_list.send_replace(map.relays.clone());
        }
        // Resolved once per name; a name that did not resolve is tried again with the next map.
        let stun_name = map.stun_addr.clone();
        let same = self.stun.server.as_ref().map(|s| &s.0) == stun_name.as_ref();
        let unresolved = self.stun.server.as_ref().is_some_and(|s| s.1.is_none());
        if !same || (unresolved && !self.stun.resolving) {
            self.stun.next = None;
            self.stun.resolving = stun_name.is_some();
            self.stun.server = stun_name.clone().map(|n| (n, None));
            if let Some(name) = stun_name {
                self.effects.push_back(Effect::ResolveStun(name));
            }
        }
        // Flows of peers that lost their grant end now (revocation takes effect at once).
        if self.kind == NodeKind::Site {
            // Aborted sockets stay until the stack has sent their reset; `service_flows` then
            // removes them and gives their budget back.
            let grants = &self.grants;
            if let Some(stack) = self.stack.as_mut() {
                for (h, f) in &self.flows {
                    let Some(k) = f.peer else { continue };
                    let s = stack.socket(*h);
                    if let Some(smoltcp::wire::IpAddress::Ipv4(a)) = s.local_endpoint().map(|e| e.addr) {
                        if !grants.get(&k).is_some_and(|g| g.contains(&a)) {
                            s.abort();
                        }
                    }
                }
            }
            let grants = std::mem::take(&mut self.grants);
            self.retain_udp_flows(|t, f| grants.get(&f.peer).is_some_and(|g| g.contains(t.dst.ip())));
            self.grants = grants;
        }
        // A client's flows to resources it lost end now too: the site would refuse them anyway, and
        // without the resource's route not even that refusal could come back.
        if self.kind == NodeKind::Client {
            let reachable: std::collections::HashSet<Ipv4Addr> =
                map.resources.values().filter_map(|r| r.overlay_addr.parse().ok()).collect();
            if let Some(stack) = self.stack.as_mut() {
                for h in self.flows.keys() {
                    let s = stack.socket(*h);
                    if let Some(smoltcp::wire::IpAddress::Ipv4(a)) = s.remote_endpoint().map(|e| e.addr) {
                        if !reachable.contains(&a) {
                            s.abort();
                        }
                    }
                }
            }
        }
        tracing::info!(
            version = map.version,
            peers = map.peers.len(),
            resources = map.resources.len(),
            "network map applied"
        );
        self.map = Some(map);
    }

    /// A datagram on the node's UDP socket: a path probe, a STUN answer, or WireGuard.
    fn datagram(&mut self, from: SocketAddr, data: &[u8], now: Instant) {
        if probe::is_probe(data) {
            if !self.force_relay {
                self.paths.handle_probe(from, data, now);
            }
        } else if stun::is_stun(data) {
            self.stun_answer(data, now);
        } else if let Some(auth) = self.device.handle_datagram(Via::Direct(from), data) {
            if auth.initiation {
                self.paths.handle_initiation(&auth.peer, from, now);
            }
            self.paths.handle_rx(&auth.peer, from, now);
        }
    }

    /// A WireGuard packet the relay brought from peer `from`.
    fn relayed(&mut self, from: [u8; 32], data: &[u8]) {
        if let Some(b) = self.relay_bytes.get_mut(&from) {
            b.rx += data.len() as u64;
        } else if self.peer_names.contains_key(&from) {
            self.relay_bytes.insert(from, RelayBytes { tx: 0, rx: data.len() as u64 });
        }
        // The relay names the sender: its handshakes count against its own budget only.
        self.device.handle_relayed(&from, data);
    }

    fn stun_resolved(&mut self, name: String, addr: Option<SocketAddr>, now: Instant) {
        if self.stun.server.as_ref().map(|s| &s.0) != Some(&name) {
            return; // a name the map no longer names
        }
        self.stun.resolving = false;
        if addr.is_none() {
            tracing::warn!(server = %name, "cannot resolve the STUN server; the node will not learn its public address");
        }
        self.stun.server = Some((name, addr));
        self.stun.next = addr.map(|_| now);
    }

    /// Sends a STUN request when one is due.
    fn stun_tick(&mut self, now: Instant) {
        let Some(due) = self.stun.next else { return };
        if now < due {
            return;
        }
        let Some((_, Some(server))) = self.stun.server.clone() else { return };
        let mut txid = [0u8; 12];
        self.rng.fill_bytes(&mut txid);
        self.stun.outstanding = Some(txid);
        self.stun.next = Some(now + STUN_RETRY);
        if let Err(e) = self.udp.try_send_to(&stun::request(txid), server) {
            tracing::debug!(%server, error = %e, "STUN request not sent");
        }
    }

    fn stun_answer(&mut self, data: &[u8], now: Instant) {
        let Some(resp) = stun::parse_response(data) else { return };
        if self.stun.outstanding != Some(resp.txid) {
            return;
        }
        self.stun.outstanding = None;
        self.stun.next = Some(now + STUN_EVERY);
        let mapped = normalize(resp.mapped);
        if self.stun.reflexive == Some(mapped) {
            return;
        }
        tracing::info!(reflexive = %mapped, previous = ?self.stun.reflexive, "public address learned");
        self.stun.reflexive = Some(mapped);
        self.report_candidates();
        // Our peers are about to learn the new address from the server: punch towards them now.
        self.paths.punch_all(now);
    }

    fn report_candidates(&self) {
        let mut c = self.base_candidates.clone();
        if let Some(r) = self.stun.reflexive {
            let r = r.to_string();
            if !c.iter().any(|x| x.addr == r) {
                c.push(Candidate { addr: r, kind: "reflexive".into() });
            }
        }
        if let Some(tx) = &self.candidates_tx {
            let _ = tx.try_send(c);
        }
    }

    fn command(&mut self, c: Command, now: Instant) {
        match c {
            Command::Connect { remote, reply } => {
                let (Some(stack), Some(own)) = (self.stack.as_mut(), self.own_addr) else {
                    let _ = reply.send(Err("no network map yet".into()));
                    return;
                };
                let owner = self.device.route(*remote.ip());
                let h = match stack.connect(own, remote, owner.as_ref()) {
                    Ok(h) => h,
                    Err(e) => {
                        let _ = reply.send(Err(format!("cannot open a connection to {remote}: {e}")));
                        return;
                    }
                };
                let (mut flow, ends) = Flow::new(None, self.wake.clone(), now);
                flow.connect_reply = Some((reply, ends));
                self.flows.insert(h, flow);
            }
            Command::UdpSend { local_port, remote, payload, replies } => {
                let Some(own) = self.own_addr else { return };
                self.client_udp.insert(local_port, replies);
                let p = packet::udp_packet(SocketAddrV4::new(own, local_port), remote, &payload);
                self.device.handle_outbound(&p);
            }
            Command::UdpClose { local_port } => {
                self.client_udp.remove(&local_port);
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
    }

    fn status(&self) -> serde_json::Value {
        let mut peers = Vec::new();
        for (key, (name, id)) in &self.peer_names {
            let st = self.device.peer_stats(key);
            let hs = st.as_ref().and_then(|s| s.last_handshake_secs);
            // A session is up while its last handshake is younger than WireGuard's reject-after time;
            // it is direct only over a path that answered probes, relayed only while the relay is up.
            let alive = hs.is_some_and(|secs| secs < 180);
            let path = match self.paths.current(key) {
                Some(Via::Direct(_)) if alive && self.paths.is_direct(key) => "direct",
                Some(Via::Relay) if alive && self.relay_state.up => "relay",
                // A guessed, unproven endpoint is not a path yet.
                _ => "down",
            };
            let ps = self.paths.stats(key).unwrap_or_default();
            let rb = self.relay_bytes.get(key).copied().unwrap_or_default();
            peers.push(serde_json::json!({
                "name": name,
                "node_id": id,
                "path": path,
                "endpoint": st.as_ref().and_then(|s| s.endpoint).map(|e| e.to_string()),
                "last_handshake_secs_ago": hs,
                "tx_bytes": st.as_ref().map(|s| s.tx_bytes).unwrap_or(0),
                "rx_bytes": st.as_ref().map(|s| s.rx_bytes).unwrap_or(0),
                "rtt_ms": st.as_ref().and_then(|s| s.rtt_ms),
                "path_rtt_us": ps.rtt_us,
                "path_changes": ps.path_changes,
                "punch_attempts": ps.punch_attempts,
                "punch_successes": ps.punch_successes,
                "relay_tx_bytes": rb.tx,
                "relay_rx_bytes": rb.rx,
            }));
        }
        serde_json::json!({
            "node": self.map.as_ref().map(|m| m.node_name.clone()),
            "kind": self.kind.as_str(),
            "overlay_addr": self.own_addr.map(|a| a.to_string()),
            "map_version": self.map.as_ref().map(|m| m.version),
            "listen": self.udp.local_addr().ok().map(|a| a.to_string()),
            "uptime_secs": self.started.elapsed().as_secs(),
            "peers": peers,
            "flows": self.flows.len(),
            "udp_flows": self.udp_flows.len(),
            "pending_dials": self.pending_syn.len(),
            "refused": self.refused,
            "tcp": self.stack.as_ref().map(|s| s.stats()).unwrap_or_default(),
            "drops": self.device.drops,
            "counters": self.counters,
            "bad_probes": self.paths.bad_probes,
            "reflexive_addr": self.stun.reflexive.map(|a| a.to_string()),
            "relay": self.relay_state,
        })
    }

    /// A packet the system sends into the tunnel (TUN mode).
    fn send_from_os(&mut self, p: &[u8], now: Instant) {
        self.filter.outbound(p, now);
        self.device.handle_outbound(p);
    }

    fn inbound(&mut self, peer: [u8; 32], pkt: Vec<u8>, now: Instant) {
        if self.to_os.is_some() {
            // What a site may send to this machine: replies to what it started, for its own address
            // only. A compromised site must reach neither the client's services nor, through a
            // kernel that forwards, its LAN.
            match self.filter.inbound(&pkt, now) {
                Ok(()) => {
                    if let Some(os) = &self.to_os {
                        // Full queue: drop, as a congested link would; TCP backs off.
                        let _ = os.try_send(pkt);
                    }
                }
                Err(Refusal::WrongDestination) => self.counters.wrong_destination += 1,
                Err(Refusal::Unsolicited) => self.counters.unsolicited += 1,
                Err(Refusal::Unparsable) => self.counters.unparsable += 1,
            }
            return;
        }
        if self.kind == NodeKind::Client {
            if let Some(Proto::Udp { dst_port, src_port }) = packet::summarize(&pkt).map(|s| s.proto) {
                if let Some(tx) = self.client_udp.get(&dst_port) {
                    if let (Some(s), Some(payload)) = (packet::summarize(&pkt), packet::udp_payload(&pkt)) {
                        let _ = tx.try_send((SocketAddrV4::new(s.src, src_port), payload.to_vec()));
                    }
                    return;
                }
            }
            if let Some(stack) = self.stack.as_mut() {
                stack.push_inbound(pkt);
            }
            return;
        }
        let Some(s) = packet::summarize(&pkt) else {
            self.counters.unparsable += 1;
            return;
        };
        if !self.grants.get(&peer).is_some_and(|g| g.contains(&s.dst)) {
            self.counters.not_granted += 1;
            tracing::debug!(dst = %s.dst, "refusing a packet for a resource the peer was not granted");
            // TCP gets a reset, as a firewall's reject: a flow cut by a revoke ends at once on the
            // client instead of retransmitting into silence.
            if matches!(s.proto, Proto::Tcp { .. }) {
                if let Some(rst) = packet::rst_for(&pkt) {
                    self.device.send_to_peer(&peer, &rst);
                }
            }
            return;
        }
        let Some(res) = self.served.get(&s.dst).cloned() else {
            self.counters.not_granted += 1;
            return;
        };
        match s.proto {
            Proto::Tcp { src_port, dst_port, syn_only } => {
                if dst_port != res.port {
                    self.counters.wrong_port += 1;
                    if let Some(rst) = packet::rst_for_syn(&pkt) {
                        self.device.send_to_peer(&peer, &rst);
                    }
                    return;
                }
                let tuple = Tuple {
                    src: SocketAddrV4::new(s.src, src_port),
                    dst: SocketAddrV4::new(s.dst, dst_port),
                };
                if syn_only && !self.has_socket(tuple) {
                    if self.pending_syn.contains_key(&tuple) {
                        return;
                    }
                    // The flow limits and the memory budget first: no target is dialled for a flow
                    // the stack would refuse (the stack counts its refusals).
                    if let Some(Err(e)) = self.stack.as_mut().map(|st| st.admit(Some(&peer))) {
                        tracing::debug!(flow = ?tuple, error = %e, "refusing a new flow");
                        self.refuse_syn(&peer, &pkt);
                        return;
                    }
                    if let Err(limit) = self.pending_count.add(Some(&peer)) {
                        self.refused.pending_dial(limit);
                        tracing::debug!(flow = ?tuple, limit = limit.as_str(), "too many dials pending; refusing a new flow");
                        self.refuse_syn(&peer, &pkt);
                        return;
                    }
                    self.pending_syn.insert(tuple, (peer, pkt));
                    self.effects.push_back(Effect::DialTcp { tuple, target: res.target });
                    return;
                }
                if let Some(stack) = self.stack.as_mut() {
                    stack.push_inbound(pkt);
                }
            }
            Proto::Udp { src_port, dst_port } => {
                if dst_port != res.port {
                    self.counters.wrong_port += 1;
                    return;
                }
                let tuple = Tuple {
                    src: SocketAddrV4::new(s.src, src_port),
                    dst: SocketAddrV4::new(s.dst, dst_port),
                };
                let Some(payload) = packet::udp_payload(&pkt).map(<[u8]>::to_vec) else { return };
                if let Some(f) = self.udp_flows.get_mut(&tuple) {
                    f.last = now;
                    match &f.sock {
                        Some(sock) => {
                            let _ = sock.try_send(&payload);
                        }
                        None if f.queued.len() < 16 => f.queued.push(payload),
                        None => {}
                    }
                    return;
                }
                if let Err(limit) = self.udp_count.add(Some(&peer)) {
                    // Dropped, as a full NAT table drops; the client's application retries or not.
                    self.refused.udp(limit);
                    tracing::debug!(flow = ?tuple, limit = limit.as_str(), "too many UDP flows; dropping a new one");
                    return;
                }
                self.effects.push_back(Effect::OpenUdp { tuple, target: res.target });
                let flow = UdpFlow { peer, sock: None, queued: vec![payload], last: now, task: None };
                self.udp_flows.insert(tuple, flow);
            }
            Proto::EchoRequest => {
                if let Some(reply) = packet::echo_reply(&pkt) {
                    self.device.send_to_peer(&peer, &reply);
                }
            }
            Proto::Other(_) => self.counters.unparsable += 1,
        }
    }

    /// Sends the queued WireGuard datagrams: runs of equal-size datagrams to one destination go out as
    /// one GSO send (the kernel cuts them), the rest one by one.
    async fn flush_udp(&mut self) {
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

    fn path_changed(&mut self, ev: tunnel_core::path::PathEvent, now: Instant) {
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
                if self.stun.server.as_ref().is_some_and(|s| s.1.is_some()) {
                    self.stun.next = Some(now);
                }
            }
            None => tracing::info!(peer = %name, path = "down", "path changed"),
        }
    }

    fn has_socket(&mut self, t: Tuple) -> bool {
        let Some(stack) = self.stack.as_mut() else { return false };
        self.flows.keys().any(|h| {
            let s = stack.socket(*h);
            let remote = s.remote_endpoint();
            let local = s.local_endpoint();
            matches!((remote, local), (Some(r), Some(l))
                if r.port == t.src.port() && l.port == t.dst.port()
                    && r.addr == smoltcp::wire::IpAddress::Ipv4(*t.src.ip())
                    && l.addr == smoltcp::wire::IpAddress::Ipv4(*t.dst.ip()))
        })
    }

    fn dialed(&mut self, tuple: Tuple, result: Result<TcpStream, String>, now: Instant) {
        let Some((peer, syn)) = self.pending_syn.remove(&tuple) else { return };
        self.pending_count.remove(Some(&peer));
        // A revoke that arrived while the target was being dialled holds.
        let granted = self.grants.get(&peer).is_some_and(|g| g.contains(tuple.dst.ip()));
        match result {
            Ok(_) if !granted => {
                if let Some(rst) = packet::rst_for_syn(&syn) {
                    self.device.send_to_peer(&peer, &rst);
                }
            }
            Ok(stream) => {
                let Some(stack) = self.stack.as_mut() else { return };
                let h = match stack.listen(tuple.dst, Some(&peer)) {
                    Ok(h) => h,
                    Err(e) => {
                        // The target accepted, but this flow would overrun a buffer budget: the
                        // client hears a reset, as from a full server.
                        tracing::debug!(target_flow = ?tuple, error = %e, "refusing a flow");
                        if let Some(rst) = packet::rst_for_syn(&syn) {
                            self.device.send_to_peer(&peer, &rst);
                        }
                        return;
                    }
                };
                let (flow, ends) = Flow::new(Some(peer), self.wake.clone(), now);
                self.flows.insert(h, flow);
                stack.push_inbound(syn);
                self.counters.flows_opened += 1;
                self.effects.push_back(Effect::Bridge(stream, ends));
            }
            Err(e) => {
                self.counters.dial_failures += 1;
                tracing::info!(target_flow = ?tuple, error = %e, "target refused; answering the client with a reset");
                if let Some(rst) = packet::rst_for_syn(&syn) {
                    self.device.send_to_peer(&peer, &rst);
                }
            }
        }
    }

    /// Hands the queued effects to the shell's tasks; a UDP flow keeps the handle of its task (and
    /// one that ended in the meantime has it aborted at once).
    fn perform_effects(&mut self, tasks: &mut Tasks) {
        while let Some(e) = self.effects.pop_front() {
            if let Some((tuple, task)) = tasks.perform(e) {
                match self.udp_flows.get_mut(&tuple) {
                    Some(f) => f.task = Some(task),
                    None => task.abort(),
                }
            }
        }
    }

    fn udp_event(&mut self, ev: UdpEvent, now: Instant) {
        match ev {
            UdpEvent::Ready(tuple, sock) => {
                if let Some(f) = self.udp_flows.get_mut(&tuple) {
                    for d in f.queued.drain(..) {
                        let _ = sock.try_send(&d);
                    }
                    f.sock = Some(sock);
                }
            }
            UdpEvent::Data(tuple, payload) => {
                let Some(f) = self.udp_flows.get_mut(&tuple) else { return };
                f.last = now;
                let Some(peer) = self.device.route(*tuple.src.ip()) else { return };
                let p = packet::udp_packet(tuple.dst, tuple.src, &payload);
                self.device.send_to_peer(&peer, &p);
            }
        }
    }

    /// Moves everything that can move: decrypted packets into the stack, socket data to and from the
    /// application channels, stack output into the tunnel, datagrams onto the socket.
    async fn pump(&mut self, now: Instant) {
        self.device.handle_timeout(now);
        self.paths.handle_timeout(now);
        self.stun_tick(now);
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
        for _ in 0..64 {
            let mut moved = false;
            while let Some(inb) = self.device.poll_inbound() {
                moved = true;
                self.inbound(inb.peer, inb.packet, now);
            }
            if let Some(stack) = self.stack.as_mut() {
                stack.poll(now);
                moved |= service_flows(stack, &mut self.flows, now);
                stack.poll(now);
                while let Some(p) = stack.pop_outbound() {
                    moved = true;
                    self.device.handle_outbound(&p);
                }
            }
            while let Some(ev) = self.paths.poll_event() {
                self.path_changed(ev, now);
            }
            while let Some((dst, p)) = self.paths.poll_transmit() {
                self.send_udp(&p, dst).await;
            }
            while let Some(t) = self.device.poll_transmit() {
                moved = true;
                match t.dst {
                    Via::Direct(dst) => {
                        self.out_batch.push((dst, t.payload));
                        if self.out_batch.len() >= 64 {
                            self.flush_udp().await;
                        }
                    }
                    Via::Relay => {
                        if let Some(peer) = t.peer {
                            self.relay_bytes.entry(peer).or_default().tx += t.payload.len() as u64;
                            // A full queue drops, as a congested link would.
                            let _ =
                                self.relay_out.try_send(tunnel_core::relay::encode_packet(&peer, &t.payload));
                        }
                    }
                }
                if let Some(peer) = t.peer {
                    self.paths.handle_tx(&peer, now);
                }
            }
            self.flush_udp().await;
            if !moved {
                break;
            }
        }
        let idle_cutoff = now.checked_sub(UDP_IDLE).unwrap_or(now);
        self.retain_udp_flows(|_, f| f.last >= idle_cutoff);
    }

    /// Keeps the UDP flows `keep` says to; the others end (their tasks with them) and are uncounted.
    fn retain_udp_flows(&mut self, keep: impl Fn(&Tuple, &UdpFlow) -> bool) {
        let count = &mut self.udp_count;
        self.udp_flows.retain(|t, f| {
            let k = keep(t, f);
            if !k {
                count.remove(Some(&f.peer));
            }
            k
        });
    }

    /// Answers a site's refused SYN with a reset, as a full server would.
    fn refuse_syn(&mut self, peer: &[u8; 32], syn: &[u8]) {
        if let Some(rst) = packet::rst_for_syn(syn) {
            self.device.send_to_peer(peer, &rst);
        }
    }
}

/// Moves data between sockets and application channels; drops finished flows. Returns whether
/// anything moved.
fn service_flows(stack: &mut NetStack, flows: &mut HashMap<SocketHandle, Flow>, now: Instant) -> bool {
    let mut moved = false;
    let mut done = Vec::new();
    for (h, f) in flows.iter_mut() {
        let s = stack.socket(*h);
        if f.peer.is_some() {
            // A site socket listens for exactly one connection. Back in Listen after a reset, or never
            // taken, it must not wait for (and hand the target to) somebody else's SYN.
            if s.state() != TcpState::Listen {
                f.accepted = true;
            } else if f.accepted || now.saturating_duration_since(f.created) > LISTEN_TIMEOUT {
                s.abort();
                done.push(*h);
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
            if let Some((reply, _)) = f.connect_reply.take() {
                let _ = reply.send(Err("the resource did not answer the connection (timed out)".into()));
            }
            // Removed on the next pass, after the stack has sent the reset.
            s.abort();
            moved = true;
            continue;
        }
        if let Some((_, _)) = &f.connect_reply {
            match s.state() {
                TcpState::Established => {
                    if let Some((reply, ends)) = f.connect_reply.take() {
                        let _ = reply.send(Ok(ends));
                    }
                }
                TcpState::Closed | TcpState::TimeWait => {
                    if let Some((reply, _)) = f.connect_reply.take() {
                        let _ = reply.send(Err("connection refused by the resource".into()));
                    }
                    done.push(*h);
                    continue;
                }
                _ => continue,
            }
        }
        // Tunnel -> application.
        if let Some(tx) = &f.to_app {
            while s.can_recv() {
                let Ok(permit) = tx.try_reserve() else { break };
                let mut chunk = Vec::new();
                let _ = s.recv(|b| {
                    let n = b.len().min(CHUNK);
                    chunk.extend_from_slice(&b[..n]);
                    (n, ())
                });
                if chunk.is_empty() {
                    break;
                }
                permit.send(Bytes::from(chunk));
                moved = true;
            }
            let opening = matches!(s.state(), TcpState::Listen | TcpState::SynSent | TcpState::SynReceived);
            if !opening && !s.may_recv() && !s.can_recv() {
                // The remote side sent FIN (or the socket died): end of stream for the application.
                f.to_app = None;
                moved = true;
            }
        }
        // Application -> tunnel.
        loop {
            if f.pending.is_none() && !f.app_done {
                match f.from_app.try_recv() {
                    Ok(b) => f.pending = Some(b),
                    Err(mpsc::error::TryRecvError::Empty) => {}
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        f.app_done = true;
                        s.close();
                        moved = true;
                    }
                }
            }
            let Some(p) = f.pending.as_mut() else { break };
            if !s.can_send() {
                break;
            }
            match s.send_slice(p) {
                Ok(n) if n > 0 => {
                    moved = true;
                    if n == p.len() {
                        f.pending = None;
                    } else {
                        let rest = p.slice(n..);
                        *p = rest;
                        break;
                    }
                }
                _ => break,
            }
        }
        if matches!(s.state(), TcpState::Closed | TcpState::TimeWait) && (f.to_app.is_none() || !s.is_open())
        {
            done.push(*h);
        }
    }
    for h in done {
        flows.remove(&h);
        stack.remove(h);
        moved = true;
    }
    moved
}

#[cfg(test)]
mod tests;
