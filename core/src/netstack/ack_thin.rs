//! Duplicate ACKs thinned before they leave the stack.
//!
//! smoltcp answers every out-of-order segment with an immediate ACK. When segments arrive in a
//! batch (the node decrypts a whole receive batch before it polls the stack) and a hole is open,
//! that is one pure ACK per segment, all with the same acknowledgment number, each SACK block set
//! covering the one before. A kernel sender behind a TUN device processes every one of them in the
//! thread that writes it into the device: at 1% loss the site sent 0.80 ACKs per data segment of a
//! TUN upload, and the client spent most of its core on them.
//!
//! After each poll, a pure ACK with SACK blocks is dropped from the outbound queue when a later
//! one of the same flow, still in the queue, carries the same acknowledgment number and SACK blocks
//! that cover all of its own (so the sender learns nothing less), and the flow has already sent
//! three ACKs for that acknowledgment number (a sender counting duplicate ACKs still reaches its
//! threshold). This is Linux's SACK compression (`tcp_comp_sack_nr`) without its timer: only ACKs
//! already waiting together are merged, so a packet arriving alone is answered as before.
//! Anything else (data, SYN, FIN, RST, an ACK that moves the acknowledgment number, one without
//! SACK blocks, which a sender without SACK counts) is never touched.

use std::collections::{HashMap, VecDeque};

use smoltcp::wire::{IpProtocol, Ipv4Packet, TcpOption, TcpPacket};

/// Duplicate ACKs a flow sends for one acknowledgment number before thinning starts.
const FIRST_DUPLICATES: u8 = 3;
/// Flows whose duplicate-ACK count is remembered; beyond it the memory is cleared (a few more ACKs
/// go out, nothing else happens).
const MAX_FLOWS: usize = 4096;
/// The longest pure ACK: 20 bytes of IPv4, 20 of TCP and 40 of options.
const MAX_ACK_LEN: usize = 80;

type FlowKey = (u32, u32, u16, u16);
type Blocks = [Option<(u32, u32)>; 3];

/// A pure ACK with SACK blocks found in the queue.
struct DupAck {
    index: usize,
    flow: FlowKey,
    ack: u32,
    blocks: Blocks,
    /// A later ACK of the flow in the queue has the same number and covers these blocks.
    covered: bool,
}

#[derive(Default)]
pub(super) struct AckThinner {
    /// Per flow: the acknowledgment number of its last duplicate ACKs and how many were sent.
    sent: HashMap<FlowKey, (u32, u8)>,
    found: Vec<DupAck>,
    /// Per flow, while walking the queue backwards: the nearest later ACK (index into `found`).
    later: HashMap<FlowKey, usize>,
    drop: Vec<bool>,
    /// ACKs dropped so far.
    pub(super) thinned: u64,
}

impl AckThinner {
    /// Drops the redundant duplicate ACKs from `queue` (see the module's documentation).
    pub(super) fn thin(&mut self, queue: &mut VecDeque<Vec<u8>>) {
        self.found.clear();
        for (index, p) in queue.iter().enumerate() {
            if let Some((flow, ack, blocks)) = parse(p) {
                self.found.push(DupAck { index, flow, ack, blocks, covered: false });
            }
        }
        if self.found.is_empty() {
            return;
        }
        // Backwards: is each one covered by the nearest later one of its flow? Coverage is
        // transitive, so the nearest is enough.
        self.later.clear();
        for i in (0..self.found.len()).rev() {
            let flow = self.found[i].flow;
            if let Some(&j) = self.later.get(&flow) {
                let (a, b) = (&self.found[i], &self.found[j]);
                let covered = a.ack == b.ack && covers(&b.blocks, &a.blocks);
                self.found[i].covered = covered;
            }
            self.later.insert(flow, i);
        }
        // Forwards: the first three for an acknowledgment number always go.
        if self.sent.len() > MAX_FLOWS {
            self.sent.clear();
        }
        self.drop.clear();
        self.drop.resize(queue.len(), false);
        let mut dropped = 0;
        for d in &self.found {
            let (ack, count) = self.sent.entry(d.flow).or_insert((d.ack, 0));
            if *ack != d.ack {
                *ack = d.ack;
                *count = 0;
            }
            if *count >= FIRST_DUPLICATES && d.covered {
                self.drop[d.index] = true;
                dropped += 1;
            } else {
                *count = count.saturating_add(1);
            }
        }
        if dropped > 0 {
            let mut i = 0;
            let drop = &self.drop;
            queue.retain(|_| {
                i += 1;
                !drop[i - 1]
            });
            self.thinned += dropped;
        }
    }

    /// Flows whose duplicate-ACK count is remembered.
    #[cfg(test)]
    fn flows(&self) -> usize {
        self.sent.len()
    }
}

/// The flow, acknowledgment number and SACK blocks of a pure IPv4 TCP ACK that carries SACK blocks.
fn parse(p: &[u8]) -> Option<(FlowKey, u32, Blocks)> {
    if p.len() > MAX_ACK_LEN {
        return None;
    }
    let ip = Ipv4Packet::new_checked(p).ok()?;
    if ip.next_header() != IpProtocol::Tcp || ip.more_frags() || ip.frag_offset() != 0 {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    if !tcp.ack() || tcp.syn() || tcp.fin() || tcp.rst() || tcp.urg() || !tcp.payload().is_empty() {
        return None;
    }
    let mut options = tcp.options();
    let mut blocks = None;
    while !options.is_empty() {
        let (rest, option) = TcpOption::parse(options).ok()?;
        match option {
            TcpOption::EndOfList => break,
            TcpOption::SackRange(b) => blocks = Some(b),
            _ => {}
        }
        options = rest;
    }
    let blocks = blocks.filter(|b| b.iter().any(Option::is_some))?;
    let flow = (u32::from(ip.src_addr()), u32::from(ip.dst_addr()), tcp.src_port(), tcp.dst_port());
    Some((flow, tcp.ack_number().0 as u32, blocks))
}

/// Whether every block of `inner` lies inside some block of `outer` (sequence numbers wrap).
fn covers(outer: &Blocks, inner: &Blocks) -> bool {
    inner.iter().flatten().all(|&(l, r)| {
        outer.iter().flatten().any(|&(ol, or)| {
            let len = or.wrapping_sub(ol);
            l.wrapping_sub(ol) <= len && r.wrapping_sub(ol) <= len && l.wrapping_sub(ol) <= r.wrapping_sub(ol)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpAddress, Ipv4Repr, TcpControl, TcpRepr, TcpSeqNumber};

    fn packet(ack: i32, blocks: Blocks, payload: &[u8], control: TcpControl, port: u16) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port: 80,
            dst_port: port,
            control,
            seq_number: TcpSeqNumber(1000),
            ack_number: Some(TcpSeqNumber(ack)),
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: blocks,
            timestamp: None,
            payload,
        };
        let (src, dst) = ([100, 96, 0, 10].into(), [100, 96, 0, 2].into());
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let mut buf = vec![0u8; ip.buffer_len() + tcp.buffer_len()];
        let caps = ChecksumCapabilities::default();
        let mut p = Ipv4Packet::new_unchecked(&mut buf);
        ip.emit(&mut p, &caps);
        tcp.emit(
            &mut TcpPacket::new_unchecked(p.payload_mut()),
            &IpAddress::Ipv4(src),
            &IpAddress::Ipv4(dst),
            &caps,
        );
        buf
    }

    fn dup(ack: i32, right: u32) -> Vec<u8> {
        dup_on(5000, ack, right)
    }

    fn dup_on(port: u16, ack: i32, right: u32) -> Vec<u8> {
        packet(ack, [Some((5500, right)), None, None], &[], TcpControl::None, port)
    }

    #[test]
    fn a_batch_of_duplicate_acks_keeps_the_first_three_and_the_last() {
        let mut t = AckThinner::default();
        let mut q: VecDeque<Vec<u8>> = (1..=10).map(|k| dup(5000, 5500 + 500 * k)).collect();
        let last = q.back().cloned();
        t.thin(&mut q);
        assert_eq!(q.len(), 4, "three at once, then the one that covers the rest");
        assert_eq!(q.back().cloned(), last);
        assert_eq!(t.thinned, 6);
        // The next batch for the same number: the first three were sent, only the last goes.
        let mut q: VecDeque<Vec<u8>> = (11..=15).map(|k| dup(5000, 5500 + 500 * k)).collect();
        t.thin(&mut q);
        assert_eq!(q.len(), 1);
        assert_eq!(q[0], dup(5000, 5500 + 500 * 15));
        // A new acknowledgment number starts the count again.
        let mut q: VecDeque<Vec<u8>> = (1..=5).map(|k| dup(6000, 6500 + 500 * k)).collect();
        t.thin(&mut q);
        assert_eq!(q.len(), 4);
        assert_eq!(t.flows(), 1);
    }

    #[test]
    fn what_the_sender_needs_is_never_thinned() {
        let mut t = AckThinner::default();
        // Prime both flows past their three duplicates.
        for port in [5000, 5001] {
            let mut q: VecDeque<Vec<u8>> = (1..=4).map(|k| dup_on(port, 5000, 5500 + 500 * k)).collect();
            t.thin(&mut q);
        }
        let data = packet(5000, [Some((5500, 9000)), None, None], b"data", TcpControl::None, 5000);
        let fin = packet(5000, [Some((5500, 9000)), None, None], &[], TcpControl::Fin, 5000);
        let no_sack = packet(5000, [None, None, None], &[], TcpControl::None, 5000);
        let other_flow = dup_on(5001, 5000, 9000);
        // A block the later ACK does not cover (a second hole filled lower down).
        let other_range =
            packet(5000, [Some((5100, 5200)), Some((5500, 8000)), None], &[], TcpControl::None, 5000);
        let moved = dup(5100, 9000);
        for keep in [data, fin, no_sack, other_flow, other_range, moved] {
            let mut q: VecDeque<Vec<u8>> = [keep.clone(), dup(5000, 9500)].into_iter().collect();
            t.thin(&mut q);
            assert_eq!(q.front(), Some(&keep));
            assert_eq!(q.len(), 2);
        }
    }

    #[test]
    fn coverage_wraps_around_the_sequence_space() {
        let near_end = u32::MAX - 100;
        let outer = [Some((near_end, 400)), None, None];
        assert!(covers(&outer, &[Some((near_end + 10, 50)), None, None]));
        assert!(covers(&outer, &[Some((10, 300)), None, None]));
        assert!(!covers(&outer, &[Some((near_end - 10, 50)), None, None]));
        assert!(!covers(&outer, &[Some((10, 500)), None, None]));
    }

    #[test]
    fn malformed_packets_are_left_alone() {
        let mut t = AckThinner::default();
        let mut q: VecDeque<Vec<u8>> = [vec![0x45; 3], vec![0xff; 60], Vec::new()].into_iter().collect();
        t.thin(&mut q);
        assert_eq!(q.len(), 3);
    }
}
