//! Relay wire formats (core/src/relay.rs).
//!
//! - The TCP/TLS stream framing: the input (after a byte that seeds the chunk sizes) is fed to
//!   `Frame::decode` in random-size pieces, as a socket delivers it; the frames must be the same as
//!   when the whole stream is decoded at once, and hello/packet frames re-encode to the bytes they
//!   came from.
//! - `Capability::verify` on arbitrary bytes with a key that signs nothing (never accepted: the
//!   fuzzer cannot sign) and with the key that signs below (accepted only as what the bytes say), and a round trip: a capability built from the input and signed with that key
//!   verifies to itself before its expiry, is refused after it, and is refused with one bit changed.
//! - `parse_packet` / `encode_packet`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ring::signature::Ed25519KeyPair;
use std::sync::OnceLock;
use tunnel_core::relay::{self, CapError, Capability, Frame};
use tunnel_fuzz::Input;

/// The key that signs in the round trip below (and the seeds): inputs may carry its signatures.
fn server_key() -> &'static Ed25519KeyPair {
    static K: OnceLock<Ed25519KeyPair> = OnceLock::new();
    K.get_or_init(|| {
        Ed25519KeyPair::from_seed_unchecked(&[0x42; 32]).unwrap_or_else(|_| panic!("fixed seed is a key"))
    })
}

/// A key that never signs anything here: nothing may verify with it.
fn unused_key() -> &'static Vec<u8> {
    static K: OnceLock<Vec<u8>> = OnceLock::new();
    K.get_or_init(|| {
        let k = Ed25519KeyPair::from_seed_unchecked(&[0x43; 32]).unwrap_or_else(|_| panic!("fixed seed is a key"));
        relay::public_key(&k)
    })
}

/// Decodes frames until more bytes are needed or the stream is refused.
fn drain(buf: &mut Vec<u8>, out: &mut Vec<Result<Frame, String>>) -> bool {
    loop {
        let before = buf.clone();
        match Frame::decode(buf) {
            Ok(Some(f)) => {
                let used = before.len() - buf.len();
                assert!(used >= 2, "a frame of {used} bytes");
                assert_eq!(&before[used..], &buf[..], "decode took bytes from the middle");
                if matches!(f, Frame::Hello(_) | Frame::Packet(_)) {
                    // Empty (keepalive) frames before it are skipped by the decoder.
                    assert!(before[..used].ends_with(&f.encode()), "frame does not re-encode to its bytes");
                }
                out.push(Ok(f));
            }
            Ok(None) => {
                assert_eq!(&before, buf, "decode consumed bytes without a frame");
                return true;
            }
            Err(e) => {
                out.push(Err(e));
                return false;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mut rng = u32::from(input.u8()) | 0x100;
    let stream = input.rest();

    // Whole stream at once.
    let mut whole = Vec::new();
    let mut buf = stream.to_vec();
    drain(&mut buf, &mut whole);

    // The same stream in pieces of 1..=64 bytes.
    let mut pieces = Vec::new();
    let mut buf = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        let n = (rng % 64 + 1) as usize;
        let (a, b) = rest.split_at(n.min(rest.len()));
        rest = b;
        buf.extend_from_slice(a);
        if !drain(&mut buf, &mut pieces) {
            break;
        }
    }
    assert_eq!(whole, pieces, "chunked decoding differs from whole decoding");

    // Capabilities: arbitrary bytes never verify with a key that signed nothing. With the signing
    // key they may (the corpus holds signed ones): then they must say what the bytes say.
    let key = server_key();
    let public = relay::public_key(key);
    for now in [0, u64::MAX] {
        if let Ok(c) = Capability::verify(stream, unused_key(), now) {
            panic!("forged capability accepted: {c:?}");
        }
        if let Ok(c) = Capability::verify(stream, &public, now) {
            assert!(c.expires_unix_ms >= now);
            assert_eq!(c.sign(key).map(|b| b.len()), Ok(stream.len()));
            assert_eq!(&stream[4..36], &c.node.0[..]);
        }
    }
    let _ = Capability::verify(stream, stream.get(..32).unwrap_or_default(), 0);

    // Round trip of a capability built from the input.
    let mut c = Input::new(stream);
    let mut node = [0u8; 32];
    node.copy_from_slice(&{
        let mut k = [0u8; 32];
        let b = c.bytes(32);
        k[..b.len()].copy_from_slice(b);
        k
    });
    let expires_unix_ms = c.u64();
    let n = usize::from(c.u8() % 16);
    let peers: Vec<tunnel_core::PublicKey> = (0..n)
        .map(|i| {
            let mut k = [i as u8; 32];
            let b = c.bytes(32);
            k[..b.len()].copy_from_slice(b);
            tunnel_core::PublicKey(k)
        })
        .collect();
    let cap = Capability { node: tunnel_core::PublicKey(node), expires_unix_ms, peers };
    // At most 15 peers: far below MAX_CAP_PEERS, so signing cannot refuse.
    let signed = cap.sign(key).unwrap_or_else(|e| panic!("signing {} peers refused: {e}", cap.peers.len()));
    assert_eq!(Capability::verify(&signed, &public, expires_unix_ms), Ok(cap.clone()));
    if expires_unix_ms < u64::MAX {
        assert_eq!(Capability::verify(&signed, &public, expires_unix_ms + 1), Err(CapError::Expired));
    }
    let at = usize::from(c.u16()) % signed.len();
    let mut bad = signed.clone();
    bad[at] ^= 1 << (c.u8() % 8);
    assert!(Capability::verify(&bad, &public, 0).is_err(), "capability with byte {at} changed accepted");

    // Relayed packets.
    if let Some((k, payload)) = relay::parse_packet(stream) {
        assert_eq!(relay::encode_packet(&k, payload), stream);
    } else {
        assert!(stream.len() <= relay::PACKET_HEADER);
    }
});
