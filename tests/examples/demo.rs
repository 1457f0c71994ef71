//! The quickstart demo, no root: a control server, a site agent and a userspace client on loopback,
//! a small HTTP service on the "site", and a fetch of that service through the WireGuard tunnel by its
//! private DNS name. Everything is the real thing (TLS, gRPC, SQLite, boringtun, smoltcp, SOCKS5, DNS);
//! only the network is loopback.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::Duration;

use anyhow::{bail, Context, Result};
use hickory_proto::rr::RecordType;
use tunnel_tests::loopback::{client_config, site_config};
use tunnel_tests::wire::{dns, http, socks5};
use tunnel_tests::{services, TestServer};

/// What the service answers: a stand-in for a management agent that publishes no port.
const GREETING: &str = "hello from periphery, a service on the home site\n";

#[tokio::main]
async fn main() -> Result<()> {
    let s = TestServer::start().await?;
    println!("1. control server on {} (TLS, pinned key; SQLite in a temp dir)", s.addr());
    let service = services::http(200, GREETING).await;
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
    let agent = tunnel_node::node::start(site_config(&site, dirs.0.path())).await?;
    println!("6. site agent up: WireGuard on udp {}, no root, no TUN", agent.dataplane.local_addr);
    let c = tunnelctl::up::start(client_config(&client, dirs.1.path())).await?;
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
    let answer = dns::query(c.dns, "periphery.tunnel.internal.", RecordType::A).await;
    let addr = dns::first_a(&answer).context("no A record for periphery.tunnel.internal")?;
    println!("8. DNS: periphery.tunnel.internal -> {addr} (private overlay address)");
    let host = "periphery.tunnel.internal";
    let stream = socks5::connect(c.socks5, host, port).await?;
    let reply = http::get_over(stream, host, "/", Duration::from_secs(10))
        .await
        .context("fetch through the tunnel")?;
    let body = reply.body.trim();
    println!(
        "9. GET http://{host}:{port}/ through the tunnel -> {}",
        reply.head.lines().next().unwrap_or("")
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
        bail!("unexpected answer: {reply:?}");
    }
    println!(
        "\nOK: the client reached a service that publishes no port, by its private name, through WireGuard."
    );
    drop(c);
    drop(agent);
    Ok(())
}
