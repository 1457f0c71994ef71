//! What a site decides: a packet must come from a peer whose inner source is its own overlay
//! address (checked by the device) and go to a resource that peer was granted; anything else is
//! dropped and counted. TCP to a resource waits for its target to be dialled; UDP becomes a flow to
//! the target's socket; ICMP echo is answered here.

use crate::PublicKey;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use super::flows::FlowState;
use std::collections::BTreeMap;

use super::{
    Deliver, Effect, Engine, EngineConfig, FlowId, FlowTuple, Node, NodeStatus, Refused, Role, UDP_IDLE,
    UDP_QUEUED,
};
use crate::map::{NetworkMap, NodeKind};
use crate::netstack::FlowCount;
use crate::packet::{self, Proto};

/// A resource as the site serves it.
#[derive(Clone, Debug)]
pub(super) struct ServedResource {
    pub(super) target: String,
    pub(super) port: u16,
}

/// A site's UDP flow to a target.
#[derive(Debug)]
pub(super) struct UdpFlow {
    /// The peer whose grant this flow rides on.
    pub(super) peer: PublicKey,
    /// The shell has the target's socket; until then datagrams wait in `queued`.
    ready: bool,
    queued: Vec<Vec<u8>>,
    pub(super) last: Instant,
}

/// A site: it serves resources to the clients granted them.
#[derive(Debug)]
pub struct Site {
    /// Peer key -> resource addresses it may reach.
    grants: BTreeMap<PublicKey, Vec<Ipv4Addr>>,
    /// Resource address -> what to dial.
    served: BTreeMap<Ipv4Addr, ServedResource>,
    /// SYNs held while their targets are dialled, counted in `pending_count`.
    pending_syn: BTreeMap<FlowTuple, (PublicKey, Vec<u8>)>,
    pending_count: FlowCount,
    /// UDP flows, counted in `udp_count`.
    udp_flows: BTreeMap<FlowTuple, UdpFlow>,
    udp_count: FlowCount,
    refused: Refused,
}

impl Role for Site {
    const KIND: NodeKind = NodeKind::Site;
    const STACK_ANY_IP: bool = true;
    const PERSISTENT_KEEPALIVE: bool = false;

    fn new(cfg: &EngineConfig) -> Site {
        let limits = cfg.stack.flows.sane();
        Site {
            grants: BTreeMap::new(),
            served: BTreeMap::new(),
            pending_syn: BTreeMap::new(),
            pending_count: FlowCount::new(limits.pending_dials_per_peer, limits.pending_dials),
            udp_flows: BTreeMap::new(),
            udp_count: FlowCount::new(limits.udp_per_peer, limits.udp),
            refused: Refused::default(),
        }
    }

    fn on_map(&mut self, node: &mut Node, map: &NetworkMap) {
        let addr_of: BTreeMap<&str, Ipv4Addr> = map
            .resources
            .values()
            .filter_map(|r| Some((r.name.as_str(), crate::map::ipv4(r.overlay_addr)?)))
            .collect();
        self.grants.clear();
        for p in map.peers.values() {
            let Some(key) = p.public_key else { continue };
            let granted = p.resources.iter().filter_map(|r| addr_of.get(r.as_str()).copied()).collect();
            self.grants.insert(key, granted);
        }
        self.served.clear();
        for r in map.resources.values() {
            if let (Some(addr), Some(target)) = (crate::map::ipv4(r.overlay_addr), r.target.clone()) {
                self.served.insert(addr, ServedResource { target, port: r.port });
            }
        }
        self.revoke(node);
    }

    fn on_inbound(&mut self, node: &mut Node, peer: PublicKey, packet: Vec<u8>, now: Instant) {
        self.inbound(node, peer, packet, now);
    }

    fn on_settle(&mut self, node: &mut Node, now: Instant) {
        let idle_cutoff = now.checked_sub(UDP_IDLE).unwrap_or(now);
        self.retain_udp_flows(node, |_, f| f.last >= idle_cutoff);
    }

    fn status(&self, out: &mut NodeStatus) {
        out.udp_flows = self.udp_flows.len();
        out.pending_dials = self.pending_syn.len();
        out.refused = self.refused;
    }
}

impl Site {
    fn inbound(&mut self, node: &mut Node, peer: PublicKey, pkt: Vec<u8>, now: Instant) {
        let Some(s) = packet::summarize(&pkt) else {
            node.counters.unparsable += 1;
            return;
        };
        if !self.grants.get(&peer).is_some_and(|g| g.contains(&s.dst)) {
            node.counters.not_granted += 1;
            tracing::debug!(dst = %s.dst, "refusing a packet for a resource the peer was not granted");
            // TCP gets a reset, as a firewall's reject: a flow cut by a revoke ends at once on the
            // client instead of retransmitting into silence.
            if matches!(s.proto, Proto::Tcp { .. }) {
                if let Some(rst) = packet::rst_for(&pkt) {
                    node.device.send_to_peer(&peer, &rst);
                }
            }
            return;
        }
        let Some(res_port) = self.served.get(&s.dst).map(|r| r.port) else {
            node.counters.not_granted += 1;
            return;
        };
        // The target is looked up again only for a new flow: no copy per packet.
        let target = |site: &Site| site.served.get(&s.dst).map(|r| r.target.clone()).unwrap_or_default();
        match s.proto {
            Proto::Tcp { src_port, dst_port, syn_only } => {
                if dst_port != res_port {
                    node.counters.wrong_port += 1;
                    refuse_syn(node, &peer, &pkt);
                    return;
                }
                let tuple = FlowTuple {
                    src: SocketAddrV4::new(s.src, src_port),
                    dst: SocketAddrV4::new(s.dst, dst_port),
                };
                if syn_only && !has_socket(node, tuple) {
                    if self.pending_syn.contains_key(&tuple) {
                        return;
                    }
                    // The flow limits and the memory budget first: no target is dialled for a flow
                    // the stack would refuse (the stack counts its refusals).
                    if let Some(Err(e)) = node.stack.as_mut().map(|st| st.admit(Some(&peer))) {
                        tracing::debug!(flow = ?tuple, error = %e, "refusing a new flow");
                        refuse_syn(node, &peer, &pkt);
                        return;
                    }
                    if let Err(limit) = self.pending_count.add(Some(&peer)) {
                        self.refused.pending_dial(limit);
                        tracing::debug!(flow = ?tuple, limit = limit.as_str(), "too many dials pending; refusing a new flow");
                        refuse_syn(node, &peer, &pkt);
                        return;
                    }
                    let target = target(self);
                    self.pending_syn.insert(tuple, (peer, pkt));
                    node.effects.push_back(Effect::DialTcp { flow: tuple, target });
                    return;
                }
                if let Some(stack) = node.stack.as_mut() {
                    stack.push_inbound(pkt);
                }
            }
            Proto::Udp { src_port, dst_port } => {
                if dst_port != res_port {
                    node.counters.wrong_port += 1;
                    return;
                }
                let tuple = FlowTuple {
                    src: SocketAddrV4::new(s.src, src_port),
                    dst: SocketAddrV4::new(s.dst, dst_port),
                };
                let Some(payload) = packet::udp_payload(&pkt).map(<[u8]>::to_vec) else { return };
                if let Some(f) = self.udp_flows.get_mut(&tuple) {
                    f.last = now;
                    if f.ready {
                        node.delivers.push_back(Deliver::Target { flow: tuple, payload });
                    } else if f.queued.len() < UDP_QUEUED {
                        f.queued.push(payload);
                    }
                    return;
                }
                if let Err(limit) = self.udp_count.add(Some(&peer)) {
                    // Dropped, as a full NAT table drops; the client's application retries or not.
                    self.refused.udp(limit);
                    tracing::debug!(flow = ?tuple, limit = limit.as_str(), "too many UDP flows; dropping a new one");
                    return;
                }
                let target = target(self);
                node.effects.push_back(Effect::OpenUdp { flow: tuple, target });
                let flow = UdpFlow { peer, ready: false, queued: vec![payload], last: now };
                self.udp_flows.insert(tuple, flow);
            }
            Proto::EchoRequest => {
                if let Some(reply) = packet::echo_reply(&pkt) {
                    node.device.send_to_peer(&peer, &reply);
                }
            }
            Proto::Other(_) => node.counters.unparsable += 1,
        }
    }

    /// Flows of peers that lost their grant end now (revocation takes effect at once).
    fn revoke(&mut self, node: &mut Node) {
        // Aborted sockets stay until the stack has sent their reset; the flow service then removes
        // them and gives their budget back.
        let grants = &self.grants;
        if let Some(stack) = node.stack.as_mut() {
            for (h, f) in &node.flows {
                let Some(k) = f.peer else { continue };
                let s = stack.socket(*h);
                if let Some(smoltcp::wire::IpAddress::Ipv4(a)) = s.local_endpoint().map(|e| e.addr) {
                    if !grants.get(&k).is_some_and(|g| g.contains(&a)) {
                        s.abort();
                    }
                }
            }
        }
        let grants = std::mem::take(&mut self.grants);
        self.retain_udp_flows(node, |t, f| grants.get(&f.peer).is_some_and(|g| g.contains(t.dst.ip())));
        self.grants = grants;
    }

    /// Keeps the UDP flows `keep` says to; the others end (their sockets with them) and are uncounted.
    fn retain_udp_flows(&mut self, node: &mut Node, keep: impl Fn(&FlowTuple, &UdpFlow) -> bool) {
        let count = &mut self.udp_count;
        let effects = &mut node.effects;
        self.udp_flows.retain(|t, f| {
            let k = keep(t, f);
            if !k {
                count.remove(Some(&f.peer));
                effects.push_back(Effect::CloseUdp { flow: *t });
            }
            k
        });
    }
}

/// Answers a site's refused SYN with a reset, as a full server would.
fn refuse_syn(node: &mut Node, peer: &PublicKey, syn: &[u8]) {
    if let Some(rst) = packet::rst_for_syn(syn) {
        node.device.send_to_peer(peer, &rst);
    }
}

/// Whether the stack has a socket for this flow already (the SYN is a retransmission).
fn has_socket(node: &mut Node, t: FlowTuple) -> bool {
    let Some(stack) = node.stack.as_mut() else { return false };
    let (src, dst): (Ipv4Addr, Ipv4Addr) = (*t.src.ip(), *t.dst.ip());
    node.flows.keys().any(|h| {
        let s = stack.socket(*h);
        let remote = s.remote_endpoint();
        let local = s.local_endpoint();
        matches!((remote, local), (Some(r), Some(l))
            if r.port == t.src.port() && l.port == t.dst.port()
                && r.addr == smoltcp::wire::IpAddress::Ipv4(src)
                && l.addr == smoltcp::wire::IpAddress::Ipv4(dst))
    })
}

impl Engine<Site> {
    /// The answer to [`Effect::DialTcp`]. When the target accepted and the flow may go on, its
    /// SYN enters the stack and the returned flow is the one to bridge to the target connection;
    /// `None` means the client was answered with a reset (or the SYN is gone) and the shell drops
    /// the connection.
    pub fn handle_dial_result(
        &mut self,
        tuple: FlowTuple,
        result: Result<(), String>,
        now: Instant,
    ) -> Option<FlowId> {
        let (peer, syn) = self.role.pending_syn.remove(&tuple)?;
        self.role.pending_count.remove(Some(&peer));
        // A revoke that arrived while the target was being dialled holds.
        let granted = self.role.grants.get(&peer).is_some_and(|g| g.contains(tuple.dst.ip()));
        match result {
            Ok(()) if !granted => {
                refuse_syn(&mut self.node, &peer, &syn);
                None
            }
            Ok(()) => {
                let stack = self.node.stack.as_mut()?;
                let h = match stack.listen(tuple.dst, Some(&peer)) {
                    Ok(h) => h,
                    Err(e) => {
                        // The target accepted, but this flow would overrun a buffer budget: the
                        // client hears a reset, as from a full server.
                        tracing::debug!(target_flow = ?tuple, error = %e, "refusing a flow");
                        refuse_syn(&mut self.node, &peer, &syn);
                        return None;
                    }
                };
                self.node.flows.insert(h, FlowState::site(peer, now));
                stack.push_inbound(syn);
                self.node.counters.flows_opened += 1;
                Some(h)
            }
            Err(e) => {
                self.node.counters.dial_failures += 1;
                tracing::info!(target_flow = ?tuple, error = %e, "target refused; answering the client with a reset");
                refuse_syn(&mut self.node, &peer, &syn);
                None
            }
        }
    }

    /// The shell opened the socket [`Effect::OpenUdp`] asked for; the datagrams that waited for it
    /// are delivered. Whether the flow still exists (if not, the shell closes the socket).
    pub fn handle_udp_ready(&mut self, tuple: FlowTuple) -> bool {
        let Some(f) = self.role.udp_flows.get_mut(&tuple) else { return false };
        f.ready = true;
        for payload in f.queued.drain(..) {
            self.node.delivers.push_back(Deliver::Target { flow: tuple, payload });
        }
        true
    }

    /// A datagram from a UDP flow's target, for the client that opened the flow.
    pub fn handle_udp_reply(&mut self, tuple: FlowTuple, payload: &[u8], now: Instant) {
        let Some(f) = self.role.udp_flows.get_mut(&tuple) else { return };
        f.last = now;
        let Some(peer) = self.node.device.route(*tuple.src.ip()) else { return };
        let p = packet::udp_packet(tuple.dst, tuple.src, payload);
        self.node.device.send_to_peer(&peer, &p);
    }
}
