//! The SOCKS5 listener of `tunnelctl up --userspace` (client/src/up/socks.rs).
//!
//! The handshake (`session`) is private and reads a `TcpStream`, so it cannot be driven over an
//! in-memory stream from here; this target reaches it through the public `socks::serve` on a
//! loopback listener, with a stand-in data plane that answers CONNECTs (alternately refused and
//! accepted with a flow that sends a few bytes and ends). Each input is what one client sends before
//! closing its side; the target reads until the server closes. Also `parse_udp_header`, the UDP
//! ASSOCIATE datagram header, on the same bytes.
//!
//! Checks: no panic (libfuzzer-sys aborts on a panic in any thread, spawned tasks included), no hang
//! (libFuzzer's -timeout), and the reply is well-formed: method selection `05 00`/`05 FF` first.
#![no_main]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Notify};
use tunnel_core::dns::PrivateZone;
use tunnel_core::map::{NetworkMap, NodeKind, ResourceInfo};
use tunnel_core::NodeId;
use tunnel_node::dataplane::{Command, Dataplane, FlowEnds};
use tunnelctl::up::socks;
use tunnel_fuzz::runtime;

fn map() -> NetworkMap {
    let mut resources = BTreeMap::new();
    resources.insert(
        "prom".to_string(),
        ResourceInfo {
            name: "prom".into(),
            overlay_addr: "100.96.0.10".parse().unwrap_or_else(|_| unreachable!()),
            target: None,
            port: 9090,
            alias: None,
            site_id: NodeId::from_random([1; 10]),
            dns_names: vec!["prom.tunnel.internal".into()],
            health_check: None,
        },
    );
    NetworkMap {
        version: 1,
        node_id: NodeId::from_random([2; 10]),
        node_name: "me".into(),
        kind: NodeKind::Client,
        overlay_addr: "100.96.0.2".parse().unwrap_or_else(|_| unreachable!()),
        overlay_cidr: "100.96.0.0/16".parse().unwrap_or_else(|_| unreachable!()),
        dns_zone: "tunnel.internal".into(),
        mtu: 1280,
        peers: BTreeMap::new(),
        resources,
        relays: vec![],
        stun_addr: None,
    }
}

/// The stand-in data plane: refuses every other CONNECT, accepts the rest with a short flow.
async fn fake_dataplane(mut rx: mpsc::Receiver<Command>) {
    let n = AtomicU64::new(0);
    while let Some(c) = rx.recv().await {
        match c {
            Command::Connect { reply, .. } => {
                if n.fetch_add(1, Ordering::Relaxed) % 2 == 0 {
                    let _ = reply.send(Err("connection refused".into()));
                    continue;
                }
                let (to_app, from_tunnel) = mpsc::channel::<Bytes>(4);
                let (from_app, mut app_rx) = mpsc::channel::<Bytes>(4);
                let _ = to_app.try_send(Bytes::from_static(b"HTTP/1.0 200 OK\r\n\r\n"));
                drop(to_app);
                tokio::spawn(async move { while app_rx.recv().await.is_some() {} });
                let _ = reply.send(Ok(FlowEnds { tx: from_app, rx: from_tunnel, wake: Arc::new(Notify::new()) }));
            }
            Command::UdpSend { .. } | Command::UdpClose { .. } => {}
            Command::Status { reply } => {
                let _ = reply.send(tunnel_core::status::NodeStatus::new(tunnel_core::map::NodeKind::Client));
            }
        }
    }
}

fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        runtime().block_on(async {
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(fake_dataplane(rx));
            let dp = Dataplane {
                commands: tx,
                local_addr: "127.0.0.1:9".parse().unwrap_or_else(|_| unreachable!()),
                kind: tunnel_core::map::NodeKind::Client,
            };
            let m = map();
            let zone = PrivateZone::from_map(&m);
            let (maps_tx, maps) = watch::channel(Some(Arc::new(m)));
            let (zone_tx, zones) = watch::channel(Arc::new(zone));
            // The senders live as long as the process: the listener reads the current values.
            std::mem::forget(maps_tx);
            std::mem::forget(zone_tx);
            let listen: SocketAddr = "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!());
            let (bound, task) = socks::serve(listen, dp, maps, zones)
                .await
                .unwrap_or_else(|e| panic!("cannot start the SOCKS5 listener: {e}"));
            std::mem::forget(task);
            bound
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = socks::parse_udp_header(data);
    let addr = server();
    let reply = runtime().block_on(async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the local listener: {e}"));
        // The server may close early (it refused): a failed write is part of the game.
        let _ = s.write_all(data).await;
        let _ = s.shutdown().await;
        let mut reply = Vec::new();
        match tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut reply)).await {
            Ok(_) => reply,
            Err(_) => panic!("the SOCKS5 session did not end within 20 s of the client closing"),
        }
    });
    // A SOCKS5 greeting with a method list gets a method selection first.
    if reply.len() >= 2 {
        assert_eq!(reply[0], 5, "reply {reply:02x?}");
        assert!(reply[1] == 0 || reply[1] == 0xFF, "reply {reply:02x?}");
    }
    if reply.len() >= 2 && reply[1] == 0xFF {
        assert_eq!(reply.len(), 2, "refused method, then more: {reply:02x?}");
    }
});
