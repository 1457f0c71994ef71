//! Credential checks: argon2 hashes of join secrets and session tickets (the limits on logins are in
//! [`crate::limits`]).
//!
//! A join secret is checked with argon2id, at most one run per core at a time (a queue, so a burst of
//! joins cannot starve the runtime). After a successful login the node gets a *session ticket*: an
//! HMAC-SHA256 over its id, secret generation and public key, signed with a key kept in the data dir.
//! Reconnects present the ticket, which costs one HMAC, so a reconnect storm of thousands of nodes after
//! a server restart is not thousands of argon2 runs. Rotating or removing a node bumps or drops the
//! generation, which voids every ticket issued before.

use std::sync::{Arc, Mutex};

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
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

/// The largest argon2 memory cost a stored hash may ask for (KiB): a damaged or hostile row cannot
/// make a login allocate more than this.
pub const KDF_MEMORY_MAX_KIB: u32 = 256 * 1024;

/// Hashes and checks secrets on the blocking pool, one run per core at a time, each in a memory block
/// kept for the server's life.
///
/// argon2id needs `m_cost` KiB of working memory per run (19 MiB by default). Allocated per run, glibc
/// serves the second and later runs from its heap (its dynamic mmap threshold rises to the size of the
/// first freed block) and keeps the pages after free: a server that had 20 joins sat at 300+ MB. One
/// block per worker, reused, bounds the memory at `cores x m_cost` whatever the number of logins.
#[derive(Clone, Debug)]
pub struct SecretHasher {
    params: KdfParams,
    permits: Arc<Semaphore>,
    blocks: Arc<Mutex<Vec<Vec<argon2::Block>>>>,
}

impl SecretHasher {
    /// A hasher that makes new hashes with `params`.
    pub fn new(params: KdfParams) -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        SecretHasher { params, permits: Arc::new(Semaphore::new(cores)), blocks: Arc::default() }
    }

    /// Runs `f` with a memory block of at least `count` argon2 blocks, on the blocking pool.
    async fn with_memory<T: Send + 'static>(
        &self,
        count: usize,
        f: impl FnOnce(&mut [argon2::Block]) -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let _permit = self.permits.acquire().await?;
        let pool = self.blocks.clone();
        Ok(tokio::task::spawn_blocking(move || {
            let mut mem = pool.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
            if mem.len() < count {
                mem.resize(count, argon2::Block::default());
            }
            let out = f(&mut mem[..count]);
            pool.lock().unwrap_or_else(|e| e.into_inner()).push(mem);
            out
        })
        .await?)
    }

    /// The PHC string of a new hash of `secret`.
    pub async fn hash(&self, secret: String) -> anyhow::Result<String> {
        let params = Params::new(self.params.m_cost, self.params.t_cost, 1, Some(32))
            .map_err(|e| anyhow::anyhow!("bad argon2 parameters: {e}"))?;
        let mut salt = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut salt);
        let count = params.block_count();
        self.with_memory(count, move |mem| -> anyhow::Result<String> {
            let a = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
            let mut out = [0u8; 32];
            a.hash_password_into_with_memory(secret.as_bytes(), &salt, &mut out, mem)
                .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?;
            let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
            let phc = PasswordHash {
                algorithm: argon2::ARGON2ID_IDENT,
                version: Some(Version::V0x13.into()),
                params: ParamsString::try_from(&params).map_err(|e| anyhow::anyhow!("params: {e}"))?,
                salt: Some(salt.as_salt()),
                hash: Some(Output::new(&out).map_err(|e| anyhow::anyhow!("output: {e}"))?),
            };
            Ok(phc.to_string())
        })
        .await?
    }

    /// Whether `secret` matches the PHC string `hash`.
    pub async fn verify(&self, secret: String, hash: String) -> bool {
        let Some(check) = StoredHash::parse(&hash) else { return false };
        let count = check.params.block_count();
        self.with_memory(count, move |mem| check.matches(secret.as_bytes(), mem)).await.unwrap_or(false)
    }
}

/// A stored argon2 hash, parsed and bounded before any memory is committed to it.
struct StoredHash {
    algorithm: Algorithm,
    version: Version,
    params: Params,
    salt: Vec<u8>,
    expected: Output,
}

impl StoredHash {
    fn parse(phc: &str) -> Option<StoredHash> {
        let h = PasswordHash::new(phc).ok()?;
        let algorithm = Algorithm::try_from(h.algorithm).ok()?;
        let version = h.version.map_or(Ok(Version::V0x13), Version::try_from).ok()?;
        let params = Params::try_from(&h).ok()?;
        if params.m_cost() > KDF_MEMORY_MAX_KIB || params.p_cost() != 1 {
            return None;
        }
        let mut salt = [0u8; 64];
        let salt = h.salt?.decode_b64(&mut salt).ok()?.to_vec();
        Some(StoredHash { algorithm, version, params, salt, expected: h.hash? })
    }

    fn matches(&self, secret: &[u8], mem: &mut [argon2::Block]) -> bool {
        let mut out = vec![0u8; self.expected.len()];
        let a = Argon2::new(self.algorithm, self.version, self.params.clone());
        if a.hash_password_into_with_memory(secret, &self.salt, &mut out, mem).is_err() {
            return false;
        }
        // Output's equality is constant-time.
        Output::new(&out).is_ok_and(|o| o == self.expected)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hash_and_verify() {
        let h = SecretHasher::new(KdfParams { m_cost: 64, t_cost: 1 });
        let hash = h.hash("right".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(h.verify("right".into(), hash.clone()).await);
        assert!(!h.verify("wrong".into(), hash.clone()).await);
        assert!(!h.verify("right".into(), "not a hash".into()).await);
        // Hashes made before (argon2's own PHC encoder) still verify.
        let old = {
            use argon2::password_hash::PasswordHasher;
            let salt = SaltString::generate(&mut rand::rngs::OsRng);
            let p = Params::new(64, 1, 1, None).unwrap();
            Argon2::new(Algorithm::Argon2id, Version::V0x13, p)
                .hash_password(b"old", &salt)
                .unwrap()
                .to_string()
        };
        assert!(h.verify("old".into(), old.clone()).await);
        assert!(!h.verify("new".into(), old).await);
        // A stored hash asking for more memory than the cap is refused before any is committed.
        let greedy = hash.replace("m=64", &format!("m={}", KDF_MEMORY_MAX_KIB + 1));
        assert!(!h.verify("right".into(), greedy).await);
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
}
