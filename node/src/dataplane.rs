//! The data plane's I/O shell, shared by the site agent and the userspace client, around the
//! sans-IO [`Engine`] of `tunnel_core::engine`.
//!
//! One task owns the UDP socket and the engine. It waits until any source has something (the socket,
//! commands such as new outbound flows and status requests, the network map, flow data from
//! application tasks, timers), then sweeps every source in a fixed order under a budget each
//! ([`sweep`]), then drives the engine until nothing moves, sending its datagrams in GSO batches,
//! delivering its packets, and performing the I/O it asks for (dials, UDP flows, STUN lookups) in
//! tasks whose answers come back as inputs.
//!
//! Application sides (a target connection on a site, a SOCKS client on a client) run in their own
//! tasks and talk to the loop through bounded channels ([`bridge`]). Every protocol decision
//! (grants, flows, paths, what a TUN client lets in) is the engine's.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tunnel_core::engine::{
    self, Client, Deliver, Engine, EngineConfig, Event, FlowTuple, Role, Site, Transmit, DRIVE_ROUNDS,
};
use tunnel_core::map::{Candidate, NetworkMap, NodeKind, RelayInfo};
use tunnel_core::status::NodeStatus;

use crate::relay::{RelayLink, RelayState};

mod bridge;
mod effects;
mod roles;
mod sockets;
mod sweep;
mod udp_out;

pub use crate::udp::bind_socket;
use bridge::Bridge;
use effects::Tasks;
use roles::ShellRole;
pub use sockets::bridge_stream;
use sweep::{run, Inputs};
use udp_out::UdpOut;

/// Chunk size of a target connection's reads.
const CHUNK: usize = 16 * 1024;
/// How long a site waits for a target's name to resolve and the target to accept.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Default keepalive: WireGuard's persistent keepalive and the idle path check, holding NAT mappings open.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(25);

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
    Status { reply: oneshot::Sender<NodeStatus> },
}

/// Handle to a running data plane.
#[derive(Debug, Clone)]
pub struct Dataplane {
    /// Commands to the loop.
    pub commands: mpsc::Sender<Command>,
    /// The UDP socket's local address.
    pub local_addr: SocketAddr,
    /// Site or client.
    pub kind: NodeKind,
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
        match tokio::time::timeout(engine::CONNECT_TIMEOUT + Duration::from_secs(2), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("data plane stopped".into()),
            Err(_) => Err(format!("connection to {remote} timed out (no answer through the tunnel)")),
        }
    }

    /// The status document.
    pub async fn status(&self) -> Option<NodeStatus> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Status { reply }).await.ok()?;
        rx.await.ok()
    }
}

/// What a site's UDP flow task reports.
#[derive(Debug)]
enum UdpEvent {
    Ready(FlowTuple, Arc<UdpSocket>),
    Data(FlowTuple, Vec<u8>),
}

/// The loop's state: the engine and everything it needs that is I/O.
struct Shell<R: Role> {
    engine: Engine<R>,
    /// The node's UDP socket, for sending: datagrams in GSO batches.
    out: UdpOut,
    /// TUN mode: decrypted packets go here instead of into the userspace stack.
    to_os: Option<mpsc::Sender<Vec<u8>>>,
    /// Userspace client: where each UDP association's replies go.
    client_udp: HashMap<u16, mpsc::Sender<(SocketAddrV4, Vec<u8>)>>,
    bridge: Bridge,
    tasks: Tasks,
    relay_out: mpsc::Sender<Vec<u8>>,
    relay_list: watch::Sender<Vec<RelayInfo>>,
    relay_state: RelayState,
    candidates_tx: Option<mpsc::Sender<Vec<Candidate>>>,
    started: Instant,
}

impl<R: Role> std::fmt::Debug for Shell<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shell").field("engine", &self.engine).finish_non_exhaustive()
    }
}

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
    maps: watch::Receiver<Option<Arc<NetworkMap>>>,
    os: Option<OsPackets>,
    opts: PathOptions,
) -> anyhow::Result<(Dataplane, tokio::task::JoinHandle<()>)> {
    let (cfg, parts, inputs, relay_task, dp) = assemble(kind, private_key, socket, maps, os, opts)?;
    let now = Instant::now();
    // The one place the node's kind is looked at: everything after is the role's type.
    let task = match kind {
        NodeKind::Site => tokio::spawn(run(Shell::<Site>::new(cfg, parts, now), inputs, relay_task)),
        NodeKind::Client => tokio::spawn(run(Shell::<Client>::new(cfg, parts, now), inputs, relay_task)),
    };
    Ok((dp, task))
}

/// The loop's parts before it runs: the engine's configuration, the shell's outputs, the inputs it
/// waits on, the relay link's task, and the handle the node keeps. Needs a Tokio runtime (the relay
/// link starts).
fn assemble(
    kind: NodeKind,
    private_key: [u8; 32],
    socket: UdpSocket,
    maps: watch::Receiver<Option<Arc<NetworkMap>>>,
    os: Option<OsPackets>,
    opts: PathOptions,
) -> anyhow::Result<(EngineConfig, Parts, Inputs, tokio::task::JoinHandle<()>, Dataplane)> {
    let udp = Arc::new(socket);
    let udp_state = Arc::new(
        quinn_udp::UdpSocketState::new((&*udp).into())
            .map_err(|e| anyhow::anyhow!("cannot set up the WireGuard UDP socket: {e}"))?,
    );
    let local_addr = udp.local_addr()?;
    let (cmd_tx, cmd_rx) = mpsc::channel::<Command>(64);
    let (udp_event_tx, udp_event_rx) = mpsc::channel(1024);
    let (from_os, to_os) = match os {
        Some(o) => (Some(o.from_os), Some(o.to_os)),
        None => (None, None),
    };
    let (relay, relay_task) = crate::relay::start();
    let RelayLink { out: relay_out, inbound: relay_in, state: relay_state, relays: relay_list } = relay;
    let (stun_resolve_tx, stun_resolve_rx) = mpsc::channel(4);
    let out = UdpOut::new(udp.clone(), udp_state.clone());
    let cfg = EngineConfig {
        private_key,
        seed: rand::random(),
        tun: to_os.is_some(),
        keepalive: opts.keepalive,
        force_relay: opts.force_relay,
        base_candidates: opts.base_candidates,
        stack: opts.stack,
    };
    let inputs = Inputs {
        udp,
        udp_state,
        maps,
        cmd_rx,
        udp_event_rx,
        from_os,
        relay_in,
        relay_state,
        stun_resolve_rx,
        relay_open: true,
    };
    let parts = Parts {
        out,
        to_os,
        tasks: Tasks::new(stun_resolve_tx, udp_event_tx),
        relay_out,
        relay_list,
        candidates_tx: opts.candidates_tx,
    };
    Ok((cfg, parts, inputs, relay_task, Dataplane { commands: cmd_tx, local_addr, kind }))
}

/// The shell's outputs, before the engine exists.
struct Parts {
    out: UdpOut,
    to_os: Option<mpsc::Sender<Vec<u8>>>,
    tasks: Tasks,
    relay_out: mpsc::Sender<Vec<u8>>,
    relay_list: watch::Sender<Vec<RelayInfo>>,
    candidates_tx: Option<mpsc::Sender<Vec<Candidate>>>,
}

impl<R: ShellRole> Shell<R> {
    fn new(cfg: EngineConfig, p: Parts, now: Instant) -> Shell<R> {
        Shell {
            engine: Engine::new(cfg, now),
            out: p.out,
            to_os: p.to_os,
            client_udp: HashMap::new(),
            bridge: Bridge::new(),
            tasks: p.tasks,
            relay_out: p.relay_out,
            relay_list: p.relay_list,
            relay_state: RelayState::default(),
            candidates_tx: p.candidates_tx,
            started: now,
        }
    }
}

impl<R: ShellRole> Shell<R> {
    fn apply_map(&mut self, map: Arc<NetworkMap>, now: Instant) {
        if *self.relay_list.borrow() != map.relays {
            self.relay_list.send_replace(map.relays.clone());
        }
        self.engine.handle_map(map, &mut self.bridge, now);
    }

    fn command(&mut self, c: Command, now: Instant) {
        match c {
            Command::Connect { remote, reply } => match R::connect(&mut self.engine, remote, now) {
                Ok(id) => {
                    self.bridge.open(id, Some(reply));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::UdpSend { local_port, remote, payload, replies } => {
                self.client_udp.insert(local_port, replies);
                R::udp_send(&mut self.engine, local_port, remote, &payload);
            }
            Command::UdpClose { local_port } => {
                self.client_udp.remove(&local_port);
                R::udp_close(&mut self.engine, local_port);
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
    }

    /// A dial of a site's target ended: a connection the engine takes is bridged to its flow, any
    /// other is dropped (the client was answered with a reset).
    fn dialed(&mut self, flow: FlowTuple, result: Result<TcpStream, String>, now: Instant) {
        let (stream, result) = match result {
            Ok(s) => (Some(s), Ok(())),
            Err(e) => (None, Err(e)),
        };
        let Some(id) = R::dial_result(&mut self.engine, flow, result, now) else { return };
        let (Some(stream), Some(ends)) = (stream, self.bridge.open(id, None)) else { return };
        // It ends by itself when either side closes.
        tokio::spawn(bridge_stream(stream, ends));
    }

    fn udp_event(&mut self, ev: UdpEvent, now: Instant) {
        match ev {
            UdpEvent::Ready(flow, sock) => {
                if self.tasks.udp_ready(flow, sock) && !R::udp_ready(&mut self.engine, flow) {
                    self.tasks.close_udp(&flow);
                }
            }
            UdpEvent::Data(flow, payload) => R::udp_reply(&mut self.engine, flow, &payload, now),
        }
    }

    fn status(&self) -> NodeStatus {
        NodeStatus {
            listen: self.out.udp.local_addr().ok().map(|a| a.to_string()),
            uptime_secs: self.started.elapsed().as_secs(),
            relay: self.relay_state.clone(),
            ..self.engine.status()
        }
    }

    /// Moves everything that can move: the engine's timers, its rounds (decrypted packets into the
    /// stack, flow bytes to and from the application channels, stack output into the tunnel), its
    /// datagrams onto the socket and the relay, its packets to their local receivers, its I/O
    /// requests to the tasks.
    async fn pump(&mut self, now: Instant) {
        self.engine.handle_timeout(now);
        for _ in 0..DRIVE_ROUNDS {
            let mut moved = self.engine.drive(&mut self.bridge, now);
            moved |= self.transmit(now).await;
            self.deliver();
            if !moved {
                break;
            }
        }
        self.engine.settle(now);
        while let Some(e) = self.engine.poll_effect() {
            self.tasks.perform(e);
        }
        while let Some(ev) = self.engine.poll_event() {
            match ev {
                Event::Candidates(c) => {
                    if let Some(tx) = &self.candidates_tx {
                        let _ = tx.try_send(c);
                    }
                }
            }
        }
    }

    /// Sends the engine's datagrams; whether there were any.
    async fn transmit(&mut self, now: Instant) -> bool {
        let mut any = false;
        while let Some(t) = self.engine.poll_transmit(now) {
            any = true;
            match t {
                Transmit::Udp { dst, payload } => {
                    self.out.push(dst, payload).await;
                }
                Transmit::Relay { peer, payload } => {
                    // A full queue drops, as a congested link would.
                    let _ = self.relay_out.try_send(tunnel_core::relay::encode_packet(&peer, &payload));
                }
            }
        }
        self.out.flush().await;
        any
    }

    /// Hands the engine's packets to their local receivers. A full queue drops, as a congested
    /// link would; TCP backs off.
    fn deliver(&mut self) {
        while let Some(d) = self.engine.poll_deliver() {
            match d {
                Deliver::Os(p) => {
                    if let Some(os) = &self.to_os {
                        let _ = os.try_send(p);
                    }
                }
                Deliver::UdpReply { local_port, from, payload } => {
                    if let Some(tx) = self.client_udp.get(&local_port) {
                        let _ = tx.try_send((from, payload));
                    }
                }
                Deliver::Target { flow, payload } => self.tasks.send_to_target(&flow, &payload),
            }
        }
    }
}

#[cfg(test)]
mod tests;
