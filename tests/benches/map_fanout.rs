//! Map distribution benchmark (a benchmark, not a test: it prints figures and asserts nothing about
//! speed). Run it with `bench/map-fanout.sh N`.
//!
//! It starts the real `tunnel-server` binary (release build) as its own process, so the memory figure
//! is the server's alone, creates one site `hub` with resource `r0` and N-1 clients each granted `r0`,
//! connects all N nodes over TLS (one connection each), and then measures:
//!
//! 1. `add-resource` on the hub's site: the time until the affected node (the site) has it, while N
//!    nodes are connected. A new resource has no grants yet, so this touches one node whatever N is.
//! 2. The site reports new endpoints: the time until each of the N-1 clients (every one of them has
//!    the site as a peer) holds the new candidates. This is the fan-out case.
//!
//! The server runs with a cheap argon2 cost (hidden flag) because this measures map distribution,
//! not the login KDF.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::mpsc;
use tunnel_core::map::{Candidate, CandidateKind};
use tunnel_core::JoinToken;
use tunnel_node::{ControlConfig, ControlSession};

const NEW_RESOURCE: &str = "bench-new";
const NEW_ENDPOINT: &str = "198.51.100.7:51820";

struct Server {
    child: Child,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/release/deps/map_fanout-xxxx -> target/release/tunnel-server
    let p = exe.parent().and_then(|d| d.parent()).context("no target dir")?.join("tunnel-server");
    if !p.exists() {
        bail!("{} not found: build it first (bench/map-fanout.sh does)", p.display());
    }
    Ok(p)
}

async fn start_server() -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new(server_binary()?)
        .args(["--data-dir", dir.path().join("data").to_str().unwrap_or_default()])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--public-addr", "127.0.0.1"])
        .args(["--metrics-listen", "127.0.0.1:0", "--argon2-memory-kib", "64"])
        // Every node joins from 127.0.0.1 at once: lift the per-source login limits.
        .args(["--login-failure-burst", "100000", "--logins-in-flight-per-source", "64"])
        .env("TUNNEL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let token_path = dir.path().join("data/admin.token");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(t) = std::fs::read_to_string(&token_path) {
            if tunnel_tests::ctl(&["--admin-token", t.trim(), "info"]).await.is_ok() {
                return Ok(Server { child, admin: t.trim().to_owned(), _dir: dir });
            }
        }
        if Instant::now() > deadline {
            bail!("server did not come up");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[derive(Debug)]
enum Seen {
    Resource(Instant),
    Endpoint(Instant),
}

async fn run(n: usize) -> Result<()> {
    let server = start_server().await?;
    let admin = server.admin.clone();
    let ctl = move |args: Vec<String>| {
        let admin = admin.clone();
        async move {
            let mut full = vec!["--admin-token".to_string(), admin];
            full.extend(args);
            let refs: Vec<&str> = full.iter().map(String::as_str).collect();
            tunnel_tests::ctl(&refs).await
        }
    };
    let t = Instant::now();
    let hub_token = ctl(vec!["site".into(), "add".into(), "hub".into()]).await?.trim().to_owned();
    ctl(["add-resource", "--site", "hub", "--name", "r0", "--target", "127.0.0.1:9"]
        .map(String::from)
        .to_vec())
    .await?;
    let mut tokens = vec![hub_token];
    // Create clients and grants with some concurrency (each is one admin call).
    let (tok_tx, mut tok_rx) = mpsc::channel(1024);
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    for i in 1..n {
        let ctl = ctl.clone();
        let tok_tx = tok_tx.clone();
        let sem = sem.clone();
        tokio::spawn(async move {
            let _p = sem.acquire().await;
            let name = format!("c{i}");
            let tok = ctl(vec!["client".into(), "add".into(), name.clone()]).await;
            let g = ctl(["grant", "--client", &name, "--resource", "r0"].map(String::from).to_vec()).await;
            let _ = tok_tx.send(tok.and_then(|t| g.map(|_| t.trim().to_owned()))).await;
        });
    }
    drop(tok_tx);
    while let Some(t) = tok_rx.recv().await {
        tokens.push(t?);
    }
    println!("setup: {} nodes and {} grants created in {:.1} s", n, n - 1, t.elapsed().as_secs_f64());

    // Connect every node.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(usize, Seen)>();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<()>>();
    let (hub_cmd_tx, mut hub_cmd_rx) = mpsc::channel::<Vec<Candidate>>(1);
    let t = Instant::now();
    let connect_sem = Arc::new(tokio::sync::Semaphore::new(64));
    for (i, tok) in tokens.iter().enumerate() {
        let cfg = ControlConfig {
            token: JoinToken::parse(tok)?,
            private_key: None,
            public_key: tunnel_core::PublicKey([(i % 251) as u8; 32]),
            version: "bench".into(),
            candidates: vec![],
        };
        let seen_tx = seen_tx.clone();
        let ready_tx = ready_tx.clone();
        let sem = connect_sem.clone();
        let mut hub_cmd =
            if i == 0 { Some(std::mem::replace(&mut hub_cmd_rx, mpsc::channel(1).1)) } else { None };
        tokio::spawn(async move {
            let permit = sem.acquire_owned().await;
            let mut s = match ControlSession::open(&cfg, None).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            if let Err(e) = s.next_map().await {
                let _ = ready_tx.send(Err(e.into()));
                return;
            }
            drop(permit);
            let _ = ready_tx.send(Ok(()));
            let (mut got_res, mut got_ep) = (false, false);
            loop {
                tokio::select! {
                    m = s.next_map() => {
                        let Ok(m) = m else { return };
                        let now = Instant::now();
                        if !got_res && m.resources.contains_key(NEW_RESOURCE) {
                            got_res = true;
                            let _ = seen_tx.send((i, Seen::Resource(now)));
                        }
                        if !got_ep && m.peers.values().any(|p| p.candidates.iter().any(|c| c.addr.to_string() == NEW_ENDPOINT)) {
                            got_ep = true;
                            let _ = seen_tx.send((i, Seen::Endpoint(now)));
                        }
                    }
                    Some(c) = async { match hub_cmd.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                        let _ = s.send_candidates(&c).await;
                    }
                }
            }
        });
    }
    drop(ready_tx);
    let mut ok = 0;
    while let Some(r) = ready_rx.recv().await {
        r?;
        ok += 1;
        if ok == n {
            break;
        }
    }
    let connect_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = server.child.id();
    println!(
        "connect: {n} nodes logged in and received their maps in {connect_secs:.1} s ({:.0} logins/s)",
        n as f64 / connect_secs
    );
    println!(
        "server memory with {n} sessions: RSS {:.1} MiB (peak {:.1} MiB)",
        rss_kib(pid, "VmRSS:") as f64 / 1024.0,
        rss_kib(pid, "VmHWM:") as f64 / 1024.0
    );

    // 1. add-resource -> the site.
    let t0 = Instant::now();
    ctl(["add-resource", "--site", "hub", "--name", NEW_RESOURCE, "--target", "127.0.0.1:10"]
        .map(String::from)
        .to_vec())
    .await?;
    let admin_done = t0.elapsed();
    let at = loop {
        match tokio::time::timeout(Duration::from_secs(30), seen_rx.recv()).await? {
            Some((0, Seen::Resource(at))) => break at,
            Some(_) => continue,
            None => bail!("nodes went away"),
        }
    };
    println!(
        "add-resource: admin call returned after {}, the affected node (1 site) had it after {}",
        ms(admin_done),
        ms(at - t0)
    );

    // 2. endpoint change of the site -> every client.
    let t0 = Instant::now();
    hub_cmd_tx.send(vec![Candidate::new(NEW_ENDPOINT.parse()?, CandidateKind::Advertised)]).await?;
    let mut lat = Vec::with_capacity(n - 1);
    while lat.len() < n - 1 {
        match tokio::time::timeout(Duration::from_secs(60), seen_rx.recv()).await? {
            Some((i, Seen::Endpoint(at))) if i != 0 => lat.push(at - t0),
            Some(_) => continue,
            None => bail!("nodes went away"),
        }
    }
    lat.sort();
    println!(
        "site endpoint change -> {} affected clients: p50 {}, p99 {}, max {} (includes the 50 ms coalescing window)",
        n - 1,
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(pct(&lat, 1.0))
    );
    println!(
        "server memory at the end: RSS {:.1} MiB (peak {:.1} MiB)",
        rss_kib(pid, "VmRSS:") as f64 / 1024.0,
        rss_kib(pid, "VmHWM:") as f64 / 1024.0
    );
    Ok(())
}

fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sizes: Vec<usize> =
        std::env::args().skip(1).filter(|a| !a.starts_with('-')).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![1000] } else { sizes };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    for n in sizes {
        println!("== {n} nodes ==");
        rt.block_on(run(n.max(2)))?;
    }
    Ok(())
}
