//! The loop's schedule: wait until any source has something, then sweep every source in a fixed
//! order, each under its own budget, then pump the engine once.
//!
//! The order puts the rare and small first (commands such as `/status`, a new map, the relay's state,
//! STUN answers, dial results) and the floods last (a site's UDP target replies, the socket, the
//! relay, the TUN device). A budget caps what one source may hand over per wake-up, so a stranger
//! flooding the socket costs each wake-up at most [`PACKET_BUDGET`] datagrams, and the commands and
//! the other packets behind it are still served on every wake-up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tunnel_core::PublicKey;

use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinError;
use tunnel_core::engine::{self, FlowTuple};
use tunnel_core::map::NetworkMap;

use super::roles::ShellRole;
use super::{Command, Shell, UdpEvent};
use crate::relay::RelayState;

/// Commands, STUN answers and dial results handled per wake-up.
const CONTROL_BUDGET: usize = 16;
/// Datagrams (from the socket, the relay, the TUN device, a site's UDP targets), per source and wake-up.
pub(super) const PACKET_BUDGET: usize = 256;

/// What the loop waits on.
pub(super) struct Inputs {
    pub(super) udp: Arc<UdpSocket>,
    pub(super) udp_state: Arc<quinn_udp::UdpSocketState>,
    pub(super) maps: watch::Receiver<Option<Arc<NetworkMap>>>,
    pub(super) cmd_rx: mpsc::Receiver<Command>,
    pub(super) udp_event_rx: mpsc::Receiver<UdpEvent>,
    pub(super) from_os: Option<mpsc::Receiver<Vec<u8>>>,
    pub(super) relay_in: mpsc::Receiver<(PublicKey, Vec<u8>)>,
    pub(super) relay_state: watch::Receiver<RelayState>,
    pub(super) stun_resolve_rx: mpsc::Receiver<(String, Option<SocketAddr>)>,
    /// Whether the relay link's task still sends its state.
    pub(super) relay_open: bool,
}

/// What ended a wait: an input it took, or only a sign that there is something to do.
enum Woke {
    Command(Command),
    Map,
    RelayState,
    Stun(String, Option<SocketAddr>),
    Dialed(Result<(FlowTuple, Result<TcpStream, String>), JoinError>),
    Udp(UdpEvent),
    Relayed(PublicKey, Vec<u8>),
    Os(Vec<u8>),
    /// The socket is readable, the application moved flow data, or a timer is due: the sweep and
    /// the pump find out what.
    Ready,
    /// Every handle to the data plane, or the map's sender, is gone.
    Stop,
}

/// Receive buffers for one recvmmsg batch; with GRO each may hold many datagrams.
struct RecvBufs {
    bufs: Vec<Vec<u8>>,
    metas: Vec<quinn_udp::RecvMeta>,
}

/// The loop: waits for any input, sweeps them all, pumps.
pub(super) async fn run<R: ShellRole>(
    mut sh: Shell<R>,
    mut inp: Inputs,
    relay_task: tokio::task::JoinHandle<()>,
) {
    // The relay link lives and dies with the loop.
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _relay_task = AbortOnDrop(relay_task);
    let mut rb = RecvBufs {
        bufs: (0..quinn_udp::BATCH_SIZE).map(|_| vec![0u8; 65_536]).collect(),
        metas: vec![quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE],
    };
    if let Some(m) = inp.maps.borrow_and_update().clone() {
        sh.apply_map(m, Instant::now());
    }
    loop {
        let deadline = sh.engine.next_deadline(Instant::now());
        let woke = wait(&mut sh, &mut inp, deadline).await;
        // The clock is read once per wake-up, when the wait ends: every handler and the pump after
        // it see that time.
        let now = Instant::now();
        if !take(&mut sh, &mut inp, woke, now) || !sweep(&mut sh, &mut inp, &mut rb, now) {
            break;
        }
        sh.pump(now).await;
    }
}

/// Waits until any source has something or the engine's next deadline passes.
async fn wait<R: ShellRole>(sh: &mut Shell<R>, inp: &mut Inputs, deadline: Instant) -> Woke {
    let wake: Arc<Notify> = sh.bridge.wake.clone();
    let from_os = inp.from_os.as_mut();
    let from_os = async move {
        match from_os {
            Some(r) => r.recv().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        c = inp.cmd_rx.recv() => c.map_or(Woke::Stop, Woke::Command),
        r = inp.maps.changed() => if r.is_ok() { Woke::Map } else { Woke::Stop },
        r = inp.relay_state.changed(), if inp.relay_open => {
            if r.is_ok() {
                Woke::RelayState
            } else {
                inp.relay_open = false;
                Woke::Ready
            }
        }
        Some((name, addr)) = inp.stun_resolve_rx.recv() => Woke::Stun(name, addr),
        Some(r) = sh.tasks.dials.join_next(), if !sh.tasks.dials.is_empty() => Woke::Dialed(r),
        Some(ev) = inp.udp_event_rx.recv() => Woke::Udp(ev),
        r = inp.udp.readable() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "UDP socket not readable");
            }
            Woke::Ready
        }
        Some((from, p)) = inp.relay_in.recv() => Woke::Relayed(from, p),
        Some(p) = from_os => Woke::Os(p),
        _ = wake.notified() => Woke::Ready,
        _ = tokio::time::sleep_until(deadline.into()) => Woke::Ready,
    }
}

/// Hands what the wait took to the engine; false when the loop must end.
fn take<R: ShellRole>(sh: &mut Shell<R>, inp: &mut Inputs, woke: Woke, now: Instant) -> bool {
    match woke {
        Woke::Command(c) => sh.command(c, now),
        Woke::Map => map(sh, inp, now),
        Woke::RelayState => relay_state(sh, inp, now),
        Woke::Stun(name, addr) => sh.engine.handle_stun_resolved(name, addr, now),
        // A dial task cannot panic short of a bug; it is then dropped with its SYN, which the
        // pending-dial timeout of the client's connect covers.
        Woke::Dialed(r) => {
            if let Ok((flow, result)) = r {
                sh.dialed(flow, result, now);
            }
        }
        Woke::Udp(ev) => sh.udp_event(ev, now),
        Woke::Relayed(from, p) => sh.engine.handle_relayed(from, &p),
        Woke::Os(p) => R::os_packet(&mut sh.engine, &p, now),
        Woke::Ready => {}
        Woke::Stop => return false,
    }
    true
}

fn map<R: ShellRole>(sh: &mut Shell<R>, inp: &mut Inputs, now: Instant) {
    if let Some(m) = inp.maps.borrow_and_update().clone() {
        sh.apply_map(m, now);
    }
}

fn relay_state<R: ShellRole>(sh: &mut Shell<R>, inp: &mut Inputs, now: Instant) {
    let st = inp.relay_state.borrow_and_update().clone();
    sh.engine.handle_relay_up(st.up, now);
    sh.relay_state = st;
}

/// Every source in its fixed order, each up to its budget, without waiting; false when the loop
/// must end (the commands' or the map's sender is gone).
fn sweep<R: ShellRole>(sh: &mut Shell<R>, inp: &mut Inputs, rb: &mut RecvBufs, now: Instant) -> bool {
    use mpsc::error::TryRecvError;
    for _ in 0..CONTROL_BUDGET {
        match inp.cmd_rx.try_recv() {
            Ok(c) => sh.command(c, now),
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Disconnected) => return false,
        }
    }
    match inp.maps.has_changed() {
        Ok(true) => map(sh, inp, now),
        Ok(false) => {}
        Err(_) => return false,
    }
    if inp.relay_state.has_changed().unwrap_or(false) {
        relay_state(sh, inp, now);
    }
    for _ in 0..CONTROL_BUDGET {
        let Ok((name, addr)) = inp.stun_resolve_rx.try_recv() else { break };
        sh.engine.handle_stun_resolved(name, addr, now);
    }
    for _ in 0..CONTROL_BUDGET {
        let Some(r) = sh.tasks.dials.try_join_next() else { break };
        if let Ok((flow, result)) = r {
            sh.dialed(flow, result, now);
        }
    }
    for _ in 0..PACKET_BUDGET {
        let Ok(ev) = inp.udp_event_rx.try_recv() else { break };
        sh.udp_event(ev, now);
    }
    socket(sh, inp, rb, now);
    for _ in 0..PACKET_BUDGET {
        let Ok((from, p)) = inp.relay_in.try_recv() else { break };
        sh.engine.handle_relayed(from, &p);
    }
    if let Some(r) = inp.from_os.as_mut() {
        for _ in 0..PACKET_BUDGET {
            let Ok(p) = r.try_recv() else { break };
            R::os_packet(&mut sh.engine, &p, now);
        }
    }
    true
}

/// Up to [`PACKET_BUDGET`] datagrams from the socket, in recvmmsg batches.
fn socket<R: ShellRole>(sh: &mut Shell<R>, inp: &mut Inputs, rb: &mut RecvBufs, now: Instant) {
    let mut handled = 0;
    while handled < PACKET_BUDGET {
        let mut iovs: Vec<std::io::IoSliceMut<'_>> =
            rb.bufs.iter_mut().map(|b| std::io::IoSliceMut::new(b)).collect();
        let got = inp.udp.try_io(tokio::io::Interest::READABLE, || {
            inp.udp_state.recv((&*inp.udp).into(), &mut iovs, &mut rb.metas)
        });
        let n = match got {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    tracing::debug!(error = %e, "UDP receive failed");
                }
                return;
            }
        };
        for (meta, buf) in rb.metas.iter().zip(rb.bufs.iter()).take(n) {
            let from = engine::normalize(meta.addr);
            let stride = if meta.stride == 0 { meta.len } else { meta.stride };
            for d in buf[..meta.len].chunks(stride.max(1)) {
                sh.engine.handle_datagram(from, d, now);
                handled += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{assemble, PathOptions};
    use tokio::sync::oneshot;
    use tunnel_core::engine::Client;
    use tunnel_core::map::NodeKind;

    /// Junk waiting in the socket is taken at most a budget per sweep, after the commands: a status
    /// request queued behind 600 junk datagrams is answered by the first sweep, which leaves most
    /// of the junk to the next ones.
    #[tokio::test]
    async fn a_sweep_answers_commands_first_and_takes_a_budget_of_datagrams() {
        let (_maps_tx, maps) = watch::channel(None);
        let sock = crate::udp::bind_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let (cfg, parts, mut inp, _relay, dp) =
            assemble(NodeKind::Client, [21; 32], sock, maps, None, PathOptions::default()).unwrap();
        let now = Instant::now();
        let mut sh = Shell::<Client>::new(cfg, parts, now);
        let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        const JUNK: u64 = 600;
        for _ in 0..JUNK {
            stranger.send_to(&[0xee; 120], dp.local_addr).unwrap();
        }
        inp.udp.readable().await.unwrap();
        let (reply, mut answered) = oneshot::channel();
        dp.commands.send(Command::Status { reply }).await.unwrap();
        let mut rb = RecvBufs {
            bufs: (0..quinn_udp::BATCH_SIZE).map(|_| vec![0u8; 65_536]).collect(),
            metas: vec![quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE],
        };
        let malformed = |sh: &Shell<Client>| sh.engine.status().drops.malformed;

        assert!(sweep(&mut sh, &mut inp, &mut rb, now));
        let status = answered.try_recv().expect("the status request was answered by the first sweep");
        assert_eq!(status.drops.malformed, 0, "commands come before the socket");
        let first = malformed(&sh);
        assert!(
            (PACKET_BUDGET as u64..JUNK / 2).contains(&first),
            "one sweep took {first} datagrams, the budget is {PACKET_BUDGET}"
        );
        let mut sweeps = 1;
        while malformed(&sh) < JUNK {
            assert!(sweep(&mut sh, &mut inp, &mut rb, now));
            sweeps += 1;
            assert!(sweeps <= 4, "600 datagrams need three sweeps, not {sweeps}");
        }
        assert_eq!(malformed(&sh), JUNK, "every junk datagram was counted");
    }
}
