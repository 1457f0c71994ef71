//! The data plane on loopback, no root: a real server, a site agent and a userspace client (each with
//! its own UDP socket, boringtun sessions and smoltcp stack), real TCP/UDP services as resources, and
//! real SOCKS5 and DNS clients in front.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::net::SocketAddr;
use std::time::Duration;

use tunnel_core::path::Via;
use tunnel_core::status::PathState;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tunnel_core::wg::{Device, PeerConfig};
use tunnel_tests::loopback::{start_client, Loopback, Resource};
use tunnel_tests::wire::dns::query as dns;
use tunnel_tests::wire::http;
use tunnel_tests::wire::socks5::{self, fetch, Refused};
use tunnel_tests::{services, wait_until, TestServer, PATIENCE};

/// The loopback network and the file `web` serves.
struct Net {
    lo: Loopback,
    blob: Vec<u8>,
}

impl std::ops::Deref for Net {
    type Target = Loopback;
    fn deref(&self) -> &Loopback {
        &self.lo
    }
}

impl std::ops::DerefMut for Net {
    fn deref_mut(&mut self) -> &mut Loopback {
        &mut self.lo
    }
}

/// Server, site `home` with `web` (TCP blob, alias), `echo` (UDP), `secret` (not granted) and
/// `tcpecho`, and client `laptop` granted `web`, `echo` and `tcpecho`.
async fn net() -> Net {
    net_on(TestServer::start().await.unwrap()).await
}

async fn net_on(server: TestServer) -> Net {
    let blob = tunnel_tests::blob(4_000_000);
    let resources = [
        Resource::granted("web", services::sender(blob.clone()).await).alias("web.private.example.com"),
        Resource::granted("echo", services::udp_echo().await),
        Resource::not_granted("secret", services::sender(b"top secret".to_vec()).await),
        Resource::granted("tcpecho", services::tcp_echo().await),
    ];
    Net { lo: Loopback::start(server, &resources).await, blob }
}

/// `GET path` from a node's `/status` listener: the body.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    http::get(addr, path).await.unwrap().body
}

#[tokio::test]
async fn megabytes_by_private_name_and_alias_byte_exact() {
    let n = net().await;
    let port = n.port("web");
    for host in ["web.tunnel.internal", "web.private.example.com"] {
        let got = fetch(n.client().socks5, host, port).await.unwrap();
        assert_eq!(got.len(), n.blob.len(), "{host}");
        assert!(got == n.blob, "{host}: bytes differ");
    }
    // On loopback the direct path is proven within a punch round or two (the transfer may finish on the
    // relay that answered first).
    wait_until("the path to be direct", || async {
        n.client().node.dataplane.status().await.unwrap().peers[0].path == PathState::Direct
    })
    .await;
    // The tunnel really carried it: both ends count the bytes.
    let st = n.client().node.dataplane.status().await.unwrap();
    assert!(st.peers[0].rx_bytes > 8_000_000, "{st:?}");
}

#[tokio::test]
async fn a_client_forced_onto_the_relay_moves_the_same_bytes_through_it() {
    let n = net().await;
    // A second client of the same user, on the relay only (as with --force-relay).
    let cdir = tempfile::tempdir().unwrap();
    let relayed = start_client(&n.client_token, cdir.path(), true).await;
    wait_until("the relayed client knows web", || async {
        relayed.node.maps.borrow().as_ref().is_some_and(|m| m.resources.contains_key("web"))
    })
    .await;
    let port = n.port("web");
    let got = fetch(relayed.socks5, "web.tunnel.internal", port).await.unwrap();
    assert!(got == n.blob, "bytes differ over the relay");
    let st = relayed.node.dataplane.status().await.unwrap();
    let peer = &st.peers[0];
    assert_eq!(peer.path, PathState::Relay, "{st:?}");
    assert_eq!(st.relay.transport.as_deref(), Some("quic"), "{st:?}");
    assert!(peer.relay_rx_bytes >= n.blob.len() as u64, "{st:?}");
    // The site sees the same: that client's packets arrive through the relay.
    let site = n.site.dataplane.status().await.unwrap();
    let relayed_bytes: u64 = site.peers.iter().map(|p| p.relay_tx_bytes).sum();
    assert!(relayed_bytes >= n.blob.len() as u64, "{site:?}");
    // And the server's relay counted it.
    let stats = &n.server.running().relay.as_ref().unwrap().stats;
    assert!(stats.bytes.load(std::sync::atomic::Ordering::Relaxed) >= n.blob.len() as u64);
    // /metrics says the same, one family at a time.
    let metrics = http_get(relayed.node.status_addr.unwrap(), "/metrics").await;
    assert!(metrics.contains("tunnel_node_peer_path{peer=\"home\",path=\"relay\"} 1"), "{metrics}");
    assert!(metrics.contains("tunnel_node_relay_up 1"), "{metrics}");
    let relay_rx = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tunnel_node_peer_relay_rx_bytes_total{peer=\"home\"} "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap();
    assert!(relay_rx >= n.blob.len() as u64);
    let mut seen = std::collections::HashSet::new();
    let mut last = "";
    for l in metrics.lines().filter(|l| !l.starts_with('#')) {
        let family = l.split(['{', ' ']).next().unwrap();
        if family != last {
            assert!(seen.insert(family), "family {family} is split in two:\n{metrics}");
            last = family;
        }
    }
}

#[tokio::test]
async fn a_relay_path_losing_three_percent_each_way_still_carries_a_transfer() {
    // Loss looked like an MTU black hole to QUIC, which fell back to 1200-byte packets: full-size
    // tunnel packets stopped fitting a datagram and the transfer stalled after its first second.
    let (fwd, target) = tunnel_tests::lossy::udp_forwarder(0.03).await;
    let server = TestServer::start_with(|c| {
        c.relay_listen = None;
        c.relay_tcp_listen = None;
        c.external_relays = vec![tunnel_server::ExternalRelay { udp: fwd.to_string(), tcp: None }];
    })
    .await
    .unwrap();
    let keys = tunnel_server::relay::RelayKeys::load_or_create(&server.cfg.data_dir).unwrap();
    let relay = tunnel_server::relay::start(
        tunnel_server::relay::RelayConfig {
            udp: Some("127.0.0.1:0".parse().unwrap()),
            tcp: None,
            bundle: keys.bundle,
            limits: Default::default(),
        },
        std::sync::Arc::new(tunnel_server::relay::RelayStats::default()),
    )
    .await
    .unwrap();
    target.send_replace(relay.udp_addr);
    let n = net_on(server).await;
    // A client of its own (the same token twice would make two nodes take turns at one identity).
    let token = n.server.ctl(&["client", "add", "roamer"]).await.unwrap().trim().to_owned();
    n.server.ctl(&["grant", "--client", "roamer", "--resource", "web"]).await.unwrap();
    let cdir = tempfile::tempdir().unwrap();
    let relayed = start_client(&token, cdir.path(), true).await;
    wait_until("the relayed client knows web", || async {
        relayed.node.maps.borrow().as_ref().is_some_and(|m| m.resources.contains_key("web"))
    })
    .await;
    let port = n.port("web");
    // Long enough for QUIC to have seen many losses of full-size packets (the stall came after
    // about a second of traffic).
    let rounds = 10;
    for i in 0..rounds {
        let got = fetch(relayed.socks5, "web.tunnel.internal", port).await.unwrap();
        assert!(got == n.blob, "bytes differ over the lossy relay (round {i})");
    }
    let st = relayed.node.dataplane.status().await.unwrap();
    assert_eq!(st.peers[0].path, PathState::Relay, "{st:?}");
    assert!(st.peers[0].relay_rx_bytes >= rounds * n.blob.len() as u64, "{st:?}");
}

#[tokio::test]
async fn udp_echo_through_socks5_udp_associate() {
    let n = net().await;
    let port = n.port("echo");
    let assoc = socks5::udp_associate(n.client().socks5).await.unwrap();
    let relay = assoc.relay;
    let u = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let d = socks5::udp_datagram("echo.tunnel.internal", port, b"marco");
    let mut buf = [0u8; 2048];
    // UDP may lose the first datagram while the site dials: retry a few times.
    let mut answer = None;
    for _ in 0..20 {
        u.send_to(&d, relay).await.unwrap();
        if let Ok(Ok((len, _))) =
            tokio::time::timeout(Duration::from_millis(500), u.recv_from(&mut buf)).await
        {
            answer = Some(buf[..len].to_vec());
            break;
        }
    }
    let a = answer.expect("an echo came back");
    assert_eq!(&a[..4], &[0, 0, 0, 1]);
    assert_eq!(&a[10..], b"marco");
}

#[tokio::test]
async fn private_dns_answers_names_and_refuses_unknown_ones() {
    let n = net().await;
    let web_addr = n.client().node.maps.borrow().as_ref().unwrap().resources["web"].overlay_addr;
    for name in ["web.tunnel.internal.", "web.private.example.com."] {
        let m = dns(n.client().dns, name, RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers.len(), 1);
        match &m.answers[0].data {
            RData::A(a) => assert_eq!(std::net::IpAddr::V4(a.0), web_addr),
            other => panic!("{other:?}"),
        }
    }
    let nx = dns(n.client().dns, "nothing.tunnel.internal.", RecordType::A).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    // Not granted: not even its name resolves for this client.
    let secret = dns(n.client().dns, "secret.tunnel.internal.", RecordType::A).await;
    assert_eq!(secret.metadata.response_code, ResponseCode::NXDomain);
}

#[tokio::test]
async fn ungranted_resources_are_unreachable_even_to_a_raw_peer() {
    let n = net().await;
    // Through the client: the name is not there.
    assert!(fetch(n.client().socks5, "secret.tunnel.internal", 80).await.is_err());
    // A raw peer holding the client's own key, sending straight at the agent.
    let other = n.server.ctl(&["client", "add", "other"]).await.unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let other_client = start_client(other.trim(), other_dir.path(), false).await;
    wait_until("the other client's map", || async { other_client.node.maps.borrow().is_some() }).await;
    let other_addr = other_client.node.maps.borrow().as_ref().unwrap().overlay_addr;
    let (secret_addr, web_addr, client_addr, site_key) = {
        let m = n.site.maps.borrow().clone().unwrap();
        let cm = n.client().node.maps.borrow().clone().unwrap();
        let site = cm.peers.values().next().unwrap();
        (
            m.resources["secret"].overlay_addr,
            m.resources["web"].overlay_addr,
            cm.overlay_addr,
            site.public_key.unwrap(),
        )
    };
    let key_text = std::fs::read_to_string(n.client().node.state.path().join("private.key")).unwrap();
    let key: [u8; 32] = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.decode(key_text.trim()).unwrap().try_into().unwrap()
    };
    let agent_udp = SocketAddr::from(([127, 0, 0, 1], n.site.dataplane.local_addr.port()));
    let raw = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut dev = Device::new(key, 99);
    dev.set_peers(
        vec![PeerConfig {
            key: site_key,
            allowed: vec!["100.96.0.0/16".parse().unwrap()],
            endpoint: Some(agent_udp),
            keepalive: None,
        }],
        std::time::Instant::now(),
    );
    let before = n.site.dataplane.status().await.unwrap();
    let mut buf = vec![0u8; 65536];
    let exchange = |dev: &mut Device, pkt: Option<Vec<u8>>| {
        if let Some(p) = pkt {
            dev.handle_outbound(&p);
        }
        let mut out = Vec::new();
        while let Some(t) = dev.poll_transmit() {
            out.push(t);
        }
        out
    };
    // Complete a handshake with a packet for the ungranted resource, then send a few more.
    let probe = |src: &std::net::IpAddr, dst: &std::net::IpAddr| {
        tunnel_core::packet::udp_packet(
            format!("{src}:4000").parse().unwrap(),
            format!("{dst}:9").parse().unwrap(),
            b"x",
        )
    };
    for pkt in
        [probe(&client_addr, &secret_addr), probe(&client_addr, &secret_addr), probe(&other_addr, &web_addr)]
    {
        for t in exchange(&mut dev, Some(pkt)) {
            raw.send_to(&t.payload, direct(t.dst)).await.unwrap();
        }
        // Let the handshake answer come back and flush what boringtun queued.
        if let Ok(Ok((len, from))) =
            tokio::time::timeout(Duration::from_millis(500), raw.recv_from(&mut buf)).await
        {
            dev.handle_datagram(Via::Direct(from), &buf[..len]);
            for t in exchange(&mut dev, None) {
                raw.send_to(&t.payload, direct(t.dst)).await.unwrap();
            }
        }
    }
    let after_ok = {
        let n = &n;
        let before = before.clone();
        move || {
            let before = before.clone();
            async move {
                let a = n.site.dataplane.status().await.unwrap();
                a.counters.not_granted > before.counters.not_granted
                    && a.drops.bad_source > before.drops.bad_source
            }
        }
    };
    wait_until("the agent to drop and count both packets", after_ok).await;
    // Nothing came back for them (no echo, no data). Path probes may: the raw peer holds the client's
    // key, so the agent follows its handshake and checks the path, which is no answer to the packets.
    while let Ok(Ok((len, _))) =
        tokio::time::timeout(Duration::from_millis(300), raw.recv_from(&mut buf)).await
    {
        assert!(tunnel_core::probe::is_probe(&buf[..len]), "a {len}-byte answer came back");
    }
}

#[tokio::test]
async fn revoke_stops_access_within_seconds() {
    let n = net().await;
    let port = n.port("web");
    assert!(fetch(n.client().socks5, "web.tunnel.internal", port).await.is_ok());
    // A connection open across the revoke is cut by the site itself.
    let mut open =
        socks5::connect(n.client().socks5, "tcpecho.tunnel.internal", n.port("tcpecho")).await.unwrap();
    open.write_all(b"ping").await.unwrap();
    let mut four = [0u8; 4];
    open.read_exact(&mut four).await.unwrap();
    assert_eq!(&four, b"ping");
    n.server.ctl(&["revoke", "--client", "laptop", "--resource", "tcpecho"]).await.unwrap();
    let cut = tokio::time::timeout(PATIENCE, async {
        loop {
            if open.write_all(b"more").await.is_err() {
                return;
            }
            let mut b = [0u8; 4];
            match tokio::time::timeout(Duration::from_millis(500), open.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "the open connection survived the revoke");
    n.server.ctl(&["revoke", "--client", "laptop", "--resource", "web"]).await.unwrap();
    wait_until("access to stop", || async {
        fetch(n.client().socks5, "web.tunnel.internal", port).await.is_err()
    })
    .await;
    // And the site refuses it too, whatever the client does: its map says so.
    wait_until("the site to drop the client", || async {
        n.site
            .maps
            .borrow()
            .as_ref()
            .is_some_and(|m| m.peers.values().all(|p| !p.resources.contains(&"web".to_string())))
    })
    .await;
}

#[tokio::test]
async fn server_outage_keeps_tunnels_and_changes_flow_again_after_it_returns() {
    let mut n = net().await;
    let port = n.port("web");
    // Start a transfer, kill the server in the middle of it.
    let mut s = socks5::connect(n.client().socks5, "web.tunnel.internal", port).await.unwrap();
    let mut first = vec![0u8; 1000];
    s.read_exact(&mut first).await.unwrap();
    n.server.server.take().unwrap().kill();
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut rest)).await.unwrap().unwrap();
    first.extend(rest);
    assert!(first == n.blob, "the running transfer completed byte-exact");
    wait_until("the client to notice the outage", || async {
        !matches!(*n.client().node.link.borrow(), tunnel_node::LinkState::Connected)
    })
    .await;
    // A new connection to a known resource still works, from the cached map.
    assert_eq!(fetch(n.client().socks5, "web.tunnel.internal", port).await.unwrap().len(), n.blob.len());
    // A client started while the server is down comes up from its cached map and reaches the resource.
    let state_dir = n.client().node.state.path().to_owned();
    let token = n.client_token.clone();
    let restarted = start_client(&token, &state_dir, false).await;
    drop(n.lo.client.replace(restarted));
    wait_until("the restarted client to load its cached map", || async {
        n.client().node.maps.borrow().is_some()
    })
    .await;
    assert_eq!(fetch(n.client().socks5, "web.tunnel.internal", port).await.unwrap().len(), n.blob.len());
    let status =
        tunnel_tests::ctl(&["status", "--json", "--state-dir", state_dir.to_str().unwrap()]).await.unwrap();
    let status: tunnel_core::status::NodeStatus = serde_json::from_str(&status).unwrap();
    assert_eq!(status.peers[0].path, PathState::Direct, "{status:?}");
    assert_ne!(status.control, Some(tunnel_core::status::LinkState::Connected), "{status:?}");
    // The server returns; a change made afterwards reaches the nodes.
    n.server.restart().await.unwrap();
    let echo = services::udp_echo().await;
    n.server
        .ctl(&["add-resource", "--site", "home", "--name", "later", "--target", &echo.to_string()])
        .await
        .unwrap();
    n.server.ctl(&["grant", "--client", "laptop", "--resource", "later"]).await.unwrap();
    wait_until("the new resource to reach the client", || async {
        n.client().node.maps.borrow().as_ref().is_some_and(|m| m.resources.contains_key("later"))
    })
    .await;
    wait_until("the new resource to reach the site", || async {
        n.site.maps.borrow().as_ref().is_some_and(|m| m.resources.contains_key("later"))
    })
    .await;
}

#[tokio::test]
async fn rotating_a_client_cuts_its_tunnels_not_only_its_control_session() {
    let n = net().await;
    let port = n.port("web");
    assert!(fetch(n.client().socks5, "web.tunnel.internal", port).await.is_ok());
    n.server.ctl(&["client", "rotate", "laptop"]).await.unwrap();
    // The old client still runs on its cached map, but the site no longer holds its key.
    wait_until("the site to drop the rotated client's key", || async {
        n.site.maps.borrow().as_ref().is_some_and(|m| m.peers.values().all(|p| p.public_key.is_none()))
    })
    .await;
    let r =
        tokio::time::timeout(Duration::from_secs(20), fetch(n.client().socks5, "web.tunnel.internal", port))
            .await;
    assert!(!matches!(r, Ok(Ok(_))), "a rotated client still reached the resource");
}

#[tokio::test]
async fn a_refused_target_gives_the_client_a_reset() {
    let n = net().await;
    // A resource whose target accepts nothing.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    n.server
        .ctl(&["add-resource", "--site", "home", "--name", "dead", "--target", &closed.to_string()])
        .await
        .unwrap();
    n.server.ctl(&["grant", "--client", "laptop", "--resource", "dead"]).await.unwrap();
    wait_until("dead to be known", || async {
        n.client().node.maps.borrow().as_ref().is_some_and(|m| m.resources.contains_key("dead"))
    })
    .await;
    wait_until("dead to reach the site", || async {
        n.site
            .maps
            .borrow()
            .as_ref()
            .is_some_and(|m| m.peers.values().any(|p| p.resources.contains(&"dead".to_string())))
    })
    .await;
    let r = socks5::connect(n.client().socks5, "dead.tunnel.internal", closed.port()).await;
    assert_eq!(
        r.err(),
        Some(Refused(5)),
        "SOCKS5 'connection refused', not a connection that dies after accept"
    );
}

fn direct(v: Via) -> std::net::SocketAddr {
    match v {
        Via::Direct(a) => a,
        Via::Relay => panic!("the raw test peer has no relay"),
    }
}

#[tokio::test]
async fn the_site_checks_targets_and_tunnelctl_shows_their_health() {
    let n = net().await;
    // A port nothing listens on (bound, then closed), and HTTP services answering 200 and 503.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let ok = services::http(200, "").await;
    let failing = services::http(503, "").await;
    for (name, target, check) in [
        ("gone", closed.to_string(), "tcp"),
        ("ready", ok.to_string(), "http:/ready"),
        ("broken", failing.to_string(), "http:/ready"),
    ] {
        n.server
            .ctl(&[
                "add-resource",
                "--site",
                "home",
                "--name",
                name,
                "--target",
                &target,
                "--health-check",
                check,
            ])
            .await
            .unwrap();
    }
    let bad = n
        .server
        .ctl(&["add-resource", "--site", "home", "--name", "x", "--target", "h:1", "--health-check", "ping"])
        .await
        .unwrap_err()
        .to_string();
    assert!(bad.contains("is not 'tcp' or 'http:/PATH'") && !bad.contains('\n'), "{bad}");
    let health = |v: &serde_json::Value, name: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .map(|r| r["health"].as_str().unwrap().to_owned())
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let v = loop {
        let v = n.server.ctl_json(&["resources", "--json"]).await.unwrap();
        let all = ["web", "gone", "ready", "broken"].map(|r| health(&v, r));
        if all.iter().all(|h| h.as_deref() != Some("unknown")) {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "health never reported: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(health(&v, "web").as_deref(), Some("healthy"), "{v}");
    assert_eq!(health(&v, "ready").as_deref(), Some("healthy"), "{v}");
    assert_eq!(health(&v, "gone").as_deref(), Some("unhealthy"), "{v}");
    assert_eq!(health(&v, "broken").as_deref(), Some("unhealthy"), "{v}");
    let broken = v.as_array().unwrap().iter().find(|r| r["name"] == "broken").unwrap();
    assert_eq!(broken["health_detail"], "HTTP 503");
    // The table says it too, and the agent's /metrics.
    let table = n.server.ctl(&["resources"]).await.unwrap();
    assert!(table.contains("unhealthy (HTTP 503)"), "{table}");
    let metrics = http_get(n.site.status_addr.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("tunnel_node_resource_health{resource=\"gone\",state=\"unhealthy\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tunnel_node_resource_health{resource=\"web\",state=\"healthy\"} 1"),
        "{metrics}"
    );
    // With the site gone, nobody vouches for the targets any more.
    let Loopback { server, site, .. } = n.lo;
    drop(site);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let v = server.ctl_json(&["resources", "--json"]).await.unwrap();
        if health(&v, "web").as_deref() == Some("unknown") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "health still reported for an offline site: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
