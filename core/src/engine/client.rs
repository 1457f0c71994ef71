//! What a client decides: in TUN mode, which packets from sites the system may see; in userspace
//! mode, which go to a UDP association and which to the stack's TCP flows.

use crate::PublicKey;
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use super::flows::FlowState;
use super::{Deliver, Engine, EngineConfig, FlowId, Node, Role};
use crate::map::{NetworkMap, NodeKind};
use crate::packet::filter::{InboundFilter, Refusal};
use crate::packet::{self, Proto};

/// A machine client: it reaches the resources its sites serve it.
#[derive(Debug)]
pub struct Client {
    /// Inner packets go to and from the system (a TUN device), not the userspace stack.
    tun: bool,
    /// TUN mode: what this client started, so that only replies to it come in, and only for its
    /// own address.
    filter: InboundFilter,
    /// Userspace mode: local ports with a UDP association.
    udp_ports: BTreeSet<u16>,
}

impl Role for Client {
    const KIND: NodeKind = NodeKind::Client;
    const STACK_ANY_IP: bool = false;
    const PERSISTENT_KEEPALIVE: bool = true;

    fn new(cfg: &EngineConfig) -> Client {
        Client { tun: cfg.tun, filter: InboundFilter::default(), udp_ports: BTreeSet::new() }
    }

    fn on_address(&mut self, addr: Ipv4Addr) {
        self.filter.set_address(addr);
    }

    fn on_map(&mut self, node: &mut Node, map: &NetworkMap) {
        lost_resources(node, map);
    }

    fn on_inbound(&mut self, node: &mut Node, _peer: PublicKey, packet: Vec<u8>, now: Instant) {
        self.inbound(node, packet, now);
    }
}

impl Client {
    fn inbound(&mut self, node: &mut Node, pkt: Vec<u8>, now: Instant) {
        if self.tun {
            // What a site may send to this machine: replies to what it started, for its own address
            // only. A compromised site must reach neither the client's services nor, through a
            // kernel that forwards, its LAN.
            match self.filter.inbound(&pkt, now) {
                Ok(()) => node.delivers.push_back(Deliver::Os(pkt)),
                Err(Refusal::WrongDestination) => node.counters.wrong_destination += 1,
                Err(Refusal::Unsolicited) => node.counters.unsolicited += 1,
                Err(Refusal::Unparsable) => node.counters.unparsable += 1,
            }
            return;
        }
        if let Some(s) = packet::summarize(&pkt) {
            if let Proto::Udp { dst_port, src_port } = s.proto {
                if self.udp_ports.contains(&dst_port) {
                    if let Some(payload) = packet::udp_payload(&pkt) {
                        let from = SocketAddrV4::new(s.src, src_port);
                        node.delivers.push_back(Deliver::UdpReply {
                            local_port: dst_port,
                            from,
                            payload: payload.to_vec(),
                        });
                    }
                    return;
                }
            }
        }
        if let Some(stack) = node.stack.as_mut() {
            stack.push_inbound(pkt);
        }
    }
}

impl Engine<Client> {
    /// Opens a TCP flow to `remote` through the tunnel (a userspace client); the outcome comes to
    /// the shell's [`super::FlowPort::connected`].
    pub fn connect(&mut self, remote: SocketAddrV4, now: Instant) -> Result<FlowId, String> {
        let (Some(stack), Some(own)) = (self.node.stack.as_mut(), self.node.own_addr) else {
            return Err("no network map yet".into());
        };
        let owner = self.node.device.route(*remote.ip());
        let h = stack
            .connect(own, remote, owner.as_ref())
            .map_err(|e| format!("cannot open a connection to {remote}: {e}"))?;
        self.node.flows.insert(h, FlowState::client(now));
        Ok(h)
    }

    /// One datagram from a userspace UDP association on `local_port`; replies to that port come
    /// out as [`Deliver::UdpReply`] until [`Engine::handle_udp_close`].
    pub fn handle_udp_send(&mut self, local_port: u16, remote: SocketAddrV4, payload: &[u8]) {
        let Some(own) = self.node.own_addr else { return };
        self.role.udp_ports.insert(local_port);
        let p = packet::udp_packet(SocketAddrV4::new(own, local_port), remote, payload);
        self.node.device.handle_outbound(&p);
    }

    /// The association on `local_port` ended.
    pub fn handle_udp_close(&mut self, local_port: u16) {
        self.role.udp_ports.remove(&local_port);
    }

    /// A packet the system sends into the tunnel (TUN mode).
    pub fn handle_os_packet(&mut self, p: &[u8], now: Instant) {
        self.role.filter.outbound(p, now);
        self.node.device.handle_outbound(p);
    }
}

/// A client's flows to resources it lost end now: the site would refuse them anyway, and
/// without the resource's route not even that refusal could come back.
fn lost_resources(node: &mut Node, map: &NetworkMap) {
    let reachable: BTreeSet<Ipv4Addr> =
        map.resources.values().filter_map(|r| crate::map::ipv4(r.overlay_addr)).collect();
    if let Some(stack) = node.stack.as_mut() {
        for h in node.flows.keys() {
            let s = stack.socket(*h);
            if let Some(smoltcp::wire::IpAddress::Ipv4(a)) = s.remote_endpoint().map(|e| e.addr) {
                if !reachable.contains(&a) {
                    s.abort();
                }
            }
        }
    }
}
