//! A deterministic simulation of several engines (`tunnel_core::engine`) on a made-up internet, in
//! virtual time: routers with NAT and filtering models, latency and loss per hop, a STUN responder,
//! a relay, and a control plane that republishes candidates as a real server does. Punching, path
//! selection and relay fallback run here in milliseconds and the same way every time; the
//! namespace lab (`nat.rs`, `tests/tests/lab_nat/`) runs the same cases on real kernels.
//!
//! Time is `t0 + ticks`, one tick a millisecond; each tick delivers the datagrams that have arrived,
//! then gives every node one wake-up as the shell does (`node/src/dataplane.rs`): timers, drive
//! rounds with transmits, settle, effects, events. Randomness (loss) comes from one seeded rng. What
//! the engines do not decide is fixed: boringtun's ephemeral keys differ from run to run, the sizes
//! and times of every datagram do not. boringtun reads the real clock for its own timers: a run
//! lasts milliseconds, so nothing rekeys or expires, and the loss model spares WireGuard's handshake
//! messages by default (a lost one is retried only after 5 real seconds). WireGuard's timers stay in
//! the real-time tests.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tunnel_core::engine::{
    BufferPort, Client, Effect, Engine, EngineConfig, Event, FlowId, FlowTuple, Role, Site, Transmit,
    DRIVE_ROUNDS,
};
use tunnel_core::map::{Candidate, CandidateKind, NetworkMap, NodeKind, PeerInfo, ResourceInfo};
use tunnel_core::{stun, wg, NodeId};

/// One tick of virtual time.
pub const TICK: Duration = Duration::from_millis(1);
/// The STUN responder's address on the simulated internet.
pub const STUN_ADDR: &str = "203.0.113.10:3478";
/// The resource every site serves, and its target (never dialled: the sim answers dials itself).
pub const WEB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(100, 96, 0, 10), 80);

/// How a router between a node and the internet behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Endpoint-independent mapping (one public port per inside socket, the inside port when free),
    /// address-and-port-dependent filtering: the home router.
    Cone,
    /// A new public port for every destination (endpoint-dependent mapping); the same filtering.
    Symmetric,
    /// No translation, a stateful firewall: inbound only from where the inside host has sent.
    Firewall,
    /// [`NatKind::Cone`], whose conntrack records an unsolicited inbound packet (dropped) for 30 s:
    /// when the inside host then sends to that remote from the same socket, the recorded entry holds
    /// the public port, and the router maps the new flow to another one. The remote then sees the
    /// host at a port nobody announced (a peer-reflexive address).
    EarlyConntrack,
}

/// How long [`NatKind::EarlyConntrack`] keeps an unsolicited inbound entry.
const EARLY_ENTRY: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Router {
    kind: NatKind,
    public_ip: Ipv4Addr,
    /// (inside socket, destination for endpoint-dependent mappings) -> public port.
    mappings: HashMap<(SocketAddr, Option<SocketAddr>), u16>,
    /// Public port -> inside socket.
    reverse: HashMap<u16, SocketAddr>,
    /// (public port, remote) pairs the inside has sent to: what the filter lets in.
    holes: HashSet<(u16, SocketAddr)>,
    /// EarlyConntrack: (public port, remote) of unsolicited inbound packets, until when.
    early: HashMap<(u16, SocketAddr), Instant>,
    /// EarlyConntrack: flows mapped to another port because an early entry held theirs.
    clashes: usize,
    next_port: u16,
}

impl Router {
    fn new(kind: NatKind, public_ip: Ipv4Addr) -> Router {
        Router {
            kind,
            public_ip,
            mappings: HashMap::new(),
            reverse: HashMap::new(),
            holes: HashSet::new(),
            early: HashMap::new(),
            clashes: 0,
            next_port: 40_000,
        }
    }

    fn allocate(&mut self, inside: SocketAddr, key: Option<SocketAddr>, prefer: u16) -> u16 {
        let port = if self.reverse.contains_key(&prefer) {
            loop {
                self.next_port = self.next_port.wrapping_add(7).max(40_000);
                if !self.reverse.contains_key(&self.next_port) {
                    break self.next_port;
                }
            }
        } else {
            prefer
        };
        self.mappings.insert((inside, key), port);
        self.reverse.insert(port, inside);
        port
    }

    /// An inside datagram to `dst` leaves as from this address.
    fn outbound(&mut self, inside: SocketAddr, dst: SocketAddr, now: Instant) -> SocketAddr {
        let port = match self.kind {
            NatKind::Firewall => inside.port(),
            NatKind::Symmetric => match self.mappings.get(&(inside, Some(dst))) {
                Some(p) => *p,
                None => {
                    let p = self.next_port;
                    self.allocate(inside, Some(dst), p.wrapping_add(1))
                }
            },
            NatKind::Cone | NatKind::EarlyConntrack => {
                let cone = match self.mappings.get(&(inside, None)) {
                    Some(p) => *p,
                    None => self.allocate(inside, None, inside.port()),
                };
                let clash = self.early.get(&(cone, dst)).is_some_and(|until| now < *until);
                if let Some(p) = self.mappings.get(&(inside, Some(dst))) {
                    *p
                } else if clash {
                    self.clashes += 1;
                    self.allocate(inside, Some(dst), cone)
                } else {
                    cone
                }
            }
        };
        if self.kind == NatKind::Firewall {
            self.reverse.insert(port, inside);
        }
        self.holes.insert((port, dst));
        SocketAddr::from((self.public_ip, port))
    }

    /// A datagram from `src` to this router's public `port`: the inside socket it goes to, if the
    /// filter lets it in.
    fn inbound(&mut self, src: SocketAddr, port: u16, now: Instant) -> Option<SocketAddr> {
        if self.holes.contains(&(port, src)) {
            return self.reverse.get(&port).copied();
        }
        if self.kind == NatKind::EarlyConntrack {
            self.early.entry((port, src)).or_insert(now + EARLY_ENTRY);
        }
        None
    }
}

/// A site's or a client's engine.
#[derive(Debug)]
pub enum SimEngine {
    Site(Engine<Site>),
    Client(Engine<Client>),
}

/// `$body` with `$e` bound to whichever engine it is.
macro_rules! with_engine {
    ($engine:expr, $e:ident => $body:expr) => {
        match $engine {
            SimEngine::Site($e) => $body,
            SimEngine::Client($e) => $body,
        }
    };
}

/// One wake-up of an engine, as the shell runs it: its transmits, effects, events, deliveries.
fn wake_engine<R: Role>(e: &mut Engine<R>, port: &mut BufferPort, now: Instant) -> Vec<Transmit> {
    let mut out = vec![];
    e.handle_timeout(now);
    for _ in 0..DRIVE_ROUNDS {
        let mut moved = e.drive(port, now);
        while let Some(t) = e.poll_transmit(now) {
            moved = true;
            out.push(t);
        }
        if !moved {
            break;
        }
    }
    e.settle(now);
    out
}

/// One engine on the simulated internet.
#[derive(Debug)]
pub struct SimNode {
    pub name: String,
    pub kind: NodeKind,
    pub engine: SimEngine,
    pub port: BufferPort,
    /// Its socket's address (inside its router's network, or public without a router).
    pub host: SocketAddr,
    pub overlay: Ipv4Addr,
    key: [u8; 32],
    router: Option<usize>,
    /// The candidates it reported (the control plane hands them to its peers).
    candidates: Vec<Candidate>,
    /// Site: flows bridged after a dial, by tuple.
    pub bridged: HashMap<FlowTuple, FlowId>,
    /// Site: the flow bridged last.
    pub last_bridged: Option<FlowId>,
    /// How long its control link takes to bring a new map (default: none).
    pub map_delay: Duration,
}

impl SimNode {
    /// The public key.
    pub fn public_key(&self) -> tunnel_core::PublicKey {
        wg::public_key(self.key)
    }

    /// The path to its first peer, as `/status` shows it.
    pub fn path(&self) -> &'static str {
        with_engine!(&self.engine, e => e.status()).peers.first().map(|p| p.path.as_str()).unwrap_or("none")
    }

    /// The endpoint its first peer is reached at, if direct.
    pub fn endpoint(&self) -> Option<String> {
        with_engine!(&self.engine, e => e.status()).peers.first().and_then(|p| p.endpoint.clone())
    }
}

/// Latency and loss of every hop (node to router, router to router, to the STUN responder).
#[derive(Debug, Clone, Copy)]
pub struct LinkModel {
    /// One-way delay of a datagram end to end.
    pub latency: Duration,
    /// Share of datagrams lost end to end, each way (0.0-1.0).
    pub loss: f64,
    /// Loss spares WireGuard handshake messages (types 1 and 2): boringtun retries them only after
    /// 5 s of real time.
    pub spare_handshakes: bool,
}

impl Default for LinkModel {
    fn default() -> Self {
        LinkModel { latency: Duration::from_millis(5), loss: 0.0, spare_handshakes: true }
    }
}

#[derive(Debug)]
enum Payload {
    Udp { src: SocketAddr, dst: SocketAddr, data: Vec<u8> },
    Relay { from: tunnel_core::PublicKey, to: usize, data: Vec<u8> },
}

/// The simulated internet.
#[derive(Debug)]
pub struct Sim {
    t0: Instant,
    /// Virtual time now.
    pub now: Instant,
    rng: StdRng,
    pub nodes: Vec<SimNode>,
    routers: Vec<Router>,
    /// Datagrams in flight by arrival time (ordered by time, then by sending order).
    in_flight: BTreeMap<(Instant, u64), Payload>,
    /// Maps on their way to their nodes, by arrival time.
    maps_in_flight: BTreeMap<(Instant, u64), (usize, Arc<NetworkMap>)>,
    seq: u64,
    pub link: LinkModel,
    /// Whether the relay is reachable.
    relay_up: bool,
    map_version: u64,
    /// Every datagram handed to the network: (ms since start, from, to, bytes, delivered).
    pub trace: Vec<(u64, String, String, usize, bool)>,
}

impl Sim {
    /// An empty internet; `seed` drives loss and every engine's randomness.
    pub fn new(seed: u64, link: LinkModel) -> Sim {
        let t0 = Instant::now();
        Sim {
            t0,
            now: t0,
            rng: StdRng::seed_from_u64(seed),
            nodes: vec![],
            routers: vec![],
            in_flight: BTreeMap::new(),
            maps_in_flight: BTreeMap::new(),
            seq: 0,
            link,
            relay_up: true,
            map_version: 0,
            trace: vec![],
        }
    }

    /// A router of `kind` with public address `public_ip`; returns its index for [`Sim::add_node`].
    pub fn add_router(&mut self, kind: NatKind, public_ip: Ipv4Addr) -> usize {
        self.routers.push(Router::new(kind, public_ip));
        self.routers.len() - 1
    }

    /// A node with its socket at `host`, behind `router` (or public with `None`). Sites serve
    /// [`WEB`]; clients are granted it.
    pub fn add_node(&mut self, name: &str, kind: NodeKind, host: SocketAddr, router: Option<usize>) -> usize {
        let i = self.nodes.len();
        let key = [i as u8 + 40; 32];
        let overlay = Ipv4Addr::new(100, 96, 1, i as u8 + 1);
        let lan = Candidate::new(host, CandidateKind::Lan);
        let cfg = EngineConfig {
            private_key: key,
            seed: self.rng.next_u64(),
            tun: false,
            keepalive: Duration::from_secs(25),
            force_relay: false,
            base_candidates: vec![lan],
            stack: Default::default(),
        };
        self.nodes.push(SimNode {
            name: name.into(),
            kind,
            engine: match kind {
                NodeKind::Site => SimEngine::Site(Engine::new(cfg, self.now)),
                NodeKind::Client => SimEngine::Client(Engine::new(cfg, self.now)),
            },
            port: BufferPort::default(),
            host,
            overlay,
            key,
            router,
            candidates: vec![lan],
            bridged: HashMap::new(),
            last_bridged: None,
            map_delay: Duration::ZERO,
        });
        i
    }

    /// How many flows router `r` mapped to another port because an early inbound entry held theirs
    /// ([`NatKind::EarlyConntrack`]).
    pub fn clashes(&self, r: usize) -> usize {
        self.routers[r].clashes
    }

    /// Sets the relay reachable or not, for every node.
    pub fn set_relay(&mut self, up: bool) {
        self.relay_up = up;
        let now = self.now;
        for n in &mut self.nodes {
            with_engine!(&mut n.engine, e => e.handle_relay_up(up, now));
        }
    }

    /// Publishes every node's map, as the control server does after a change: sites see every
    /// client (granted [`WEB`]), clients every site, each peer with the candidates it reported.
    /// Each arrives after its node's [`SimNode::map_delay`].
    pub fn publish(&mut self) {
        self.map_version += 1;
        let infos: Vec<PeerInfo> = self
            .nodes
            .iter()
            .map(|n| {
                let host = |a: Ipv4Addr| ipnet::IpNet::V4(a.into());
                let mut allowed = vec![host(n.overlay)];
                if n.kind == NodeKind::Site {
                    allowed.push(host(*WEB.ip()));
                }
                PeerInfo {
                    node_id: NodeId::from_random([n.key[0]; 10]),
                    name: n.name.clone(),
                    kind: n.kind,
                    public_key: Some(n.public_key()),
                    overlay_addr: n.overlay.into(),
                    allowed_ips: allowed,
                    candidates: n.candidates.clone(),
                    online: true,
                    resources: if n.kind == NodeKind::Client { vec!["web".into()] } else { vec![] },
                }
            })
            .collect();
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            let peers =
                infos.iter().filter(|p| p.kind != n.kind).map(|p| (p.node_id.clone(), p.clone())).collect();
            let web = ResourceInfo {
                name: "web".into(),
                overlay_addr: (*WEB.ip()).into(),
                target: (n.kind == NodeKind::Site).then(|| "127.0.0.1:9".into()),
                port: WEB.port(),
                alias: None,
                site_id: NodeId::from_random([9; 10]),
                dns_names: vec!["web.tunnel.internal".into()],
                health_check: None,
            };
            let map = NetworkMap {
                version: self.map_version,
                node_id: NodeId::from_random([n.key[0]; 10]),
                node_name: n.name.clone(),
                kind: n.kind,
                overlay_addr: n.overlay.into(),
                overlay_cidr: ipnet::IpNet::V4(ipnet::Ipv4Net::new_assert(Ipv4Addr::new(100, 96, 0, 0), 16)),
                dns_zone: "tunnel.internal".into(),
                mtu: 1280,
                peers,
                resources: BTreeMap::from([("web".into(), web)]),
                relays: vec![],
                stun_addr: Some(STUN_ADDR.into()),
            };
            self.seq += 1;
            let at = self.now + self.nodes[i].map_delay;
            self.maps_in_flight.insert((at, self.seq), (i, Arc::new(map)));
        }
        self.deliver_maps();
    }

    fn deliver_maps(&mut self) {
        let now = self.now;
        while let Some(entry) = self.maps_in_flight.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (i, map) = entry.remove();
            let n = &mut self.nodes[i];
            with_engine!(&mut n.engine, e => e.handle_map(map, &mut n.port, now));
        }
    }

    /// Milliseconds since the start.
    pub fn elapsed_ms(&self) -> u64 {
        (self.now - self.t0).as_millis() as u64
    }

    fn lost(&mut self, data: &[u8]) -> bool {
        if self.link.loss <= 0.0 {
            return false;
        }
        if self.link.spare_handshakes && wg::is_wireguard(data) && matches!(data.first(), Some(1 | 2)) {
            return false;
        }
        self.rng.gen_range(0.0..1.0) < self.link.loss
    }

    fn schedule(&mut self, p: Payload) {
        self.seq += 1;
        self.in_flight.insert((self.now + self.link.latency, self.seq), p);
    }

    /// Node `i` sends `data` to `dst`: through its router onto the internet.
    fn send_udp(&mut self, i: usize, dst: SocketAddr, data: Vec<u8>) {
        let (host, router) = (self.nodes[i].host, self.nodes[i].router);
        let src = match router {
            Some(r) if !self.same_lan(r, dst) => self.routers[r].outbound(host, dst, self.now),
            _ => host,
        };
        let lost = self.lost(&data);
        self.trace.push((self.elapsed_ms(), src.to_string(), dst.to_string(), data.len(), !lost));
        if !lost {
            self.schedule(Payload::Udp { src, dst, data });
        }
    }

    fn same_lan(&self, router: usize, dst: SocketAddr) -> bool {
        self.nodes.iter().any(|n| n.router == Some(router) && n.host == dst)
    }

    /// Where a datagram for `dst` from `src` ends up: a node and the source it sees, or nowhere.
    fn arrive(&mut self, src: SocketAddr, dst: SocketAddr, data: &[u8]) -> Option<(usize, SocketAddr)> {
        if dst.to_string() == STUN_ADDR {
            if let Some(answer) = stun::answer(data, src) {
                // The responder answers at once, from its own address.
                self.seq += 1;
                let stun: SocketAddr = dst;
                self.in_flight.insert(
                    (self.now + self.link.latency, self.seq),
                    Payload::Udp { src: stun, dst: src, data: answer },
                );
            }
            return None;
        }
        // A host on the same LAN, or a public host.
        if let Some(i) = self.nodes.iter().position(|n| n.host == dst) {
            return Some((i, src));
        }
        let now = self.now;
        let r =
            self.routers.iter().position(|r| matches!(dst, SocketAddr::V4(v) if *v.ip() == r.public_ip))?;
        let inside = self.routers[r].inbound(src, dst.port(), now)?;
        let i = self.nodes.iter().position(|n| n.host == inside && n.router == Some(r))?;
        Some((i, src))
    }

    /// One tick: arrivals, then one wake-up of every node, then the clock moves on.
    pub fn step(&mut self) {
        let now = self.now;
        self.deliver_maps();
        while let Some(entry) = self.in_flight.first_entry() {
            if entry.key().0 > now {
                break;
            }
            match entry.remove() {
                Payload::Udp { src, dst, data } => {
                    if let Some((i, from)) = self.arrive(src, dst, &data) {
                        with_engine!(&mut self.nodes[i].engine, e => e.handle_datagram(from, &data, now));
                    }
                }
                Payload::Relay { from, to, data } => {
                    with_engine!(&mut self.nodes[to].engine, e => e.handle_relayed(from, &data))
                }
            }
        }
        for i in 0..self.nodes.len() {
            self.wake(i);
        }
        self.now += TICK;
    }

    /// One wake-up of node `i`, as the shell runs it.
    fn wake(&mut self, i: usize) {
        let now = self.now;
        let out = {
            let n = &mut self.nodes[i];
            with_engine!(&mut n.engine, e => wake_engine(e, &mut n.port, now))
        };
        for t in out {
            match t {
                Transmit::Udp { dst, payload } => self.send_udp(i, dst, payload),
                Transmit::Relay { peer, payload } => {
                    let to = self.nodes.iter().position(|n| n.public_key() == peer);
                    let delivered = self.relay_up && to.is_some();
                    let to_name = to.map(|t| self.nodes[t].name.clone()).unwrap_or_default();
                    self.trace.push((
                        self.elapsed_ms(),
                        self.nodes[i].name.clone(),
                        format!("relay:{to_name}"),
                        payload.len(),
                        delivered,
                    ));
                    if let (true, Some(to)) = (self.relay_up, to) {
                        let from = self.nodes[i].public_key();
                        self.schedule(Payload::Relay { from, to, data: payload });
                    }
                }
            }
        }
        let mut republish = false;
        let n = &mut self.nodes[i];
        let effects: Vec<Effect> =
            with_engine!(&mut n.engine, e => std::iter::from_fn(|| e.poll_effect()).collect());
        for effect in effects {
            match (effect, &mut n.engine) {
                (Effect::ResolveStun(name), engine) => {
                    with_engine!(engine, e => e.handle_stun_resolved(name.clone(), name.parse().ok(), now))
                }
                (Effect::DialTcp { flow, .. }, SimEngine::Site(e)) => {
                    if let Some(id) = e.handle_dial_result(flow, Ok(()), now) {
                        n.bridged.insert(flow, id);
                        n.last_bridged = Some(id);
                    }
                }
                (Effect::OpenUdp { flow, .. }, SimEngine::Site(e)) => {
                    e.handle_udp_ready(flow);
                }
                _ => {}
            }
        }
        let events: Vec<Event> =
            with_engine!(&mut n.engine, e => std::iter::from_fn(|| e.poll_event()).collect());
        for ev in events {
            match ev {
                Event::Candidates(c) => {
                    n.candidates = c;
                    republish = true;
                }
            }
        }
        with_engine!(&mut n.engine, e => while e.poll_deliver().is_some() {});
        if republish {
            self.publish();
        }
    }

    /// Steps until `done` holds, at most `limit` of virtual time; whether it did.
    pub fn run_until(&mut self, limit: Duration, done: impl Fn(&Sim) -> bool) -> bool {
        let end = self.now + limit;
        while self.now < end {
            if done(self) {
                return true;
            }
            self.step();
        }
        done(self)
    }

    /// Steps for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
        }
    }

    /// Client `client` starts a flow to [`WEB`] (`None` without a map, or if it is no client).
    pub fn start_connect(&mut self, client: usize) -> Option<FlowId> {
        let now = self.now;
        match &mut self.nodes[client].engine {
            SimEngine::Client(e) => e.connect(WEB, now).ok(),
            SimEngine::Site(_) => None,
        }
    }

    /// Client `client` opens a flow to [`WEB`]; the flow and the site's end once both exist.
    pub fn connect(&mut self, client: usize, site: usize, limit: Duration) -> Option<(FlowId, FlowId)> {
        let c = self.start_connect(client)?;
        self.nodes[client].port.reuse(c);
        let before = self.nodes[site].bridged.len();
        let ok = self.run_until(limit, |s| {
            s.nodes[client].port.connected.get(&c).is_some_and(|r| r.is_ok())
                && s.nodes[site].bridged.len() > before
        });
        if !ok {
            return None;
        }
        Some((c, self.nodes[site].last_bridged?))
    }
}
