//! Limits on what strangers and nodes can make the server do: login attempts, logins in flight, and
//! the keying of every per-source limit.
//!
//! Logins are charged when they are admitted, not after the work: a source with no tokens left is
//! refused before any credential is checked, so parallel attempts cannot all slip in while the first
//! ones are still hashing. A login that succeeds gets its token back. Three budgets are kept apart so
//! one cannot be spent to lock the others out:
//! - failed join-secret logins per source (argon2 work; a guesser),
//! - wrong admin tokens per source (a misconfigured script must not lock out the nodes behind the
//!   same NAT or cluster egress address),
//! - logins per node (ticket reconnects are cheap HMACs, but each one rebuilds and signs a map).
//!
//! Every per-source limit keys an IPv6 source by its /64 (one subscriber's prefix) and an IPv4-mapped
//! IPv6 address as the IPv4 address it is.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The key a per-source limit counts under: IPv4 as is, IPv6 by /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Every login limit, with the defaults SECURITY.md documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    /// Failed join-secret logins a source may make at once ...
    pub failed_burst: u32,
    /// ... and then per minute.
    pub failed_per_minute: u32,
    /// Join-secret logins (argon2 runs) in flight from one source.
    pub inflight_per_source: usize,
    /// Join-secret logins in flight in all; more wait for nothing and are refused at once.
    pub inflight_total: usize,
    /// Logins one node may make at once ...
    pub node_burst: u32,
    /// ... and then per minute.
    pub node_per_minute: u32,
    /// Wrong admin tokens a source may present at once ...
    pub admin_failed_burst: u32,
    /// ... and then per minute.
    pub admin_failed_per_minute: u32,
    /// Refuse nodes that cannot prove they hold their private key (versions before key-proof-v1).
    pub require_key_proof: bool,
}

impl Default for LoginLimits {
    fn default() -> Self {
        LoginLimits {
            failed_burst: 10,
            failed_per_minute: 10,
            inflight_per_source: 4,
            inflight_total: 64,
            node_burst: 6,
            node_per_minute: 12,
            admin_failed_burst: 10,
            admin_failed_per_minute: 10,
            require_key_proof: false,
        }
    }
}

/// The most keys a bucket table holds. Keys whose bucket is full again are forgotten first; beyond
/// that, a new key is refused (a flood from very many sources), so the table never grows unbounded.
pub const BUCKET_TABLE_MAX: usize = 100_000;

/// Why a login was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The key's bucket is empty.
    #[error("try again in {}s", .0.as_secs().max(1))]
    Wait(Duration),
    /// Too many keys are being tracked at once.
    #[error("the server is tracking too many sources; try again later")]
    TableFull,
}

/// Token buckets per key: `burst` tokens, refilled at `per_minute`.
#[derive(Debug)]
pub struct Buckets<K> {
    burst: f64,
    per_sec: f64,
    map: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// Buckets of `burst` tokens refilled at `per_minute` tokens a minute.
    pub fn new(burst: u32, per_minute: u32) -> Self {
        Buckets {
            burst: f64::from(burst.max(1)),
            per_sec: f64::from(per_minute.max(1)) / 60.0,
            map: Mutex::default(),
        }
    }

    fn level(&self, at: (f64, Instant), now: Instant) -> f64 {
        (at.0 + now.saturating_duration_since(at.1).as_secs_f64() * self.per_sec).min(self.burst)
    }

    /// Takes a token for `key`, or says how long to wait for one.
    pub fn take(&self, key: &K, now: Instant) -> Result<(), Refusal> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(key) && map.len() >= BUCKET_TABLE_MAX {
            map.retain(|_, v| {
                (v.0 + now.saturating_duration_since(v.1).as_secs_f64() * self.per_sec) < self.burst
            });
            if map.len() >= BUCKET_TABLE_MAX {
                return Err(Refusal::TableFull);
            }
        }
        let level = map.get(key).map_or(self.burst, |v| self.level(*v, now));
        if level < 1.0 {
            map.insert(key.clone(), (level, now));
            return Err(Refusal::Wait(Duration::from_secs_f64((1.0 - level) / self.per_sec)));
        }
        map.insert(key.clone(), (level - 1.0, now));
        Ok(())
    }

    /// Gives back a token taken for `key` (the attempt succeeded and should not count).
    pub fn refund(&self, key: &K, now: Instant) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = map.get(key).copied() {
            let level = (self.level(v, now) + 1.0).min(self.burst);
            map.insert(key.clone(), (level, now));
        }
    }

    /// Forgets `key`: its next attempt starts with a full bucket.
    pub fn forget(&self, key: &K) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }

    /// Whether `key` has a token now (without taking it).
    pub fn has_token(&self, key: &K, now: Instant) -> bool {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key).is_none_or(|v| self.level(*v, now) >= 1.0)
    }

    /// How many keys are tracked.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counts work in flight per source and in all; [`InFlight::enter`] hands out a guard that leaves on
/// drop, so an attempt that errors or is cancelled never leaks a slot.
#[derive(Debug)]
pub struct InFlight {
    per_source: usize,
    total: usize,
    state: Arc<Mutex<(HashMap<IpAddr, usize>, usize)>>,
}

/// Which cap of an [`InFlight`] count is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    PerSource,
    Total,
}

/// A slot in an [`InFlight`] count.
#[derive(Debug)]
pub struct InFlightGuard {
    key: IpAddr,
    state: Arc<Mutex<(HashMap<IpAddr, usize>, usize)>>,
}

impl InFlight {
    /// At most `per_source` at once from one source key and `total` in all.
    pub fn new(per_source: usize, total: usize) -> Self {
        InFlight { per_source: per_source.max(1), total: total.max(1), state: Arc::default() }
    }

    /// A slot for `key` (already a [`source_key`]), or `None` when either cap is reached.
    pub fn enter(&self, key: IpAddr) -> Option<InFlightGuard> {
        self.try_enter(key).ok()
    }

    /// A slot for `key`, or which cap is reached.
    pub fn try_enter(&self, key: IpAddr) -> Result<InFlightGuard, Full> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (map, total) = &mut *st;
        let mine = map.get(&key).copied().unwrap_or(0);
        if *total >= self.total {
            return Err(Full::Total);
        }
        if mine >= self.per_source {
            return Err(Full::PerSource);
        }
        map.insert(key, mine + 1);
        *total += 1;
        Ok(InFlightGuard { key, state: self.state.clone() })
    }

    /// How many are in flight in all.
    pub fn total(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (map, total) = &mut *st;
        *total = total.saturating_sub(1);
        match map.get_mut(&self.key) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                map.remove(&self.key);
            }
        }
    }
}

/// What the gate refused and saw, for `/metrics`.
#[derive(Debug, Default)]
pub struct GateStats {
    /// Logins refused: the source's failed-login budget is spent.
    pub refused_source: AtomicU64,
    /// Logins refused: the node's login budget is spent.
    pub refused_node: AtomicU64,
    /// Logins refused: too many join-secret logins in flight.
    pub refused_inflight: AtomicU64,
    /// Logins refused: a join secret of the wrong shape (no argon2 run).
    pub refused_malformed: AtomicU64,
    /// Logins refused: the key proof was wrong, missing where required, or late.
    pub refused_key_proof: AtomicU64,
    /// Logins accepted from nodes that cannot prove their key (older versions).
    pub without_key_proof: AtomicU64,
    /// Wrong admin tokens refused before comparison because the source's budget is spent.
    pub refused_admin: AtomicU64,
    /// Candidates dropped from nodes' reports (refused address, over the cap, duplicate).
    pub candidates_dropped: AtomicU64,
    /// Endpoint updates held back by the per-session rate (the latest is applied later).
    pub endpoint_updates_deferred: AtomicU64,
    /// gRPC connections refused by the per-source or total cap.
    pub conns_refused: Arc<AtomicU64>,
}

impl GateStats {
    /// Prometheus text; `inflight` is the join-secret logins in progress now.
    pub fn render(&self, out: &mut String, inflight: usize) {
        use std::fmt::Write as _;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP tunnel_server_logins_refused_total Logins refused before or instead of a credential check, by reason.\n# TYPE tunnel_server_logins_refused_total counter"
        );
        for (reason, a) in [
            ("source_budget", &self.refused_source),
            ("node_budget", &self.refused_node),
            ("in_flight", &self.refused_inflight),
            ("malformed_secret", &self.refused_malformed),
            ("key_proof", &self.refused_key_proof),
            ("admin_budget", &self.refused_admin),
        ] {
            let _ = writeln!(out, "tunnel_server_logins_refused_total{{reason=\"{reason}\"}} {}", g(a));
        }
        for (name, help, v) in [
            (
                "tunnel_server_logins_without_key_proof_total",
                "Logins accepted from nodes that cannot prove their key (before key-proof-v1).",
                g(&self.without_key_proof),
            ),
            (
                "tunnel_server_candidates_dropped_total",
                "Candidates dropped from nodes' reports (refused address, over the cap, repeated).",
                g(&self.candidates_dropped),
            ),
            (
                "tunnel_server_connections_refused_total",
                "gRPC connections refused: too many from the source or in all.",
                g(&self.conns_refused),
            ),
            (
                "tunnel_server_endpoint_updates_deferred_total",
                "Endpoint updates held back by the per-session rate (the latest is applied later).",
                g(&self.endpoint_updates_deferred),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP tunnel_server_logins_in_flight Join-secret logins being checked now.\n# TYPE tunnel_server_logins_in_flight gauge\ntunnel_server_logins_in_flight {inflight}"
        );
    }
}

/// Adds one to a counter.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The login limits in force, and the counts they keep.
#[derive(Debug)]
pub struct LoginGate {
    pub limits: LoginLimits,
    pub stats: GateStats,
    /// Join-secret logins (and logins naming no known node) per source key.
    pub failed: Buckets<IpAddr>,
    /// Successful logins per node id.
    pub per_node: Buckets<String>,
    /// Stale or forged session tickets per node id (written to the audit log while it lasts).
    pub ticket_failed: Buckets<String>,
    /// Wrong admin tokens per source key.
    pub admin: Buckets<IpAddr>,
    /// Join-secret logins in flight.
    pub inflight: InFlight,
}

impl LoginGate {
    /// A gate with `limits`.
    pub fn new(limits: LoginLimits) -> Self {
        LoginGate {
            limits,
            failed: Buckets::new(limits.failed_burst, limits.failed_per_minute),
            per_node: Buckets::new(limits.node_burst, limits.node_per_minute),
            ticket_failed: Buckets::new(limits.failed_burst, limits.failed_per_minute),
            admin: Buckets::new(limits.admin_failed_burst, limits.admin_failed_per_minute),
            inflight: InFlight::new(limits.inflight_per_source, limits.inflight_total),
            stats: GateStats::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_sources_count_by_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b), "one /64 is one source");
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn buckets_charge_on_admission_and_refund_success() {
        let b: Buckets<IpAddr> = Buckets::new(3, 6);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            b.take(&ip, t0).unwrap();
        }
        // A fourth attempt started before any of the first three finished is refused.
        let Err(Refusal::Wait(wait)) = b.take(&ip, t0) else { panic!("admitted past the burst") };
        assert!(wait > Duration::from_secs(5) && wait <= Duration::from_secs(10), "{wait:?}");
        b.refund(&ip, t0);
        assert!(b.take(&ip, t0).is_ok(), "a successful login gives its token back");
        assert!(b.take(&"192.0.2.2".parse().unwrap(), t0).is_ok(), "other sources are not affected");
        assert!(b.take(&ip, t0 + Duration::from_secs(11)).is_ok(), "refilled");
    }

    #[test]
    fn inflight_caps_per_source_and_total() {
        let f = InFlight::new(2, 3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let g1 = f.enter(a).unwrap();
        let _g2 = f.enter(a).unwrap();
        assert!(f.enter(a).is_none(), "per source");
        let _g3 = f.enter(b).unwrap();
        assert!(f.enter(b).is_none(), "in total");
        drop(g1);
        assert!(f.enter(a).is_some(), "a slot comes back when the attempt ends");
    }

    #[test]
    fn bucket_table_is_bounded() {
        let b: Buckets<u32> = Buckets::new(1, 1);
        let t0 = Instant::now();
        for k in 0..BUCKET_TABLE_MAX as u32 {
            let _ = b.take(&k, t0);
        }
        assert_eq!(b.take(&u32::MAX, t0), Err(Refusal::TableFull));
        assert_eq!(b.len(), BUCKET_TABLE_MAX);
        // Once buckets have refilled they are forgotten and new keys get in.
        assert!(b.take(&u32::MAX, t0 + Duration::from_secs(120)).is_ok());
        assert!(b.len() < 10);
    }
}
