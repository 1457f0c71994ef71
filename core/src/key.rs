//! A node's WireGuard public key: 32 bytes, shown as standard base64 (as `wg` shows keys), stored
//! and sent as the bytes (on disk the cached map keeps its array of numbers; on the wire the
//! `bytes` field). Private keys and the symmetric keys derived from them stay plain byte arrays:
//! this type is only for what may be shown and shared.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// An X25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A key from exactly 32 bytes.
    pub fn from_slice(b: &[u8]) -> Option<PublicKey> {
        b.try_into().ok().map(PublicKey)
    }

    /// Standard base64, as `wg` prints keys.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// From standard base64.
    pub fn from_base64(s: &str) -> Option<PublicKey> {
        PublicKey::from_slice(&STANDARD.decode(s).ok()?)
    }
}

impl From<[u8; 32]> for PublicKey {
    fn from(b: [u8; 32]) -> PublicKey {
        PublicKey(b)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_shows_as_base64_and_serializes_as_its_bytes() {
        let k = PublicKey([7; 32]);
        assert_eq!(PublicKey::from_base64(&k.to_string()), Some(k));
        assert_eq!(PublicKey::from_slice(&[1; 31]), None);
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(json, serde_json::to_string(&[7u8; 32]).unwrap(), "the cached map keeps its shape");
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), k);
    }
}
