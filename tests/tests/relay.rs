//! The relay and the STUN responder on loopback, driven by the node's real relay link and a real UDP
//! socket: who may talk to whom, expiry, both transports, full-size packets, amplification limits.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tunnel_core::map::RelayInfo;
use tunnel_core::relay::{encode_packet, Capability};
use tunnel_node::relay::{self as link, RelayLink};
use tunnel_server::relay::{self, RelayKeys, RelayStats};
use tunnel_tests::PATIENCE;

struct Relay {
    keys: RelayKeys,
    running: relay::RunningRelay,
    stats: Arc<RelayStats>,
    _dir: tempfile::TempDir,
}

async fn relay() -> Relay {
    relay_with(relay::Limits::default()).await
}

async fn relay_with(limits: relay::Limits) -> Relay {
    tunnel_tests::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let keys = RelayKeys::load_or_create(dir.path()).unwrap();
    let stats = Arc::new(RelayStats::default());
    let cfg = relay::RelayConfig {
        udp: Some("127.0.0.1:0".parse().unwrap()),
        tcp: Some("127.0.0.1:0".parse().unwrap()),
        bundle: keys.bundle.clone(),
        limits,
    };
    let running = relay::start(cfg, stats.clone()).await.unwrap();
    Relay { keys, running, stats, _dir: dir }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

impl Relay {
    /// The map entry a node with `key`, allowed to reach `peers`, would get; `udp`/`tcp` choose the
    /// transports offered.
    fn info(&self, key: u8, peers: &[u8], ttl_ms: i64, udp: bool, tcp: bool) -> RelayInfo {
        let cap = Capability {
            node: tunnel_core::PublicKey([key; 32]),
            expires_unix_ms: (now_ms() as i64 + ttl_ms).max(0) as u64,
            peers: peers.iter().map(|p| tunnel_core::PublicKey([*p; 32])).collect(),
        }
        .sign(&self.keys.signer)
        .unwrap();
        RelayInfo {
            addr: if udp { self.running.udp_addr.unwrap().to_string() } else { String::new() },
            key_pin: self.keys.pin.0.to_vec(),
            capability: cap,
            tcp_addr: tcp.then(|| self.running.tcp_addr.unwrap().to_string()),
        }
    }
}

async fn connect(info: RelayInfo) -> RelayLink {
    let (mut l, task) = link::start();
    // The link task runs for the test's life.
    std::mem::forget(task);
    l.relays.send_replace(vec![info]);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let st = l.state.borrow_and_update().clone();
        if st.up || st.last_error.is_some() {
            return l;
        }
        assert!(tokio::time::Instant::now() < deadline, "relay link never settled");
        let _ = tokio::time::timeout(Duration::from_millis(200), l.state.changed()).await;
    }
}

async fn recv(l: &mut RelayLink) -> Option<(tunnel_core::PublicKey, Vec<u8>)> {
    tokio::time::timeout(Duration::from_secs(2), l.inbound.recv()).await.ok().flatten()
}

#[tokio::test]
async fn relays_only_between_peers_whose_capabilities_name_each_other() {
    let r = relay().await;
    let mut a = connect(r.info(1, &[2, 3], 60_000, true, false)).await;
    // B's capability is the newest word of the server: it does not name C.
    let mut b = connect(r.info(2, &[1], 120_000, true, false)).await;
    let mut c = connect(r.info(3, &[2], 60_000, true, false)).await;
    let mut d = connect(r.info(4, &[2], 180_000, true, false)).await;
    for l in [&a, &b, &c] {
        assert!(l.state.borrow().up, "{:?}", l.state.borrow());
    }
    // A full-size tunnel packet (1280 inner + 32 WireGuard) fits one datagram and arrives whole.
    let big = vec![0x5a; 1312];
    a.out.send(encode_packet(&tunnel_core::PublicKey([2; 32]), &big)).await.unwrap();
    let (from, got) = recv(&mut b).await.expect("B got A's packet");
    assert_eq!((from, got.len()), (tunnel_core::PublicKey([1; 32]), 1312));
    assert!(got == big);
    b.out.send(encode_packet(&tunnel_core::PublicKey([1; 32]), b"back")).await.unwrap();
    assert_eq!(recv(&mut a).await, Some((tunnel_core::PublicKey([2; 32]), b"back".to_vec())));

    // C may name B, but B's newer capability does not name C: refused. A may name C, C's capability
    // (as new as A's) does not name A: refused.
    let refused = r.stats.refused_not_allowed.load(Ordering::Relaxed);
    c.out.send(encode_packet(&tunnel_core::PublicKey([2; 32]), b"let me in")).await.unwrap();
    a.out.send(encode_packet(&tunnel_core::PublicKey([3; 32]), b"hi c")).await.unwrap();
    assert_eq!(recv(&mut b).await, None);
    assert_eq!(recv(&mut c).await, None);
    assert_eq!(r.stats.refused_not_allowed.load(Ordering::Relaxed), refused + 2);
    // Nobody registered as key 9.
    a.out.send(encode_packet(&tunnel_core::PublicKey([9; 32]), b"anyone?")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(r.stats.refused_not_allowed.load(Ordering::Relaxed), refused + 3);
    assert!(r.stats.packets.load(Ordering::Relaxed) >= 2);
    assert_eq!(r.stats.sessions.load(Ordering::Relaxed), 4);
    // D's capability is newer than B's and names B: a grant B has not heard of yet. It goes through,
    // and so does B's answer, before B's own capability names D.
    d.out.send(encode_packet(&tunnel_core::PublicKey([2; 32]), b"new grant")).await.unwrap();
    assert_eq!(recv(&mut b).await, Some((tunnel_core::PublicKey([4; 32]), b"new grant".to_vec())));
    b.out.send(encode_packet(&tunnel_core::PublicKey([4; 32]), b"answer")).await.unwrap();
    assert_eq!(recv(&mut d).await, Some((tunnel_core::PublicKey([2; 32]), b"answer".to_vec())));
    // B's newer capability does not name C, so B may not answer C either: the newest word holds.
    let refused = r.stats.refused_not_allowed.load(Ordering::Relaxed);
    b.out.send(encode_packet(&tunnel_core::PublicKey([3; 32]), b"no")).await.unwrap();
    assert_eq!(recv(&mut c).await, None);
    assert_eq!(r.stats.refused_not_allowed.load(Ordering::Relaxed), refused + 1);
}

#[tokio::test]
async fn expired_or_forged_capabilities_are_refused_but_a_live_registration_outlives_expiry() {
    let r = relay().await;
    let expired = connect(r.info(1, &[2], -1_000, true, false)).await;
    let st = expired.state.borrow().clone();
    assert!(!st.up);
    assert!(st.last_error.clone().unwrap_or_default().contains("expired"), "{st:?}");
    // Signed by somebody else.
    let other = RelayKeys::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
    let mut forged = r.info(1, &[2], 60_000, true, false);
    forged.capability = Capability {
        node: tunnel_core::PublicKey([1; 32]),
        expires_unix_ms: now_ms() + 60_000,
        peers: vec![tunnel_core::PublicKey([2; 32])],
    }
    .sign(&other.signer)
    .unwrap();
    let forged = connect(forged).await;
    assert!(forged.state.borrow().last_error.clone().unwrap_or_default().contains("signature"));
    assert!(r.stats.registrations_refused.load(Ordering::Relaxed) >= 2);

    // Capabilities valid for 1.5 s: after they expire, the registered pair keeps flowing.
    let a = connect(r.info(1, &[2], 1_500, true, false)).await;
    let mut b = connect(r.info(2, &[1], 1_500, true, false)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.out.send(encode_packet(&tunnel_core::PublicKey([2; 32]), b"still here")).await.unwrap();
    assert_eq!(recv(&mut b).await, Some((tunnel_core::PublicKey([1; 32]), b"still here".to_vec())));
}

#[tokio::test]
async fn tcp_and_quic_nodes_reach_each_other() {
    let r = relay().await;
    let mut q = connect(r.info(1, &[2], 60_000, true, false)).await;
    // Only TCP offered (as for a node whose network blocks UDP).
    let mut t = connect(r.info(2, &[1], 60_000, false, true)).await;
    assert_eq!(t.state.borrow().transport.as_deref(), Some("tcp"));
    assert_eq!(q.state.borrow().transport.as_deref(), Some("quic"));
    let big = vec![7u8; 1312];
    for _ in 0..50 {
        q.out.send(encode_packet(&tunnel_core::PublicKey([2; 32]), &big)).await.unwrap();
    }
    for _ in 0..50 {
        let (from, got) = recv(&mut t).await.expect("packet over TCP");
        assert_eq!((from, got.len()), (tunnel_core::PublicKey([1; 32]), 1312));
    }
    t.out.send(encode_packet(&tunnel_core::PublicKey([1; 32]), b"over tcp")).await.unwrap();
    assert_eq!(recv(&mut q).await, Some((tunnel_core::PublicKey([2; 32]), b"over tcp".to_vec())));
}

#[tokio::test]
async fn stun_answers_standard_requests_without_amplification_and_rate_limits() {
    let server = tunnel_tests::TestServer::start().await.unwrap();
    let stun = server.running().stun_addr.unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    let mut buf = [0u8; 512];
    let req = tunnel_core::stun::request([3; 12]);
    sock.send_to(&req, stun).await.unwrap();
    let (n, _) = tokio::time::timeout(PATIENCE, sock.recv_from(&mut buf)).await.unwrap().unwrap();
    assert!(n <= req.len());
    let resp = tunnel_core::stun::parse_response(&buf[..n]).unwrap();
    assert_eq!((resp.txid, resp.mapped), ([3; 12], me));
    // A bare 20-byte request: an answer would be larger than the question, so none comes.
    let mut bare = req[..20].to_vec();
    bare[2..4].copy_from_slice(&[0, 0]);
    sock.send_to(&bare, stun).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await.is_err());
    // A burst from one source: at most the per-source rate is answered.
    for i in 0..60u8 {
        sock.send_to(&tunnel_core::stun::request([i; 12]), stun).await.unwrap();
    }
    let mut answers = 0;
    while tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await.is_ok() {
        answers += 1;
    }
    assert!(
        answers > 0 && answers <= 2 * tunnel_server::stun::PER_SOURCE_PER_SEC as usize,
        "{answers} answers"
    );
    assert!(answers < 60, "{answers} answers to a burst of 60: no rate limit");
}

#[tokio::test]
async fn a_node_is_held_to_its_byte_rate_and_flow_count() {
    // 100 kB/s and two peers at once per node.
    let r =
        relay_with(relay::Limits { bytes_per_sec: 100_000, max_flows: 2, ..relay::Limits::default() }).await;
    let a = connect(r.info(1, &[2, 3, 4], 60_000, true, false)).await;
    let mut b = connect(r.info(2, &[1], 60_000, true, false)).await;
    let _c = connect(r.info(3, &[1], 60_000, true, false)).await;
    let _d = connect(r.info(4, &[1], 60_000, true, false)).await;
    // 1 MB in a burst: about a tenth gets through (one second's worth of burst).
    for _ in 0..800 {
        a.out.send(encode_packet(&tunnel_core::PublicKey([2; 32]), &[1u8; 1250])).await.unwrap();
        tokio::task::yield_now().await;
    }
    let mut got = 0usize;
    while let Some((_, p)) = recv(&mut b).await {
        got += p.len();
    }
    assert!(got > 0 && got <= 200_000, "{got} bytes relayed at 100 kB/s");
    assert!(r.stats.refused_rate.load(Ordering::Relaxed) > 0);
    // Peers 2 and 3 are its two flows; a third is refused while they are fresh.
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.out.send(encode_packet(&tunnel_core::PublicKey([3; 32]), b"x")).await.unwrap();
    a.out.send(encode_packet(&tunnel_core::PublicKey([4; 32]), b"y")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(r.stats.refused_flows.load(Ordering::Relaxed), 1);
}

/// A QUIC connection to the relay that completes its handshake and then does what it likes.
async fn raw_quic(r: &Relay) -> quinn::Connection {
    let tls = tunnel_node::tls::pinned_client_config(r.keys.pin, relay::ALPN).unwrap();
    let qtls = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut cfg = quinn::ClientConfig::new(Arc::new(qtls));
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.initial_mtu(relay::QUIC_MTU);
    cfg.transport_config(Arc::new(t));
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    ep.connect(r.running.udp_addr.unwrap(), "tunnel-relay").unwrap().await.unwrap()
}

#[tokio::test]
async fn a_connection_that_shows_no_capability_is_closed_and_its_datagrams_dropped() {
    let r = relay().await;
    let conn = raw_quic(&r).await;
    // Before: datagrams waited in an 8 MiB buffer and its own keep-alives held the connection for ever.
    for _ in 0..50 {
        let _ = conn
            .send_datagram(bytes::Bytes::from(encode_packet(&tunnel_core::PublicKey([2; 32]), &[0; 1200])));
    }
    let why = tokio::time::timeout(PATIENCE, conn.closed()).await.expect("closed by the relay");
    assert!(why.to_string().contains("no capability"), "{why}");
    assert_eq!(r.stats.register_timeouts.load(Ordering::Relaxed), 1);
    assert!(r.stats.early_datagrams.load(Ordering::Relaxed) > 0, "datagrams were read and dropped");
    assert_eq!(r.stats.packets.load(Ordering::Relaxed), 0);
    // Over TCP: a connection that never speaks TLS is closed too.
    let mut tcp = tokio::net::TcpStream::connect(r.running.tcp_addr.unwrap()).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(PATIENCE, tokio::io::AsyncReadExt::read(&mut tcp, &mut buf)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{n:?}");
    assert_eq!(r.stats.register_timeouts.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn a_quic_handshake_left_unfinished_is_closed_within_the_registration_deadline() {
    let r = relay().await;
    // A client's first datagram (a real QUIC Initial), and then silence: the handshake never ends.
    let tls = tunnel_node::tls::pinned_client_config(r.keys.pin, relay::ALPN).unwrap();
    let qtls = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep =
        quinn_proto::Endpoint::new(Arc::new(quinn_proto::EndpointConfig::default()), None, false, None);
    let now = std::time::Instant::now();
    let relay_addr = r.running.udp_addr.unwrap();
    let (_, mut conn) =
        ep.connect(now, quinn::ClientConfig::new(Arc::new(qtls)), relay_addr, "tunnel-relay").unwrap();
    let mut initial = Vec::new();
    let t = conn.poll_transmit(now, 1, &mut initial).expect("an Initial to send");
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&initial[..t.size], relay_addr).await.unwrap();
    let start = tokio::time::Instant::now();
    let mut buf = [0u8; 2048];
    tokio::time::timeout(PATIENCE, sock.recv_from(&mut buf)).await.expect("the relay answers").unwrap();
    assert_eq!(r.stats.conns.load(Ordering::Relaxed), 1, "the handshake holds a slot");
    while r.stats.conns.load(Ordering::Relaxed) > 0 {
        // Before: the slot was held until the handshake's idle timeout, 30 s.
        assert!(start.elapsed() < relay::REGISTER_TIMEOUT + Duration::from_secs(3), "slot still held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(r.stats.register_timeouts.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn connections_are_capped_per_source_and_counted() {
    let r = relay_with(relay::Limits { conns_per_source: 2, ..relay::Limits::default() }).await;
    let held: Vec<_> = futures::future::join_all((0..2).map(|_| raw_quic(&r))).await;
    // The third from the same address is refused (before: unlimited).
    let tls = tunnel_node::tls::pinned_client_config(r.keys.pin, relay::ALPN).unwrap();
    let qtls = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(qtls)));
    let third = ep.connect(r.running.udp_addr.unwrap(), "tunnel-relay").unwrap().await;
    assert!(third.is_err(), "a third connection got in");
    let tcp = tokio::net::TcpStream::connect(r.running.tcp_addr.unwrap()).await.unwrap();
    let mut tcp = tcp;
    let mut buf = [0u8; 4];
    let n =
        tokio::time::timeout(Duration::from_secs(2), tokio::io::AsyncReadExt::read(&mut tcp, &mut buf)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "TCP refused at once too: {n:?}");
    assert_eq!(r.stats.conns_refused_source.load(Ordering::Relaxed), 2);
    let mut metrics = String::new();
    r.stats.render(&mut metrics);
    assert!(metrics.contains("tunnel_relay_connections_refused_total{reason=\"per_source\"} 2"), "{metrics}");
    drop(held);
}

#[tokio::test]
async fn an_older_capability_does_not_take_a_registration_away() {
    let r = relay().await;
    let mut a = connect(r.info(1, &[2], 120_000, true, false)).await;
    let mut b = connect(r.info(2, &[1], 120_000, true, false)).await;
    assert!(a.state.borrow().up && b.state.borrow().up);
    // Somebody presents A's older capability (a thief, a stale process) on a new connection.
    let stale = connect(r.info(1, &[2], 30_000, false, true)).await;
    let st = stale.state.borrow().clone();
    assert!(
        !st.up && st.last_error.unwrap_or_default().contains("newer capability"),
        "{:?}",
        stale.state.borrow()
    );
    assert_eq!(r.stats.refused_older.load(Ordering::Relaxed), 1);
    // B's packets still reach the real A.
    b.out.send(encode_packet(&tunnel_core::PublicKey([1; 32]), b"still you")).await.unwrap();
    assert_eq!(recv(&mut a).await, Some((tunnel_core::PublicKey([2; 32]), b"still you".to_vec())));
    let _ = &mut b;
}
