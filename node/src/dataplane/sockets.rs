//! The target-side connections a site opens (TCP dials, UDP flows), with the tasks that copy between
//! them and the loop's flow channels.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;

use tunnel_core::engine::{FlowTuple as Tuple, UDP_IDLE};

use super::{FlowEnds, UdpEvent, CHUNK, DIAL_TIMEOUT};

async fn resolve(target: &str) -> Result<SocketAddr, String> {
    let mut addrs =
        tokio::net::lookup_host(target).await.map_err(|e| format!("cannot resolve {target}: {e}"))?;
    // Prefer IPv4; the site's own network decides the rest.
    let all: Vec<SocketAddr> = addrs.by_ref().collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| format!("{target} has no address"))
}

/// Resolves and connects to a target within [`DIAL_TIMEOUT`] in all (a resolver that hangs must
/// not hold a pending dial longer than an unreachable target does).
pub(super) async fn dial(target: &str) -> Result<TcpStream, String> {
    let connect = async {
        let addr = resolve(target).await?;
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Err(e) => Err(format!("{target} ({addr}): {e}")),
        }
    };
    match tokio::time::timeout(DIAL_TIMEOUT, connect).await {
        Ok(r) => r,
        Err(_) => Err(format!("{target}: timed out")),
    }
}

pub(super) async fn udp_dial(target: &str) -> Result<UdpSocket, String> {
    let addr = resolve(target).await?;
    let bind: SocketAddr =
        if addr.is_ipv4() { "0.0.0.0:0".parse().unwrap_or(addr) } else { "[::]:0".parse().unwrap_or(addr) };
    let s = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    s.connect(addr).await.map_err(|e| e.to_string())?;
    // The loop sends with try_send: until the reactor has seen the new socket writable, that would
    // fail and drop the flow's first datagrams.
    s.writable().await.map_err(|e| e.to_string())?;
    Ok(s)
}

pub(super) async fn udp_flow_reader(sock: Arc<UdpSocket>, tuple: Tuple, events: mpsc::Sender<UdpEvent>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        match tokio::time::timeout(UDP_IDLE, sock.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                if events.send(UdpEvent::Data(tuple, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

/// Copies between a TCP stream and a flow's channels until both directions are done.
pub async fn bridge_stream(stream: TcpStream, ends: FlowEnds) {
    let FlowEnds { tx, mut rx, wake } = ends;
    let (mut r, mut w) = stream.into_split();
    let w1 = wake.clone();
    let up = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        break;
                    }
                    w1.notify_one();
                }
            }
        }
        drop(tx);
        w1.notify_one();
    };
    let down = async move {
        while let Some(b) = rx.recv().await {
            wake.notify_one();
            if w.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
        wake.notify_one();
    };
    tokio::join!(up, down);
}
