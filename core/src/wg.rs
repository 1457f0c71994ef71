//! WireGuard for many peers on one UDP socket, on top of boringtun, without I/O.
//!
//! [`Device`] holds one boringtun `Tunn` per peer. Inbound datagrams reach their session by receiver
//! index (handshake initiations by the initiator's static key, recovered with the device's own key),
//! never by source address, so a stray or spoofed datagram cannot land in another peer's session.
//!
//! Use:
//! - feed datagrams with [`Device::handle_datagram`], inner packets to send with [`Device::handle_outbound`],
//!   and call [`Device::handle_timeout`] whenever [`Device::poll_timeout`] says;
//! - after each of those, drain [`Device::poll_transmit`] (datagrams for the socket) and
//!   [`Device::poll_inbound`] (decrypted inner packets, with the peer they came from).
//!
//! boringtun reads the clock itself (its timers use `Instant::now()`); this wrapper keeps the rest of
//! the core pure and takes `now` only for its own scheduling (and the relayed handshake budgets).
//!
//! Handshakes cost an X25519 or two each, so they are rate limited before anything costly runs, in two
//! separate budgets. Datagrams from UDP addresses share one device-wide limit (boringtun's
//! `RateLimiter`): beyond it a sender gets a cookie and must prove its address. Packets from the relay
//! have no address to bind a cookie to, so each relayed sender (the key the relay names) has its own
//! small budget instead, and a relayed packet whose WireGuard identity is not that sender is dropped:
//! one sender, relayed or spoofing addresses directly, cannot spend the handshakes of the others.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey as X25519Public, StaticSecret};

use crate::PublicKey;
use ipnet::Ipv4Net;

/// Which way a peer's packets go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Via {
    /// Straight to this UDP address.
    Direct(SocketAddr),
    /// Through the relay, addressed to the peer with this key.
    Relay,
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Direct(a) => write!(f, "{a}"),
            Via::Relay => f.write_str("relay"),
        }
    }
}

impl serde::Serialize for Via {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// How often boringtun's timers must be driven.
pub const TIMER_TICK: Duration = Duration::from_millis(250);

/// Largest datagram a WireGuard packet can be (inner MTU + 32 bytes overhead, with room to spare).
const BUF: usize = 65_536;

/// A peer as the path logic wants it installed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's static public key: its identity.
    pub key: PublicKey,
    /// Inner addresses the peer may send from and be sent to.
    pub allowed: Vec<Ipv4Net>,
    /// Where to send at first, if known; otherwise the first authenticated packet's source. After
    /// that only [`Device::set_endpoint`] (the path logic) moves it.
    pub endpoint: Option<SocketAddr>,
    /// Persistent keepalive in seconds.
    pub keepalive: Option<u16>,
}

/// A datagram to send.
#[derive(Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Which way: a UDP address, or the relay.
    pub dst: Via,
    /// The peer it is for (`None` only for cookie replies to strangers, which are never relayed).
    pub peer: Option<PublicKey>,
    /// The WireGuard packet.
    pub payload: Vec<u8>,
}

/// What authenticated an inbound datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authenticated {
    /// The peer whose session accepted it.
    pub peer: PublicKey,
    /// It was a fresh handshake initiation: the peer (re)started a session from where it came from.
    pub initiation: bool,
}

/// Handshake initiations from keys that are not peers yet, kept briefly: a client that joins sends its
/// first initiation as soon as it has the map, often before the site has applied the map that names
/// it; answering once the key arrives saves the initiator WireGuard's 5 s retry.
const PENDING_INITS: usize = 16;

/// Handshake messages (initiations and responses) from one relayed sender processed at once, then
/// [`RELAY_HANDSHAKE_RATE`] a second. An honest peer sends at most one initiation per 5 s (plus a
/// response to each of ours), so this leaves it ample room and caps what a flooding one costs.
pub const RELAY_HANDSHAKE_BURST: f64 = 10.0;
/// Relayed handshake messages a second one sender may have processed, after the burst.
pub const RELAY_HANDSHAKE_RATE: f64 = 2.0;
/// Handshake messages a second from all UDP sources together before senders must answer a cookie.
pub const DIRECT_HANDSHAKE_RATE: u64 = 100;

/// A token bucket for relayed handshakes, refilled lazily from the last time the device was given.
#[derive(Debug, Clone, Copy)]
struct HandshakeBudget {
    tokens: f64,
    at: Option<Instant>,
}

impl HandshakeBudget {
    fn full() -> Self {
        HandshakeBudget { tokens: RELAY_HANDSHAKE_BURST, at: None }
    }

    /// Takes one handshake if the budget has one left at `now`.
    fn take(&mut self, now: Option<Instant>) -> bool {
        if let (Some(now), Some(at)) = (now, self.at) {
            let secs = now.saturating_duration_since(at).as_secs_f64();
            self.tokens = (self.tokens + secs * RELAY_HANDSHAKE_RATE).min(RELAY_HANDSHAKE_BURST);
        }
        if now.is_some() {
            self.at = now;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A decrypted inner packet.
#[derive(Debug, PartialEq, Eq)]
pub struct Inbound {
    /// The peer (static key) it came from.
    pub peer: PublicKey,
    /// The IPv4 packet.
    pub packet: Vec<u8>,
}

/// Why packets were dropped; each is counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DropCounts {
    /// Not a WireGuard packet at all, or malformed.
    pub malformed: u64,
    /// Handshake from a key that is not a peer, or an index no session owns.
    pub unknown_peer: u64,
    /// Failed decryption, replays, expired sessions.
    pub crypto: u64,
    /// Decrypted, but the inner source is not one of the peer's allowed addresses.
    pub bad_source: u64,
    /// Outbound packet for an address no peer owns.
    pub no_route: u64,
    /// Outbound packet for a peer whose endpoint is not known yet.
    pub no_endpoint: u64,
    /// A relayed handshake beyond its sender's budget.
    pub handshake_rate: u64,
    /// A relayed packet whose WireGuard identity is not the sender the relay named.
    pub relay_sender: u64,
}

/// Per-peer figures for `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStats {
    /// Seconds since the last completed handshake.
    pub last_handshake_secs: Option<u64>,
    /// Bytes sent (WireGuard payload).
    pub tx_bytes: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Current endpoint.
    pub endpoint: Option<Via>,
    /// Round-trip time of the last handshake, in ms.
    pub rtt_ms: Option<u32>,
}

struct PeerState {
    tunn: Tunn,
    index: u32,
    cfg: PeerConfig,
    endpoint: Option<Via>,
    /// The endpoint is a guess: follow authenticated packets.
    roaming: bool,
    /// Something (a handshake initiation, most likely) was dropped for want of an endpoint: send a
    /// fresh initiation as soon as there is one, rather than after WireGuard's 5 s retry.
    starved: bool,
    /// Handshakes this peer may still have processed through the relay.
    relay_budget: HandshakeBudget,
}

/// A handshake initiation from a key that is not a peer yet, and where it came from. It passed the
/// rate limits and, if relayed, the check against the sender the relay named.
struct PendingInit {
    key: PublicKey,
    from: Via,
    data: Vec<u8>,
}

/// Every WireGuard session of one node.
pub struct Device {
    secret: StaticSecret,
    public: X25519Public,
    peers: BTreeMap<PublicKey, PeerState>,
    by_index: HashMap<u32, PublicKey>,
    next_index: u32,
    /// Handshakes from UDP addresses, all together (cookies beyond it).
    limiter: Arc<RateLimiter>,
    /// MAC checks only, never under load: every session's own limiter, so that the budgets above
    /// decide alone (boringtun would otherwise count each handshake again, in one shared pool).
    verifier: Arc<RateLimiter>,
    /// Relayed handshakes from senders that are not peers (yet).
    stranger_budget: HandshakeBudget,
    /// The latest time [`Device::handle_timeout`] was given.
    now: Option<Instant>,
    transmits: VecDeque<Transmit>,
    inbound: VecDeque<Inbound>,
    pending_inits: VecDeque<PendingInit>,
    next_tick: Option<Instant>,
    buf: Vec<u8>,
    /// Dropped packets, by reason.
    pub drops: DropCounts,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("peers", &self.peers.len()).field("drops", &self.drops).finish()
    }
}

impl Device {
    /// A device with this private key. `index_seed` makes session indices unpredictable.
    pub fn new(private_key: [u8; 32], index_seed: u32) -> Self {
        let secret = StaticSecret::from(private_key);
        let public = X25519Public::from(&secret);
        Device {
            limiter: Arc::new(RateLimiter::new(&public, DIRECT_HANDSHAKE_RATE)),
            verifier: Arc::new(RateLimiter::new(&public, u64::MAX)),
            stranger_budget: HandshakeBudget::full(),
            now: None,
            secret,
            public,
            peers: BTreeMap::new(),
            by_index: HashMap::new(),
            next_index: index_seed & 0x00FF_FFFF,
            transmits: VecDeque::new(),
            inbound: VecDeque::new(),
            pending_inits: VecDeque::new(),
            next_tick: None,
            buf: vec![0; BUF],
            drops: DropCounts::default(),
        }
    }

    /// This device's public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(*self.public.as_bytes())
    }

    fn alloc_index(&mut self) -> u32 {
        // boringtun shifts the index left by 8 bits: it must fit in 24.
        loop {
            self.next_index = (self.next_index + 1) & 0x00FF_FFFF;
            if !self.by_index.contains_key(&self.next_index) {
                return self.next_index;
            }
        }
    }

    /// Installs exactly these peers: new ones are added, missing ones removed, changed ones updated in
    /// place (their sessions keep running); untouched peers are not disturbed.
    pub fn set_peers(&mut self, desired: Vec<PeerConfig>, now: Instant) {
        let wanted: BTreeMap<PublicKey, PeerConfig> = desired.into_iter().map(|p| (p.key, p)).collect();
        let gone: Vec<PublicKey> = self.peers.keys().filter(|k| !wanted.contains_key(*k)).copied().collect();
        for k in gone {
            if let Some(p) = self.peers.remove(&k) {
                self.by_index.remove(&p.index);
            }
        }
        for (key, cfg) in wanted {
            if let Some(p) = self.peers.get_mut(&key) {
                if p.cfg != cfg {
                    if cfg.endpoint.is_some() && cfg.endpoint != p.cfg.endpoint {
                        p.endpoint = cfg.endpoint.map(Via::Direct);
                    }
                    p.cfg = cfg;
                }
                continue;
            }
            let index = self.alloc_index();
            let tunn = Tunn::new(
                self.secret.clone(),
                X25519Public::from(key.0),
                None,
                cfg.keepalive,
                index,
                Some(self.verifier.clone()),
            );
            self.by_index.insert(index, key);
            let endpoint = cfg.endpoint.map(Via::Direct);
            let relay_budget = HandshakeBudget::full();
            self.peers.insert(
                key,
                PeerState { tunn, index, cfg, endpoint, roaming: true, starved: false, relay_budget },
            );
        }
        if self.next_tick.is_none() {
            self.next_tick = Some(now);
        }
        // Initiations that arrived before their key: answer them now (they passed the rate limits
        // when they arrived).
        let pending: Vec<PendingInit> = self.pending_inits.drain(..).collect();
        for p in pending {
            if self.peers.contains_key(&p.key) {
                self.process(p.from, None, &p.data);
            } else {
                self.pending_inits.push_back(p);
            }
        }
    }

    /// Keys of the installed peers.
    pub fn peer_keys(&self) -> Vec<PublicKey> {
        self.peers.keys().copied().collect()
    }

    /// Figures for one peer.
    pub fn peer_stats(&self, key: &PublicKey) -> Option<PeerStats> {
        let p = self.peers.get(key)?;
        let (hs, tx, rx, _loss, rtt) = p.tunn.stats();
        Some(PeerStats {
            last_handshake_secs: hs.map(|d| d.as_secs()),
            tx_bytes: tx as u64,
            rx_bytes: rx as u64,
            endpoint: p.endpoint,
            rtt_ms: rtt,
        })
    }

    /// Where the path logic sends a peer's packets from now on. With `roaming`, the choice is a guess
    /// and the session follows the source of authenticated packets, as plain WireGuard does.
    pub fn set_endpoint(&mut self, key: &PublicKey, via: Option<Via>, roaming: bool) {
        if let Some(p) = self.peers.get_mut(key) {
            p.endpoint = via;
            p.roaming = roaming;
            if let (Some(dst), true) = (via, p.starved) {
                p.starved = false;
                if let TunnResult::WriteToNetwork(b) = p.tunn.format_handshake_initiation(&mut self.buf, true)
                {
                    self.transmits.push_back(Transmit { dst, peer: Some(*key), payload: b.to_vec() });
                }
            }
        }
    }

    /// A datagram arrived on the node's socket. Says which peer's session authenticated it, if one
    /// did. Relayed packets go to [`Device::handle_relayed`], which knows their sender; given here
    /// with [`Via::Relay`], a packet is taken as from a sender the relay did not name.
    pub fn handle_datagram(&mut self, from: Via, data: &[u8]) -> Option<Authenticated> {
        let src_ip = match from {
            Via::Direct(a) => a.ip(),
            Via::Relay => return self.relayed(None, data),
        };
        // MACs and the handshake rate limit first: they are cheap, and nothing costly (the X25519 of a
        // handshake) runs for a packet that fails them. Under load the sender gets a cookie reply and no
        // session is touched.
        match self.limiter.verify_packet(Some(src_ip), data, &mut self.buf) {
            Ok(_) => {}
            Err(TunnResult::WriteToNetwork(cookie)) => {
                self.transmits.push_back(Transmit { dst: from, peer: None, payload: cookie.to_vec() });
                return None;
            }
            Err(TunnResult::Err(WireGuardError::InvalidPacket)) => {
                self.drops.malformed += 1;
                return None;
            }
            Err(_) => {
                self.drops.crypto += 1;
                return None;
            }
        }
        self.process(from, None, data)
    }

    /// A WireGuard packet the relay brought from the node whose key is `sender`. Its handshakes are
    /// counted against that sender's own budget (a cookie cannot work without an address), and a
    /// packet whose WireGuard identity is another key is dropped.
    pub fn handle_relayed(&mut self, sender: &PublicKey, data: &[u8]) -> Option<Authenticated> {
        self.relayed(Some(sender), data)
    }

    fn relayed(&mut self, sender: Option<&PublicKey>, data: &[u8]) -> Option<Authenticated> {
        match self.verifier.verify_packet(None, data, &mut self.buf) {
            Ok(Packet::HandshakeInit(_) | Packet::HandshakeResponse(_)) => {
                let now = self.now;
                let budget = match sender.and_then(|k| self.peers.get_mut(k)) {
                    Some(p) => &mut p.relay_budget,
                    None => &mut self.stranger_budget,
                };
                if !budget.take(now) {
                    self.drops.handshake_rate += 1;
                    return None;
                }
            }
            Ok(_) => {}
            Err(TunnResult::Err(WireGuardError::InvalidPacket)) => {
                self.drops.malformed += 1;
                return None;
            }
            Err(_) => {
                self.drops.crypto += 1;
                return None;
            }
        }
        self.process(Via::Relay, sender, data)
    }

    /// Finds the session of a datagram that passed the rate limits and hands it to boringtun.
    fn process(&mut self, from: Via, sender: Option<&PublicKey>, data: &[u8]) -> Option<Authenticated> {
        let src_ip = match from {
            Via::Direct(a) => Some(a.ip()),
            Via::Relay => None,
        };
        let mut is_init = false;
        let key = match Tunn::parse_incoming_packet(data) {
            Err(_) => {
                self.drops.malformed += 1;
                return None;
            }
            Ok(Packet::HandshakeInit(init)) => {
                is_init = true;
                match parse_handshake_anon(&self.secret, &self.public, &init) {
                    Ok(half) => PublicKey(half.peer_static_public),
                    Err(_) => {
                        self.drops.crypto += 1;
                        return None;
                    }
                }
            }
            Ok(Packet::HandshakeResponse(p)) => match self.by_index.get(&(p.receiver_idx >> 8)) {
                Some(k) => *k,
                None => {
                    self.drops.unknown_peer += 1;
                    return None;
                }
            },
            Ok(Packet::PacketCookieReply(p)) => match self.by_index.get(&(p.receiver_idx >> 8)) {
                Some(k) => *k,
                None => {
                    self.drops.unknown_peer += 1;
                    return None;
                }
            },
            Ok(Packet::PacketData(p)) => match self.by_index.get(&(p.receiver_idx >> 8)) {
                Some(k) => *k,
                None => {
                    self.drops.unknown_peer += 1;
                    return None;
                }
            },
        };
        if sender.is_some_and(|s| *s != key) {
            self.drops.relay_sender += 1;
            return None;
        }
        let Some(peer) = self.peers.get_mut(&key) else {
            self.drops.unknown_peer += 1;
            if is_init {
                if self.pending_inits.len() >= PENDING_INITS {
                    self.pending_inits.pop_front();
                }
                self.pending_inits.retain(|p| p.key != key);
                self.pending_inits.push_back(PendingInit { key, from, data: data.to_vec() });
            }
            return None;
        };
        let mut first = true;
        let mut authentic = false;
        loop {
            let input: &[u8] = if first { data } else { &[] };
            let src = if first { src_ip } else { None };
            first = false;
            match peer.tunn.decapsulate(src, input, &mut self.buf) {
                TunnResult::Done => break,
                TunnResult::Err(e) => {
                    match e {
                        WireGuardError::DuplicateCounter
                        | WireGuardError::InvalidCounter
                        | WireGuardError::InvalidAeadTag
                        | WireGuardError::InvalidMac
                        | WireGuardError::NoCurrentSession
                        | WireGuardError::WrongIndex
                        | WireGuardError::WrongTai64nTimestamp
                        | WireGuardError::UnderLoad
                        | WireGuardError::ConnectionExpired => self.drops.crypto += 1,
                        _ => self.drops.malformed += 1,
                    }
                    break;
                }
                TunnResult::WriteToNetwork(b) => {
                    // A handshake response to an initiation that authenticated, or queued data. A cookie
                    // reply (type 3) authenticates nothing.
                    if b.first() != Some(&3) {
                        authentic = true;
                    }
                    self.transmits.push_back(Transmit { dst: from, peer: Some(key), payload: b.to_vec() });
                }
                TunnResult::WriteToTunnelV4(b, inner_src) => {
                    authentic = true;
                    if peer.cfg.allowed.iter().any(|n| n.contains(&inner_src)) {
                        self.inbound.push_back(Inbound { peer: key, packet: b.to_vec() });
                    } else {
                        self.drops.bad_source += 1;
                    }
                }
                TunnResult::WriteToTunnelV6(..) => {
                    // The overlay is IPv4 only.
                    authentic = true;
                    self.drops.bad_source += 1;
                }
            }
        }
        if !authentic {
            return None;
        }
        // First contact: the peer is where its first authenticated packet came from. Later moves are
        // the path logic's call (a stray packet over another path must not move the session).
        if peer.endpoint.is_none() || peer.roaming {
            peer.endpoint = Some(from);
        }
        Some(Authenticated { peer: key, initiation: is_init })
    }

    /// An inner IPv4 packet to send to whichever peer owns its destination.
    pub fn handle_outbound(&mut self, packet: &[u8]) {
        let Some(IpAddr::V4(dst)) = Tunn::dst_address(packet) else {
            self.drops.no_route += 1;
            return;
        };
        let Some(key) = self.route(dst) else {
            self.drops.no_route += 1;
            return;
        };
        self.send_to_peer(&key, packet);
    }

    /// Sends an inner packet to a specific peer.
    pub fn send_to_peer(&mut self, key: &PublicKey, packet: &[u8]) {
        let Some(peer) = self.peers.get_mut(key) else {
            self.drops.no_route += 1;
            return;
        };
        match peer.tunn.encapsulate(packet, &mut self.buf) {
            TunnResult::WriteToNetwork(b) => match peer.endpoint {
                Some(dst) => {
                    self.transmits.push_back(Transmit { dst, peer: Some(*key), payload: b.to_vec() })
                }
                None => {
                    self.drops.no_endpoint += 1;
                    peer.starved = true;
                }
            },
            TunnResult::Err(_) => self.drops.crypto += 1,
            // Queued inside boringtun until the handshake completes.
            _ => {}
        }
    }

    /// The peer whose allowed addresses hold `dst` (longest prefix wins).
    pub fn route(&self, dst: Ipv4Addr) -> Option<PublicKey> {
        self.peers
            .iter()
            .flat_map(|(k, p)| {
                p.cfg.allowed.iter().filter(|n| n.contains(&dst)).map(move |n| (n.prefix_len(), *k))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, k)| k)
    }

    /// When [`Device::handle_timeout`] should run next, and why.
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        self.next_tick.map(|t| (t, "wireguard timers"))
    }

    /// Drives boringtun's timers (handshake retries, keepalives, rekeys); `now` also refills the
    /// relayed handshake budgets.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = Some(now);
        match self.next_tick {
            Some(t) if t <= now => {}
            _ => return,
        }
        self.next_tick = if self.peers.is_empty() { None } else { Some(now + TIMER_TICK) };
        // The limiter counts handshakes per interval; boringtun leaves the reset to its owner (the
        // limiter itself ignores calls less than a second apart).
        self.limiter.reset_count();
        for (key, peer) in self.peers.iter_mut() {
            match peer.tunn.update_timers(&mut self.buf) {
                TunnResult::WriteToNetwork(b) => {
                    if let Some(dst) = peer.endpoint {
                        self.transmits.push_back(Transmit { dst, peer: Some(*key), payload: b.to_vec() });
                    } else {
                        peer.starved = true;
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                _ => {}
            }
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next decrypted inner packet.
    pub fn poll_inbound(&mut self) -> Option<Inbound> {
        self.inbound.pop_front()
    }
}

/// Whether a datagram is WireGuard: type 1-4, three zero bytes, and the exact length for its type.
pub fn is_wireguard(data: &[u8]) -> bool {
    Tunn::parse_incoming_packet(data).is_ok()
}

/// The public key for a private key.
pub fn public_key(private_key: [u8; 32]) -> PublicKey {
    PublicKey(*X25519Public::from(&StaticSecret::from(private_key)).as_bytes())
}

#[cfg(test)]
mod tests;
