//! Reading and writing the few inner IPv4 packets the nodes handle outside the TCP stack: UDP
//! datagrams, ICMP echo, and the RST that answers a SYN whose target refused. Parsing never panics
//! on bad input: a packet that does not parse is `None`. [`filter`] decides what a TUN client lets
//! in from the tunnel.

pub mod filter;

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4Message, Icmpv4Packet, IpAddress, IpProtocol, Ipv4Packet, TcpPacket, TcpSeqNumber, UdpPacket,
};

/// The parts of an IPv4 packet the data plane decides on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Summary {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Transport protocol.
    pub proto: Proto,
}

/// The transport part, as far as the data plane cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// TCP with ports and the flags that matter.
    Tcp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
        /// A connection attempt: SYN without ACK.
        syn_only: bool,
    },
    /// UDP with ports.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// ICMP echo request.
    EchoRequest,
    /// Anything else.
    Other(u8),
}

/// Parses and checks an IPv4 packet (header checksum, lengths, transport header present).
pub fn summarize(packet: &[u8]) -> Option<Ipv4Summary> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    if !ip.verify_checksum() || ip.more_frags() || ip.frag_offset() != 0 {
        return None;
    }
    let payload = ip.payload();
    let proto = match ip.next_header() {
        IpProtocol::Tcp => {
            let t = TcpPacket::new_checked(payload).ok()?;
            Proto::Tcp { src_port: t.src_port(), dst_port: t.dst_port(), syn_only: t.syn() && !t.ack() }
        }
        IpProtocol::Udp => {
            let u = UdpPacket::new_checked(payload).ok()?;
            Proto::Udp { src_port: u.src_port(), dst_port: u.dst_port() }
        }
        IpProtocol::Icmp => {
            let i = Icmpv4Packet::new_checked(payload).ok()?;
            if i.msg_type() == Icmpv4Message::EchoRequest {
                Proto::EchoRequest
            } else {
                Proto::Other(1)
            }
        }
        other => Proto::Other(u8::from(other)),
    };
    Some(Ipv4Summary { src: ip.src_addr(), dst: ip.dst_addr(), proto })
}

/// The UDP payload of a packet already summarised as UDP.
pub fn udp_payload(packet: &[u8]) -> Option<&[u8]> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    let hl = usize::from(ip.header_len());
    let total = usize::from(ip.total_len()).min(packet.len());
    let udp = UdpPacket::new_checked(packet.get(hl..total)?).ok()?;
    let len = usize::from(udp.len()).checked_sub(8)?;
    packet.get(hl + 8..hl + 8 + len)
}

fn ipv4_header(buf: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr, proto: IpProtocol, total: usize) {
    let mut ip = Ipv4Packet::new_unchecked(buf);
    ip.set_version(4);
    ip.set_header_len(20);
    ip.set_dscp(0);
    ip.set_ecn(0);
    ip.set_total_len(total as u16);
    ip.set_ident(0);
    ip.clear_flags();
    ip.set_dont_frag(true);
    ip.set_frag_offset(0);
    ip.set_hop_limit(64);
    ip.set_next_header(proto);
    ip.set_src_addr(src);
    ip.set_dst_addr(dst);
    ip.fill_checksum();
}

/// A UDP datagram in an IPv4 packet.
pub fn udp_packet(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut buf = vec![0u8; total];
    ipv4_header(&mut buf, *src.ip(), *dst.ip(), IpProtocol::Udp, total);
    let mut udp = UdpPacket::new_unchecked(&mut buf[20..]);
    udp.set_src_port(src.port());
    udp.set_dst_port(dst.port());
    udp.set_len((8 + payload.len()) as u16);
    udp.payload_mut()[..payload.len()].copy_from_slice(payload);
    udp.fill_checksum(&IpAddress::Ipv4(*src.ip()), &IpAddress::Ipv4(*dst.ip()));
    buf
}

/// A TCP segment without data: a SYN (`syn`), a SYN-ACK (`syn`, `ack`) or a bare ACK. The nodes make
/// only resets themselves; tests and raw peers make the rest.
pub fn tcp_segment(src: SocketAddrV4, dst: SocketAddrV4, syn: bool, ack: bool) -> Vec<u8> {
    let total = 40;
    let mut buf = vec![0u8; total];
    ipv4_header(&mut buf, *src.ip(), *dst.ip(), IpProtocol::Tcp, total);
    let mut t = TcpPacket::new_unchecked(&mut buf[20..]);
    t.set_src_port(src.port());
    t.set_dst_port(dst.port());
    t.set_header_len(20);
    t.clear_flags();
    t.set_syn(syn);
    t.set_ack(ack);
    t.set_seq_number(TcpSeqNumber(1000));
    t.set_ack_number(TcpSeqNumber(if ack { 1 } else { 0 }));
    t.set_window_len(65_535);
    t.set_urgent_at(0);
    t.fill_checksum(&IpAddress::Ipv4(*src.ip()), &IpAddress::Ipv4(*dst.ip()));
    buf
}

/// The reset that answers a SYN: the target refused, so the client sees "connection refused".
pub fn rst_for_syn(syn: &[u8]) -> Option<Vec<u8>> {
    let ip = Ipv4Packet::new_checked(syn).ok()?;
    let t = TcpPacket::new_checked(ip.payload()).ok()?;
    if !t.syn() || t.ack() {
        return None;
    }
    rst_for(syn)
}

/// The reset that answers any TCP segment (RFC 793's rule for a segment that reached no connection):
/// the sender's connection ends at once instead of retransmitting into silence. `None` for a reset.
pub fn rst_for(segment: &[u8]) -> Option<Vec<u8>> {
    let ip = Ipv4Packet::new_checked(segment).ok()?;
    let t = TcpPacket::new_checked(ip.payload()).ok()?;
    if t.rst() {
        return None;
    }
    let total = 40;
    let mut buf = vec![0u8; total];
    ipv4_header(&mut buf, ip.dst_addr(), ip.src_addr(), IpProtocol::Tcp, total);
    let mut r = TcpPacket::new_unchecked(&mut buf[20..]);
    r.set_src_port(t.dst_port());
    r.set_dst_port(t.src_port());
    r.set_header_len(20);
    r.clear_flags();
    r.set_rst(true);
    if t.ack() {
        r.set_seq_number(t.ack_number());
        r.set_ack_number(TcpSeqNumber(0));
    } else {
        let len = t.payload().len() + usize::from(t.syn()) + usize::from(t.fin());
        r.set_seq_number(TcpSeqNumber(0));
        r.set_ack_number(t.seq_number() + len);
        r.set_ack(true);
    }
    r.set_window_len(0);
    r.set_urgent_at(0);
    r.fill_checksum(&IpAddress::Ipv4(ip.dst_addr()), &IpAddress::Ipv4(ip.src_addr()));
    Some(buf)
}

/// The echo reply to an ICMP echo request, with the same identifier, sequence and data.
pub fn echo_reply(request: &[u8]) -> Option<Vec<u8>> {
    let ip = Ipv4Packet::new_checked(request).ok()?;
    let icmp = Icmpv4Packet::new_checked(ip.payload()).ok()?;
    if icmp.msg_type() != Icmpv4Message::EchoRequest || !icmp.verify_checksum() {
        return None;
    }
    let icmp_len = ip.payload().len();
    let total = 20 + icmp_len;
    let mut buf = vec![0u8; total];
    ipv4_header(&mut buf, ip.dst_addr(), ip.src_addr(), IpProtocol::Icmp, total);
    buf[20..].copy_from_slice(ip.payload());
    let mut r = Icmpv4Packet::new_unchecked(&mut buf[20..]);
    r.set_msg_type(Icmpv4Message::EchoReply);
    r.set_msg_code(0);
    r.fill_checksum();
    Some(buf)
}

/// Checksum capabilities for software-made packets: compute and verify everything.
pub fn checksums() -> ChecksumCapabilities {
    ChecksumCapabilities::default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn udp_round_trip() {
        let src: SocketAddrV4 = "100.96.0.2:5000".parse().unwrap();
        let dst: SocketAddrV4 = "100.96.0.3:53".parse().unwrap();
        let p = udp_packet(src, dst, b"hello");
        let s = summarize(&p).unwrap();
        assert_eq!((s.src, s.dst), (*src.ip(), *dst.ip()));
        assert_eq!(s.proto, Proto::Udp { src_port: 5000, dst_port: 53 });
        assert_eq!(udp_payload(&p).unwrap(), b"hello");
    }

    #[test]
    fn echo_reply_swaps_addresses_and_keeps_data() {
        let mut req = vec![0u8; 20 + 8 + 4];
        ipv4_header(
            &mut req,
            "100.96.0.2".parse().unwrap(),
            "100.96.0.3".parse().unwrap(),
            IpProtocol::Icmp,
            32,
        );
        {
            let mut i = Icmpv4Packet::new_unchecked(&mut req[20..]);
            i.set_msg_type(Icmpv4Message::EchoRequest);
            i.set_msg_code(0);
            i.set_echo_ident(7);
            i.set_echo_seq_no(9);
            i.data_mut().copy_from_slice(b"ping");
            i.fill_checksum();
        }
        assert_eq!(summarize(&req).unwrap().proto, Proto::EchoRequest);
        let rep = echo_reply(&req).unwrap();
        let ip = Ipv4Packet::new_checked(&rep[..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.src_addr(), "100.96.0.3".parse::<Ipv4Addr>().unwrap());
        let i = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(i.verify_checksum());
        assert_eq!(
            (i.msg_type(), i.echo_ident(), i.echo_seq_no(), i.data()),
            (Icmpv4Message::EchoReply, 7, 9, &b"ping"[..])
        );
    }

    proptest! {
        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = summarize(&data);
            let _ = udp_payload(&data);
            let _ = rst_for_syn(&data);
            let _ = rst_for(&data);
            let _ = echo_reply(&data);
        }
    }
}
