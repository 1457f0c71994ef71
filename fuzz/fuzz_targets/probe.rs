//! Path probes (core/src/probe.rs): `parse` and `verify` on any datagram, and encode/parse/verify
//! round trips with keys taken from the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel_core::probe::{self, ProbeKind};
use tunnel_core::wg;

fuzz_target!(|data: &[u8]| {
    let key = [0x5Au8; 32];
    let parsed = probe::parse(data);
    let verified = probe::verify(data, &key);
    if parsed.is_some() {
        assert!(probe::is_probe(data) && data.len() == probe::LEN);
        assert!(!wg::is_wireguard(data), "a probe that is also WireGuard");
    }
    if verified {
        assert_eq!(data.len(), probe::LEN);
    }
    // Whatever header parsed re-encodes to the same header, and a probe made with a key verifies
    // with that key only.
    if let Some(p) = parsed {
        let mut k = [0u8; 32];
        k.copy_from_slice(&data[5..37]);
        let again = probe::encode(p.kind, &p.sender, p.txid, &k);
        assert_eq!(&again[..45], &data[..45]);
        assert_eq!(probe::parse(&again), Some(p));
        assert!(probe::verify(&again, &k));
        let mut other = k;
        other[0] ^= 1;
        assert!(!probe::verify(&again, &other));
    }
    if data.len() >= 40 {
        let mut sender = tunnel_core::PublicKey::default();
        sender.0.copy_from_slice(&data[..32]);
        let txid = u64::from_be_bytes(data[32..40].try_into().unwrap_or_else(|_| unreachable!()));
        let kind = if data.len() % 2 == 0 { ProbeKind::Ping } else { ProbeKind::Pong };
        let p = probe::encode(kind, &sender, txid, &key);
        assert_eq!(p.len(), probe::LEN);
        assert_eq!(probe::parse(&p).map(|x| (x.kind, x.sender, x.txid)), Some((kind, sender, txid)));
        assert!(probe::verify(&p, &key));
        // Any one-byte change is caught.
        let at = usize::from(data[data.len() - 1]) % probe::LEN;
        let mut bad = p.clone();
        bad[at] ^= data[0] | 1;
        assert!(!(probe::verify(&bad, &key) && bad != p));
    }
});
