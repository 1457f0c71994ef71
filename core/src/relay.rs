//! The relay's wire formats: capabilities, packet framing, and the stream framing used over TCP/TLS.
//!
//! A relay forwards WireGuard packets that stay end-to-end encrypted; it needs to know only who may send
//! to whom. That comes from a [`Capability`] signed by the control server (Ed25519): the node's key, the
//! peers it may reach, an expiry. The relay checks it with the server's public key alone, no database.
//!
//! Lengths are `u16`; a zero `u16` (never a valid length) is followed by a `u32` length, for messages
//! over 65,535 bytes: a capability naming more than ~2,000 peers. Relays before that refuse such a
//! message loudly (an empty capability or frame), never read it wrong.
//!
//! Over QUIC: the node opens a bidirectional stream, writes one hello frame (length + capability)
//! and reads one reply byte (0 accepted; otherwise refused, then a UTF-8 reason); packets then travel as
//! QUIC datagrams of [`encode_packet`] form (the peer's key, then the WireGuard packet): the sender names
//! the destination, the relay rewrites it to name the source. Over TCP/TLS the same messages travel as
//! [`Frame`]s (`u16` length, type byte, body), for networks that block UDP.

use crate::PublicKey;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

/// ALPN of the relay protocol (QUIC and TCP/TLS).
pub const ALPN: &[u8] = b"tunnel-relay/1";
/// QUIC packet size from the first packet on, at both ends: a full-size tunnel packet (inner MTU 1280,
/// plus 32 bytes of WireGuard and 32 of relay header) must fit one datagram. 1452 fits any 1500-byte
/// link (IPv6).
pub const QUIC_MTU: u16 = 1452;

const CAP_MAGIC: &[u8; 4] = b"TCP1";
const SIG_LEN: usize = 64;
/// Peers one capability may name; the server refuses to sign one for more ([`Capability::sign`]).
pub const MAX_CAP_PEERS: usize = 16_384;
/// Largest frame over TCP (and largest hello): a capability naming [`MAX_CAP_PEERS`] peers fits.
pub const MAX_FRAME: usize = 1 << 20;

/// The length prefix of a message of `len` bytes: `u16`, or a zero `u16` and a `u32`.
pub fn encode_len(len: usize) -> Vec<u8> {
    match u16::try_from(len) {
        Ok(n) if n > 0 => n.to_be_bytes().to_vec(),
        _ => [&[0u8, 0][..], &(len as u32).to_be_bytes()].concat(),
    }
}

/// The length at the front of `buf` and the prefix's size: `Ok(None)` if more bytes are needed, `Err`
/// if it is over [`MAX_FRAME`] (or zero).
pub fn decode_len(buf: &[u8]) -> Result<Option<(usize, usize)>, String> {
    let Some(short) = buf.get(..2) else { return Ok(None) };
    let (len, prefix) = match u16::from_be_bytes([short[0], short[1]]) {
        0 => match buf.get(2..6) {
            Some(l) => (u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize, 6),
            None => return Ok(None),
        },
        n => (n as usize, 2),
    };
    if len == 0 || len > MAX_FRAME {
        return Err(format!("frame length {len} out of range"));
    }
    Ok(Some((len, prefix)))
}
/// Relay header on each packet: the peer's 32-byte key.
pub const PACKET_HEADER: usize = 32;

/// Why a capability was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CapError {
    /// Not a capability at all.
    #[error("malformed capability")]
    Malformed,
    /// The signature does not match the server's key.
    #[error("capability signature does not verify")]
    BadSignature,
    /// Past its expiry.
    #[error("capability expired")]
    Expired,
    /// More peers than one capability may name.
    #[error("a capability may name at most {MAX_CAP_PEERS} peers, not {0}")]
    TooManyPeers(usize),
}

/// Who may use a relay to reach whom, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// The node's WireGuard public key.
    pub node: PublicKey,
    /// Unix time in milliseconds after which it is no longer accepted.
    pub expires_unix_ms: u64,
    /// Keys of the peers the node may exchange packets with.
    pub peers: Vec<PublicKey>,
}

impl Capability {
    fn body(&self) -> Vec<u8> {
        let n = self.peers.len();
        let mut b = Vec::with_capacity(4 + 32 + 8 + 2 + 32 * n + SIG_LEN);
        b.extend_from_slice(CAP_MAGIC);
        b.extend_from_slice(self.node.as_bytes());
        b.extend_from_slice(&self.expires_unix_ms.to_be_bytes());
        b.extend_from_slice(&(n as u16).to_be_bytes());
        for p in &self.peers[..n] {
            b.extend_from_slice(p.as_bytes());
        }
        b
    }

    /// Signed with the control server's key; `Err` with more than [`MAX_CAP_PEERS`] peers (a
    /// capability silently missing some peers would cut their relayed paths without a word).
    pub fn sign(&self, key: &Ed25519KeyPair) -> Result<Vec<u8>, CapError> {
        if self.peers.len() > MAX_CAP_PEERS {
            return Err(CapError::TooManyPeers(self.peers.len()));
        }
        let mut b = self.body();
        let sig = key.sign(&b);
        b.extend_from_slice(sig.as_ref());
        Ok(b)
    }

    /// Checks `bytes` against the server's public key and the current time.
    pub fn verify(bytes: &[u8], server_key: &[u8], now_unix_ms: u64) -> Result<Capability, CapError> {
        if bytes.len() < 4 + 32 + 8 + 2 + SIG_LEN || &bytes[..4] != CAP_MAGIC {
            return Err(CapError::Malformed);
        }
        let (body, sig) = bytes.split_at(bytes.len() - SIG_LEN);
        let n = u16::from_be_bytes([body[44], body[45]]) as usize;
        if body.len() != 46 + 32 * n || n > MAX_CAP_PEERS {
            return Err(CapError::Malformed);
        }
        UnparsedPublicKey::new(&ED25519, server_key).verify(body, sig).map_err(|_| CapError::BadSignature)?;
        let mut node = [0u8; 32];
        node.copy_from_slice(&body[4..36]);
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&body[36..44]);
        let expires_unix_ms = u64::from_be_bytes(exp);
        if now_unix_ms > expires_unix_ms {
            return Err(CapError::Expired);
        }
        let peers = body[46..].chunks_exact(32).filter_map(PublicKey::from_slice).collect();
        Ok(Capability { node: PublicKey(node), expires_unix_ms, peers })
    }
}

/// The public half of a signing key, as relays are given it.
pub fn public_key(key: &Ed25519KeyPair) -> Vec<u8> {
    key.public_key().as_ref().to_vec()
}

/// A packet for (or from) the peer `key`.
pub fn encode_packet(key: &PublicKey, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(PACKET_HEADER + payload.len());
    v.extend_from_slice(key.as_bytes());
    v.extend_from_slice(payload);
    v
}

/// Splits a relayed packet into the peer's key and the WireGuard packet.
pub fn parse_packet(data: &[u8]) -> Option<(PublicKey, &[u8])> {
    if data.len() <= PACKET_HEADER {
        return None;
    }
    Some((PublicKey::from_slice(&data[..PACKET_HEADER])?, &data[PACKET_HEADER..]))
}

/// A message on a TCP/TLS relay connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Node -> relay: a capability (first frame, and again to renew).
    Hello(Vec<u8>),
    /// Relay -> node: `Ok(())` accepted, or the reason for refusing.
    Reply(Result<(), String>),
    /// Either way: [`encode_packet`] form.
    Packet(Vec<u8>),
}

const FRAME_HELLO: u8 = 1;
const FRAME_REPLY: u8 = 2;
const FRAME_PACKET: u8 = 3;

impl Frame {
    /// `u16` length (of type + body), type, body.
    pub fn encode(&self) -> Vec<u8> {
        let (ty, body): (u8, Vec<u8>) = match self {
            Frame::Hello(c) => (FRAME_HELLO, c.clone()),
            Frame::Reply(Ok(())) => (FRAME_REPLY, vec![0]),
            Frame::Reply(Err(why)) => (FRAME_REPLY, [&[1u8][..], why.as_bytes()].concat()),
            Frame::Packet(p) => (FRAME_PACKET, p.clone()),
        };
        let mut v = encode_len(1 + body.len());
        v.reserve(1 + body.len());
        v.push(ty);
        v.extend_from_slice(&body);
        v
    }

    /// Takes one whole frame off the front of `buf`: `Ok(None)` if more bytes are needed, `Err` if
    /// the stream is not speaking this protocol (the connection should be closed).
    pub fn decode(buf: &mut Vec<u8>) -> Result<Option<Frame>, String> {
        let Some((len, prefix)) = decode_len(buf)? else { return Ok(None) };
        if buf.len() < prefix + len {
            return Ok(None);
        }
        let ty = buf[prefix];
        let body = buf[prefix + 1..prefix + len].to_vec();
        buf.drain(..prefix + len);
        match ty {
            FRAME_HELLO => Ok(Some(Frame::Hello(body))),
            FRAME_REPLY => match body.split_first() {
                Some((0, _)) => Ok(Some(Frame::Reply(Ok(())))),
                Some((_, why)) => Ok(Some(Frame::Reply(Err(String::from_utf8_lossy(why).into_owned())))),
                None => Err("empty reply".into()),
            },
            FRAME_PACKET => Ok(Some(Frame::Packet(body))),
            t => Err(format!("unknown frame type {t}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ring::rand::SystemRandom;

    fn key() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    #[test]
    fn capabilities_verify_only_with_the_right_key_and_before_expiry() {
        let (k, other) = (key(), key());
        let cap = Capability {
            node: crate::PublicKey([1; 32]),
            expires_unix_ms: 10_000,
            peers: vec![crate::PublicKey([2; 32]), crate::PublicKey([3; 32])],
        };
        let signed = cap.sign(&k).unwrap();
        assert_eq!(Capability::verify(&signed, &public_key(&k), 9_999), Ok(cap.clone()));
        assert_eq!(Capability::verify(&signed, &public_key(&other), 9_999), Err(CapError::BadSignature));
        assert_eq!(Capability::verify(&signed, &public_key(&k), 10_001), Err(CapError::Expired));
        let mut tampered = signed.clone();
        tampered[50] ^= 1; // one peer key changed
        assert_eq!(Capability::verify(&tampered, &public_key(&k), 0), Err(CapError::BadSignature));
        assert_eq!(Capability::verify(&signed[..60], &public_key(&k), 0), Err(CapError::Malformed));
    }

    #[test]
    fn frames_round_trip_in_pieces() {
        let frames = vec![
            Frame::Hello(vec![7; 300]),
            Frame::Reply(Ok(())),
            Frame::Reply(Err("expired".into())),
            Frame::Packet(encode_packet(&crate::PublicKey([9; 32]), &[1; 1312])),
        ];
        let wire: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for chunk in wire.chunks(7) {
            buf.extend_from_slice(chunk);
            while let Some(f) = Frame::decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        assert!(Frame::decode(&mut vec![0, 1, 99]).is_err());
        assert!(Frame::decode(&mut vec![0, 0, 0xff, 0, 0, 0, 1]).is_err(), "over the largest frame");
    }

    #[test]
    fn capabilities_for_thousands_of_peers_travel_whole() {
        let k = key();
        // 3,000 peers: over what a u16 length holds (it used to wrap, and the TCP encoder truncated).
        let peers: Vec<PublicKey> = (0..3000u32)
            .map(|i| {
                let mut p = [0u8; 32];
                p[..4].copy_from_slice(&i.to_be_bytes());
                PublicKey(p)
            })
            .collect();
        let cap = Capability { node: crate::PublicKey([1; 32]), expires_unix_ms: 10_000, peers };
        let signed = cap.sign(&k).unwrap();
        assert!(signed.len() > 65_535);
        let mut wire = Frame::Hello(signed.clone()).encode();
        wire.extend(Frame::Packet(vec![5; 10]).encode());
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for chunk in wire.chunks(1000) {
            buf.extend_from_slice(chunk);
            while let Some(f) = Frame::decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, vec![Frame::Hello(signed.clone()), Frame::Packet(vec![5; 10])]);
        assert_eq!(Capability::verify(&signed, &public_key(&k), 0), Ok(cap));
        let too_many = Capability {
            node: crate::PublicKey([1; 32]),
            expires_unix_ms: 1,
            peers: vec![crate::PublicKey([0; 32]); MAX_CAP_PEERS + 1],
        };
        assert_eq!(too_many.sign(&k), Err(CapError::TooManyPeers(MAX_CAP_PEERS + 1)));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Capability::verify(&data, &[0; 32], 0);
            let _ = parse_packet(&data);
            let mut buf = data.clone();
            while let Ok(Some(_)) = Frame::decode(&mut buf) {}
        }
    }
}
