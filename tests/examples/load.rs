//! The load generator of `bench/load.sh`: drives one release `tunnel-server` process on loopback
//! through bounded scenarios and prints what each costs the server (admin-call latency, RSS, CPU) and
//! what its defences counted. Figures only: a busy machine prints slower figures, it does not fail.
//!
//! - setup: 20 sites, 180 clients, 20 resources and 720 grants in one Apply; every node joins once
//!   with its join secret (argon2 at the server's default cost, 4 at a time) and keeps its ticket.
//! - idle: 100 of them hold a session for 30 s: resident memory with a small fleet.
//! - relay: 3000 QUIC and 2000 TCP connections that never present a capability (one TCP in ten
//!   completes TLS), 50 per source from 100 sources, plus one source asking for 100; each reconnects
//!   when the relay closes it, so the relay sees ~1000 new connections a second.
//! - logins: raw `Control.Connect` Hellos from 500 sources, half with a wrong secret for a real node,
//!   half for unknown node ids, 128 in flight; a real node logs in once a second meanwhile.
//! - udp: 20,000 datagrams/s of garbage (random bytes, QUIC Initial and STUN look-alikes, real Binding
//!   requests) from 250 sources at the STUN and QUIC relay ports; a STUN probe every 100 ms.
//! - tickets: all 200 nodes reconnect with their tickets at once, then again 200 ms after each
//!   reconnect's first map, for the whole phase.
//!
//! An observer thread with a runtime of its own (so the load's tasks do not delay it) calls
//! `Admin.ServerInfo` every 100 ms on a held channel and once a second on a new connection, and
//! samples the server's VmRSS and /metrics. Every source address is in 127.0.0.0/8.
//!
//! `load free-ports N` prints N ports free on 127.0.0.1 for both TCP and UDP (for the script).

#![allow(clippy::unwrap_used)] // a benchmark: a panic is the report

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_stream::wrappers::ReceiverStream;
use tunnel_core::{AdminToken, KeyPin, NodeId, Secret};
use tunnel_node::{ControlConfig, ControlSession, ServerTarget, SessionError};
use tunnel_proto::v1 as pb;
use tunnel_tests::TestNode;

const SITES: usize = 20;
const CLIENTS: usize = 180;
const GRANTS_PER_CLIENT: usize = 4;
const IDLE_SESSIONS: usize = 100;
/// The server admits 4 join-secret logins from one source at once.
const JOIN_CONCURRENCY: usize = 4;
const RELAY_SOURCES: u8 = 100;
const QUIC_PER_SOURCE: usize = 30;
const TCP_PER_SOURCE: usize = 20;
/// QUIC and TCP connections each from one more source: 100 against the relay's cap of 64.
const GREEDY: usize = 50;
const TLS_EVERY: usize = 10;
/// New connections are spread over this long, not sent in one instant.
const RAMP: Duration = Duration::from_secs(2);
const LOGIN_SOURCES: usize = 500;
const LOGIN_WORKERS: usize = 128;
const UDP_SOURCES: u8 = 250;
const UDP_RATE: usize = 20_000;
const STORM_PAUSE: Duration = Duration::from_millis(200);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
struct Args {
    data_dir: PathBuf,
    pid: u32,
    metrics: SocketAddr,
    stun: SocketAddr,
    relay_udp: SocketAddr,
    relay_tcp: SocketAddr,
    secs: u64,
    idle_secs: u64,
    /// Scenarios to run (`--only relay,udp`); all when empty. Those after setup need its fleet.
    only: Vec<String>,
    /// `--relay quic|tcp|both`: which relay connections the relay scenario opens.
    relay_mix: String,
}

fn parse_args() -> Result<Args> {
    let mut m = BTreeMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let key = k.strip_prefix("--").with_context(|| format!("unexpected argument {k}"))?.to_owned();
        let v = it.next().with_context(|| format!("--{key} needs a value"))?;
        m.insert(key, v);
    }
    let get = |k: &str| m.get(k).cloned().with_context(|| format!("missing --{k}"));
    let num = |k: &str, d: u64| m.get(k).map_or(Ok(d), |v| v.parse()).with_context(|| format!("--{k}"));
    Ok(Args {
        data_dir: get("data-dir")?.into(),
        pid: get("server-pid")?.parse()?,
        metrics: get("metrics")?.parse()?,
        stun: get("stun")?.parse()?,
        relay_udp: get("relay-udp")?.parse()?,
        relay_tcp: get("relay-tcp")?.parse()?,
        secs: num("secs", 20)?,
        idle_secs: num("idle-secs", 30)?,
        only: m.get("only").map(|v| v.split(',').map(str::to_owned).collect()).unwrap_or_default(),
        relay_mix: m.get("relay").cloned().unwrap_or_else(|| "both".into()),
    })
}

/// Ports free on 127.0.0.1 for TCP and UDP alike (held until all are found, so they differ).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let mut held = Vec::new();
    while held.len() < n {
        let t = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = t.local_addr()?.port();
        if let Ok(u) = std::net::UdpSocket::bind(("127.0.0.1", port)) {
            held.push((port, t, u));
        }
    }
    Ok(held.into_iter().map(|(p, _, _)| p).collect())
}

/// The server under test, as the load sees it.
#[derive(Debug, Clone)]
struct Server {
    args: Args,
    admin: AdminToken,
    relay_pin: KeyPin,
}

fn proc_field(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    proc_field(pid, "VmRSS:")
}

/// utime + stime in clock ticks (USER_HZ, 100 on Linux).
fn cpu_ticks(pid: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
    f.iter().sum()
}

fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
}

/// The server's /metrics, as name (with labels) -> value.
async fn metrics(addr: SocketAddr) -> Result<BTreeMap<String, f64>> {
    let mut s = timeout(Duration::from_secs(2), TcpStream::connect(addr)).await??;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n").await?;
    let mut text = String::new();
    timeout(Duration::from_secs(3), s.read_to_string(&mut text)).await??;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect())
}

fn metric(m: &BTreeMap<String, f64>, k: &str) -> u64 {
    m.get(k).copied().unwrap_or(0.0) as u64
}

/// Latencies of calls that succeeded, and the failures.
#[derive(Debug, Default, Clone)]
struct Lat {
    ok: Vec<Duration>,
    errors: u64,
    last_error: String,
}

impl Lat {
    fn record<T, E: std::fmt::Display>(&mut self, took: Duration, r: &Result<T, E>) {
        match r {
            Ok(_) => self.ok.push(took),
            Err(e) => {
                self.errors += 1;
                self.last_error = e.to_string();
            }
        }
    }

    fn pct(&self, p: f64) -> Duration {
        let mut v = self.ok.clone();
        v.sort();
        v.get(((v.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or_default()
    }

    fn summary(&self) -> String {
        let mut s = format!(
            "n={} p50 {} p99 {} max {} errors {}",
            self.ok.len(),
            ms(self.pct(0.5)),
            ms(self.pct(0.99)),
            ms(self.pct(1.0)),
            self.errors
        );
        if self.errors > 0 {
            s.push_str(&format!(" (last: {})", one_line(&self.last_error)));
        }
        s
    }
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1e3;
    if v >= 100.0 {
        format!("{v:.0}ms")
    } else {
        format!("{v:.1}ms")
    }
}

fn mb(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

fn one_line(s: &str) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() > 90 {
        format!("{}...", s.chars().take(90).collect::<String>())
    } else {
        s
    }
}

type Figures = Vec<(String, String)>;

/// What the observer saw during one phase.
#[derive(Debug, Default)]
struct Observed {
    held: Lat,
    fresh: Lat,
    rss_peak: u64,
    /// (seconds into the phase, tunnel_relay_connections, tunnel_server_sessions)
    timeline: Vec<(f64, u64, u64)>,
}

/// Calls ServerInfo every `every` until `stop`: on one held channel, or on a new connection each time.
async fn admin_probe(token: AdminToken, every: Duration, fresh: bool, stop: Arc<AtomicBool>) -> Lat {
    let mut lat = Lat::default();
    let mut held: Option<tunnelctl::admin::Client> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Relaxed) {
        tick.tick().await;
        let t0 = Instant::now();
        let r: Result<()> = timeout(CALL_TIMEOUT, async {
            let mut c = match held.take() {
                Some(c) if !fresh => c,
                _ => tunnelctl::admin::connect(&token).await?,
            };
            c.server_info(pb::ServerInfoRequest {}).await.map_err(tunnelctl::admin::status)?;
            held = Some(c);
            Ok(())
        })
        .await
        .unwrap_or_else(|_| Err(anyhow!("no answer within {CALL_TIMEOUT:?}")));
        lat.record(t0.elapsed(), &r);
    }
    lat
}

struct Observer {
    stop_probes: Arc<AtomicBool>,
    stop_all: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Observed>,
}

fn observe(srv: &Server) -> Observer {
    let stop_probes = Arc::new(AtomicBool::new(false));
    let stop_all = Arc::new(AtomicBool::new(false));
    let (token, pid, maddr) = (srv.admin.clone(), srv.args.pid, srv.args.metrics);
    let (sp, sa) = (stop_probes.clone(), stop_all.clone());
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let held = admin_probe(token.clone(), Duration::from_millis(100), false, sp.clone());
            let fresh = admin_probe(token, Duration::from_secs(1), true, sp);
            let sample = async move {
                let t0 = Instant::now();
                let (mut peak, mut timeline) = (0, Vec::new());
                let mut n = 0u64;
                while !sa.load(Relaxed) {
                    peak = peak.max(rss_kb(pid));
                    if n.is_multiple_of(2) {
                        if let Ok(m) = metrics(maddr).await {
                            let (r, s) = (
                                metric(&m, "tunnel_relay_connections"),
                                metric(&m, "tunnel_server_sessions"),
                            );
                            timeline.push((t0.elapsed().as_secs_f64(), r, s));
                        }
                    }
                    n += 1;
                    sleep(Duration::from_millis(250)).await;
                }
                (peak, timeline)
            };
            let (held, fresh, (rss_peak, timeline)) = tokio::join!(held, fresh, sample);
            Observed { held, fresh, rss_peak, timeline }
        })
    });
    Observer { stop_probes, stop_all, thread }
}

/// One phase's figures, for its block and the closing table.
#[derive(Debug)]
struct Report {
    name: String,
    secs: f64,
    obs: Observed,
    rss_before: u64,
    rss_after: u64,
    cpu_pct: f64,
    gen_cpu_pct: f64,
    figures: Figures,
}

/// Runs `load` under observation, waits (2-10 s) for relay connections and sessions to drain, then
/// prints the phase's block.
async fn phase(srv: &Server, name: &str, load: impl Future<Output = Result<Figures>>) -> Result<Report> {
    let pid = srv.args.pid;
    println!("\n== {name} ==");
    let (rss_before, cpu0, gen0) = (rss_kb(pid), cpu_ticks(&pid.to_string()), cpu_ticks("self"));
    let t0 = Instant::now();
    let obs = observe(srv);
    let result = load.await;
    let secs = t0.elapsed().as_secs_f64();
    let cpu_pct = (cpu_ticks(&pid.to_string()) - cpu0) as f64 / secs;
    let gen_cpu_pct = (cpu_ticks("self") - gen0) as f64 / secs;
    obs.stop_probes.store(true, Relaxed);
    let settle = Instant::now();
    loop {
        let drained = metrics(srv.args.metrics).await.is_ok_and(|m| {
            metric(&m, "tunnel_relay_connections") == 0 && metric(&m, "tunnel_server_sessions") == 0
        });
        if (drained && settle.elapsed() >= Duration::from_secs(2))
            || settle.elapsed() > Duration::from_secs(10)
        {
            break;
        }
        sleep(Duration::from_millis(250)).await;
    }
    let rss_after = rss_kb(pid);
    obs.stop_all.store(true, Relaxed);
    let obs = obs.thread.join().map_err(|_| anyhow!("observer thread panicked"))?;
    let figures = match result {
        Ok(f) => f,
        Err(e) => vec![("load failed".into(), format!("{e:#}"))],
    };
    let r = Report { name: name.into(), secs, obs, rss_before, rss_after, cpu_pct, gen_cpu_pct, figures };
    print_report(&r);
    if !alive(pid) {
        anyhow::bail!("the server (pid {pid}) is gone after {name}");
    }
    Ok(r)
}

fn print_report(r: &Report) {
    let o = &r.obs;
    println!("  duration                      {:.1}s (then drained)", r.secs);
    println!("  admin ServerInfo, held        {}", o.held.summary());
    println!("  admin ServerInfo, new conn    {}", o.fresh.summary());
    println!(
        "  server RSS MB                 before {}  peak {}  after {}",
        mb(r.rss_before),
        mb(o.rss_peak.max(r.rss_before).max(r.rss_after)),
        mb(r.rss_after)
    );
    println!(
        "  CPU, % of one core            server {:.0}%  load generator {:.0}%",
        r.cpu_pct, r.gen_cpu_pct
    );
    for (k, v) in &r.figures {
        println!("  {k:<29} {v}");
    }
    if o.timeline.iter().any(|t| t.1 > 0) {
        let mut line = String::new();
        let mut next = 0.0;
        for (t, conns, _) in &o.timeline {
            if *t >= next {
                line.push_str(&format!(" {t:.0}s:{conns}"));
                next = t + 2.0;
            }
        }
        let peak = o.timeline.iter().map(|t| t.1).max().unwrap_or(0);
        println!("  relay connections open (peak {peak}):{line}");
    }
}

/// A node of the fleet, with the ticket of its last login.
#[derive(Debug, Clone)]
struct Member {
    cfg: ControlConfig,
    ticket: Vec<u8>,
}

/// Logs in (with `ticket`, else the join secret) and waits for the first map.
async fn login(cfg: &ControlConfig, ticket: Option<&[u8]>) -> Result<ControlSession, SessionError> {
    let mut s = ControlSession::open(cfg, ticket).await?;
    timeout(Duration::from_secs(30), s.next_map())
        .await
        .map_err(|_| SessionError::Lost("no map within 30s".into()))??;
    Ok(s)
}

async fn setup(srv: &Server, fleet: &mut Vec<Member>) -> Result<Figures> {
    let mut admin = tunnelctl::admin::connect(&srv.admin).await?;
    let site = |i: usize| format!("site-{i:02}");
    let svc = |i: usize| format!("svc-{i:02}");
    let req = pb::ApplyRequest {
        sites: (0..SITES).map(|i| pb::SiteSpec { name: site(i) }).collect(),
        clients: (0..CLIENTS).map(|i| pb::ClientSpec { name: format!("client-{i:03}") }).collect(),
        resources: (0..SITES)
            .map(|i| pb::ResourceSpec {
                name: svc(i),
                site: site(i),
                target: format!("127.0.0.1:{}", 8000 + i),
                ..Default::default()
            })
            .collect(),
        grants: (0..CLIENTS)
            .flat_map(|c| {
                (0..GRANTS_PER_CLIENT).map(move |k| pb::GrantSpec {
                    client: format!("client-{c:03}"),
                    resource: format!("svc-{:02}", (c + k * SITES / GRANTS_PER_CLIENT) % SITES),
                })
            })
            .collect(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let reply = admin.apply(req).await.map_err(tunnelctl::admin::status)?.into_inner();
    let apply_took = t0.elapsed();
    let mut rng = StdRng::from_entropy();
    let cfgs: Vec<ControlConfig> = reply
        .tokens
        .iter()
        .map(|t| {
            let mut key = [0u8; 32];
            rng.fill_bytes(&mut key);
            TestNode::keyed(&t.join_token, key)
        })
        .collect();
    let t0 = Instant::now();
    let joins: Vec<_> = futures::stream::iter(cfgs)
        .map(|cfg| async move {
            let t = Instant::now();
            let r = login(&cfg, None).await.map(|s| s.welcome.session_ticket);
            (cfg, r, t.elapsed())
        })
        .buffer_unordered(JOIN_CONCURRENCY)
        .collect()
        .await;
    let mut lat = Lat::default();
    for (cfg, r, took) in joins {
        lat.record(took, &r);
        if let Ok(ticket) = r {
            fleet.push(Member { cfg, ticket });
        }
    }
    Ok(vec![
        ("Apply (200 nodes, 720 grants)".into(), ms(apply_took)),
        (
            "joins with the secret".into(),
            format!("{} in {:.1}s, each {}", fleet.len(), t0.elapsed().as_secs_f64(), lat.summary()),
        ),
    ])
}

async fn idle(srv: &Server, fleet: &[Member]) -> Result<Figures> {
    let opened = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(16));
    let tasks: Vec<_> = fleet
        .iter()
        .take(IDLE_SESSIONS)
        .cloned()
        .map(|m| {
            let (opened, gate) = (opened.clone(), gate.clone());
            tokio::spawn(async move {
                let permit = gate.acquire_owned().await;
                let Ok(mut s) = login(&m.cfg, Some(&m.ticket)).await else { return };
                drop(permit);
                opened.fetch_add(1, Relaxed);
                // Read what the server sends (deltas as peers come and go) until aborted.
                while s.next_map().await.is_ok() {}
            })
        })
        .collect();
    let t0 = Instant::now();
    while opened.load(Relaxed) < IDLE_SESSIONS.min(fleet.len()) && t0.elapsed() < Duration::from_secs(60) {
        sleep(Duration::from_millis(50)).await;
    }
    let open_took = t0.elapsed();
    let rss_open = rss_kb(srv.args.pid);
    sleep(Duration::from_secs(srv.args.idle_secs)).await;
    let m = metrics(srv.args.metrics).await?;
    let rss_held = rss_kb(srv.args.pid);
    let hwm = proc_field(srv.args.pid, "VmHWM:");
    let mut ended = 0;
    for t in tasks {
        if t.is_finished() {
            ended += 1;
        }
        t.abort();
    }
    Ok(vec![
        (
            "sessions opened (tickets)".into(),
            format!("{} in {:.1}s", opened.load(Relaxed), open_took.as_secs_f64()),
        ),
        (
            "sessions open at the end".into(),
            format!("{} (server gauge), {ended} ended early", metric(&m, "tunnel_server_sessions")),
        ),
        (
            "RSS with sessions held".into(),
            format!(
                "{} MB at open, {} MB after {} s (goal < 64 MB)",
                mb(rss_open),
                mb(rss_held),
                srv.args.idle_secs
            ),
        ),
        ("server VmHWM so far".into(), format!("{} MB", mb(hwm))),
    ])
}

/// Outcomes of one kind of relay connection.
#[derive(Debug, Default)]
struct Conns {
    attempts: AtomicU64,
    established: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    closed_by_relay: AtomicU64,
    tls_done: AtomicU64,
    lifetimes: Mutex<Lat>,
    last_error: Mutex<String>,
}

impl Conns {
    fn fail(&self, e: impl std::fmt::Display) {
        self.failed.fetch_add(1, Relaxed);
        *self.last_error.lock().unwrap() = e.to_string();
    }

    fn summary(&self) -> String {
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

async fn quic_slot(ep: quinn::Endpoint, to: SocketAddr, start: Instant, deadline: Instant, c: Arc<Conns>) {
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
async fn tls_handshake(
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

async fn tcp_slot(
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

async fn relay(srv: &Server) -> Result<Figures> {
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

/// A local TCP forwarder that sends each connection on to `to` from the next of `sources`: the
/// server sees many sources although `tunnel_node::connect` cannot bind one.
async fn source_proxy(
    to: SocketAddr,
    sources: Vec<Ipv4Addr>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(async move {
        let mut next = 0usize;
        loop {
            let Ok((mut inbound, _)) = l.accept().await else { continue };
            let from = sources[next % sources.len()];
            next += 1;
            tokio::spawn(async move {
                let s = TcpSocket::new_v4()?;
                s.bind((from, 0).into())?;
                let mut out = s.connect(to).await?;
                let _ = (out.set_nodelay(true), inbound.set_nodelay(true));
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                Ok::<(), std::io::Error>(())
            });
        }
    });
    Ok((addr, task))
}

/// Sends `hello` on a raw Connect stream through `server` and returns the first answer.
async fn raw_hello(
    server: SocketAddr,
    pin: KeyPin,
    hello: pb::Hello,
) -> Result<pb::ServerMessage, tonic::Status> {
    let target = ServerTarget { server: server.to_string(), pin };
    let channel =
        tunnel_node::connect(&target).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = pb::control_client::ControlClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let _ = tx.send(pb::NodeMessage { msg: Some(pb::node_message::Msg::Hello(hello)) }).await;
    let mut inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
    let first = inbound.message().await?;
    drop(tx);
    first.ok_or_else(|| tonic::Status::unknown("stream closed"))
}

fn outcome(r: &Result<pb::ServerMessage, tonic::Status>) -> String {
    let Err(s) = r else { return "ACCEPTED (should not happen)".into() };
    let m = s.message();
    let why = if m.contains("wrong secret") {
        "wrong secret (argon2 ran)"
    } else if m.contains("not known") {
        "unknown node"
    } else if m.contains("logins from") {
        "source budget spent"
    } else if m.contains("in progress") {
        "in-flight cap"
    } else {
        return format!("{:?}: {}", s.code(), one_line(m));
    };
    format!("{:?}: {why}", s.code())
}

async fn logins(srv: &Server, fleet: &[Member]) -> Result<Figures> {
    let sources =
        (0..LOGIN_SOURCES).map(|i| Ipv4Addr::new(127, 2, (i / 250) as u8, (i % 250 + 1) as u8)).collect();
    let grpc: SocketAddr = srv.admin.server.parse().context("the admin token's server address")?;
    let (proxy, proxy_task) = source_proxy(grpc, sources).await?;
    let deadline = Instant::now() + Duration::from_secs(srv.args.secs);
    let ids: Arc<Vec<String>> = Arc::new(fleet.iter().map(|m| m.cfg.token.node_id.to_string()).collect());
    let tally: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let lat: Arc<Mutex<Lat>> = Arc::default();
    let pin = srv.admin.pin;
    let workers: Vec<_> = (0..LOGIN_WORKERS)
        .map(|w| {
            let (ids, tally, lat) = (ids.clone(), tally.clone(), lat.clone());
            tokio::spawn(async move {
                let mut rng = StdRng::from_entropy();
                let mut n = w;
                while Instant::now() < deadline {
                    n += 1;
                    let node_id = if n % 2 == 0 && !ids.is_empty() {
                        ids[rng.gen_range(0..ids.len())].clone()
                    } else {
                        NodeId::from_random(rng.gen()).to_string()
                    };
                    let hello = pb::Hello {
                        node_id,
                        secret: Secret::from_random(rng.gen()).expose().to_owned(),
                        public_key: rng.gen::<[u8; 32]>().to_vec(),
                        version: "load".into(),
                        ..Default::default()
                    };
                    let t0 = Instant::now();
                    let r = timeout(CALL_TIMEOUT, raw_hello(proxy, pin, hello))
                        .await
                        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("bench: no answer in 10s")));
                    lat.lock().unwrap().ok.push(t0.elapsed());
                    *tally.lock().unwrap().entry(outcome(&r)).or_default() += 1;
                }
            })
        })
        .collect();
    // A real node logs in once a second meanwhile, alternately with its ticket and its join secret.
    let mut real = [Lat::default(), Lat::default()];
    let mut i = 0;
    while Instant::now() < deadline {
        let m = &fleet[IDLE_SESSIONS + i % (fleet.len() - IDLE_SESSIONS).max(1)];
        let with_ticket = i % 2 == 0;
        let t0 = Instant::now();
        let r = login(&m.cfg, with_ticket.then_some(m.ticket.as_slice())).await;
        real[usize::from(!with_ticket)].record(t0.elapsed(), &r);
        i += 1;
        sleep(Duration::from_secs(1)).await;
    }
    for w in workers {
        let _ = w.await;
    }
    proxy_task.abort();
    let tally = tally.lock().unwrap();
    let total: u64 = tally.values().sum();
    let mut figures = vec![(
        format!("bad Hellos, {LOGIN_SOURCES} sources"),
        format!("{total} ({:.0}/s), answered in {}", total as f64 / srv.args.secs as f64, {
            let l = lat.lock().unwrap();
            format!("p50 {} p99 {} max {}", ms(l.pct(0.5)), ms(l.pct(0.99)), ms(l.pct(1.0)))
        }),
    )];
    for (k, v) in tally.iter() {
        figures.push((format!("  {k}"), v.to_string()));
    }
    figures.push(("real node, ticket login".into(), real[0].summary()));
    figures.push(("real node, secret login".into(), real[1].summary()));
    let db = srv.args.data_dir.join("tunnel.db");
    let size = |p: PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
    let wal = size(db.with_extension("db-wal"));
    figures
        .push(("database now".into(), format!("{} MB (+ WAL {} MB)", mb(size(db) / 1024), mb(wal / 1024))));
    Ok(figures)
}

fn garbage(rng: &mut StdRng, to_stun: bool) -> Vec<u8> {
    let kind = rng.gen_range(0..10);
    if to_stun && kind < 2 {
        // A real Binding request: answered, up to 20 a second per source.
        return tunnel_core::stun::request(rng.gen());
    }
    if to_stun && kind < 6 {
        // STUN header and magic cookie, nonsense after.
        let mut p = vec![0u8; rng.gen_range(20..200)];
        rng.fill_bytes(&mut p);
        p[0] &= 0x3f;
        p[4..8].copy_from_slice(&tunnel_core::stun::MAGIC_COOKIE.to_be_bytes());
        return p;
    }
    if !to_stun && kind < 5 {
        // A QUIC v1 Initial that parses and fails decryption: the relay derives keys and tries.
        let mut p = vec![0u8; 1200];
        rng.fill_bytes(&mut p);
        p[0] = 0xc0 | (p[0] & 0x0f);
        p[1..5].copy_from_slice(&1u32.to_be_bytes());
        p[5] = 8;
        p[14] = 8;
        p[23] = 0;
        let rest = (1200 - 26) as u16;
        p[24..26].copy_from_slice(&(0x4000 | rest).to_be_bytes());
        return p;
    }
    let mut p = vec![0u8; rng.gen_range(1..1400)];
    rng.fill_bytes(&mut p);
    p
}

async fn udp(srv: &Server) -> Result<Figures> {
    let mut socks = Vec::new();
    for i in 0..UDP_SOURCES {
        socks.push(UdpSocket::bind((Ipv4Addr::new(127, 3, 0, i + 1), 0)).await?);
    }
    let before = metrics(srv.args.metrics).await?;
    let deadline = Instant::now() + Duration::from_secs(srv.args.secs);
    let (stun, relay) = (srv.args.stun, srv.args.relay_udp);
    let flood = async move {
        let mut rng = StdRng::from_entropy();
        let (mut sent, mut dropped) = (0u64, 0u64);
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        while Instant::now() < deadline {
            tick.tick().await;
            for k in 0..UDP_RATE / 100 {
                let to_stun = k % 2 == 0;
                let p = garbage(&mut rng, to_stun);
                let s = &socks[rng.gen_range(0..socks.len())];
                match s.try_send_to(&p, if to_stun { stun } else { relay }) {
                    Ok(_) => sent += 1,
                    Err(_) => dropped += 1,
                }
            }
        }
        (sent, dropped)
    };
    let probe = async move {
        let s = UdpSocket::bind("127.0.0.1:0").await?;
        let mut lat = Lat::default();
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            let txid: [u8; 12] = rand::random();
            let t0 = Instant::now();
            s.send_to(&tunnel_core::stun::request(txid), stun).await?;
            let r = timeout(Duration::from_secs(1), async {
                loop {
                    let (n, _) = s.recv_from(&mut buf).await?;
                    if tunnel_core::stun::parse_response(&buf[..n]).is_some_and(|r| r.txid == txid) {
                        return Ok::<_, std::io::Error>(());
                    }
                }
            })
            .await
            .map_err(|_| anyhow!("no answer in 1s"))
            .and_then(|r| r.map_err(anyhow::Error::from));
            lat.record(t0.elapsed(), &r);
            sleep(Duration::from_millis(100)).await;
        }
        Ok::<_, anyhow::Error>(lat)
    };
    let ((sent, dropped), stun_probe) = tokio::join!(flood, probe);
    let after = metrics(srv.args.metrics).await?;
    let d = |k: &str| metric(&after, k).saturating_sub(metric(&before, k));
    let stun_out = |o: &str| d(&format!("tunnel_stun_requests_total{{outcome=\"{o}\"}}"));
    Ok(vec![
        (
            format!("datagrams, {UDP_SOURCES} sources"),
            format!(
                "{sent} sent ({:.0}/s), {dropped} not sent (socket full)",
                sent as f64 / srv.args.secs as f64
            ),
        ),
        (
            "STUN responder (server)".into(),
            format!(
                "answered {} rate_limited {} ignored {}",
                stun_out("answered"),
                stun_out("rate_limited"),
                stun_out("ignored")
            ),
        ),
        ("STUN probe, every 100 ms".into(), stun_probe?.summary()),
        (
            "relay (server)".into(),
            format!(
                "connections now {}, refused per_source +{} total +{}",
                metric(&after, "tunnel_relay_connections"),
                d("tunnel_relay_connections_refused_total{reason=\"per_source\"}"),
                d("tunnel_relay_connections_refused_total{reason=\"total\"}")
            ),
        ),
    ])
}

async fn tickets(srv: &Server, fleet: &mut [Member]) -> Result<Figures> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(srv.args.secs);
    #[derive(Default)]
    struct Storm {
        ok: Lat,
        first_wave: Vec<Duration>,
        refused_node: u64,
        other: BTreeMap<String, u64>,
    }
    let storm: Arc<Mutex<Storm>> = Arc::default();
    let tasks: Vec<_> = fleet
        .iter()
        .cloned()
        .map(|mut m| {
            let storm = storm.clone();
            tokio::spawn(async move {
                let mut first = true;
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    let r = login(&m.cfg, Some(&m.ticket)).await;
                    {
                        let mut st = storm.lock().unwrap();
                        match r {
                            Ok(s) => {
                                st.ok.ok.push(t0.elapsed());
                                if first {
                                    st.first_wave.push(start.elapsed());
                                }
                                m.ticket = s.welcome.session_ticket.clone();
                            }
                            Err(e) if e.to_string().contains("too many logins for node") => {
                                st.refused_node += 1
                            }
                            Err(e) => *st.other.entry(one_line(&e.to_string())).or_default() += 1,
                        }
                    }
                    first = false;
                    sleep(STORM_PAUSE).await;
                }
                m
            })
        })
        .collect();
    for (slot, task) in fleet.iter_mut().zip(tasks) {
        *slot = task.await?;
    }
    let st = storm.lock().unwrap();
    let mut wave = st.first_wave.clone();
    wave.sort();
    let mut figures = vec![
        (
            "first wave (all at once)".into(),
            format!(
                "{}/{} had a map in {}",
                wave.len(),
                fleet.len(),
                wave.last().map_or("-".into(), |d| ms(*d))
            ),
        ),
        (
            "reconnects with a map".into(),
            format!(
                "{} ({:.0}/s), each {}",
                st.ok.ok.len(),
                st.ok.ok.len() as f64 / srv.args.secs as f64,
                st.ok.summary()
            ),
        ),
        ("refused: per-node budget".into(), st.refused_node.to_string()),
    ];
    for (k, v) in &st.other {
        figures.push((format!("other failure ({v})"), k.clone()));
    }
    Ok(figures)
}

fn print_table(reports: &[Report]) {
    println!("\n== summary: admin ServerInfo on a held channel (ms), server RSS (MB), server CPU ==");
    println!(
        "{:<10} {:>7} {:>7} {:>7} {:>5} | {:>7} {:>7} {:>5} | {:>7} {:>7} {:>7} | {:>5}",
        "phase", "p50", "p99", "max", "err", "new p50", "new max", "err", "before", "peak", "after", "cpu%"
    );
    for r in reports {
        let (h, f) = (&r.obs.held, &r.obs.fresh);
        let v = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
        println!(
            "{:<10} {:>7} {:>7} {:>7} {:>5} | {:>7} {:>7} {:>5} | {:>7} {:>7} {:>7} | {:>5.0}",
            r.name.split(':').next().unwrap_or(""),
            v(h.pct(0.5)),
            v(h.pct(0.99)),
            v(h.pct(1.0)),
            h.errors,
            v(f.pct(0.5)),
            v(f.pct(1.0)),
            f.errors,
            mb(r.rss_before),
            mb(r.obs.rss_peak.max(r.rss_before).max(r.rss_after)),
            mb(r.rss_after),
            r.cpu_pct
        );
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("free-ports") {
        let n = argv.get(2).map_or(Ok(6), |v| v.parse())?;
        let ports: Vec<String> = free_ports(n)?.iter().map(u16::to_string).collect();
        println!("{}", ports.join(" "));
        return Ok(());
    }
    let args = parse_args()?;
    let token = std::fs::read_to_string(args.data_dir.join("admin.token")).context("admin.token")?;
    let admin = AdminToken::parse(&token).map_err(|e| anyhow!("admin token: {e}"))?;
    let bundle = tunnel_server::relay::RelayBundle::load(&args.data_dir.join("relay.bundle"))?;
    let srv = Server { relay_pin: bundle.pin()?, admin, args };
    let secs = srv.args.secs;
    println!(
        "tunnel-server pid {} on {}: RSS {} MB fresh; {secs} s per scenario; {} cores",
        srv.args.pid,
        srv.admin.server,
        mb(rss_kb(srv.args.pid)),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let want = |s: &str| srv.args.only.is_empty() || srv.args.only.iter().any(|o| o == s);
    let mut fleet = Vec::new();
    let mut reports = Vec::new();
    if ["setup", "idle", "logins", "tickets"].iter().any(|s| want(s)) {
        reports.push(phase(&srv, "setup: Apply 200 nodes, each joins once", setup(&srv, &mut fleet)).await?);
        if fleet.len() <= IDLE_SESSIONS {
            anyhow::bail!("only {} nodes joined; the rest needs more than {IDLE_SESSIONS}", fleet.len());
        }
    }
    if want("idle") {
        let name = format!("idle: {IDLE_SESSIONS} sessions held {} s", srv.args.idle_secs);
        reports.push(phase(&srv, &name, idle(&srv, &fleet)).await?);
    }
    if want("relay") {
        let mix = srv.args.relay_mix.as_str();
        let (q, t) = (usize::from(mix != "tcp"), usize::from(mix != "quic"));
        let name = format!(
            "relay: {} QUIC + {} TCP idle connections, reconnecting, {secs} s",
            q * usize::from(RELAY_SOURCES) * QUIC_PER_SOURCE,
            t * usize::from(RELAY_SOURCES) * TCP_PER_SOURCE
        );
        reports.push(phase(&srv, &name, relay(&srv)).await?);
    }
    if want("logins") {
        let name = format!("logins: failed-login flood from {LOGIN_SOURCES} sources, {secs} s");
        reports.push(phase(&srv, &name, logins(&srv, &fleet)).await?);
    }
    if want("udp") {
        let name = format!("udp: {UDP_RATE} garbage datagrams/s at STUN and QUIC relay, {secs} s");
        reports.push(phase(&srv, &name, udp(&srv)).await?);
    }
    if want("tickets") {
        let name = format!("tickets: {} nodes reconnecting with tickets, {secs} s", fleet.len());
        reports.push(phase(&srv, &name, tickets(&srv, &mut fleet)).await?);
    }
    print_table(&reports);
    Ok(())
}
