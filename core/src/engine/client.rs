//! What a client decides: in TUN mode, which packets from sites the system may see; in userspace
//! mode, which go to a UDP association and which to the stack's TCP flows.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use super::flows::FlowState;
use super::{Deliver, Engine, FlowId};
use crate::map::NetworkMap;
use crate::packet::filter::Refusal;
use crate::packet::{self, Proto};

impl Engine {
    pub(super) fn client_inbound(&mut self, pkt: Vec<u8>, now: Instant) {
        if self.tun {
            // What a site may send to this machine: replies to what it started, for its own address
            // only. A compromised site must reach neither the client's services nor, through a
            // kernel that forwards, its LAN.
            match self.filter.inbound(&pkt, now) {
                Ok(()) => self.delivers.push_back(Deliver::Os(pkt)),
                Err(Refusal::WrongDestination) => self.counters.wrong_destination += 1,
                Err(Refusal::Unsolicited) => self.counters.unsolicited += 1,
                Err(Refusal::Unparsable) => self.counters.unparsable += 1,
            }
            return;
        }
        if let Some(s) = packet::summarize(&pkt) {
            if let Proto::Udp { dst_port, src_port } = s.proto {
                if self.client_udp.contains(&dst_port) {
                    if let Some(payload) = packet::udp_payload(&pkt) {
                        let from = SocketAddrV4::new(s.src, src_port);
                        self.delivers.push_back(Deliver::UdpReply {
                            local_port: dst_port,
                            from,
                            payload: payload.to_vec(),
                        });
                    }
                    return;
                }
            }
        }
        if let Some(stack) = self.stack.as_mut() {
            stack.push_inbound(pkt);
        }
    }

    /// Opens a TCP flow to `remote` through the tunnel (a userspace client); the outcome comes to
    /// the shell's [`super::FlowPort::connected`].
    pub fn connect(&mut self, remote: SocketAddrV4, now: Instant) -> Result<FlowId, String> {
        let (Some(stack), Some(own)) = (self.stack.as_mut(), self.own_addr) else {
            return Err("no network map yet".into());
        };
        let owner = self.device.route(*remote.ip());
        let h = stack
            .connect(own, remote, owner.as_ref())
            .map_err(|e| format!("cannot open a connection to {remote}: {e}"))?;
        self.flows.insert(h, FlowState::client(now));
        Ok(h)
    }

    /// One datagram from a userspace UDP association on `local_port`; replies to that port come
    /// out as [`Deliver::UdpReply`] until [`Engine::handle_udp_close`].
    pub fn handle_udp_send(&mut self, local_port: u16, remote: SocketAddrV4, payload: &[u8]) {
        let Some(own) = self.own_addr else { return };
        self.client_udp.insert(local_port);
        let p = packet::udp_packet(SocketAddrV4::new(own, local_port), remote, payload);
        self.device.handle_outbound(&p);
    }

    /// The association on `local_port` ended.
    pub fn handle_udp_close(&mut self, local_port: u16) {
        self.client_udp.remove(&local_port);
    }

    /// A packet the system sends into the tunnel (TUN mode).
    pub fn handle_os_packet(&mut self, p: &[u8], now: Instant) {
        self.filter.outbound(p, now);
        self.device.handle_outbound(p);
    }

    /// A client's flows to resources it lost end now: the site would refuse them anyway, and
    /// without the resource's route not even that refusal could come back.
    pub(super) fn client_lost_resources(&mut self, map: &NetworkMap) {
        let reachable: HashSet<Ipv4Addr> =
            map.resources.values().filter_map(|r| r.overlay_addr.parse().ok()).collect();
        if let Some(stack) = self.stack.as_mut() {
            for h in self.flows.keys() {
                let s = stack.socket(*h);
                if let Some(smoltcp::wire::IpAddress::Ipv4(a)) = s.remote_endpoint().map(|e| e.addr) {
                    if !reachable.contains(&a) {
                        s.abort();
                    }
                }
            }
        }
    }
}
