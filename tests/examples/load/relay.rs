//! Relay connections that never present a capability, QUIC and TCP, from many sources.

use super::*;

/// Outcomes of one kind of relay connection.
#[derive(Debug, Default)]
pub(crate) struct Conns {
    pub(crate) attempts: AtomicU64,
    pub(crate) established: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) closed_by_relay: AtomicU64,
    pub(crate) tls_done: AtomicU64,
    pub(crate) lifetimes: Mutex<Lat>,
    pub(crate) last_error: Mutex<String>,
}

impl Conns {
    pub(crate) fn fail(&self, e: impl std::fmt::Display) {
        self.failed.fetch_add(1, Relaxed);
        *self.last_error.lock().unwrap() = e.to_string();
    }

    pub(crate) fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Relaxed);
        let life = self.lifetimes.lock().unwrap();
        let mut s = format!(
            "attempts {} open {} refused {} failed {} closed by relay {} (after p50 {} max {})",
            g(&self.attempts),
            g(&self.established),
            g(&self.refused),
            g(&self.failed),
            g(&self.closed_by_relay),
            ms(life.pct(0.5)),
            ms(life.pct(1.0)),
        );
        if g(&self.tls_done) > 0 {
            s.push_str(&format!(", TLS done {}", g(&self.tls_done)));
        }
        let last = self.last_error.lock().unwrap();
        if !last.is_empty() {
            s.push_str(&format!(" [last failure: {}]", one_line(&last)));
        }
        s
    }
}

pub(crate) async fn quic_slot(
    ep: quinn::Endpoint,
    to: SocketAddr,
    start: Instant,
    deadline: Instant,
    c: Arc<Conns>,
) {
    sleep_until(start).await;
    while Instant::now() < deadline {
        c.attempts.fetch_add(1, Relaxed);
        let connecting = match ep.connect(to, "tunnel-relay") {
            Ok(x) => x,
            Err(e) => return c.fail(e),
        };
        match timeout(CALL_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => {
                c.established.fetch_add(1, Relaxed);
                let opened = Instant::now();
                tokio::select! {
                    _ = conn.closed() => {
                        c.closed_by_relay.fetch_add(1, Relaxed);
                        c.lifetimes.lock().unwrap().ok.push(opened.elapsed());
                    }
                    _ = sleep_until(deadline) => conn.close(0u32.into(), b"bench over"),
                }
            }
            Ok(Err(e)) if e.to_string().contains("refused") => {
                c.refused.fetch_add(1, Relaxed);
                sleep(Duration::from_millis(500)).await;
            }
            Ok(Err(e)) => c.fail(e),
            Err(_) => c.fail("QUIC handshake timed out"),
        }
    }
}

/// Drives a TLS 1.3 client handshake over `tcp` by hand (this crate has rustls, not tokio-rustls).
pub(crate) async fn tls_handshake(
    tcp: &mut TcpStream,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<rustls::ClientConnection> {
    let name = rustls::pki_types::ServerName::try_from("tunnel-relay")?;
    let mut conn = rustls::ClientConnection::new(cfg, name)?;
    let mut buf = vec![0u8; 16 << 10];
    loop {
        while conn.wants_write() {
            let mut out = Vec::new();
            conn.write_tls(&mut out)?;
            tcp.write_all(&out).await?;
        }
        if !conn.is_handshaking() {
            return Ok(conn);
        }
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            anyhow::bail!("the relay closed the connection during TLS");
        }
        let mut rd = &buf[..n];
        while !rd.is_empty() {
            conn.read_tls(&mut rd)?;
            conn.process_new_packets()?;
        }
    }
}

pub(crate) async fn tcp_slot(
    from: Ipv4Addr,
    to: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    start: Instant,
    deadline: Instant,
    c: Arc<Conns>,
) {
    sleep_until(start).await;
    while Instant::now() < deadline {
        c.attempts.fetch_add(1, Relaxed);
        let connect = async {
            let s = TcpSocket::new_v4()?;
            s.bind((from, 0).into())?;
            s.connect(to).await
        };
        let mut tcp = match timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                c.fail(e);
                sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(_) => {
                c.fail("TCP connect timed out");
                continue;
            }
        };
        let opened = Instant::now();
        let hold = async {
            if let Some(cfg) = &tls {
                let _conn = tls_handshake(&mut tcp, cfg.clone()).await?;
                c.tls_done.fetch_add(1, Relaxed);
            }
            let mut b = [0u8; 512];
            while tcp.read(&mut b).await? > 0 {}
            Ok::<(), anyhow::Error>(())
        };
        tokio::select! {
            _ = hold => {
                // The relay drops a connection over its caps at once; one it admitted lives ~5 s.
                if opened.elapsed() < Duration::from_secs(1) {
                    c.refused.fetch_add(1, Relaxed);
                    sleep(Duration::from_millis(500)).await;
                } else {
                    c.established.fetch_add(1, Relaxed);
                    c.closed_by_relay.fetch_add(1, Relaxed);
                    c.lifetimes.lock().unwrap().ok.push(opened.elapsed());
                }
            }
            _ = sleep_until(deadline) => {
                c.established.fetch_add(1, Relaxed);
                return;
            }
        }
    }
}

pub(crate) async fn relay(srv: &Server) -> Result<Figures> {
    let tls = tunnel_node::tls::pinned_client_config(srv.relay_pin, tunnel_server::relay::ALPN)
        .map_err(|e| anyhow!(e))?;
    let quic =
        quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls.clone())?));
    let tls = Arc::new(tls);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(srv.args.secs);
    let [q, t, gq, gt]: [Arc<Conns>; 4] = Default::default();
    // Per source: its address, how many QUIC and TCP connections, and where each kind counts.
    type Plan = (Ipv4Addr, usize, usize, Arc<Conns>, Arc<Conns>);
    let mix = srv.args.relay_mix.as_str();
    let (nq, nt) = (usize::from(mix != "tcp"), usize::from(mix != "quic"));
    let mut plan: Vec<Plan> = (0..RELAY_SOURCES)
        .map(|s| {
            (Ipv4Addr::new(127, 1, s, 1), nq * QUIC_PER_SOURCE, nt * TCP_PER_SOURCE, q.clone(), t.clone())
        })
        .collect();
    plan.push((Ipv4Addr::new(127, 1, 250, 1), nq * GREEDY, nt * GREEDY, gq.clone(), gt.clone()));
    let total: usize = plan.iter().map(|p| p.1 + p.2).sum();
    let (mut tasks, mut endpoints, mut slot) = (Vec::new(), Vec::new(), 0usize);
    let mut at = || {
        slot += 1;
        start + RAMP.mul_f64(slot as f64 / total as f64)
    };
    for (ip, nq, nt, qc, tc) in plan {
        let mut ep = quinn::Endpoint::client((ip, 0).into())?;
        ep.set_default_client_config(quic.clone());
        for _ in 0..nq {
            tasks.push(tokio::spawn(quic_slot(ep.clone(), srv.args.relay_udp, at(), deadline, qc.clone())));
        }
        for i in 0..nt {
            let tls = (i % TLS_EVERY == 0).then(|| tls.clone());
            tasks.push(tokio::spawn(tcp_slot(ip, srv.args.relay_tcp, tls, at(), deadline, tc.clone())));
        }
        endpoints.push(ep);
    }
    for task in tasks {
        let _ = task.await;
    }
    for ep in &endpoints {
        ep.close(0u32.into(), b"bench over");
    }
    let m = metrics(srv.args.metrics).await?;
    let refused = |r: &str| metric(&m, &format!("tunnel_relay_connections_refused_total{{reason=\"{r}\"}}"));
    Ok(vec![
        (format!("QUIC, {RELAY_SOURCES} sources x {QUIC_PER_SOURCE}"), q.summary()),
        (format!("TCP, {RELAY_SOURCES} sources x {TCP_PER_SOURCE}"), t.summary()),
        (format!("QUIC, 1 source x {GREEDY}"), gq.summary()),
        (format!("TCP, 1 source x {GREEDY}"), gt.summary()),
        (
            "relay refusals (server)".into(),
            format!(
                "per_source {} total {} no_capability {}; unregistered datagrams {}",
                refused("per_source"),
                refused("total"),
                refused("no_capability"),
                metric(&m, "tunnel_relay_refused_packets_total{reason=\"unregistered\"}")
            ),
        ),
    ])
}
