//! Path probes: small authenticated pings and pongs that prove a path works in both directions.
//!
//! WireGuard handshakes cannot do this job: WireGuard allows one initiation per 5 s and rejects
//! replays, so several candidate paths cannot be tried at once with them. A probe is bound to the pair
//! of node keys: its MAC key is derived from the X25519 shared secret of the two static keys, so only
//! the two peers can make one, and a pong only counts when it answers a ping we sent to that exact
//! address (see [`crate::path`]).
//!
//! Layout (61 bytes): magic `F7 54 4E 50` | kind (1 ping, 2 pong) | sender's public key (32) |
//! transaction id (8) | HMAC-SHA256 over everything before it, truncated to 16 bytes.
//! Byte 0 (0xF7) has its top bits set (not STUN) and is not 1-4 (not WireGuard).

use boringtun::x25519::{PublicKey as X25519Public, StaticSecret};

use crate::PublicKey;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The first four bytes of every probe.
pub const MAGIC: [u8; 4] = [0xF7, b'T', b'N', b'P'];
/// Length of every probe.
pub const LEN: usize = 61;
const MAC_AT: usize = 45;

/// Ping or pong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// "Are you there on this path?"
    Ping,
    /// "Yes": echoes the ping's transaction id.
    Pong,
}

/// A probe whose MAC has not been checked yet: only the sender's key is trusted to look up the pair key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Ping or pong.
    pub kind: ProbeKind,
    /// The sender's static public key.
    pub sender: PublicKey,
    /// Transaction id.
    pub txid: u64,
}

/// Whether a datagram carries the probe magic.
pub fn is_probe(data: &[u8]) -> bool {
    data.len() >= 4 && data[..4] == MAGIC
}

/// The MAC key shared by the two nodes `secret`'s owner and `peer`.
pub fn pair_key(secret: &StaticSecret, peer: &PublicKey) -> [u8; 32] {
    let shared = secret.diffie_hellman(&X25519Public::from(peer.0));
    let mine = *X25519Public::from(secret).as_bytes();
    let (a, b) = if mine <= peer.0 { (mine, peer.0) } else { (peer.0, mine) };
    let mut h = Sha256::new();
    h.update(b"tunnel path probe v1");
    h.update(shared.as_bytes());
    h.update(a);
    h.update(b);
    h.finalize().into()
}

fn mac(key: &[u8; 32], body: &[u8]) -> [u8; 16] {
    // HMAC accepts keys of any length: this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(body);
    let full = m.finalize().into_bytes();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// Builds a probe from `sender` with the pair key `key`.
pub fn encode(kind: ProbeKind, sender: &PublicKey, txid: u64, key: &[u8; 32]) -> Vec<u8> {
    let mut p = Vec::with_capacity(LEN);
    p.extend_from_slice(&MAGIC);
    p.push(match kind {
        ProbeKind::Ping => 1,
        ProbeKind::Pong => 2,
    });
    p.extend_from_slice(sender.as_bytes());
    p.extend_from_slice(&txid.to_be_bytes());
    let tag = mac(key, &p);
    p.extend_from_slice(&tag);
    p
}

/// Reads a probe's header, without checking its MAC (the caller finds the pair key by `sender`,
/// then calls [`verify`]).
pub fn parse(data: &[u8]) -> Option<Probe> {
    if data.len() != LEN || !is_probe(data) {
        return None;
    }
    let kind = match data[4] {
        1 => ProbeKind::Ping,
        2 => ProbeKind::Pong,
        _ => return None,
    };
    let sender = PublicKey::from_slice(&data[5..37])?;
    let txid = u64::from_be_bytes(data[37..45].try_into().ok()?);
    Some(Probe { kind, sender, txid })
}

/// Whether the probe's MAC is right for the pair key `key` (constant time).
pub fn verify(data: &[u8], key: &[u8; 32]) -> bool {
    if data.len() != LEN {
        return false;
    }
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(&data[..MAC_AT]);
    m.verify_truncated_left(&data[MAC_AT..]).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys() -> (StaticSecret, StaticSecret) {
        (StaticSecret::from([1u8; 32]), StaticSecret::from([2u8; 32]))
    }

    #[test]
    fn both_ends_derive_the_same_key_and_verify() {
        let (a, b) = keys();
        let (pa, pb) =
            (PublicKey(*X25519Public::from(&a).as_bytes()), PublicKey(*X25519Public::from(&b).as_bytes()));
        let kab = pair_key(&a, &pb);
        assert_eq!(kab, pair_key(&b, &pa));
        let ping = encode(ProbeKind::Ping, &pa, 42, &kab);
        assert_eq!(ping.len(), LEN);
        assert!(!crate::stun::is_stun(&ping) && !crate::wg::is_wireguard(&ping));
        assert_eq!(parse(&ping), Some(Probe { kind: ProbeKind::Ping, sender: pa, txid: 42 }));
        assert!(verify(&ping, &kab));
    }

    #[test]
    fn a_third_key_or_a_flipped_bit_fails() {
        let (a, b) = keys();
        let c = StaticSecret::from([3u8; 32]);
        let (pa, pb) =
            (PublicKey(*X25519Public::from(&a).as_bytes()), PublicKey(*X25519Public::from(&b).as_bytes()));
        // C claims to be A.
        let forged = encode(ProbeKind::Pong, &pa, 7, &pair_key(&c, &pb));
        assert!(!verify(&forged, &pair_key(&b, &pa)));
        let mut good = encode(ProbeKind::Pong, &pa, 7, &pair_key(&a, &pb));
        good[40] ^= 1;
        assert!(!verify(&good, &pair_key(&b, &pa)));
    }

    proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = parse(&data);
            let _ = verify(&data, &[0; 32]);
        }
    }
}
