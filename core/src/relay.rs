//! The relay's wire formats: capabilities, packet framing, and the stream framing used over TCP/TLS.
//!
//! A relay forwards WireGuard packets that stay end-to-end encrypted; it needs to know only who may send
//! to whom. That comes from a [`Capability`] signed by the control server (Ed25519): the node's key, the
//! peers it may reach, an expiry. The relay checks it with the server's public key alone, no database.
//!
//! Over QUIC: the node opens a bidirectional stream, writes one hello frame (`u16` length + capability)
//! and reads one reply byte (0 accepted; otherwise refused, then a UTF-8 reason); packets then travel as
//! QUIC datagrams of [`encode_packet`] form (the peer's key, then the WireGuard packet): the sender names
//! the destination, the relay rewrites it to name the source. Over TCP/TLS the same messages travel as
//! [`Frame`]s (`u16` length, type byte, body), for networks that block UDP.

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

const CAP_MAGIC: &[u8; 4] = b"TCP1";
const SIG_LEN: usize = 64;
/// Peers one capability may name.
pub const MAX_CAP_PEERS: usize = 4096;
/// Largest frame over TCP (and largest hello).
pub const MAX_FRAME: usize = 65_535;
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
}

/// Who may use a relay to reach whom, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// The node's WireGuard public key.
    pub node: [u8; 32],
    /// Unix time in milliseconds after which it is no longer accepted.
    pub expires_unix_ms: u64,
    /// Keys of the peers the node may exchange packets with.
    pub peers: Vec<[u8; 32]>,
}

impl Capability {
    fn body(&self) -> Vec<u8> {
        let n = self.peers.len().min(MAX_CAP_PEERS);
        let mut b = Vec::with_capacity(4 + 32 + 8 + 2 + 32 * n + SIG_LEN);
        b.extend_from_slice(CAP_MAGIC);
        b.extend_from_slice(&self.node);
        b.extend_from_slice(&self.expires_unix_ms.to_be_bytes());
        b.extend_from_slice(&(n as u16).to_be_bytes());
        for p in &self.peers[..n] {
            b.extend_from_slice(p);
        }
        b
    }

    /// Signed with the control server's key.
    pub fn sign(&self, key: &Ed25519KeyPair) -> Vec<u8> {
        let mut b = self.body();
        let sig = key.sign(&b);
        b.extend_from_slice(sig.as_ref());
        b
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
        let peers = body[46..]
            .chunks_exact(32)
            .map(|c| {
                let mut k = [0u8; 32];
                k.copy_from_slice(c);
                k
            })
            .collect();
        Ok(Capability { node, expires_unix_ms, peers })
    }
}

/// The public half of a signing key, as relays are given it.
pub fn public_key(key: &Ed25519KeyPair) -> Vec<u8> {
    key.public_key().as_ref().to_vec()
}

/// A packet for (or from) the peer `key`.
pub fn encode_packet(key: &[u8; 32], payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(PACKET_HEADER + payload.len());
    v.extend_from_slice(key);
    v.extend_from_slice(payload);
    v
}

/// Splits a relayed packet into the peer's key and the WireGuard packet.
pub fn parse_packet(data: &[u8]) -> Option<([u8; 32], &[u8])> {
    if data.len() <= PACKET_HEADER {
        return None;
    }
    let mut k = [0u8; 32];
    k.copy_from_slice(&data[..PACKET_HEADER]);
    Some((k, &data[PACKET_HEADER..]))
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
        let len = (1 + body.len()).min(MAX_FRAME);
        let mut v = Vec::with_capacity(2 + len);
        v.extend_from_slice(&(len as u16).to_be_bytes());
        v.push(ty);
        v.extend_from_slice(&body[..len - 1]);
        v
    }

    /// Takes one whole frame off the front of `buf`: `Ok(None)` if more bytes are needed, `Err` if
    /// the stream is not speaking this protocol (the connection should be closed).
    pub fn decode(buf: &mut Vec<u8>) -> Result<Option<Frame>, String> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
        if len == 0 {
            return Err("empty frame".into());
        }
        if buf.len() < 2 + len {
            return Ok(None);
        }
        let ty = buf[2];
        let body = buf[3..2 + len].to_vec();
        buf.drain(..2 + len);
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
        let cap = Capability { node: [1; 32], expires_unix_ms: 10_000, peers: vec![[2; 32], [3; 32]] };
        let signed = cap.sign(&k);
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
            Frame::Packet(encode_packet(&[9; 32], &[1; 1312])),
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
