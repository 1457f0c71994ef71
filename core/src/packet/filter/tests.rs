use super::*;
use crate::packet::{ipv4_header, udp_packet};
use proptest::prelude::*;
use smoltcp::wire::{IpAddress, TcpSeqNumber};

const ME: &str = "100.96.0.2";
const WEB: &str = "100.96.0.10:80";
const DNS: &str = "100.96.0.11:53";

#[derive(Clone, Copy)]
struct Flags {
    syn: bool,
    ack: bool,
    fin: bool,
    rst: bool,
}
const SYN: Flags = Flags { syn: true, ack: false, fin: false, rst: false };
const SYN_ACK: Flags = Flags { syn: true, ack: true, fin: false, rst: false };
const ACK: Flags = Flags { syn: false, ack: true, fin: false, rst: false };
const FIN: Flags = Flags { syn: false, ack: true, fin: true, rst: false };
const RST: Flags = Flags { syn: false, ack: false, fin: false, rst: true };

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn tcp(src: &str, dst: &str, f: Flags) -> Vec<u8> {
    let (src, dst) = (sa(src), sa(dst));
    let mut buf = vec![0u8; 40];
    ipv4_header(&mut buf, *src.ip(), *dst.ip(), IpProtocol::Tcp, 40);
    let mut t = TcpPacket::new_unchecked(&mut buf[20..]);
    t.set_src_port(src.port());
    t.set_dst_port(dst.port());
    t.set_header_len(20);
    t.clear_flags();
    t.set_syn(f.syn);
    t.set_ack(f.ack);
    t.set_fin(f.fin);
    t.set_rst(f.rst);
    t.set_seq_number(TcpSeqNumber(1));
    t.set_window_len(1000);
    t.fill_checksum(&IpAddress::Ipv4(*src.ip()), &IpAddress::Ipv4(*dst.ip()));
    buf
}

fn udp(src: &str, dst: &str) -> Vec<u8> {
    udp_packet(sa(src), sa(dst), b"payload")
}

fn icmp(src: &str, dst: &str, kind: Icmpv4Message, code: u8, body: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + body.len();
    let mut buf = vec![0u8; total];
    ipv4_header(&mut buf, src.parse().unwrap(), dst.parse().unwrap(), IpProtocol::Icmp, total);
    buf[28..].copy_from_slice(body);
    let mut i = Icmpv4Packet::new_unchecked(&mut buf[20..]);
    i.set_msg_type(kind);
    i.set_msg_code(code);
    i.fill_checksum();
    buf
}

fn echo(src: &str, dst: &str, kind: Icmpv4Message, ident: u16) -> Vec<u8> {
    let mut p = icmp(src, dst, kind, 0, b"ping");
    let mut i = Icmpv4Packet::new_unchecked(&mut p[20..]);
    i.set_echo_ident(ident);
    i.set_echo_seq_no(1);
    i.fill_checksum();
    p
}

/// An ICMP error from `from` to the client about `about` (its header and 8 bytes, as routers quote).
fn error_about(from: &str, about: &[u8]) -> Vec<u8> {
    icmp(from, ME, Icmpv4Message::DstUnreachable, 3, &about[..28])
}

fn filter() -> (InboundFilter, Instant) {
    let mut f = InboundFilter::new(64);
    f.set_address(ME.parse().unwrap());
    (f, Instant::now())
}

fn me(port: u16) -> String {
    format!("{ME}:{port}")
}

#[test]
fn only_the_clients_own_address_is_let_in() {
    let (mut f, now) = filter();
    f.outbound(&udp(&me(5000), DNS), now);
    assert_eq!(f.inbound(&udp(DNS, &me(5000)), now), Ok(()));
    // The same conversation's ports, for a LAN address behind the client (ip_forward=1): refused.
    for other in ["192.168.1.10:5000", "100.96.0.3:5000", "255.255.255.255:5000", "224.0.0.1:5000"] {
        assert_eq!(f.inbound(&udp(DNS, other), now), Err(Refusal::WrongDestination), "{other}");
        assert_eq!(f.inbound(&tcp(WEB, other, ACK), now), Err(Refusal::WrongDestination), "{other}");
    }
    // Before the address is known, nothing.
    let mut fresh = InboundFilter::default();
    assert_eq!(fresh.inbound(&udp(DNS, &me(5000)), now), Err(Refusal::WrongDestination));
}

#[test]
fn tcp_only_for_connections_the_client_opened() {
    let (mut f, now) = filter();
    // Nobody opened anything: no SYN, no ACK, no SYN-ACK gets in (a listening sshd stays unreachable).
    for flags in [SYN, ACK, SYN_ACK, FIN, RST] {
        assert_eq!(f.inbound(&tcp(WEB, &me(22), flags), now), Err(Refusal::Unsolicited));
    }
    f.outbound(&tcp(&me(40000), WEB, SYN), now);
    assert_eq!(f.inbound(&tcp(WEB, &me(40000), SYN_ACK), now), Ok(()));
    assert_eq!(f.inbound(&tcp(WEB, &me(40000), ACK), now), Ok(()));
    // A bare SYN is refused even on the connection's own ports.
    assert_eq!(f.inbound(&tcp(WEB, &me(40000), SYN), now), Err(Refusal::Unsolicited));
    // Another local port, another remote port, another remote address: not that connection.
    assert_eq!(f.inbound(&tcp(WEB, &me(40001), ACK), now), Err(Refusal::Unsolicited));
    assert_eq!(f.inbound(&tcp("100.96.0.10:81", &me(40000), ACK), now), Err(Refusal::Unsolicited));
    assert_eq!(f.inbound(&tcp("100.96.0.12:80", &me(40000), ACK), now), Err(Refusal::Unsolicited));
    // A SYN never answered is forgotten once the kernel would have given up.
    f.outbound(&tcp(&me(40002), WEB, SYN), now);
    assert_eq!(f.inbound(&tcp(WEB, &me(40002), SYN_ACK), now + TCP_OPENING), Err(Refusal::Unsolicited));
}

#[test]
fn a_closed_connection_lets_in_only_its_last_segments() {
    let (mut f, now) = filter();
    f.outbound(&tcp(&me(40000), WEB, SYN), now);
    f.inbound(&tcp(WEB, &me(40000), SYN_ACK), now).unwrap();
    f.outbound(&tcp(&me(40000), WEB, FIN), now);
    f.inbound(&tcp(WEB, &me(40000), FIN), now).unwrap();
    let later = now + Duration::from_secs(1);
    assert_eq!(f.inbound(&tcp(WEB, &me(40000), ACK), later), Ok(()), "the last ACKs");
    assert_eq!(f.inbound(&tcp(WEB, &me(40000), ACK), later + TCP_CLOSING), Err(Refusal::Unsolicited));
    // A reset ends it the same way.
    f.outbound(&tcp(&me(40010), WEB, SYN), now);
    f.inbound(&tcp(WEB, &me(40010), SYN_ACK), now).unwrap();
    f.inbound(&tcp(WEB, &me(40010), RST), now).unwrap();
    assert_eq!(f.inbound(&tcp(WEB, &me(40010), ACK), now + TCP_CLOSING), Err(Refusal::Unsolicited));
    // An outbound reset opens nothing.
    f.outbound(&tcp(&me(40020), WEB, RST), now);
    assert_eq!(f.inbound(&tcp(WEB, &me(40020), ACK), now), Err(Refusal::Unsolicited));
}

#[test]
fn an_idle_connection_is_remembered_again_when_the_client_sends_on_it() {
    let (mut f, now) = filter();
    f.outbound(&tcp(&me(40000), WEB, SYN), now);
    f.inbound(&tcp(WEB, &me(40000), SYN_ACK), now).unwrap();
    let much_later = now + TCP_IDLE + Duration::from_secs(1);
    assert_eq!(f.inbound(&tcp(WEB, &me(40000), ACK), much_later), Err(Refusal::Unsolicited));
    f.outbound(&tcp(&me(40000), WEB, ACK), much_later);
    assert_eq!(f.inbound(&tcp(WEB, &me(40000), ACK), much_later), Ok(()));
}

#[test]
fn udp_only_replies_to_the_clients_own_conversations() {
    let (mut f, now) = filter();
    assert_eq!(f.inbound(&udp(DNS, &me(5000)), now), Err(Refusal::Unsolicited));
    f.outbound(&udp(&me(5000), DNS), now);
    assert_eq!(f.inbound(&udp(DNS, &me(5000)), now), Ok(()));
    assert_eq!(f.inbound(&udp(DNS, &me(5001)), now), Err(Refusal::Unsolicited), "another local port");
    assert_eq!(f.inbound(&udp("100.96.0.11:54", &me(5000)), now), Err(Refusal::Unsolicited));
    assert_eq!(f.inbound(&udp("100.96.0.12:53", &me(5000)), now), Err(Refusal::Unsolicited));
    // Replies keep it open; silence ends it.
    let t1 = now + UDP_IDLE - Duration::from_secs(1);
    assert_eq!(f.inbound(&udp(DNS, &me(5000)), t1), Ok(()));
    assert_eq!(f.inbound(&udp(DNS, &me(5000)), t1 + UDP_IDLE), Err(Refusal::Unsolicited));
}

#[test]
fn icmp_echo_replies_and_errors_about_the_clients_packets_only() {
    let (mut f, now) = filter();
    let site = "100.96.0.10";
    // Pings from a site, and replies nobody asked for, are refused.
    assert_eq!(f.inbound(&echo(site, ME, Icmpv4Message::EchoRequest, 7), now), Err(Refusal::Unsolicited));
    assert_eq!(f.inbound(&echo(site, ME, Icmpv4Message::EchoReply, 7), now), Err(Refusal::Unsolicited));
    f.outbound(&echo(ME, site, Icmpv4Message::EchoRequest, 7), now);
    assert_eq!(f.inbound(&echo(site, ME, Icmpv4Message::EchoReply, 7), now), Ok(()));
    assert_eq!(f.inbound(&echo(site, ME, Icmpv4Message::EchoReply, 8), now), Err(Refusal::Unsolicited));
    assert_eq!(
        f.inbound(&echo(site, ME, Icmpv4Message::EchoReply, 7), now + ECHO_WAIT),
        Err(Refusal::Unsolicited)
    );
    // Errors: about a datagram the client sent (port unreachable, or fragmentation needed for PMTU).
    let sent = udp(&me(5000), DNS);
    assert_eq!(f.inbound(&error_about(site, &sent), now), Err(Refusal::Unsolicited), "not sent yet");
    f.outbound(&sent, now);
    assert_eq!(f.inbound(&error_about(site, &sent), now), Ok(()));
    let syn = tcp(&me(40000), WEB, SYN);
    f.outbound(&syn, now);
    assert_eq!(f.inbound(&error_about("100.96.0.1", &syn), now), Ok(()), "from a router on the way");
    // About packets the client never sent: refused.
    assert_eq!(f.inbound(&error_about(site, &udp(&me(5001), DNS)), now), Err(Refusal::Unsolicited));
    assert_eq!(f.inbound(&error_about(site, &udp("192.168.1.10:5000", DNS)), now), Err(Refusal::Unsolicited));
    // Other ICMP (redirects, timestamps) is refused.
    let redirect = icmp(site, ME, Icmpv4Message::Redirect, 1, &sent[..28]);
    assert_eq!(f.inbound(&redirect, now), Err(Refusal::Unsolicited));
}

#[test]
fn other_protocols_and_broken_packets_are_refused() {
    let (mut f, now) = filter();
    for proto in
        [IpProtocol::Unknown(47), IpProtocol::Unknown(50), IpProtocol::Igmp, IpProtocol::Unknown(132)]
    {
        let mut p = vec![0u8; 40];
        ipv4_header(&mut p, "100.96.0.10".parse().unwrap(), ME.parse().unwrap(), proto, 40);
        assert_eq!(f.inbound(&p, now), Err(Refusal::Unsolicited), "{proto}");
    }
    f.outbound(&udp(&me(5000), DNS), now);
    let mut frag = udp(DNS, &me(5000));
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut frag[..]);
        ip.set_more_frags(true);
        ip.fill_checksum();
    }
    assert_eq!(f.inbound(&frag, now), Err(Refusal::Unparsable));
    let mut bad_sum = udp(DNS, &me(5000));
    bad_sum[10] ^= 0xff;
    assert_eq!(f.inbound(&bad_sum, now), Err(Refusal::Unparsable));
    assert_eq!(f.inbound(&[], now), Err(Refusal::Unparsable));
}

#[test]
fn tables_stay_bounded_and_drop_the_least_recently_used() {
    let (mut f, now) = filter();
    for port in 0..200u16 {
        f.outbound(&udp(&me(10_000 + port), DNS), now + Duration::from_millis(u64::from(port)));
        f.outbound(&tcp(&me(20_000 + port), WEB, SYN), now + Duration::from_millis(u64::from(port)));
    }
    let (tcp_n, udp_n, _) = f.len();
    assert!(tcp_n <= 64 && udp_n <= 64, "{tcp_n} {udp_n}");
    let t = now + Duration::from_secs(1);
    assert_eq!(f.inbound(&udp(DNS, &me(10_199)), t), Ok(()), "the newest is kept");
    assert_eq!(f.inbound(&udp(DNS, &me(10_000)), t), Err(Refusal::Unsolicited), "the oldest went");
    // A new address forgets everything.
    f.set_address("100.96.0.3".parse().unwrap());
    assert_eq!(f.len(), (0, 0, 0));
}

proptest! {
    #[test]
    fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..120), out in any::<bool>()) {
        let (mut f, now) = filter();
        if out {
            f.outbound(&data, now);
        }
        let _ = f.inbound(&data, now);
    }
}
