//! A SOCKS5 listener (RFC 1928, no authentication) for `tunnelctl up --userspace`: CONNECT and UDP
//! ASSOCIATE to resources, with names resolved here so private names work (`curl --socks5-hostname`).
//! Destinations that are not resources are refused: this proxy reaches the tunnel only.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tunnel_core::dns::PrivateZone;
use tunnel_core::map::NetworkMap;
use tunnel_node::dataplane::{bridge_stream, Command, Dataplane};

const REP_OK: u8 = 0;
const REP_NOT_ALLOWED: u8 = 2;
const REP_HOST_UNREACHABLE: u8 = 4;
const REP_REFUSED: u8 = 5;
const REP_CMD_UNSUPPORTED: u8 = 7;
const REP_ATYP_UNSUPPORTED: u8 = 8;

/// What a SOCKS client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    Ip(IpAddr, u16),
    Name(String, u16),
}

/// Serves SOCKS5 on `listen`.
pub async fn serve(
    listen: SocketAddr,
    dp: Dataplane,
    maps: watch::Receiver<Option<Arc<NetworkMap>>>,
    zone: watch::Receiver<Arc<PrivateZone>>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let l =
        TcpListener::bind(listen).await.with_context(|| format!("cannot listen for SOCKS5 on {listen}"))?;
    let bound = l.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { continue };
            let _ = s.set_nodelay(true);
            let (dp, maps, zone) = (dp.clone(), maps.clone(), zone.clone());
            tokio::spawn(async move {
                if let Err(e) = session(s, dp, maps, zone).await {
                    tracing::debug!(error = %e, "SOCKS5 session ended");
                }
            });
        }
    });
    Ok((bound, task))
}

/// The overlay address for a destination, if it is a resource this client may use.
fn resolve(
    d: &Dest,
    maps: &watch::Receiver<Option<Arc<NetworkMap>>>,
    zone: &PrivateZone,
) -> Option<SocketAddrV4> {
    match d {
        Dest::Name(n, port) => zone.lookup(n).map(|a| SocketAddrV4::new(a, *port)),
        Dest::Ip(IpAddr::V4(a), port) => {
            let m = maps.borrow().clone()?;
            m.resources
                .values()
                .any(|r| r.overlay_addr == IpAddr::V4(*a))
                .then(|| SocketAddrV4::new(*a, *port))
        }
        Dest::Ip(_, _) => None,
    }
}

async fn read_dest(s: &mut TcpStream, atyp: u8) -> Result<Option<Dest>> {
    Ok(Some(match atyp {
        1 => {
            let mut b = [0u8; 6];
            s.read_exact(&mut b).await?;
            Dest::Ip(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])), u16::from_be_bytes([b[4], b[5]]))
        }
        3 => {
            let len = s.read_u8().await? as usize;
            let mut name = vec![0u8; len + 2];
            s.read_exact(&mut name).await?;
            let port = u16::from_be_bytes([name[len], name[len + 1]]);
            Dest::Name(String::from_utf8_lossy(&name[..len]).into_owned(), port)
        }
        4 => {
            let mut b = [0u8; 18];
            s.read_exact(&mut b).await?;
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&b[..16]);
            Dest::Ip(IpAddr::from(ip), u16::from_be_bytes([b[16], b[17]]))
        }
        _ => return Ok(None),
    }))
}

async fn reply(s: &mut TcpStream, rep: u8, bind: SocketAddr) -> Result<()> {
    let mut r = vec![5, rep, 0];
    match bind {
        SocketAddr::V4(a) => {
            r.push(1);
            r.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            r.push(4);
            r.extend_from_slice(&a.ip().octets());
        }
    }
    r.extend_from_slice(&bind.port().to_be_bytes());
    s.write_all(&r).await?;
    Ok(())
}

async fn session(
    mut s: TcpStream,
    dp: Dataplane,
    maps: watch::Receiver<Option<Arc<NetworkMap>>>,
    zone: watch::Receiver<Arc<PrivateZone>>,
) -> Result<()> {
    let none: SocketAddr = ([0, 0, 0, 0], 0).into();
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    if head[0] != 5 {
        anyhow::bail!("not SOCKS5");
    }
    let mut methods = vec![0u8; head[1] as usize];
    s.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        s.write_all(&[5, 0xFF]).await?;
        anyhow::bail!("client offers no method without authentication");
    }
    s.write_all(&[5, 0]).await?;
    let mut req = [0u8; 4];
    s.read_exact(&mut req).await?;
    let Some(dest) = read_dest(&mut s, req[3]).await? else {
        return reply(&mut s, REP_ATYP_UNSUPPORTED, none).await;
    };
    match req[1] {
        1 => {
            let target = resolve(&dest, &maps, &zone.borrow());
            let Some(target) = target else {
                tracing::info!(?dest, "SOCKS5 CONNECT to something that is not a resource of this client");
                let rep = if matches!(dest, Dest::Name(..)) { REP_HOST_UNREACHABLE } else { REP_NOT_ALLOWED };
                return reply(&mut s, rep, none).await;
            };
            match dp.connect(target).await {
                Ok(ends) => {
                    reply(&mut s, REP_OK, none).await?;
                    bridge_stream(s, ends).await;
                    Ok(())
                }
                Err(e) => {
                    tracing::info!(%target, error = %e, "connection through the tunnel failed");
                    let rep = if e.contains("refused") { REP_REFUSED } else { REP_HOST_UNREACHABLE };
                    reply(&mut s, rep, none).await
                }
            }
        }
        3 => udp_associate(s, dp, maps, zone).await,
        _ => reply(&mut s, REP_CMD_UNSUPPORTED, none).await,
    }
}

fn next_overlay_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    20000 + (NEXT.fetch_add(1, Ordering::Relaxed) % 40000) as u16
}

/// Parses a SOCKS5 UDP request header: returns the destination and the payload offset.
pub fn parse_udp_header(d: &[u8]) -> Option<(Dest, usize)> {
    if d.len() < 4 || d[2] != 0 {
        return None; // fragments are not supported
    }
    match d[3] {
        1 if d.len() >= 10 => Some((
            Dest::Ip(IpAddr::V4(Ipv4Addr::new(d[4], d[5], d[6], d[7])), u16::from_be_bytes([d[8], d[9]])),
            10,
        )),
        3 => {
            let len = *d.get(4)? as usize;
            let end = 5 + len + 2;
            if d.len() < end {
                return None;
            }
            let name = String::from_utf8_lossy(&d[5..5 + len]).into_owned();
            Some((Dest::Name(name, u16::from_be_bytes([d[5 + len], d[6 + len]])), end))
        }
        _ => None,
    }
}

async fn udp_associate(
    mut s: TcpStream,
    dp: Dataplane,
    maps: watch::Receiver<Option<Arc<NetworkMap>>>,
    zone: watch::Receiver<Arc<PrivateZone>>,
) -> Result<()> {
    let local_ip = s.local_addr()?.ip();
    let relay = UdpSocket::bind(SocketAddr::new(local_ip, 0)).await?;
    let bound = relay.local_addr()?;
    reply(&mut s, REP_OK, bound).await?;
    // Each association gets its own source port on the overlay, handed out in turn.
    let overlay_port = next_overlay_port();
    let (tx, mut rx) = mpsc::channel::<(SocketAddrV4, Vec<u8>)>(256);
    let mut client: Option<SocketAddr> = None;
    let mut buf = vec![0u8; 65_536];
    let mut ctl = [0u8; 1];
    loop {
        tokio::select! {
            r = s.read(&mut ctl) => {
                // The association lives as long as its TCP connection.
                if matches!(r, Ok(0) | Err(_)) {
                    let _ = dp.commands.send(Command::UdpClose { local_port: overlay_port }).await;
                    return Ok(());
                }
            }
            r = relay.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                if from.ip() != s.peer_addr()?.ip() { continue; }
                client = Some(from);
                let Some((dest, off)) = parse_udp_header(&buf[..n]) else { continue };
                let Some(target) = resolve(&dest, &maps, &zone.borrow()) else { continue };
                let _ = dp.commands.send(Command::UdpSend { local_port: overlay_port, remote: target, payload: buf[off..n].to_vec(), replies: tx.clone() }).await;
            }
            Some((from, payload)) = rx.recv() => {
                let Some(c) = client else { continue };
                let mut d = vec![0, 0, 0, 1];
                d.extend_from_slice(&from.ip().octets());
                d.extend_from_slice(&from.port().to_be_bytes());
                d.extend_from_slice(&payload);
                let _ = relay.send_to(&d, c).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_headers() {
        let d = [0, 0, 0, 1, 100, 96, 0, 3, 0, 53, b'x'];
        assert_eq!(parse_udp_header(&d), Some((Dest::Ip("100.96.0.3".parse().unwrap(), 53), 10)));
        let mut n = vec![0, 0, 0, 3, 4];
        n.extend_from_slice(b"prom");
        n.extend_from_slice(&[0, 80, b'y']);
        assert_eq!(parse_udp_header(&n), Some((Dest::Name("prom".into(), 80), 11)));
        assert_eq!(parse_udp_header(&[0, 0, 1, 1]), None, "fragments");
        assert_eq!(parse_udp_header(&[0, 0, 0, 3, 200, 1]), None, "truncated");
    }
}
