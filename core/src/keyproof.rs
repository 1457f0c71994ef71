//! Proof that a node holds the private key of the public key it logs in with.
//!
//! A session ticket is bound to the node's public key and a join token names no key, so without a
//! proof either one, with a public key any peer can see in its map, would log in as that node, take its
//! map and a fresh relay capability, and replace its session. X25519 keys cannot sign, so the server
//! proves possession by key agreement: inside `Connect` it sends an ephemeral X25519 public key; the
//! node answers with an HMAC-SHA256, keyed by the Diffie-Hellman result of its static key and that
//! ephemeral key, over a transcript naming the node, both keys and the purpose. Only the holder of the
//! static private key (or of the server's ephemeral one, which never leaves the server) can compute it.
//! The exchange runs inside the pinned TLS session, so an on-path attacker sees no challenge.
//!
//! Nodes announce [`KEY_PROOF_CAPABILITY`] in Hello; the server sends a challenge only to those.

use boringtun::x25519::{PublicKey, StaticSecret};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The Hello capability of nodes that answer a key challenge.
pub const KEY_PROOF_CAPABILITY: &str = "key-proof-v1";

type HmacSha256 = Hmac<Sha256>;

fn mac(shared: &[u8; 32], node_id: &str, node_key: &[u8; 32], challenge: &[u8; 32]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(shared).expect("HMAC takes any key length");
    m.update(b"tunnel key proof v1");
    m.update(&(node_id.len() as u32).to_be_bytes());
    m.update(node_id.as_bytes());
    m.update(node_key);
    m.update(challenge);
    m
}

/// The server's side: one ephemeral key per login.
pub struct KeyChallenge {
    secret: StaticSecret,
    public: [u8; 32],
}

impl std::fmt::Debug for KeyChallenge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyChallenge(<ephemeral key redacted>)")
    }
}

impl KeyChallenge {
    /// A challenge from 32 bytes of the caller's randomness.
    pub fn new(random: [u8; 32]) -> Self {
        let secret = StaticSecret::from(random);
        let public = *PublicKey::from(&secret).as_bytes();
        KeyChallenge { secret, public }
    }

    /// The ephemeral public key to send to the node.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// Whether `proof` shows that `node_id` holds the private key of `node_key`.
    pub fn verify(&self, node_id: &str, node_key: &[u8; 32], proof: &[u8]) -> bool {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*node_key));
        // A low-order public key gives an all-zero result that anyone can compute: never a proof.
        if shared.as_bytes().iter().all(|b| *b == 0) {
            return false;
        }
        // verify_slice compares in constant time.
        mac(shared.as_bytes(), node_id, node_key, &self.public).verify_slice(proof).is_ok()
    }
}

/// The node's answer to `challenge`, made with its static private key.
pub fn prove(private_key: &[u8; 32], node_id: &str, challenge: &[u8; 32]) -> [u8; 32] {
    let secret = StaticSecret::from(*private_key);
    let node_key = *PublicKey::from(&secret).as_bytes();
    let shared = secret.diffie_hellman(&PublicKey::from(*challenge));
    mac(shared.as_bytes(), node_id, &node_key, challenge).finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn public(private: &[u8; 32]) -> [u8; 32] {
        *PublicKey::from(&StaticSecret::from(*private)).as_bytes()
    }

    #[test]
    fn only_the_key_holder_can_answer() {
        let node = [7u8; 32];
        let node_pub = public(&node);
        let c = KeyChallenge::new([9u8; 32]);
        let proof = prove(&node, "n1", &c.public());
        assert!(c.verify("n1", &node_pub, &proof));
        // Another key, another node id, another challenge, a damaged proof: all refused.
        assert!(!c.verify("n1", &public(&[8u8; 32]), &proof), "a proof is for one key");
        assert!(!c.verify("n2", &node_pub, &proof), "a proof is for one node");
        let other = KeyChallenge::new([10u8; 32]);
        assert!(!other.verify("n1", &node_pub, &proof), "a proof answers one challenge");
        let mut bad = proof;
        bad[0] ^= 1;
        assert!(!c.verify("n1", &node_pub, &bad));
        assert!(!c.verify("n1", &node_pub, &proof[..16]));
        // The thief has the victim's public key and makes up a private key: no.
        assert!(!c.verify("n1", &node_pub, &prove(&[8u8; 32], "n1", &c.public())));
    }

    #[test]
    fn low_order_keys_prove_nothing() {
        let c = KeyChallenge::new([9u8; 32]);
        // The all-zero point: the shared secret is zero for any challenge.
        let zero = [0u8; 32];
        let forged = mac(&[0u8; 32], "n1", &zero, &c.public()).finalize().into_bytes();
        assert!(!c.verify("n1", &zero, &forged));
    }
}
