//! Inner IPv4 packets (core/src/packet.rs): `summarize` (what the data plane admits or refuses on),
//! `udp_payload`, `rst_for_syn`, `rst_for` and `echo_reply`, then the same packet into the userspace
//! TCP/IP stack (core/src/netstack, the patched smoltcp) as a site's stack receives it.
//!
//! The first input byte says whether to repair the checksums (bit 0) of the packet that follows, so
//! the fuzzer gets past the checks into the code behind them and also tries bad checksums.
//! Checks: no panic; what the functions build is itself a well-formed packet (valid checksums,
//! addresses and ports swapped).
#![no_main]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use smoltcp::wire::{IpAddress, Icmpv4Packet, Ipv4Packet, TcpPacket};
use tunnel_core::netstack::NetStack;
use tunnel_core::packet::{self, Proto};
use tunnel_fuzz::{fix_checksums, Input};

fn assert_valid_tcp(p: &[u8]) -> (Ipv4Addr, Ipv4Addr, u16, u16) {
    let ip = Ipv4Packet::new_checked(p).unwrap_or_else(|e| panic!("built a bad IPv4 packet: {e}"));
    assert!(ip.verify_checksum(), "built IPv4 header with a bad checksum");
    let t = TcpPacket::new_checked(ip.payload()).unwrap_or_else(|e| panic!("built a bad TCP segment: {e}"));
    assert!(t.verify_checksum(&IpAddress::Ipv4(ip.src_addr()), &IpAddress::Ipv4(ip.dst_addr())));
    assert!(t.rst());
    (ip.src_addr(), ip.dst_addr(), t.src_port(), t.dst_port())
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.u8();
    let mut pkt = input.rest().to_vec();
    if flags & 1 == 1 {
        fix_checksums(&mut pkt);
    }

    let sum = packet::summarize(&pkt);
    if let Some(s) = sum {
        if let Proto::Udp { .. } = s.proto {
            let _ = packet::udp_payload(&pkt);
        }
    }
    let _ = packet::udp_payload(&pkt);

    if let Some(rst) = packet::rst_for(&pkt) {
        let (src, dst, sp, dp) = assert_valid_tcp(&rst);
        let ip = Ipv4Packet::new_checked(&pkt[..]).unwrap_or_else(|_| unreachable!());
        let t = TcpPacket::new_checked(ip.payload()).unwrap_or_else(|_| unreachable!());
        assert_eq!((src, dst, sp, dp), (ip.dst_addr(), ip.src_addr(), t.dst_port(), t.src_port()));
        assert!(!t.rst(), "a reset answered with a reset");
        assert!(packet::rst_for(&rst).is_none(), "a reset would be answered");
    }
    if let Some(rst) = packet::rst_for_syn(&pkt) {
        assert_valid_tcp(&rst);
    }
    if let Some(reply) = packet::echo_reply(&pkt) {
        let ip = Ipv4Packet::new_checked(&reply[..]).unwrap_or_else(|e| panic!("bad echo reply: {e}"));
        assert!(ip.verify_checksum());
        let i = Icmpv4Packet::new_checked(ip.payload()).unwrap_or_else(|e| panic!("bad echo reply: {e}"));
        assert!(i.verify_checksum(), "echo reply with a bad ICMP checksum");
        assert!(packet::echo_reply(&reply).is_none(), "an echo reply would be answered");
        assert!(packet::summarize(&reply).is_some(), "our echo reply does not pass summarize");
    }

    // The same packet into a site's stack (any_ip, one listener), with its answers checked as above.
    let now = Instant::now();
    let mut stack = NetStack::new(Ipv4Addr::new(100, 96, 0, 1), 16, 1280, flags & 2 == 0, 7, now);
    let _ = stack.listen("100.96.0.10:80".parse().unwrap_or_else(|_| unreachable!()), None);
    stack.push_inbound(pkt);
    stack.poll(now);
    stack.poll(now + Duration::from_millis(300));
    while let Some(out) = stack.pop_outbound() {
        assert!(packet::summarize(&out).is_some(), "the stack sent a packet that does not parse: {out:02x?}");
    }
});
