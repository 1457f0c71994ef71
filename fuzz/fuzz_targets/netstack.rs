//! The userspace TCP stack (core/src/netstack over the patched smoltcp in vendor/smoltcp: SACK
//! scoreboard, RACK-TLP, growable buffers, BBR and CUBIC) against a remote TCP peer the fuzzer plays.
//!
//! The target opens a connection to a site's stack (any_ip, one listener, as the agent runs it) with
//! a real three-way handshake, options chosen by the first input byte (SACK, window scale,
//! timestamps, MSS; BBR or CUBIC), then reads operations: segments from the peer with sequence and
//! acknowledgment numbers relative to what each side has sent (so they land inside the windows, in
//! order, out of order, overlapping, with SACK blocks over what the stack sent), the application
//! writing and reading, closing, time passing (timers, loss recovery, buffer growth), and raw segments.
//! Every packet is built with valid checksums, so it reaches the TCP state machine.
//!
//! Checks: no panic; everything the stack sends parses as a packet (`packet::summarize`); the bytes
//! the application reads are the bytes the peer sent in order; nothing the peer sends after its FIN
//! reaches the application.
#![no_main]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, TcpTimestampRepr,
};
use tunnel_core::netstack::{Congestion, NetStack, StackOptions};
use tunnel_core::packet;
use tunnel_fuzz::{fix_checksums, Input};

const PEER: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 2);
const SERVICE: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 10);
const PEER_PORT: u16 = 40000;

/// The byte at stream offset `i` of the peer's data.
fn pattern(i: u32) -> u8 {
    (i % 251) as u8
}

struct Peer {
    iss: u32,
    /// Next sequence number of ours (after what we sent in order).
    next: u32,
    /// The stack's initial sequence number, once its SYN-ACK came.
    their_iss: Option<u32>,
    /// Highest sequence number the stack has sent up to.
    their_max: u32,
    ts: bool,
    tsval: u32,
    window: u16,
}

fn segment(repr: &TcpRepr) -> Vec<u8> {
    let tcp_len = repr.buffer_len();
    let ip = Ipv4Repr {
        src_addr: PEER,
        dst_addr: SERVICE,
        next_header: IpProtocol::Tcp,
        payload_len: tcp_len,
        hop_limit: 64,
    };
    let mut buf = vec![0u8; ip.buffer_len() + tcp_len];
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &caps);
    let mut t = TcpPacket::new_unchecked(&mut buf[ip.buffer_len()..]);
    repr.emit(&mut t, &IpAddress::Ipv4(PEER), &IpAddress::Ipv4(SERVICE), &caps);
    buf
}

/// Polls the stack and reads what it sent: the SYN-ACK's sequence number and how far it has sent.
fn run(stack: &mut NetStack, peer: &mut Peer, now: Instant) {
    stack.poll(now);
    while let Some(out) = stack.pop_outbound() {
        assert!(packet::summarize(&out).is_some(), "the stack sent a packet that does not parse: {out:02x?}");
        let Ok(ip) = Ipv4Packet::new_checked(&out[..]) else { continue };
        let Ok(t) = TcpPacket::new_checked(ip.payload()) else { continue };
        if t.dst_port() != PEER_PORT {
            continue;
        }
        let seq = t.seq_number().0 as u32;
        if t.syn() && t.ack() && peer.their_iss.is_none() {
            peer.their_iss = Some(seq);
            peer.their_max = seq.wrapping_add(1);
        }
        let end = seq.wrapping_add(t.payload().len() as u32).wrapping_add(u32::from(t.syn()) + u32::from(t.fin()));
        if let Some(iss) = peer.their_iss {
            if end.wrapping_sub(iss) > peer.their_max.wrapping_sub(iss) && end.wrapping_sub(iss) < 1 << 30 {
                peer.their_max = end;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.u8();
    let now0 = Instant::now();
    let congestion = if mode & 8 == 0 { Congestion::Bbr } else { Congestion::Cubic };
    let opts = StackOptions { congestion, ..StackOptions::default() };
    let mut stack = NetStack::with_options(Ipv4Addr::new(100, 96, 0, 1), 16, 1280, true, 11, now0, opts);
    let Ok(h) = stack.listen(std::net::SocketAddrV4::new(SERVICE, 80), None) else { return };
    let mut now = now0;
    let mut peer = Peer {
        iss: 1_000_000,
        next: 1_000_001,
        their_iss: None,
        their_max: 0,
        ts: mode & 4 != 0,
        tsval: 1,
        window: 65535,
    };
    let mss = [None, Some(536), Some(1240), Some(64)][usize::from(mode >> 4) % 4];
    let syn = TcpRepr {
        src_port: PEER_PORT,
        dst_port: 80,
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(peer.iss as i32),
        ack_number: None,
        window_len: peer.window,
        window_scale: (mode & 2 != 0).then_some(7),
        max_seg_size: mss,
        sack_permitted: mode & 1 != 0,
        sack_ranges: [None; 3],
        timestamp: peer.ts.then_some(TcpTimestampRepr::new(peer.tsval, 0)),
        payload: &[],
    };
    stack.push_inbound(segment(&syn));
    run(&mut stack, &mut peer, now);
    let Some(their_iss) = peer.their_iss else { return };

    let mut received = Vec::new();
    // Raw segments may carry any bytes at any place in the stream: then the data is not checked.
    let mut raw_used = false;
    let mut ops = 0;
    // The first operation is always the handshake's ACK, then the input's.
    let mut first = true;
    while first || (!input.is_empty() && ops < 128) {
        ops += 1;
        let op = if first { 0 } else { input.u8() % 8 };
        match op {
            0 | 1 => {
                // A segment: data at an offset from our next byte, an ACK somewhere in what the stack
                // sent, SACK blocks over it.
                let (off, len, flags, ackoff) = if first {
                    (0i32, 0usize, 0u8, 1u32)
                } else {
                    (i32::from(input.u8() as i8) * 64, usize::from(input.u16() % 1400), input.u8(), input.u32())
                };
                first = false;
                let sent = peer.their_max.wrapping_sub(their_iss).max(1);
                let ack = their_iss.wrapping_add(ackoff % (sent + 1));
                let mut sack = [None; 3];
                if flags & 1 != 0 {
                    for s in sack.iter_mut() {
                        let a = input.u16() as u32 % sent;
                        let b = a + 1 + input.u16() as u32 % (sent - a).max(1);
                        *s = Some((their_iss.wrapping_add(a), their_iss.wrapping_add(b)));
                        if input.u8() & 1 == 0 {
                            break;
                        }
                    }
                }
                let seq = peer.next.wrapping_add(off as u32);
                let start = seq.wrapping_sub(peer.iss + 1);
                let payload: Vec<u8> = (0..len as u32).map(|i| pattern(start.wrapping_add(i))).collect();
                let control = if flags & 2 != 0 { TcpControl::Fin } else if flags & 4 != 0 { TcpControl::Psh } else { TcpControl::None };
                if flags & 8 != 0 {
                    peer.window = input.u16();
                }
                peer.tsval = peer.tsval.wrapping_add(1);
                let repr = TcpRepr {
                    src_port: PEER_PORT,
                    dst_port: 80,
                    control,
                    seq_number: TcpSeqNumber(seq as i32),
                    ack_number: Some(TcpSeqNumber(ack as i32)),
                    window_len: peer.window,
                    window_scale: None,
                    max_seg_size: None,
                    sack_permitted: false,
                    sack_ranges: sack,
                    timestamp: peer.ts.then_some(TcpTimestampRepr::new(peer.tsval, 0)),
                    payload: &payload,
                };
                let pkt = segment(&repr);
                stack.push_inbound(pkt.clone());
                if flags & 16 != 0 {
                    stack.push_inbound(pkt);
                }
                if off == 0 {
                    peer.next = peer.next.wrapping_add(len as u32 + u32::from(control == TcpControl::Fin));
                }
            }
            2 => {
                let n = usize::from(input.u16());
                let s = stack.socket(h);
                if s.can_send() {
                    let bytes: Vec<u8> = (0..n).map(|i| i as u8).collect();
                    let _ = s.send_slice(&bytes);
                }
            }
            3 => {
                let mut buf = vec![0u8; usize::from(input.u16())];
                let s = stack.socket(h);
                if s.can_recv() {
                    if let Ok(n) = s.recv_slice(&mut buf) {
                        received.extend_from_slice(&buf[..n]);
                    }
                }
            }
            4 => {
                now += Duration::from_millis(u64::from(input.u16()));
            }
            5 => {
                if input.u8() & 1 == 0 {
                    stack.socket(h).close();
                } else {
                    stack.socket(h).abort();
                }
            }
            6 => {
                // Any TCP segment from the peer, checksums made right.
                let raw = input.chunk();
                raw_used = true;
                let ip = Ipv4Repr {
                    src_addr: PEER,
                    dst_addr: SERVICE,
                    next_header: IpProtocol::Tcp,
                    payload_len: raw.len(),
                    hop_limit: 64,
                };
                let mut buf = vec![0u8; 20 + raw.len()];
                ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &ChecksumCapabilities::default());
                buf[20..].copy_from_slice(raw);
                fix_checksums(&mut buf);
                stack.push_inbound(buf);
            }
            _ => {
                // Time passes while the stack's own timers run (retransmissions, probes).
                for _ in 0..usize::from(input.u8() % 8) {
                    match stack.poll_delay(now) {
                        Some(d) => now += d.min(Duration::from_secs(60)).max(Duration::from_millis(1)),
                        None => now += Duration::from_millis(200),
                    }
                    run(&mut stack, &mut peer, now);
                }
            }
        }
        run(&mut stack, &mut peer, now);
    }
    let s = stack.socket(h);
    while s.can_recv() {
        let mut buf = [0u8; 4096];
        match s.recv_slice(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
    for (i, b) in received.iter().enumerate().filter(|_| !raw_used) {
        assert_eq!(*b, pattern(i as u32), "the application read byte {i} wrong");
    }
    let _ = stack.stats();
});
