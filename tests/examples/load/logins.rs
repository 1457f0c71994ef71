//! The failed-login flood: raw Hellos from many sources while a real node logs in.

use super::*;

/// A local TCP forwarder that sends each connection on to `to` from the next of `sources`: the
/// server sees many sources although `tunnel_node::connect` cannot bind one.
pub(crate) async fn source_proxy(
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
pub(crate) async fn raw_hello(
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

pub(crate) fn outcome(r: &Result<pb::ServerMessage, tonic::Status>) -> String {
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

pub(crate) async fn logins(srv: &Server, fleet: &[Member]) -> Result<Figures> {
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
