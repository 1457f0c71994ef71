//! The client's DNS listener: private names from the network map, everything else forwarded to the
//! resolvers the machine had before (never to this listener itself).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tunnel_core::dns::{DnsAction, PrivateZone};

/// Nameservers from a resolv.conf text.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter_map(|ip| ip.parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Serves DNS on `listen` until the task is dropped.
pub async fn serve(
    listen: SocketAddr,
    zone: watch::Receiver<Arc<PrivateZone>>,
    upstreams: Vec<SocketAddr>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let sock = Arc::new(
        UdpSocket::bind(listen).await.with_context(|| format!("cannot listen for DNS on {listen}"))?,
    );
    let bound = sock.local_addr()?;
    let upstreams: Vec<SocketAddr> = upstreams.into_iter().filter(|u| *u != bound).collect();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else { continue };
            let query = buf[..n].to_vec();
            let action = zone.borrow().answer(&query);
            match action {
                DnsAction::Reply(r) => {
                    let _ = sock.send_to(&r, from).await;
                }
                DnsAction::Drop => {}
                DnsAction::Forward => {
                    let sock = sock.clone();
                    let upstreams = upstreams.clone();
                    tokio::spawn(async move {
                        // No upstream answered: say so at once (SERVFAIL), so the stub resolver moves
                        // on instead of waiting out its own timeout for every query.
                        let r = match forward(&query, &upstreams).await {
                            Some(r) => r,
                            None => servfail(&query),
                        };
                        let _ = sock.send_to(&r, from).await;
                    });
                }
            }
        }
    });
    Ok((bound, task))
}

async fn forward(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for up in upstreams {
        let bind: SocketAddr =
            if up.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
        let Ok(s) = UdpSocket::bind(bind).await else { continue };
        // Connected: only the upstream's answers arrive, and an ICMP "port unreachable" (nothing
        // listens there) ends the wait at once instead of after the timeout.
        if s.connect(up).await.is_err() || s.send(query).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(3), s.recv(&mut buf)).await {
            if n >= 2 && buf[..2] == query[..2] {
                return Some(buf[..n].to_vec());
            }
        }
    }
    None
}

/// A SERVFAIL answer to `query` (its header and question, echoed).
fn servfail(query: &[u8]) -> Vec<u8> {
    let mut r = query.to_vec();
    if r.len() >= 4 {
        r[2] = (r[2] & 0x79) | 0x80; // QR, the query's opcode and RD
        r[3] = 0x82; // RA, RCODE 2 (SERVFAIL)
    }
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn servfail_answers_the_query() {
        // id 0x1234, RD, one question (a.): the answer keeps id, opcode, RD and the question.
        let q = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 1, 0, 1];
        let r = super::servfail(&q);
        assert_eq!(&r[..4], &[0x12, 0x34, 0x81, 0x82]);
        assert_eq!(&r[4..], &q[4..]);
    }

    #[test]
    fn reads_nameservers() {
        let conf =
            "# comment\nsearch lan\nnameserver 192.0.2.53\nnameserver 2001:db8::53\nnameserver bogus\n";
        let ns = super::nameservers(conf);
        assert_eq!(ns, vec!["192.0.2.53:53".parse().unwrap(), "[2001:db8::53]:53".parse().unwrap()]);
    }
}
