//! The inputs only one role has, as one trait the shell's loop is generic over: a site's dials and
//! UDP targets, a client's connections, UDP associations and TUN packets. The other role answers
//! each as what it is for it: nothing to do, or a clear refusal.

use std::net::SocketAddrV4;
use std::time::Instant;

use tunnel_core::engine::{Client, Engine, FlowId, FlowTuple, Role, Site};

pub(super) trait ShellRole: Role {
    /// `Command::Connect`.
    fn connect(e: &mut Engine<Self>, remote: SocketAddrV4, now: Instant) -> Result<FlowId, String>;
    /// `Command::UdpSend`.
    fn udp_send(e: &mut Engine<Self>, local_port: u16, remote: SocketAddrV4, payload: &[u8]);
    /// `Command::UdpClose`.
    fn udp_close(e: &mut Engine<Self>, local_port: u16);
    /// A packet from the TUN device.
    fn os_packet(e: &mut Engine<Self>, packet: &[u8], now: Instant);
    /// A dial of a site's target ended.
    fn dial_result(
        e: &mut Engine<Self>,
        flow: FlowTuple,
        r: Result<(), String>,
        now: Instant,
    ) -> Option<FlowId>;
    /// A site's UDP target socket is open.
    fn udp_ready(e: &mut Engine<Self>, flow: FlowTuple) -> bool;
    /// A datagram from a site's UDP target.
    fn udp_reply(e: &mut Engine<Self>, flow: FlowTuple, payload: &[u8], now: Instant);
}

impl ShellRole for Site {
    fn connect(_: &mut Engine<Site>, _: SocketAddrV4, _: Instant) -> Result<FlowId, String> {
        Err("a site agent opens no connections through the tunnel".into())
    }
    fn udp_send(_: &mut Engine<Site>, _: u16, _: SocketAddrV4, _: &[u8]) {}
    fn udp_close(_: &mut Engine<Site>, _: u16) {}
    // A site has no TUN device.
    fn os_packet(_: &mut Engine<Site>, _: &[u8], _: Instant) {}
    fn dial_result(
        e: &mut Engine<Site>,
        flow: FlowTuple,
        r: Result<(), String>,
        now: Instant,
    ) -> Option<FlowId> {
        e.handle_dial_result(flow, r, now)
    }
    fn udp_ready(e: &mut Engine<Site>, flow: FlowTuple) -> bool {
        e.handle_udp_ready(flow)
    }
    fn udp_reply(e: &mut Engine<Site>, flow: FlowTuple, payload: &[u8], now: Instant) {
        e.handle_udp_reply(flow, payload, now);
    }
}

impl ShellRole for Client {
    fn connect(e: &mut Engine<Client>, remote: SocketAddrV4, now: Instant) -> Result<FlowId, String> {
        e.connect(remote, now)
    }
    fn udp_send(e: &mut Engine<Client>, local_port: u16, remote: SocketAddrV4, payload: &[u8]) {
        e.handle_udp_send(local_port, remote, payload);
    }
    fn udp_close(e: &mut Engine<Client>, local_port: u16) {
        e.handle_udp_close(local_port);
    }
    fn os_packet(e: &mut Engine<Client>, packet: &[u8], now: Instant) {
        e.handle_os_packet(packet, now);
    }
    // A client dials nothing and opens no UDP targets: these never come.
    fn dial_result(
        _: &mut Engine<Client>,
        _: FlowTuple,
        _: Result<(), String>,
        _: Instant,
    ) -> Option<FlowId> {
        None
    }
    fn udp_ready(_: &mut Engine<Client>, _: FlowTuple) -> bool {
        false
    }
    fn udp_reply(_: &mut Engine<Client>, _: FlowTuple, _: &[u8], _: Instant) {}
}
