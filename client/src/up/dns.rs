//! The client's DNS listener: private names from the network map, everything else forwarded to the
//! resolvers the machine had before (never to this listener itself).
//!
//! At most [`DnsOptions::max_forwards`] queries are forwarded at once (each is a task and a socket
//! for up to 3 s per upstream); beyond it queries are dropped and counted, so a flood costs bounded
//! memory. In TUN mode only this host and its containers are answered ([`super::dns_sources`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipnet::IpNet;
use tokio::net::UdpSocket;
use tokio::sync::{watch, Semaphore};
use tunnel_core::dns::{DnsAction, PrivateZone};

use super::dns_sources::LocalSources;

/// Default for `--dns-max-forwards`.
pub const DEFAULT_MAX_FORWARDS: usize = 256;

/// The listener's limits and whom it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsOptions {
    /// Queries forwarded upstream at once; more are dropped.
    pub max_forwards: usize,
    /// Answer only this host and its containers, and sources in `allow` (TUN mode, where the
    /// listener is on the overlay address that others can route to). Off: whoever reaches the
    /// listener (userspace mode, where the operator chose its address).
    pub local_only: bool,
    /// Networks answered besides the host and its containers (with `local_only`).
    pub allow: Vec<IpNet>,
}

impl Default for DnsOptions {
    fn default() -> Self {
        DnsOptions { max_forwards: DEFAULT_MAX_FORWARDS, local_only: false, allow: Vec::new() }
    }
}

/// What the listener turned away, for `/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct DnsStats {
    /// Queries from a source the listener does not answer.
    pub refused_source: AtomicU64,
    /// Queries dropped because as many forwards as allowed were in flight.
    pub refused_busy: AtomicU64,
    /// Forwards in flight now.
    pub forwards: AtomicU64,
}

impl DnsStats {
    /// The figures as JSON (`dns` in `/status`).
    pub fn snapshot(&self) -> tunnel_core::status::DnsStatus {
        tunnel_core::status::DnsStatus {
            refused_source: self.refused_source.load(Ordering::Relaxed),
            refused_busy: self.refused_busy.load(Ordering::Relaxed),
            forwards: self.forwards.load(Ordering::Relaxed),
        }
    }
}

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

/// Serves DNS on `listen` until the task is dropped; returns the bound address, the task and the
/// listener's counters.
pub async fn serve(
    listen: SocketAddr,
    zone: watch::Receiver<Arc<PrivateZone>>,
    upstreams: Vec<SocketAddr>,
    opts: DnsOptions,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>, Arc<DnsStats>)> {
    let sock = Arc::new(
        UdpSocket::bind(listen).await.with_context(|| format!("cannot listen for DNS on {listen}"))?,
    );
    let bound = sock.local_addr()?;
    let upstreams: Vec<SocketAddr> = upstreams.into_iter().filter(|u| *u != bound).collect();
    let stats = Arc::new(DnsStats::default());
    let forwards = Arc::new(Semaphore::new(opts.max_forwards.max(1)));
    let mut sources = opts.local_only.then(|| LocalSources::new(opts.allow.clone()));
    let counters = stats.clone();
    let task = tokio::spawn(async move {
        let stats = counters;
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else { continue };
            if let Some(s) = sources.as_mut() {
                if !s.allows(from.ip(), Instant::now()) {
                    stats.refused_source.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%from, "DNS query from a source that is not this host or its containers; dropped");
                    continue;
                }
            }
            let query = buf[..n].to_vec();
            let action = zone.borrow().answer(&query);
            match action {
                DnsAction::Reply(r) => {
                    let _ = sock.send_to(&r, from).await;
                }
                DnsAction::Drop => {}
                DnsAction::Forward => {
                    let Ok(permit) = forwards.clone().try_acquire_owned() else {
                        // As many forwards as allowed are in flight: drop, as a busy resolver does;
                        // the stub asks again.
                        stats.refused_busy.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let sock = sock.clone();
                    let upstreams = upstreams.clone();
                    let stats = stats.clone();
                    stats.forwards.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        // No upstream answered: say so at once (SERVFAIL), so the stub resolver moves
                        // on instead of waiting out its own timeout for every query.
                        let r = match forward(&query, &upstreams).await {
                            Some(r) => r,
                            None => servfail(&query),
                        };
                        let _ = sock.send_to(&r, from).await;
                        stats.forwards.fetch_sub(1, Ordering::Relaxed);
                        drop(permit);
                    });
                }
            }
        }
    });
    Ok((bound, task, stats))
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
    use super::*;

    /// A query for `name` (type A) with id `id`.
    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    }

    #[tokio::test]
    async fn forwards_in_flight_are_capped_and_the_rest_dropped() {
        // An upstream that never answers: every forward waits out its timeout.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (_zone_tx, zone) = watch::channel(Arc::new(PrivateZone::default()));
        let opts = DnsOptions { max_forwards: 3, ..DnsOptions::default() };
        let (addr, task, stats) =
            serve("127.0.0.1:0".parse().unwrap(), zone, vec![silent.local_addr().unwrap()], opts)
                .await
                .unwrap();
        let asker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for id in 0..20 {
            asker.send_to(&query(id, "example.org"), addr).await.unwrap();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while stats.refused_busy.load(Ordering::Relaxed) + stats.forwards.load(Ordering::Relaxed) < 20 {
            assert!(tokio::time::Instant::now() < deadline, "{:?}", stats.snapshot());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stats.forwards.load(Ordering::Relaxed), 3, "{:?}", stats.snapshot());
        assert_eq!(stats.refused_busy.load(Ordering::Relaxed), 17);
        task.abort();
    }

    #[tokio::test]
    async fn a_local_only_listener_answers_this_host() {
        let (_zone_tx, zone) = watch::channel(Arc::new(PrivateZone::default()));
        let opts = DnsOptions { local_only: true, ..DnsOptions::default() };
        let (addr, task, stats) = serve("127.0.0.1:0".parse().unwrap(), zone, vec![], opts).await.unwrap();
        let asker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        asker.send_to(&query(7, "example.org"), addr).await.unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(10), asker.recv(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf[..2], &7u16.to_be_bytes(), "answered (SERVFAIL: no upstream)");
        assert!(n >= 12);
        assert_eq!(stats.refused_source.load(Ordering::Relaxed), 0);
        task.abort();
    }

    #[test]
    fn servfail_answers_the_query() {
        // id 0x1234, RD, one question (a.): the answer keeps id, opcode, RD and the question.
        let q = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 1, 0, 1];
        let r = servfail(&q);
        assert_eq!(&r[..4], &[0x12, 0x34, 0x81, 0x82]);
        assert_eq!(&r[4..], &q[4..]);
    }

    #[test]
    fn reads_nameservers() {
        let conf =
            "# comment\nsearch lan\nnameserver 192.0.2.53\nnameserver 2001:db8::53\nnameserver bogus\n";
        let ns = nameservers(conf);
        assert_eq!(ns, vec!["192.0.2.53:53".parse().unwrap(), "[2001:db8::53]:53".parse().unwrap()]);
    }
}
