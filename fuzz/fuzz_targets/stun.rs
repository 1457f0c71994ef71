//! STUN (core/src/stun.rs): the responder `answer` and the client's `parse_response`, on any datagram.
//!
//! Checks: no panic; an answer is never larger than the request (no amplification) and parses back to
//! the address and transaction it was made for; `request` builds requests that get answered; one
//! socket carries STUN, WireGuard and path probes, so no datagram may be taken for two of them.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use tunnel_core::{probe, stun, wg};
use tunnel_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let v4: SocketAddr = "203.0.113.7:41641".parse().unwrap_or_else(|_| unreachable!());
    let v6: SocketAddr = "[2001:db8::7]:3478".parse().unwrap_or_else(|_| unreachable!());
    let derived = Input::new(data.get(data.len().saturating_sub(7)..).unwrap_or_default()).addr();
    let is = stun::is_stun(data);

    if let Some(r) = stun::parse_response(data) {
        assert!(is, "parsed a response that is not STUN");
        assert_eq!(&r.txid[..], &data[8..20]);
    }
    for from in [v4, v6, derived] {
        if let Some(a) = stun::answer(data, from) {
            assert!(is, "answered something that is not STUN");
            assert!(a.len() <= data.len(), "answer of {} bytes to {} bytes", a.len(), data.len());
            let back = stun::parse_response(&a).unwrap_or_else(|| panic!("own answer does not parse"));
            assert_eq!(back.mapped, from);
            assert_eq!(&back.txid[..], &data[8..20]);
        }
    }

    // Requests made from any transaction id are STUN and answerable for either family.
    let mut txid = [0u8; 12];
    let n = data.len().min(12);
    txid[..n].copy_from_slice(&data[..n]);
    let req = stun::request(txid);
    assert!(stun::is_stun(&req) && !probe::is_probe(&req) && !wg::is_wireguard(&req));
    for from in [v4, v6, derived] {
        let a = stun::answer(&req, from).unwrap_or_else(|| panic!("own request not answered"));
        assert_eq!(stun::parse_response(&a).map(|r| (r.txid, r.mapped)), Some((txid, from)));
    }

    let kinds = [is, probe::is_probe(data), wg::is_wireguard(data)];
    assert!(kinds.iter().filter(|k| **k).count() <= 1, "ambiguous datagram (stun, probe, wg) = {kinds:?}");
});
