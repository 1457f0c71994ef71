//! A userspace TCP stack (smoltcp) fed with inner IPv4 packets, without I/O.
//!
//! The site agent uses it to terminate the TCP flows clients open to resource addresses (it accepts
//! on any address: resources are many and change with the map); the userspace client uses it to open
//! flows to resources. Packets go in with [`NetStack::push_inbound`], out with
//! [`NetStack::pop_outbound`]; [`NetStack::poll`] runs the stack until nothing moves. The MSS follows
//! the device MTU, which is the tunnel MTU.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};

/// Per-socket buffer size, each direction. Bounded: a flow never holds more than this in the stack.
pub const TCP_BUFFER: usize = 256 * 1024;

/// Upper bound on packets waiting to enter the stack; beyond it new packets are dropped (TCP
/// retransmits), which is the backpressure a router gives.
const RX_QUEUE: usize = 4096;

#[derive(Debug)]
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _t: smoltcp::time::Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _t: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = self.mtu;
        c
    }
}

/// The userspace TCP/IP stack of one node.
pub struct NetStack {
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: Queues,
    epoch: Instant,
    next_port: u16,
    /// Inbound packets dropped because the stack's queue was full.
    pub rx_dropped: u64,
}

impl std::fmt::Debug for NetStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetStack").field("rx_queue", &self.dev.rx.len()).finish_non_exhaustive()
    }
}

impl NetStack {
    /// A stack that owns `addr/prefix` and, with `any_ip`, accepts packets for any address (the agent).
    pub fn new(addr: Ipv4Addr, prefix: u8, mtu: u16, any_ip: bool, seed: u64, now: Instant) -> Self {
        let mut dev = Queues { rx: VecDeque::new(), tx: VecDeque::new(), mtu: usize::from(mtu) };
        let mut cfg = Config::new(HardwareAddress::Ip);
        cfg.random_seed = seed;
        let epoch = now;
        let mut iface = Interface::new(cfg, &mut dev, smoltcp::time::Instant::from_micros(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(addr), prefix));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(addr);
        iface.set_any_ip(any_ip);
        NetStack {
            iface,
            sockets: SocketSet::new(vec![]),
            dev,
            epoch,
            next_port: 40000 + (seed % 20000) as u16,
            rx_dropped: 0,
        }
    }

    fn ts(&self, now: Instant) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(now.saturating_duration_since(self.epoch).as_micros() as i64)
    }

    /// Queues an inbound IPv4 packet for the stack.
    pub fn push_inbound(&mut self, packet: Vec<u8>) {
        if self.dev.rx.len() >= RX_QUEUE {
            self.rx_dropped += 1;
            return;
        }
        self.dev.rx.push_back(packet);
    }

    /// Runs the stack until it has nothing more to do; returns whether any socket may have changed.
    pub fn poll(&mut self, now: Instant) -> bool {
        let ts = self.ts(now);
        let mut changed = false;
        loop {
            let r = self.iface.poll(ts, &mut self.dev, &mut self.sockets);
            if r == smoltcp::iface::PollResult::SocketStateChanged {
                changed = true;
            }
            if self.dev.rx.is_empty() || r == smoltcp::iface::PollResult::None {
                break;
            }
        }
        changed
    }

    /// The next packet the stack wants sent.
    pub fn pop_outbound(&mut self) -> Option<Vec<u8>> {
        self.dev.tx.pop_front()
    }

    /// How long until the stack needs polling for its own timers.
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        let ts = self.ts(now);
        self.iface.poll_delay(ts, &self.sockets).map(|d| Duration::from_micros(d.total_micros()))
    }

    fn new_socket() -> tcp::Socket<'static> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        );
        s.set_nagle_enabled(false);
        // Without congestion control a full window is sent at once and overruns the receiving socket.
        s.set_congestion_control(tcp::CongestionControl::Cubic);
        s.set_keep_alive(Some(smoltcp::time::Duration::from_secs(30)));
        s.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
        s
    }

    /// A socket listening on `local`, to accept exactly one connection there.
    pub fn listen(&mut self, local: SocketAddrV4) -> Option<SocketHandle> {
        let mut s = Self::new_socket();
        s.listen(IpListenEndpoint { addr: Some(IpAddress::Ipv4(*local.ip())), port: local.port() }).ok()?;
        Some(self.sockets.add(s))
    }

    /// A socket connecting from this stack's address to `remote`.
    pub fn connect(&mut self, local_addr: Ipv4Addr, remote: SocketAddrV4) -> Option<SocketHandle> {
        let mut s = Self::new_socket();
        self.next_port = if self.next_port >= 65000 { 40000 } else { self.next_port + 1 };
        let local = IpEndpoint::new(IpAddress::Ipv4(local_addr), self.next_port);
        let remote = IpEndpoint::new(IpAddress::Ipv4(*remote.ip()), remote.port());
        s.connect(self.iface.context(), remote, local).ok()?;
        Some(self.sockets.add(s))
    }

    /// A socket.
    pub fn socket(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    /// Drops a socket.
    pub fn remove(&mut self, h: SocketHandle) {
        self.sockets.remove(h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_stacks_move_bytes_with_mss_from_the_mtu() {
        let now = Instant::now();
        let mut server = NetStack::new("100.96.0.1".parse().unwrap(), 16, 1280, true, 1, now);
        let mut client = NetStack::new("100.96.0.2".parse().unwrap(), 16, 1280, false, 2, now);
        let l = server.listen("100.96.0.10:80".parse().unwrap()).unwrap();
        let c = client.connect("100.96.0.2".parse().unwrap(), "100.96.0.10:80".parse().unwrap()).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (mut sent, mut got) = (0, Vec::new());
        let mut max_packet = 0;
        for _ in 0..10_000 {
            client.poll(now);
            while let Some(p) = client.pop_outbound() {
                max_packet = max_packet.max(p.len());
                server.push_inbound(p);
            }
            server.poll(now);
            while let Some(p) = server.pop_outbound() {
                client.push_inbound(p);
            }
            let cs = client.socket(c);
            if cs.can_send() && sent < data.len() {
                sent += cs.send_slice(&data[sent..]).unwrap();
            }
            let ss = server.socket(l);
            if ss.can_recv() {
                ss.recv(|b| {
                    got.extend_from_slice(b);
                    (b.len(), ())
                })
                .unwrap();
            }
            if got.len() == data.len() {
                break;
            }
        }
        assert_eq!(got, data);
        assert_eq!(max_packet, 1280, "full-size packets, never more than the MTU");
    }
}
