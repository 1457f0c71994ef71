//! What the load sees of the server: its memory, CPU and /metrics, admin-call latency, and the
//! report of each phase.

use super::*;

/// The server under test, as the load sees it.
#[derive(Debug, Clone)]
pub(crate) struct Server {
    pub(crate) args: Args,
    pub(crate) admin: AdminToken,
    pub(crate) relay_pin: KeyPin,
}

pub(crate) fn proc_field(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub(crate) fn rss_kb(pid: u32) -> u64 {
    proc_field(pid, "VmRSS:")
}

/// utime + stime in clock ticks (USER_HZ, 100 on Linux).
pub(crate) fn cpu_ticks(pid: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
    f.iter().sum()
}

pub(crate) fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
}

/// The server's /metrics, as name (with labels) -> value.
pub(crate) async fn metrics(addr: SocketAddr) -> Result<BTreeMap<String, f64>> {
    let r = tunnel_tests::wire::http::get_within(addr, "/metrics", Duration::from_secs(3)).await?;
    Ok(r.body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect())
}

pub(crate) fn metric(m: &BTreeMap<String, f64>, k: &str) -> u64 {
    m.get(k).copied().unwrap_or(0.0) as u64
}

/// Latencies of calls that succeeded, and the failures.
#[derive(Debug, Default, Clone)]
pub(crate) struct Lat {
    pub(crate) ok: Vec<Duration>,
    pub(crate) errors: u64,
    pub(crate) last_error: String,
}

impl Lat {
    pub(crate) fn record<T, E: std::fmt::Display>(&mut self, took: Duration, r: &Result<T, E>) {
        match r {
            Ok(_) => self.ok.push(took),
            Err(e) => {
                self.errors += 1;
                self.last_error = e.to_string();
            }
        }
    }

    pub(crate) fn pct(&self, p: f64) -> Duration {
        let mut v = self.ok.clone();
        v.sort();
        v.get(((v.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or_default()
    }

    pub(crate) fn summary(&self) -> String {
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

pub(crate) fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1e3;
    if v >= 100.0 {
        format!("{v:.0}ms")
    } else {
        format!("{v:.1}ms")
    }
}

pub(crate) fn mb(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

pub(crate) fn one_line(s: &str) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() > 90 {
        format!("{}...", s.chars().take(90).collect::<String>())
    } else {
        s
    }
}

pub(crate) type Figures = Vec<(String, String)>;

/// What the observer saw during one phase.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    pub(crate) held: Lat,
    pub(crate) fresh: Lat,
    pub(crate) rss_peak: u64,
    /// (seconds into the phase, tunnel_relay_connections, tunnel_server_sessions)
    pub(crate) timeline: Vec<(f64, u64, u64)>,
}

/// Calls ServerInfo every `every` until `stop`: on one held channel, or on a new connection each time.
pub(crate) async fn admin_probe(
    token: AdminToken,
    every: Duration,
    fresh: bool,
    stop: Arc<AtomicBool>,
) -> Lat {
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

pub(crate) struct Observer {
    pub(crate) stop_probes: Arc<AtomicBool>,
    pub(crate) stop_all: Arc<AtomicBool>,
    pub(crate) thread: std::thread::JoinHandle<Observed>,
}

pub(crate) fn observe(srv: &Server) -> Observer {
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
pub(crate) struct Report {
    pub(crate) name: String,
    pub(crate) secs: f64,
    pub(crate) obs: Observed,
    pub(crate) rss_before: u64,
    pub(crate) rss_after: u64,
    pub(crate) cpu_pct: f64,
    pub(crate) gen_cpu_pct: f64,
    pub(crate) figures: Figures,
}

/// Runs `load` under observation, waits (2-10 s) for relay connections and sessions to drain, then
/// prints the phase's block.
pub(crate) async fn phase(
    srv: &Server,
    name: &str,
    load: impl Future<Output = Result<Figures>>,
) -> Result<Report> {
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

pub(crate) fn print_report(r: &Report) {
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
