//! Helpers shared by the fuzz targets: a cursor over the fuzzer's bytes, checksum repair for
//! IPv4 packets, and the fixed networks the targets run against.

use std::net::SocketAddr;
use std::sync::OnceLock;

use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket, Icmpv4Packet};

/// Whether checks of known, not yet fixed findings are on (`FUZZ_STRICT=1`). Off by default so the
/// smoke run and campaigns look for new problems instead of stopping on a known one; see README.md.
pub fn strict() -> bool {
    static S: OnceLock<bool> = OnceLock::new();
    *S.get_or_init(|| std::env::var_os("FUZZ_STRICT").is_some_and(|v| v != "0"))
}

/// Reads the fuzzer's bytes front to back; running out yields zeros and empty slices, never a panic.
#[derive(Debug)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        (u64::from(self.u32()) << 32) | u64::from(self.u32())
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }

    /// A length-prefixed (`u16`) slice, as long as what is left allows.
    pub fn chunk(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16());
        self.bytes(n)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    /// An address from 7 bytes: a family bit, then IPv4 (or an IPv6 built from them) and a port.
    pub fn addr(&mut self) -> SocketAddr {
        let fam = self.u8();
        let ip = [self.u8(), self.u8(), self.u8(), self.u8()];
        let port = self.u16();
        if fam & 1 == 0 {
            SocketAddr::from((ip, port))
        } else {
            let mut v6 = [0u8; 16];
            v6[..2].copy_from_slice(&[0x20, 0x01]);
            v6[12..].copy_from_slice(&ip);
            SocketAddr::from((v6, port))
        }
    }
}

/// Rewrites the IPv4 header checksum and the TCP, UDP or ICMP checksum of `packet` where the headers
/// parse, so inputs get past checksum checks into the code behind them.
pub fn fix_checksums(packet: &mut [u8]) {
    let Ok(mut ip) = Ipv4Packet::new_checked(&mut *packet) else { return };
    ip.fill_checksum();
    let (src, dst, proto) = (ip.src_addr(), ip.dst_addr(), ip.next_header());
    let (src, dst) = (IpAddress::Ipv4(src), IpAddress::Ipv4(dst));
    let payload = ip.payload_mut();
    match proto {
        IpProtocol::Tcp => {
            if let Ok(mut t) = TcpPacket::new_checked(payload) {
                t.fill_checksum(&src, &dst);
            }
        }
        IpProtocol::Udp => {
            if let Ok(mut u) = UdpPacket::new_checked(payload) {
                u.fill_checksum(&src, &dst);
            }
        }
        IpProtocol::Icmp => {
            if let Ok(mut i) = Icmpv4Packet::new_checked(payload) {
                i.fill_checksum();
            }
        }
        _ => {}
    }
}

/// A tokio runtime for the targets that drive async code, made once per process.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot build the tokio runtime: {e}"))
    })
}
