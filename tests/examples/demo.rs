//! The quickstart demo, no root: a control server, a site agent and a userspace client on loopback,
//! a small HTTP service on the "site", and a fetch of that service through the WireGuard tunnel by its
//! private DNS name. Everything is the real thing (TLS, gRPC, SQLite, boringtun, smoltcp, SOCKS5, DNS);
//! only the network is loopback.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tunnel_core::map::NodeKind;
use tunnel_core::JoinToken;
use tunnel_tests::TestServer;

/// A tiny HTTP service standing in for a management agent that publishes no port.
async fn http_service() -> Result<std::net::SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let body = "hello from periphery, a service on the home site\n";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(addr)
}

async fn dns_a(dns: std::net::SocketAddr, name: &str) -> Result<String> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    use std::str::FromStr;
    let mut q = Message::new(1, MessageType::Query, OpCode::Query);
    q.add_query(Query::query(Name::from_str(name)?, RecordType::A));
    let s = UdpSocket::bind("127.0.0.1:0").await?;
    s.send_to(&q.to_vec()?, dns).await?;
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), s.recv_from(&mut buf)).await??;
    let m = Message::from_vec(&buf[..n])?;
    match m.answers.first().map(|r| &r.data) {
        Some(RData::A(a)) => Ok(a.0.to_string()),
        _ => bail!("no A record for {name}"),
    }
}

async fn socks_get(proxy: std::net::SocketAddr, host: &str, port: u16) -> Result<String> {
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(&[5, 1, 0]).await?;
    let mut r = [0u8; 2];
    s.read_exact(&mut r).await?;
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await?;
    if rep[1] != 0 {
        bail!("the SOCKS5 proxy refused (code {})", rep[1]);
    }
    s.write_all(format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await??;
    Ok(out)
}

#[tokio::main]
async fn main() -> Result<()> {
    let s = TestServer::start().await?;
    println!("1. control server on {} (TLS, pinned key; SQLite in a temp dir)", s.addr());
    let service = http_service().await?;
    println!("2. an HTTP service on the site's network at {service}, publishing no port to the world");
    let site = s.ctl(&["site", "add", "home"]).await?.trim().to_owned();
    let client = s.ctl(&["client", "add", "laptop"]).await?.trim().to_owned();
    println!("3. tunnelctl site add home / client add laptop -> two join tokens");
    let out = s
        .ctl(&[
            "add-resource",
            "--site",
            "home",
            "--name",
            "periphery",
            "--target",
            &service.to_string(),
            "--alias",
            "periphery.private.example.com",
        ])
        .await?;
    println!("4. tunnelctl add-resource -> {}", out.trim());
    s.ctl(&["grant", "--client", "laptop", "--resource", "periphery"]).await?;
    println!("5. tunnelctl grant --client laptop --resource periphery");

    let dirs = (tempfile::tempdir()?, tempfile::tempdir()?);
    let agent = tunnel_node::node::start(tunnel_node::node::NodeConfig {
        kind: NodeKind::Site,
        token: JoinToken::parse(&site)?,
        state_dir: dirs.0.path().to_owned(),
        listen_port: 0,
        advertise: vec![],
        metrics_listen: Some("127.0.0.1:0".parse()?),
        version: "demo".into(),
        keepalive: tunnel_node::dataplane::DEFAULT_KEEPALIVE,
        force_relay: false,
        tcp: Default::default(),
    })
    .await?;
    println!("6. site agent up: WireGuard on udp {}, no root, no TUN", agent.dataplane.local_addr);
    let c = tunnelctl::up::start(tunnelctl::up::UpConfig {
        token: JoinToken::parse(&client)?,
        state_dir: dirs.1.path().to_owned(),
        metrics_listen: "127.0.0.1:0".parse()?,
        userspace: true,
        socks5: "127.0.0.1:0".parse()?,
        dns_listen: "127.0.0.1:0".parse()?,
        listen_port: 0,
        keepalive: tunnel_node::dataplane::DEFAULT_KEEPALIVE,
        force_relay: false,
        tcp: Default::default(),
        dns: Default::default(),
        dns_mode: tunnelctl::up::resolv::DnsMode::Off,
        tun_name: String::new(),
        resolv_conf: "/etc/resolv.conf".into(),
    })
    .await?;
    println!("7. client up (userspace): SOCKS5 on {}, DNS on {}", c.socks5, c.dns);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let port = loop {
        if let Some(p) =
            c.node.maps.borrow().as_ref().and_then(|m| m.resources.get("periphery").map(|r| r.port))
        {
            break p;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the client never received its network map");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let addr = dns_a(c.dns, "periphery.tunnel.internal.").await?;
    println!("8. DNS: periphery.tunnel.internal -> {addr} (private overlay address)");
    let reply =
        socks_get(c.socks5, "periphery.tunnel.internal", port).await.context("fetch through the tunnel")?;
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    println!(
        "9. GET http://periphery.tunnel.internal:{port}/ through the tunnel -> {}",
        reply.lines().next().unwrap_or("")
    );
    println!("   body: {body}");
    let st = c.node.dataplane.status().await;
    let p = st.as_ref().and_then(|s| s.peers.first());
    println!(
        "10. tunnel to site '{}': path {}, endpoint {}, {} bytes in, {} bytes out",
        p.map_or("?", |p| p.name.as_str()),
        p.map_or("?", |p| p.path.as_str()),
        p.and_then(|p| p.endpoint.as_deref()).unwrap_or("?"),
        p.map_or(0, |p| p.rx_bytes),
        p.map_or(0, |p| p.tx_bytes)
    );
    if !body.starts_with("hello from periphery") {
        bail!("unexpected answer: {reply}");
    }
    println!(
        "\nOK: the client reached a service that publishes no port, by its private name, through WireGuard."
    );
    drop(c);
    drop(agent);
    Ok(())
}
