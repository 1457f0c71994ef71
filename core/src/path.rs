//! Path selection: which way each peer's WireGuard packets go (a direct UDP address or the relay),
//! decided only from authenticated evidence.
//!
//! For every peer, [`Paths`] knows its candidates (LAN, advertised, reflexive, and peer-reflexive ones
//! learned from authenticated pings) and proves them with probes ([`crate::probe`]): a candidate counts
//! only when a pong answering a ping we sent to that exact address comes back from it. The best proven
//! path wins (LAN beats advertised beats public; any direct path beats the relay); with none proven the
//! relay carries the traffic while punching goes on in the background, and the peer moves to a direct
//! path the moment one is proven. A direct path in use is confirmed continuously (authenticated
//! traffic from it, or pongs); if it stays silent for [`DEAD_AFTER`] it is dropped and the peer falls
//! back to the relay and punches again.
//!
//! Use: feed [`Paths::set_peers`], [`Paths::set_relay`], [`Paths::handle_probe`], [`Paths::handle_rx`],
//! [`Paths::handle_tx`] and [`Paths::handle_timeout`] (when [`Paths::poll_timeout`] says); after each,
//! drain [`Paths::poll_transmit`] (probe datagrams for the node's UDP socket) and [`Paths::poll_event`]
//! (path changes to apply to the WireGuard device).

use crate::PublicKey;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use boringtun::x25519::StaticSecret;

use crate::probe::{self, ProbeKind};

/// Pings to every candidate this often while punching.
pub const PUNCH_INTERVAL: Duration = Duration::from_millis(100);
/// How long one round of punching lasts.
pub const PUNCH_WINDOW: Duration = Duration::from_secs(5);
/// While not direct, punching starts again this often.
pub const RETRY_EVERY: Duration = Duration::from_secs(20);
/// A direct path carrying traffic is confirmed when it has been silent this long.
pub const ACTIVE_CONFIRM: Duration = Duration::from_millis(500);
/// Pings on a path being confirmed go out this often.
pub const CONFIRM_RETRY: Duration = Duration::from_millis(250);
/// A path being confirmed that stays silent this long is dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(2);
/// Traffic sent within this long makes a peer active.
const ACTIVE_WINDOW: Duration = Duration::from_secs(5);
/// Peer-reflexive candidates kept per peer.
const LEARNED_MAX: usize = 4;
/// Outstanding pings remembered per peer.
const OUTSTANDING_MAX: usize = 128;

pub use crate::wg::Via;

/// How a candidate address of a path was learned: the map's kinds ([`crate::map::CandidateKind`])
/// and the peer-reflexive one only a path sees; higher ranks win.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// Seen as the source of an authenticated ping.
    PeerReflexive,
    /// A public address a STUN server saw.
    Reflexive,
    /// Configured by the operator (a forwarded port, a hostPort).
    Advertised,
    /// On the peer's own network.
    Lan,
}

impl From<crate::map::CandidateKind> for Origin {
    /// A kind the map names, as a path's origin.
    fn from(k: crate::map::CandidateKind) -> Origin {
        match k {
            crate::map::CandidateKind::Lan => Origin::Lan,
            crate::map::CandidateKind::Reflexive => Origin::Reflexive,
            crate::map::CandidateKind::Advertised => Origin::Advertised,
        }
    }
}

/// `list` with only allowed addresses and at most the cap of each kind (the first ones), no repeats.
fn bounded(list: Vec<(SocketAddr, Origin)>) -> Vec<(SocketAddr, Origin)> {
    let mut kept: Vec<(SocketAddr, Origin)> = Vec::with_capacity(list.len().min(24));
    for c in list {
        let cap = match c.1 {
            Origin::Lan => crate::map::CandidateKind::Lan.cap(),
            Origin::Reflexive => crate::map::CandidateKind::Reflexive.cap(),
            Origin::Advertised => crate::map::CandidateKind::Advertised.cap(),
            Origin::PeerReflexive => 0,
        };
        // Loopback is the server's call: it keeps loopback candidates only from nodes on its own host.
        if (crate::map::candidate_addr_allowed(c.0) || c.0.ip().to_canonical().is_loopback())
            && kept.iter().filter(|k| k.1 == c.1).count() < cap
            && !kept.iter().any(|k| k.0 == c.0)
        {
            kept.push(c);
        }
    }
    kept
}

/// A peer as the map describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCandidates {
    /// The peer's static key.
    pub key: PublicKey,
    /// Where it may be reached.
    pub candidates: Vec<(SocketAddr, Origin)>,
}

/// Something the data plane must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathEvent {
    /// The peer.
    pub key: PublicKey,
    /// Its new path (`None`: no way to reach it now).
    pub via: Option<Via>,
    /// Whether the path is proven (a direct path answered probes, or the relay). An unproven path is
    /// a guess: the WireGuard session may follow authenticated packets elsewhere (roam) until a proof.
    pub proven: bool,
}

/// Counters per peer, for `/status` and `/metrics`.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct PathStats {
    /// Times the path changed.
    pub path_changes: u64,
    /// Punch rounds started.
    pub punch_attempts: u64,
    /// Punch rounds that proved a direct path.
    pub punch_successes: u64,
    /// Pings sent.
    pub pings: u64,
    /// Valid pongs received.
    pub pongs: u64,
    /// Round-trip time of the last pong on the path in use, in microseconds.
    pub rtt_us: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Proof {
    kind: Origin,
    last_ok: Instant,
    rtt: Duration,
}

#[derive(Debug)]
struct PeerPath {
    pair_key: [u8; 32],
    candidates: Vec<(SocketAddr, Origin)>,
    learned: VecDeque<SocketAddr>,
    proven: BTreeMap<SocketAddr, Proof>,
    current: Option<Via>,
    current_proven: bool,
    punch_until: Option<Instant>,
    punch_proved: bool,
    next_punch: Instant,
    next_retry: Instant,
    last_tx: Option<Instant>,
    confirm_since: Option<Instant>,
    last_confirm_ping: Option<Instant>,
    outstanding: VecDeque<(u64, SocketAddr, Instant)>,
    stats: PathStats,
}

/// Path state of every peer of one node.
pub struct Paths {
    secret: StaticSecret,
    me: PublicKey,
    peers: BTreeMap<PublicKey, PeerPath>,
    relay_up: bool,
    keepalive: Duration,
    rng: u64,
    /// The latest time any `handle_*` call was given.
    now: Instant,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
    events: VecDeque<PathEvent>,
    /// Probes dropped: unknown sender, bad MAC, or a pong nobody asked for.
    pub bad_probes: u64,
}

impl std::fmt::Debug for Paths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Paths").field("peers", &self.peers.len()).field("relay_up", &self.relay_up).finish()
    }
}

impl Paths {
    /// Paths for the node with this private key. `keepalive` is how often an idle direct path is
    /// confirmed (it also holds NAT mappings open); `seed` makes transaction ids unpredictable.
    pub fn new(private_key: [u8; 32], keepalive: Duration, seed: u64, now: Instant) -> Paths {
        let secret = StaticSecret::from(private_key);
        let me = crate::wg::public_key(private_key);
        Paths {
            secret,
            me,
            peers: BTreeMap::new(),
            relay_up: false,
            keepalive,
            rng: seed | 1,
            now,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            bad_probes: 0,
        }
    }

    fn next_txid(&mut self) -> u64 {
        // xorshift64*: unpredictable enough for ids that are also covered by the MAC.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Installs exactly these peers. A peer whose candidates changed starts punching.
    ///
    /// Candidates a peer may not have (loopback, multicast, link-local, ...; more than the cap of a
    /// kind) are dropped here whatever the server sent: probes go only to addresses another host could
    /// be at, and to a bounded number of them.
    pub fn set_peers(&mut self, desired: Vec<PeerCandidates>, now: Instant) {
        self.now = self.now.max(now);
        let keys: std::collections::BTreeSet<PublicKey> = desired.iter().map(|p| p.key).collect();
        self.peers.retain(|k, _| keys.contains(k));
        for mut p in desired {
            p.candidates = bounded(p.candidates);
            match self.peers.get_mut(&p.key) {
                Some(st) => {
                    if st.candidates != p.candidates {
                        st.candidates = p.candidates;
                        let valid: Vec<SocketAddr> = st.candidates.iter().map(|c| c.0).collect();
                        st.proven.retain(|a, _| valid.contains(a) || st.learned.contains(a));
                        start_punch(st, now);
                    }
                }
                None => {
                    let mut st = PeerPath {
                        pair_key: probe::pair_key(&self.secret, &p.key),
                        candidates: p.candidates,
                        learned: VecDeque::new(),
                        proven: BTreeMap::new(),
                        current: None,
                        current_proven: false,
                        punch_until: None,
                        punch_proved: false,
                        next_punch: now,
                        next_retry: now + RETRY_EVERY,
                        last_tx: None,
                        confirm_since: None,
                        last_confirm_ping: None,
                        outstanding: VecDeque::new(),
                        stats: PathStats::default(),
                    };
                    start_punch(&mut st, now);
                    self.peers.insert(p.key, st);
                }
            }
            self.reselect(&p.key, now);
        }
    }

    /// The relay is usable (connected and accepted) or not.
    pub fn set_relay(&mut self, up: bool, now: Instant) {
        self.now = self.now.max(now);
        if self.relay_up == up {
            return;
        }
        self.relay_up = up;
        let keys: Vec<PublicKey> = self.peers.keys().copied().collect();
        for k in keys {
            self.reselect(&k, now);
        }
    }

    /// Starts a round of punching to every peer (our own candidates changed).
    pub fn punch_all(&mut self, now: Instant) {
        self.now = self.now.max(now);
        for st in self.peers.values_mut() {
            start_punch(st, now);
        }
    }

    /// A probe arrived from `from` on the node's UDP socket.
    pub fn handle_probe(&mut self, from: SocketAddr, data: &[u8], now: Instant) {
        self.now = self.now.max(now);
        let Some(p) = probe::parse(data) else {
            self.bad_probes += 1;
            return;
        };
        let me = self.me;
        let Some(st) = self.peers.get_mut(&p.sender) else {
            self.bad_probes += 1;
            return;
        };
        if !probe::verify(data, &st.pair_key) {
            self.bad_probes += 1;
            return;
        }
        match p.kind {
            ProbeKind::Ping => {
                self.transmits.push_back((from, probe::encode(ProbeKind::Pong, &me, p.txid, &st.pair_key)));
                // The peer is reachable from `from` as far as it knows: learn the address, and prove it
                // from our side unless we are already direct.
                learn(st, from);
                if !matches!(st.current, Some(Via::Direct(a)) if st.proven.contains_key(&a)) {
                    start_punch(st, now);
                }
            }
            ProbeKind::Pong => {
                let Some(i) = st.outstanding.iter().position(|(id, addr, _)| *id == p.txid && *addr == from)
                else {
                    self.bad_probes += 1;
                    return;
                };
                let (_, _, sent) = st.outstanding.remove(i).unwrap_or((0, from, now));
                let kind =
                    st.candidates.iter().find(|c| c.0 == from).map(|c| c.1).unwrap_or(Origin::PeerReflexive);
                let rtt = now.saturating_duration_since(sent);
                st.proven.insert(from, Proof { kind, last_ok: now, rtt });
                st.stats.pongs += 1;
                if st.current == Some(Via::Direct(from)) {
                    st.confirm_since = None;
                    st.stats.rtt_us = Some(rtt.as_micros() as u64);
                }
                if st.punch_until.is_some() && !st.punch_proved {
                    st.punch_proved = true;
                    st.stats.punch_successes += 1;
                }
                self.reselect(&p.sender, now);
            }
        }
    }

    /// An authenticated WireGuard packet from `key` arrived directly from `from`: it confirms that path.
    pub fn handle_rx(&mut self, key: &PublicKey, from: SocketAddr, now: Instant) {
        self.now = self.now.max(now);
        if let Some(st) = self.peers.get_mut(key) {
            if let Some(p) = st.proven.get_mut(&from) {
                p.last_ok = now;
                if st.current == Some(Via::Direct(from)) {
                    st.confirm_since = None;
                }
            }
        }
    }

    /// A fresh handshake initiation from `key` authenticated, arriving directly from `from`: the peer
    /// (re)started its session from there (a restart gets a new socket, a new NAT mapping). Follow it
    /// at once, as WireGuard roaming would, while the probes prove it; the old path is forgotten. While
    /// we use the relay, the relay stays until `from` is proven.
    pub fn handle_initiation(&mut self, key: &PublicKey, from: SocketAddr, now: Instant) {
        self.now = self.now.max(now);
        let Some(st) = self.peers.get_mut(key) else { return };
        match st.current {
            Some(Via::Direct(a)) if a == from => return,
            Some(Via::Relay) => {
                start_punch(st, now);
                return;
            }
            Some(Via::Direct(old)) => {
                st.proven.remove(&old);
            }
            None => {}
        }
        learn(st, from);
        st.current = Some(Via::Direct(from));
        st.current_proven = false;
        st.confirm_since = None;
        st.stats.path_changes += 1;
        start_punch(st, now);
        self.events.push_back(PathEvent { key: *key, via: Some(Via::Direct(from)), proven: false });
        self.reselect(key, now);
    }

    /// We sent traffic to `key`: its path is in use and must be confirmed quickly.
    pub fn handle_tx(&mut self, key: &PublicKey, now: Instant) {
        self.now = self.now.max(now);
        if let Some(st) = self.peers.get_mut(key) {
            st.last_tx = Some(now);
        }
    }

    /// When [`Paths::handle_timeout`] should run next, and why.
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        let mut best: Option<(Instant, &'static str)> = None;
        let mut consider = |t: Instant, why: &'static str| {
            if best.is_none_or(|(b, _)| t < b) {
                best = Some((t, why));
            }
        };
        for st in self.peers.values() {
            if st.punch_until.is_some() {
                consider(st.next_punch, "punch");
            } else if !is_direct(st) {
                consider(st.next_retry, "punch retry");
            }
            if let Some(Via::Direct(a)) = st.current {
                if let Some(p) = st.proven.get(&a) {
                    let due = match st.confirm_since {
                        Some(since) => {
                            let retry = st.last_confirm_ping.map_or(since, |t| t + CONFIRM_RETRY);
                            retry.min(since + DEAD_AFTER)
                        }
                        None => p.last_ok + self.confirm_interval(st),
                    };
                    consider(due, "confirm path");
                }
            }
        }
        best
    }

    fn confirm_interval(&self, st: &PeerPath) -> Duration {
        let active = st.last_tx.is_some_and(|t| self.now.saturating_duration_since(t) < ACTIVE_WINDOW);
        if active {
            ACTIVE_CONFIRM
        } else {
            self.keepalive
        }
    }

    /// Sends due pings, ends punch rounds, notices dead paths.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = self.now.max(now);
        let keys: Vec<PublicKey> = self.peers.keys().copied().collect();
        let me = self.me;
        let keepalive = self.keepalive;
        for key in keys {
            let mut txids = Vec::new();
            let Some(st) = self.peers.get_mut(&key) else { continue };
            // Punching.
            if let Some(until) = st.punch_until {
                if now >= until {
                    st.punch_until = None;
                    st.next_retry = now + RETRY_EVERY;
                } else if now >= st.next_punch {
                    st.next_punch = now + PUNCH_INTERVAL;
                    let targets: Vec<SocketAddr> =
                        st.candidates.iter().map(|c| c.0).chain(st.learned.iter().copied()).collect();
                    txids.extend(targets);
                }
            } else if !is_direct(st) && now >= st.next_retry {
                start_punch(st, now);
                let targets: Vec<SocketAddr> =
                    st.candidates.iter().map(|c| c.0).chain(st.learned.iter().copied()).collect();
                st.next_punch = now + PUNCH_INTERVAL;
                txids.extend(targets);
            }
            // Confirming the direct path in use.
            let mut dead = false;
            if let Some(Via::Direct(a)) = st.current {
                if let Some(p) = st.proven.get(&a).copied() {
                    let active = st.last_tx.is_some_and(|t| now.saturating_duration_since(t) < ACTIVE_WINDOW);
                    let interval = if active { ACTIVE_CONFIRM } else { keepalive };
                    if st.confirm_since.is_none() && now.saturating_duration_since(p.last_ok) >= interval {
                        st.confirm_since = Some(now);
                        st.last_confirm_ping = None;
                    }
                    if let Some(since) = st.confirm_since {
                        if now.saturating_duration_since(since) >= DEAD_AFTER {
                            dead = true;
                        } else if st.last_confirm_ping.is_none_or(|t| now >= t + CONFIRM_RETRY) {
                            st.last_confirm_ping = Some(now);
                            if !txids.contains(&a) {
                                txids.push(a);
                            }
                        }
                    }
                }
            }
            if dead {
                if let Some(Via::Direct(a)) = st.current {
                    st.proven.remove(&a);
                }
                st.confirm_since = None;
                start_punch(st, now);
            }
            for dst in txids {
                let id = self.next_txid();
                let Some(st) = self.peers.get_mut(&key) else { break };
                if st.outstanding.len() >= OUTSTANDING_MAX {
                    st.outstanding.pop_front();
                }
                st.outstanding.push_back((id, dst, now));
                st.stats.pings += 1;
                self.transmits.push_back((dst, probe::encode(ProbeKind::Ping, &me, id, &st.pair_key)));
            }
            if dead {
                self.reselect(&key, now);
            }
        }
    }

    fn reselect(&mut self, key: &PublicKey, now: Instant) {
        let relay_up = self.relay_up;
        let Some(st) = self.peers.get_mut(key) else { return };
        let fresh = |p: &Proof| now.saturating_duration_since(p.last_ok) < PUNCH_WINDOW + DEAD_AFTER;
        let best = st
            .proven
            .iter()
            .filter(|(_, p)| fresh(p))
            .max_by(|a, b| a.1.kind.cmp(&b.1.kind).then(b.1.rtt.cmp(&a.1.rtt)))
            .map(|(a, p)| (*a, *p));
        let (want, proven) = match (best, st.current) {
            // Keep the direct path in use unless a better kind is proven (no flapping on RTT noise).
            (Some((_, bp)), Some(Via::Direct(cur)))
                if st.proven.get(&cur).is_some_and(|c| c.kind >= bp.kind) =>
            {
                (Some(Via::Direct(cur)), true)
            }
            (Some((addr, _)), _) => (Some(Via::Direct(addr)), true),
            (None, _) if relay_up => (Some(Via::Relay), true),
            // No proof and no relay: keep a guess that is still a candidate (or where the peer's last
            // initiation came from), else try the best candidate; a WireGuard handshake may still get
            // through (a peer that does not answer probes).
            (None, Some(Via::Direct(cur)))
                if st.learned.contains(&cur) || st.candidates.iter().any(|c| c.0 == cur) =>
            {
                (Some(Via::Direct(cur)), false)
            }
            (None, _) => (st.candidates.iter().max_by_key(|c| c.1).map(|c| Via::Direct(c.0)), false),
        };
        if want != st.current || proven != st.current_proven {
            st.current = want;
            st.current_proven = proven;
            st.confirm_since = None;
            st.stats.path_changes += 1;
            if let Some(Via::Direct(a)) = want {
                st.stats.rtt_us = st.proven.get(&a).map(|p| p.rtt.as_micros() as u64);
            }
            self.events.push_back(PathEvent { key: *key, via: want, proven });
        }
    }

    /// The next probe datagram to send.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// The next path change.
    pub fn poll_event(&mut self) -> Option<PathEvent> {
        self.events.pop_front()
    }

    /// The path a peer uses now.
    pub fn current(&self, key: &PublicKey) -> Option<Via> {
        self.peers.get(key).and_then(|s| s.current)
    }

    /// Whether the peer's current path is a proven direct one.
    pub fn is_direct(&self, key: &PublicKey) -> bool {
        self.peers.get(key).is_some_and(is_direct)
    }

    /// Counters for one peer.
    pub fn stats(&self, key: &PublicKey) -> Option<PathStats> {
        self.peers.get(key).map(|s| s.stats)
    }
}

fn is_direct(st: &PeerPath) -> bool {
    matches!(st.current, Some(Via::Direct(a)) if st.proven.contains_key(&a))
}

/// Remembers `from` as a peer-reflexive candidate unless it is known already (at most
/// [`LEARNED_MAX`]; the oldest goes first).
fn learn(st: &mut PeerPath, from: SocketAddr) {
    if st.candidates.iter().any(|c| c.0 == from) || st.learned.contains(&from) {
        return;
    }
    if st.learned.len() >= LEARNED_MAX {
        if let Some(old) = st.learned.pop_front() {
            st.proven.remove(&old);
        }
    }
    st.learned.push_back(from);
}

fn start_punch(st: &mut PeerPath, now: Instant) {
    if st.punch_until.is_none() {
        st.stats.punch_attempts += 1;
        st.punch_proved = false;
        st.next_punch = now;
    }
    st.punch_until = Some(now + PUNCH_WINDOW);
}

#[cfg(test)]
mod tests;
