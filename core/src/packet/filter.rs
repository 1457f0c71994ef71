//! What a TUN client lets in from the tunnel: replies to what it started, addressed to itself.
//!
//! The TUN device hands decrypted packets to the client machine's kernel, which on a host with
//! `ip_forward=1` (any Docker or Kubernetes host) would route a packet for another address on to the
//! LAN, and would deliver a new connection to any service listening on all addresses. So a packet
//! from a site comes in only if it is for the client's own overlay address and answers something the
//! client sent:
//! - TCP: segments of connections the client opened (it sent the SYN); a bare SYN never;
//! - UDP: datagrams from an address and port the client sent to, from the port it sent from;
//! - ICMP: echo replies to the client's own echo requests, and errors (unreachable, time exceeded,
//!   parameter problem) about a packet of one of those conversations;
//! - nothing else (no other protocol, no fragments).
//!
//! Without I/O: the data plane feeds what the system sends with [`InboundFilter::outbound`] and asks
//! about what arrives with [`InboundFilter::inbound`], giving the time to both. Every table is
//! bounded; when one is full, expired entries go first, then the least recently used one.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use smoltcp::wire::{Icmpv4Message, Icmpv4Packet, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket};

/// A TCP connection the client opened, before any answer: as long as a kernel retries its SYN.
pub const TCP_OPENING: Duration = Duration::from_secs(120);
/// A TCP connection idle this long is forgotten (one the client sends on again is remembered anew).
pub const TCP_IDLE: Duration = Duration::from_secs(24 * 3600);
/// A TCP connection after its reset or both FINs: time for the last ACKs.
pub const TCP_CLOSING: Duration = Duration::from_secs(10);
/// A UDP conversation idle this long is forgotten.
pub const UDP_IDLE: Duration = Duration::from_secs(120);
/// Echo replies are let in this long after the request.
pub const ECHO_WAIT: Duration = Duration::from_secs(30);

/// Entries per table unless said otherwise.
pub const DEFAULT_CAPACITY: usize = 16_384;
/// Outstanding echo requests remembered.
const ECHO_CAPACITY: usize = 1024;

/// Why a packet from the tunnel was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not addressed to the client's own overlay address (the kernel would forward it).
    #[error("not addressed to this client")]
    WrongDestination,
    /// Not an answer to anything the client sent (or not a protocol that can be one).
    #[error("not an answer to anything this client sent")]
    Unsolicited,
    /// Not a whole, well-formed IPv4 packet.
    #[error("not a well-formed IPv4 packet")]
    Unparsable,
}

/// A conversation as the client sees it: its own port and the remote end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Conv {
    local_port: u16,
    remote: SocketAddrV4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TcpPhase {
    /// The client sent a SYN; nothing came back yet.
    Opening,
    Open,
    /// Reset, or FIN seen both ways.
    Closing,
}

#[derive(Debug, Clone, Copy)]
struct TcpConn {
    phase: TcpPhase,
    fin_out: bool,
    fin_in: bool,
    last: Instant,
}

impl TcpConn {
    fn expires(&self) -> Instant {
        self.last
            + match self.phase {
                TcpPhase::Opening => TCP_OPENING,
                TcpPhase::Open => TCP_IDLE,
                TcpPhase::Closing => TCP_CLOSING,
            }
    }
}

/// The transport part of a packet, as the filter needs it.
enum Transport {
    Tcp {
        src: u16,
        dst: u16,
        syn: bool,
        ack: bool,
        fin: bool,
        rst: bool,
    },
    Udp {
        src: u16,
        dst: u16,
    },
    EchoRequest {
        ident: u16,
    },
    EchoReply {
        ident: u16,
    },
    /// An ICMP error about an earlier packet, whose header (and first 8 bytes) it quotes.
    IcmpError {
        quoted: Quoted,
    },
    Other,
}

/// The packet an ICMP error is about, from its quoted header.
#[derive(Debug, Clone, Copy)]
struct Quoted {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: QuotedKind,
}

#[derive(Debug, Clone, Copy)]
enum QuotedKind {
    Tcp { src: u16, dst: u16 },
    Udp { src: u16, dst: u16 },
    Echo { ident: u16 },
    Other,
}

/// Conversations the client started, and the verdict on what comes back.
#[derive(Debug)]
pub struct InboundFilter {
    own: Option<Ipv4Addr>,
    capacity: usize,
    tcp: HashMap<Conv, TcpConn>,
    udp: HashMap<Conv, Instant>,
    /// (remote, identifier) -> when the request went out.
    echo: HashMap<(Ipv4Addr, u16), Instant>,
}

impl Default for InboundFilter {
    fn default() -> Self {
        InboundFilter::new(DEFAULT_CAPACITY)
    }
}

impl InboundFilter {
    /// A filter that remembers up to `capacity` TCP connections and as many UDP conversations. It
    /// lets nothing in until it knows the client's address.
    pub fn new(capacity: usize) -> Self {
        InboundFilter {
            own: None,
            capacity: capacity.max(1),
            tcp: HashMap::new(),
            udp: HashMap::new(),
            echo: HashMap::new(),
        }
    }

    /// The client's own overlay address. A new address forgets every conversation.
    pub fn set_address(&mut self, own: Ipv4Addr) {
        if self.own != Some(own) {
            self.own = Some(own);
            self.tcp.clear();
            self.udp.clear();
            self.echo.clear();
        }
    }

    /// Conversations remembered now (TCP, UDP, echo).
    pub fn len(&self) -> (usize, usize, usize) {
        (self.tcp.len(), self.udp.len(), self.echo.len())
    }

    /// A packet the client's system sends into the tunnel.
    pub fn outbound(&mut self, packet: &[u8], now: Instant) {
        let Some(own) = self.own else { return };
        let Some((src, dst, t)) = parse(packet) else { return };
        if src != own {
            return;
        }
        match t {
            Transport::Tcp { src: sport, dst: dport, syn, ack, fin, rst } => {
                let conv = Conv { local_port: sport, remote: SocketAddrV4::new(dst, dport) };
                if let Some(c) = self.tcp.get_mut(&conv).filter(|c| c.expires() > now) {
                    c.last = now;
                    if rst {
                        c.phase = TcpPhase::Closing;
                    } else if syn && !ack {
                        // The port is used again for a new connection.
                        *c = TcpConn { phase: TcpPhase::Opening, fin_out: false, fin_in: false, last: now };
                    } else if fin {
                        c.fin_out = true;
                        if c.fin_in {
                            c.phase = TcpPhase::Closing;
                        }
                    }
                    return;
                }
                // A SYN opens a connection. The client's kernel also sends on connections it
                // already has (one idle past TCP_IDLE, or open before `up` restarted): a socket that
                // sends on a port of the tunnel address was opened from here, since no SYN from
                // outside ever reaches it. A reset opens nothing.
                if rst {
                    return;
                }
                let phase = if syn && !ack { TcpPhase::Opening } else { TcpPhase::Open };
                let c = TcpConn { phase, fin_out: fin, fin_in: false, last: now };
                insert(&mut self.tcp, self.capacity, conv, c, now, |c| c.expires(), |c| c.last);
            }
            Transport::Udp { src: sport, dst: dport } => {
                let conv = Conv { local_port: sport, remote: SocketAddrV4::new(dst, dport) };
                insert(&mut self.udp, self.capacity, conv, now, now, |t| *t + UDP_IDLE, |t| *t);
            }
            Transport::EchoRequest { ident } => {
                insert(&mut self.echo, ECHO_CAPACITY, (dst, ident), now, now, |t| *t + ECHO_WAIT, |t| *t);
            }
            _ => {}
        }
    }

    /// Whether a packet from the tunnel may go to the client's system.
    pub fn inbound(&mut self, packet: &[u8], now: Instant) -> Result<(), Refusal> {
        let (src, dst, t) = parse(packet).ok_or(Refusal::Unparsable)?;
        let own = self.own.ok_or(Refusal::WrongDestination)?;
        if dst != own {
            return Err(Refusal::WrongDestination);
        }
        match t {
            Transport::Tcp { src: sport, dst: dport, syn, ack, fin, rst } => {
                if syn && !ack {
                    return Err(Refusal::Unsolicited);
                }
                let conv = Conv { local_port: dport, remote: SocketAddrV4::new(src, sport) };
                let c = self.tcp.get_mut(&conv).filter(|c| c.expires() > now).ok_or(Refusal::Unsolicited)?;
                c.last = now;
                if rst {
                    c.phase = TcpPhase::Closing;
                } else {
                    if c.phase == TcpPhase::Opening {
                        c.phase = TcpPhase::Open;
                    }
                    if fin {
                        c.fin_in = true;
                        if c.fin_out {
                            c.phase = TcpPhase::Closing;
                        }
                    }
                }
                Ok(())
            }
            Transport::Udp { src: sport, dst: dport } => {
                let conv = Conv { local_port: dport, remote: SocketAddrV4::new(src, sport) };
                let t =
                    self.udp.get_mut(&conv).filter(|t| **t + UDP_IDLE > now).ok_or(Refusal::Unsolicited)?;
                *t = now;
                Ok(())
            }
            Transport::EchoReply { ident } => {
                self.echo.get(&(src, ident)).filter(|t| **t + ECHO_WAIT > now).ok_or(Refusal::Unsolicited)?;
                Ok(())
            }
            Transport::IcmpError { quoted } => {
                // About a packet this client sent: from its address, in a conversation it started.
                // The error may come from a router on the way, so its source is not checked.
                if quoted.src != own {
                    return Err(Refusal::Unsolicited);
                }
                let known = match quoted.kind {
                    QuotedKind::Tcp { src: sport, dst: dport } => self
                        .tcp
                        .get(&Conv { local_port: sport, remote: SocketAddrV4::new(quoted.dst, dport) })
                        .is_some_and(|c| c.expires() > now),
                    QuotedKind::Udp { src: sport, dst: dport } => self
                        .udp
                        .get(&Conv { local_port: sport, remote: SocketAddrV4::new(quoted.dst, dport) })
                        .is_some_and(|t| *t + UDP_IDLE > now),
                    QuotedKind::Echo { ident } => {
                        self.echo.get(&(quoted.dst, ident)).is_some_and(|t| *t + ECHO_WAIT > now)
                    }
                    QuotedKind::Other => false,
                };
                if known {
                    Ok(())
                } else {
                    Err(Refusal::Unsolicited)
                }
            }
            Transport::EchoRequest { .. } | Transport::Other => Err(Refusal::Unsolicited),
        }
    }
}

/// Inserts or refreshes `key`; when the table is full, expired entries go, then the least recently
/// used one.
fn insert<K: std::hash::Hash + Eq + Copy, V>(
    table: &mut HashMap<K, V>,
    capacity: usize,
    key: K,
    value: V,
    now: Instant,
    expires: impl Fn(&V) -> Instant,
    last: impl Fn(&V) -> Instant,
) {
    if !table.contains_key(&key) && table.len() >= capacity {
        table.retain(|_, v| expires(v) > now);
        if table.len() >= capacity {
            if let Some(oldest) = table.iter().min_by_key(|(_, v)| last(v)).map(|(k, _)| *k) {
                table.remove(&oldest);
            }
        }
    }
    table.insert(key, value);
}

/// Source, destination and transport of a whole, unfragmented IPv4 packet with a good header.
fn parse(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, Transport)> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    if !ip.verify_checksum() || ip.more_frags() || ip.frag_offset() != 0 {
        return None;
    }
    let payload = ip.payload();
    let t = match ip.next_header() {
        IpProtocol::Tcp => {
            let t = TcpPacket::new_checked(payload).ok()?;
            Transport::Tcp {
                src: t.src_port(),
                dst: t.dst_port(),
                syn: t.syn(),
                ack: t.ack(),
                fin: t.fin(),
                rst: t.rst(),
            }
        }
        IpProtocol::Udp => {
            let u = UdpPacket::new_checked(payload).ok()?;
            Transport::Udp { src: u.src_port(), dst: u.dst_port() }
        }
        IpProtocol::Icmp => {
            let i = Icmpv4Packet::new_checked(payload).ok()?;
            match i.msg_type() {
                Icmpv4Message::EchoRequest => Transport::EchoRequest { ident: i.echo_ident() },
                Icmpv4Message::EchoReply => Transport::EchoReply { ident: i.echo_ident() },
                Icmpv4Message::DstUnreachable | Icmpv4Message::TimeExceeded | Icmpv4Message::ParamProblem => {
                    match quoted(payload.get(8..)?) {
                        Some(q) => Transport::IcmpError { quoted: q },
                        None => Transport::Other,
                    }
                }
                _ => Transport::Other,
            }
        }
        _ => Transport::Other,
    };
    Some((ip.src_addr(), ip.dst_addr(), t))
}

/// The header an ICMP error quotes: an IPv4 header and at least the first 8 bytes after it. The
/// quoted packet was cut short, so its lengths and checksums are not checked.
fn quoted(b: &[u8]) -> Option<Quoted> {
    let first = *b.first()?;
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 {
        return None;
    }
    let rest = b.get(ihl..ihl + 8)?;
    let src = Ipv4Addr::new(b[12], b[13], b[14], b[15]);
    let dst = Ipv4Addr::new(b[16], b[17], b[18], b[19]);
    let port = |i: usize| u16::from_be_bytes([rest[i], rest[i + 1]]);
    let kind = match b[9] {
        6 => QuotedKind::Tcp { src: port(0), dst: port(2) },
        17 => QuotedKind::Udp { src: port(0), dst: port(2) },
        1 if rest[0] == 8 => QuotedKind::Echo { ident: port(4) },
        _ => QuotedKind::Other,
    };
    Some(Quoted { src, dst, kind })
}

#[cfg(test)]
mod tests;
