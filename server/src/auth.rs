//! Credential checks: argon2 hashes of join secrets, session tickets, and the per-source limit on
//! failed logins.
//!
//! A join secret is checked with argon2id, at most one run per core at a time (a queue, so a burst of
//! joins cannot starve the runtime). After a successful login the node gets a *session ticket*: an
//! HMAC-SHA256 over its id, secret generation and public key, signed with a key kept in the data dir.
//! Reconnects present the ticket, which costs one HMAC, so a reconnect storm of thousands of nodes after
//! a server restart is not thousands of argon2 runs. Rotating or removing a node bumps or drops the
//! generation, which voids every ticket issued before.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Semaphore;

/// Cost of the argon2id hash for new secrets. Verification reads the cost from the stored hash.
#[derive(Clone, Copy, Debug)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost: u32,
    /// Iterations.
    pub t_cost: u32,
}

impl Default for KdfParams {
    /// OWASP's argon2id baseline: 19 MiB, 2 iterations, 1 lane.
    fn default() -> Self {
        KdfParams { m_cost: 19 * 1024, t_cost: 2 }
    }
}

/// Hashes and checks secrets on the blocking pool, one run per core at a time.
#[derive(Clone, Debug)]
pub struct SecretHasher {
    params: KdfParams,
    permits: Arc<Semaphore>,
}

impl SecretHasher {
    /// A hasher that makes new hashes with `params`.
    pub fn new(params: KdfParams) -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        SecretHasher { params, permits: Arc::new(Semaphore::new(cores)) }
    }

    /// The PHC string of a new hash of `secret`.
    pub async fn hash(&self, secret: String) -> anyhow::Result<String> {
        let _permit = self.permits.acquire().await?;
        let params = self.params;
        tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut rand::rngs::OsRng);
            let p = Params::new(params.m_cost, params.t_cost, 1, None)
                .map_err(|e| anyhow::anyhow!("bad argon2 parameters: {e}"))?;
            let a = Argon2::new(Algorithm::Argon2id, Version::V0x13, p);
            a.hash_password(secret.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))
        })
        .await?
    }

    /// Whether `secret` matches the PHC string `hash`.
    pub async fn verify(&self, secret: String, hash: String) -> bool {
        let Ok(_permit) = self.permits.acquire().await else { return false };
        tokio::task::spawn_blocking(move || {
            let Ok(parsed) = PasswordHash::new(&hash) else { return false };
            Argon2::default().verify_password(secret.as_bytes(), &parsed).is_ok()
        })
        .await
        .unwrap_or(false)
    }
}

type HmacSha256 = Hmac<Sha256>;

const TICKET_VERSION: u8 = 1;
const TICKET_LEN: usize = 1 + 8 + 8 + 32;

/// Issues and checks session tickets.
#[derive(Clone)]
pub struct Tickets {
    key: [u8; 32],
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tickets(<key redacted>)")
    }
}

impl Tickets {
    /// Tickets signed with `key`.
    pub fn new(key: [u8; 32]) -> Self {
        Tickets { key }
    }

    fn mac(&self, node_id: &str, generation: i64, issued_ms: i64, public_key: &[u8; 32]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        m.update(b"tunnel-ticket-v1");
        m.update(&(node_id.len() as u32).to_be_bytes());
        m.update(node_id.as_bytes());
        m.update(&generation.to_be_bytes());
        m.update(&issued_ms.to_be_bytes());
        m.update(public_key);
        m
    }

    /// A ticket for `node_id` at `generation`, bound to `public_key`.
    pub fn issue(&self, node_id: &str, generation: i64, public_key: &[u8; 32], now_ms: i64) -> Vec<u8> {
        let tag = self.mac(node_id, generation, now_ms, public_key).finalize().into_bytes();
        let mut t = Vec::with_capacity(TICKET_LEN);
        t.push(TICKET_VERSION);
        t.extend_from_slice(&generation.to_be_bytes());
        t.extend_from_slice(&now_ms.to_be_bytes());
        t.extend_from_slice(&tag);
        t
    }

    /// Whether `ticket` was issued for this node, generation and key.
    pub fn check(&self, ticket: &[u8], node_id: &str, generation: i64, public_key: &[u8; 32]) -> bool {
        if ticket.len() != TICKET_LEN || ticket[0] != TICKET_VERSION {
            return false;
        }
        let gen = i64::from_be_bytes(ticket[1..9].try_into().unwrap_or_default());
        let issued = i64::from_be_bytes(ticket[9..17].try_into().unwrap_or_default());
        if gen != generation {
            return false;
        }
        // verify_slice compares in constant time.
        self.mac(node_id, gen, issued, public_key).verify_slice(&ticket[17..]).is_ok()
    }
}

/// Limits failed logins per source address: a token bucket refilled at a steady rate; each failure
/// takes a token; an empty bucket refuses before any credential check is run, so a guessing client
/// cannot make the server burn argon2 time either.
#[derive(Debug)]
pub struct LoginLimiter {
    burst: f64,
    per_sec: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl LoginLimiter {
    /// `burst` failures at once, then `per_minute` more per minute.
    pub fn new(burst: u32, per_minute: u32) -> Self {
        LoginLimiter {
            burst: f64::from(burst),
            per_sec: f64::from(per_minute) / 60.0,
            buckets: Mutex::default(),
        }
    }

    fn level(&self, map: &mut HashMap<IpAddr, (f64, Instant)>, ip: IpAddr, now: Instant) -> f64 {
        let (tokens, at) = map.get(&ip).copied().unwrap_or((self.burst, now));
        let refilled = (tokens + now.duration_since(at).as_secs_f64() * self.per_sec).min(self.burst);
        map.insert(ip, (refilled, now));
        refilled
    }

    /// `Err(wait)` when `ip` has failed too often and must wait before trying again.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let level = self.level(&mut map, ip, now);
        if level >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - level) / self.per_sec))
        }
    }

    /// Records a failed login from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let level = self.level(&mut map, ip, now);
        map.insert(ip, ((level - 1.0).max(0.0), now));
        // Keep the table bounded: forget sources whose bucket has refilled.
        if map.len() > 100_000 {
            let burst = self.burst;
            let per_sec = self.per_sec;
            map.retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * per_sec < burst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hash_and_verify() {
        let h = SecretHasher::new(KdfParams { m_cost: 64, t_cost: 1 });
        let hash = h.hash("right".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(h.verify("right".into(), hash.clone()).await);
        assert!(!h.verify("wrong".into(), hash).await);
        assert!(!h.verify("right".into(), "not a hash".into()).await);
    }

    #[test]
    fn tickets_bind_node_generation_and_key() {
        let t = Tickets::new([3; 32]);
        let ticket = t.issue("n1", 4, &[9; 32], 1000);
        assert!(t.check(&ticket, "n1", 4, &[9; 32]));
        assert!(!t.check(&ticket, "n2", 4, &[9; 32]), "other node");
        assert!(!t.check(&ticket, "n1", 5, &[9; 32]), "rotated");
        assert!(!t.check(&ticket, "n1", 4, &[8; 32]), "other key");
        assert!(!Tickets::new([4; 32]).check(&ticket, "n1", 4, &[9; 32]), "other server key");
        let mut bad = ticket.clone();
        bad[20] ^= 1;
        assert!(!t.check(&bad, "n1", 4, &[9; 32]));
        assert!(!t.check(&ticket[..10], "n1", 4, &[9; 32]));
    }

    #[test]
    fn limiter_refuses_after_burst_and_recovers() {
        let l = LoginLimiter::new(3, 6);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check(ip, t0).is_ok());
            l.failed(ip, t0);
        }
        let wait = l.check(ip, t0).unwrap_err();
        assert!(wait > Duration::from_secs(5) && wait <= Duration::from_secs(10), "{wait:?}");
        assert!(l.check(other, t0).is_ok(), "other sources are not affected");
        assert!(l.check(ip, t0 + Duration::from_secs(11)).is_ok());
    }
}
