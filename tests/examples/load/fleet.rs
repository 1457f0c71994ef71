//! The fleet of real nodes: setup (one join each), idle sessions, the ticket reconnect storm.

use super::*;

/// A node of the fleet, with the ticket of its last login.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub(crate) cfg: ControlConfig,
    pub(crate) ticket: Vec<u8>,
}

/// Logs in (with `ticket`, else the join secret) and waits for the first map.
pub(crate) async fn login(
    cfg: &ControlConfig,
    ticket: Option<&[u8]>,
) -> Result<ControlSession, SessionError> {
    let mut s = ControlSession::open(cfg, ticket).await?;
    timeout(Duration::from_secs(30), s.next_map())
        .await
        .map_err(|_| SessionError::Lost("no map within 30s".into()))??;
    Ok(s)
}

pub(crate) async fn setup(srv: &Server, fleet: &mut Vec<Member>) -> Result<Figures> {
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

pub(crate) async fn idle(srv: &Server, fleet: &[Member]) -> Result<Figures> {
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

pub(crate) async fn tickets(srv: &Server, fleet: &mut [Member]) -> Result<Figures> {
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
