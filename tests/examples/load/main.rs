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

mod fleet;
mod logins;
mod observe;
mod relay;
mod udp;

use fleet::*;
use logins::*;
use observe::*;
use relay::*;
use udp::*;

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
