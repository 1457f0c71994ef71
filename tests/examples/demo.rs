//! The quickstart demo: a real control server on loopback (TLS, gRPC, SQLite in a temp dir), a site
//! and a client added with the real `tunnelctl` code, a resource published and granted, and both nodes
//! joining and receiving their network maps. No root needed.
//!
//! The data plane (WireGuard tunnels, the agent's forwarding, private DNS answering) is not built yet;
//! when it is, this demo fetches the resource through the tunnel by its private name.

use std::time::Duration;

use anyhow::Result;
use tunnel_tests::{TestNode, TestServer};

#[tokio::main]
async fn main() -> Result<()> {
    let s = TestServer::start().await?;
    println!("1. control server listening on {} (data in a temp dir)", s.addr());
    let site = s.ctl(&["site", "add", "home"]).await?.trim().to_owned();
    println!("2. tunnelctl site add home        -> join token {}...", &site[..24]);
    let client = s.ctl(&["client", "add", "laptop"]).await?.trim().to_owned();
    println!("3. tunnelctl client add laptop    -> join token {}...", &client[..24]);
    let out = s
        .ctl(&[
            "add-resource",
            "--site",
            "home",
            "--name",
            "periphery",
            "--target",
            "127.0.0.1:8120",
            "--alias",
            "periphery.private.example.com",
        ])
        .await?;
    println!("4. tunnelctl add-resource ...     -> {}", out.trim());
    let out = s.ctl(&["grant", "--client", "laptop", "--resource", "periphery"]).await?;
    println!("5. tunnelctl grant ...            -> {}", out.trim());

    let site_node = TestNode::join(&site, 1).await?;
    let mut client_node = TestNode::join(&client, 2).await?;
    let m = client_node.wait_for("its resource", |m| !m.resources.is_empty()).await?;
    println!("6. the client joined over pinned TLS and received map version {}:", m.version);
    println!("     its overlay address  {}", m.overlay_addr);
    for r in m.resources.values() {
        println!("     resource {:<12} {} answers as {}", r.name, r.overlay_addr, r.dns_names.join(", "));
    }
    for p in m.peers.values() {
        println!(
            "     peer {:<16} {} ({}), allowed {}",
            p.name,
            p.overlay_addr,
            p.kind.as_str(),
            p.allowed_ips.join(", ")
        );
    }
    let sm = site_node.map();
    println!(
        "7. the site sees {} peer(s) and re-dials {} for periphery",
        sm.peers.len(),
        sm.resources["periphery"].target.as_deref().unwrap_or("?")
    );
    s.ctl(&["revoke", "--client", "laptop", "--resource", "periphery"]).await?;
    client_node.wait_for("revocation", |m| m.resources.is_empty()).await?;
    println!("8. tunnelctl revoke ...           -> pushed; the client's map no longer holds periphery");
    tokio::time::sleep(Duration::from_millis(50)).await;
    println!("\nData plane (WireGuard tunnel, agent forwarding, private DNS) is not part of this build yet.");
    Ok(())
}
