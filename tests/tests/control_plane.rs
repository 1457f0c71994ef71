//! The control plane end to end: a real server on loopback (TLS, gRPC, SQLite in a temp dir), the real
//! `tunnelctl` command code, and real nodes on `Control.Connect`.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use tunnel_core::map::NodeKind;
use tunnel_core::{JoinToken, KeyPin};
use tunnel_node::{ConnectError, SessionError};
use tunnel_tests::{ctl, TestNode, TestServer};

async fn token(s: &TestServer, args: &[&str]) -> String {
    let out = s.ctl(args).await.expect("token command");
    assert_eq!(out.lines().count(), 1, "a token command prints the token and nothing else: {out:?}");
    let t = out.trim().to_owned();
    JoinToken::parse(&t).expect("a valid join token");
    t
}

#[tokio::test]
async fn admin_lifecycle_through_the_real_api() {
    let s = TestServer::start().await.unwrap();
    let site = token(&s, &["site", "add", "home"]).await;
    token(&s, &["client", "add", "laptop"]).await;
    let out = s
        .ctl(&[
            "add-resource",
            "--site",
            "home",
            "--name",
            "periphery",
            "--target",
            "periphery:8120",
            "--alias",
            "Periphery.Private.Example.com",
        ])
        .await
        .unwrap();
    assert!(out.contains("periphery.tunnel.internal"), "{out}");
    s.ctl(&["grant", "--client", "laptop", "--resource", "periphery"]).await.unwrap();
    assert!(s
        .ctl(&["grant", "--client", "laptop", "--resource", "periphery"])
        .await
        .unwrap()
        .contains("already"));

    let sites = s.ctl_json(&["sites", "--json"]).await.unwrap();
    assert_eq!(sites[0]["name"], "home");
    assert_eq!(sites[0]["id"], JoinToken::parse(&site).unwrap().node_id.to_string());
    assert_eq!(sites[0]["resources"][0], "periphery");
    let res = s.ctl_json(&["resources", "--json"]).await.unwrap();
    assert_eq!(res[0]["target"], "periphery:8120");
    assert_eq!(res[0]["alias"], "periphery.private.example.com", "aliases are stored in canonical form");
    assert_eq!(
        res[0]["dns_names"],
        serde_json::json!(["periphery.tunnel.internal", "periphery.private.example.com"])
    );
    assert_eq!(res[0]["clients"], serde_json::json!(["laptop"]));
    let addr: std::net::Ipv4Addr = res[0]["overlay_addr"].as_str().unwrap().parse().unwrap();
    assert!("100.96.0.0/16".parse::<ipnet::Ipv4Net>().unwrap().contains(&addr));
    let grants = s.ctl_json(&["grants", "--json"]).await.unwrap();
    assert_eq!(grants.as_array().unwrap().len(), 1);
    let table = s.ctl(&["resources"]).await.unwrap();
    assert!(table.starts_with("NAME") && table.contains("periphery:8120"), "{table}");

    s.ctl(&["revoke", "--client", "laptop", "--resource", "periphery"]).await.unwrap();
    assert_eq!(s.ctl_json(&["grants", "--json"]).await.unwrap(), serde_json::json!([]));
    s.ctl(&["rm-resource", "periphery"]).await.unwrap();
    assert_eq!(s.ctl_json(&["resources", "--json"]).await.unwrap(), serde_json::json!([]));
    s.ctl(&["client", "rm", "laptop"]).await.unwrap();
    s.ctl(&["site", "rm", "home"]).await.unwrap();
    assert_eq!(s.ctl_json(&["sites", "--json"]).await.unwrap(), serde_json::json!([]));

    let audit = s.ctl_json(&["audit", "--json"]).await.unwrap();
    let actions: Vec<&str> =
        audit.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    for a in
        ["site add", "client add", "add-resource", "grant", "revoke", "rm-resource", "client rm", "site rm"]
    {
        assert!(actions.contains(&a), "audit log lacks {a}: {actions:?}");
    }
}

#[tokio::test]
async fn nodes_get_their_map_and_every_change_pushed() {
    let s = TestServer::start().await.unwrap();
    let site_tok = token(&s, &["site", "add", "home"]).await;
    let client_tok = token(&s, &["client", "add", "laptop"]).await;
    let other_tok = token(&s, &["client", "add", "bystander"]).await;
    let mut site = TestNode::join(&site_tok, 1).await.unwrap();
    let mut client = TestNode::join(&client_tok, 2).await.unwrap();
    let mut other = TestNode::join(&other_tok, 3).await.unwrap();
    assert_eq!(site.map().kind, NodeKind::Site);
    assert!(site.map().peers.is_empty() && client.map().resources.is_empty(), "deny by default");
    let other_version = other.map().version;

    s.ctl(&["add-resource", "--site", "home", "--name", "prom", "--target", "prometheus:9090"])
        .await
        .unwrap();
    let m =
        site.wait_for("the new resource on the site", |m| m.resources.contains_key("prom")).await.unwrap();
    assert_eq!(m.resources["prom"].target.as_deref(), Some("prometheus:9090"));
    assert_eq!(m.resources["prom"].port, 9090);
    let prom_addr = m.resources["prom"].overlay_addr;

    s.ctl(&["grant", "--client", "laptop", "--resource", "prom"]).await.unwrap();
    let site_id = JoinToken::parse(&site_tok).unwrap().node_id;
    let client_id = JoinToken::parse(&client_tok).unwrap().node_id;
    let m = client
        .wait_for("resource and site peer", |m| {
            m.resources.contains_key("prom") && m.peers.contains_key(&site_id)
        })
        .await
        .unwrap();
    let r = &m.resources["prom"];
    assert_eq!(r.target, None, "clients never learn targets");
    assert_eq!(r.dns_names, vec!["prom.tunnel.internal"]);
    let p = &m.peers[&site_id];
    assert_eq!(p.public_key, Some(tunnel_core::PublicKey([1; 32])));
    assert!(p.allowed_ips.iter().any(|n| n.to_string() == format!("{prom_addr}/32")), "{:?}", p.allowed_ips);
    let m = site.wait_for("client peer", |m| m.peers.contains_key(&client_id)).await.unwrap();
    assert_eq!(m.peers[&client_id].public_key, Some(tunnel_core::PublicKey([2; 32])));
    let allowed: Vec<String> = m.peers[&client_id].allowed_ips.iter().map(ToString::to_string).collect();
    assert_eq!(allowed, vec![format!("{}/32", client.map().overlay_addr)]);

    s.ctl(&["revoke", "--client", "laptop", "--resource", "prom"]).await.unwrap();
    client.wait_for("revocation", |m| m.resources.is_empty() && m.peers.is_empty()).await.unwrap();
    site.wait_for("client gone", |m| m.peers.is_empty()).await.unwrap();

    // A node re-joining with a new key: its peers learn the key.
    s.ctl(&["grant", "--client", "laptop", "--resource", "prom"]).await.unwrap();
    site.wait_for("client peer again", |m| m.peers.contains_key(&client_id)).await.unwrap();
    drop(client);
    let _client2 = TestNode::join(&client_tok, 9).await.unwrap();
    site.wait_for("the client's new key", |m| {
        m.peers.get(&client_id).and_then(|p| p.public_key) == Some(tunnel_core::PublicKey([9; 32]))
    })
    .await
    .unwrap();

    // Exactly the affected nodes heard anything: the bystander's map never moved.
    assert_eq!(other.map().version, other_version);
    assert!(tokio::time::timeout(std::time::Duration::from_millis(300), other.session.next_map())
        .await
        .is_err());
}

#[tokio::test]
async fn wrong_credentials_are_unauthenticated_and_rate_limited() {
    let s = TestServer::start().await.unwrap();
    let good = JoinToken::parse(&token(&s, &["site", "add", "home"]).await).unwrap();
    let mut bad = good.clone();
    bad.secret = tunnel_core::Secret::from_random([7; 32]);
    let err = TestNode::join(&bad.encode(), 1).await.unwrap_err();
    assert!(matches!(&err, SessionError::Rejected(m) if m.contains("wrong secret")), "{err}");
    let mut unknown = good.clone();
    unknown.node_id = tunnel_core::NodeId::from_random([1; 10]);
    let err = TestNode::join(&unknown.encode(), 1).await.unwrap_err();
    assert!(matches!(&err, SessionError::Rejected(m) if m.contains("not known")), "{err}");
    // Keep guessing: the source gets refused before any check runs.
    let mut last = String::new();
    for _ in 0..12 {
        last = TestNode::join(&bad.encode(), 1).await.unwrap_err().to_string();
    }
    assert!(last.contains("too many failed"), "{last}");
    let audit = s.ctl_json(&["audit", "--json"]).await.unwrap();
    assert!(audit
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == "login" && e["outcome"].as_str().unwrap().starts_with("denied")));
}

#[tokio::test]
async fn a_wrong_pin_refuses_the_connection_before_any_secret_is_sent() {
    let s = TestServer::start().await.unwrap();
    let mut t = JoinToken::parse(&token(&s, &["site", "add", "home"]).await).unwrap();
    t.pin = KeyPin([0xAB; 32]);
    let err = TestNode::join(&t.encode(), 1).await.unwrap_err();
    assert!(matches!(err, SessionError::Connect(ConnectError::PinMismatch { .. })), "{err}");
    // The server never saw a login attempt: the TLS handshake failed first.
    let audit = s.ctl_json(&["audit", "--json"]).await.unwrap();
    assert!(!audit.as_array().unwrap().iter().any(|e| e["action"] == "login"), "{audit}");
    // Same for the admin token.
    let mut admin = tunnel_core::AdminToken::parse(&s.admin_token()).unwrap();
    admin.pin = KeyPin([1; 32]);
    let e = ctl(&["--admin-token", &admin.encode(), "sites"]).await.unwrap_err().to_string();
    assert!(e.contains("pins") && e.contains("not the server"), "{e}");
}

#[tokio::test]
async fn removing_or_rotating_a_node_ends_its_session_at_once() {
    let s = TestServer::start().await.unwrap();
    let t1 = token(&s, &["client", "add", "a"]).await;
    let t2 = token(&s, &["client", "add", "b"]).await;
    let mut a = TestNode::join(&t1, 1).await.unwrap();
    let mut b = TestNode::join(&t2, 2).await.unwrap();
    let new = token(&s, &["client", "rotate", "a"]).await;
    assert!(matches!(a.wait_end().await, SessionError::Revoked(r) if r.contains("rotated")));
    let old = TestNode::join(&t1, 1).await.unwrap_err();
    assert!(
        matches!(&old, SessionError::Rejected(m) if m.contains("wrong secret")),
        "the old secret is dead: {old}"
    );
    TestNode::join(&new, 1).await.unwrap();
    s.ctl(&["client", "rm", "b"]).await.unwrap();
    assert!(matches!(b.wait_end().await, SessionError::Revoked(r) if r.contains("removed")));
    assert!(matches!(TestNode::join(&t2, 2).await.unwrap_err(), SessionError::Rejected(_)));
}

#[tokio::test]
async fn single_use_and_expiring_tokens() {
    let s = TestServer::start().await.unwrap();
    let once = token(&s, &["client", "add", "once", "--once"]).await;
    let first = TestNode::join(&once, 1).await.unwrap();
    let ticket = first.session.welcome.session_ticket.clone();
    let err = TestNode::join(&once, 1).await.unwrap_err();
    assert!(err.to_string().contains("single-use"), "{err}");
    // The node that joined keeps reconnecting with its ticket.
    let cfg = first.cfg.clone();
    drop(first);
    tunnel_node::ControlSession::open(&cfg, Some(&ticket)).await.unwrap();

    let short = token(&s, &["site", "add", "short", "--ttl", "1s"]).await;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let err = TestNode::join(&short, 3).await.unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    // One key, one node: another node cannot take over a registered key.
    let thief = token(&s, &["client", "add", "thief"]).await;
    let err = TestNode::join(&thief, 1).await.unwrap_err();
    assert!(err.to_string().contains("another node"), "{err}");
    let err = s.ctl(&["site", "add", "x", "--ttl", "soon"]).await.unwrap_err().to_string();
    assert!(err.contains("not a duration"), "{err}");
}

#[tokio::test]
async fn a_restart_keeps_every_site_client_resource_grant_and_address() {
    let mut s = TestServer::start().await.unwrap();
    let site_tok = token(&s, &["site", "add", "home"]).await;
    token(&s, &["client", "add", "laptop"]).await;
    s.ctl(&[
        "add-resource",
        "--site",
        "home",
        "--name",
        "prom",
        "--target",
        "prometheus:9090",
        "--alias",
        "prom.example.com",
    ])
    .await
    .unwrap();
    s.ctl(&["grant", "--client", "laptop", "--resource", "prom"]).await.unwrap();
    let site = TestNode::join(&site_tok, 5).await.unwrap();
    let ticket = site.session.welcome.session_ticket.clone();
    let cfg = site.cfg.clone();
    drop(site);
    let before = s.snapshot().await.unwrap();
    s.restart().await.unwrap();
    assert_eq!(s.snapshot().await.unwrap(), before);
    // Tokens and tickets issued before the restart still work (same key, same port).
    let mut again = tunnel_node::ControlSession::open(&cfg, Some(&ticket)).await.unwrap();
    let m = again.next_map().await.unwrap();
    assert!(m.resources.contains_key("prom"));
    // New addresses do not collide with the old ones.
    s.ctl(&["add-resource", "--site", "home", "--name", "loki", "--target", "loki:3100"]).await.unwrap();
    let res = s.ctl_json(&["resources", "--json"]).await.unwrap();
    let addrs: std::collections::BTreeSet<&str> =
        res.as_array().unwrap().iter().map(|r| r["overlay_addr"].as_str().unwrap()).collect();
    assert_eq!(addrs.len(), 2);
}

#[tokio::test]
async fn bad_input_is_refused_with_a_reason_and_changes_nothing() {
    let s = TestServer::start().await.unwrap();
    token(&s, &["site", "add", "home"]).await;
    token(&s, &["client", "add", "laptop"]).await;
    s.ctl(&[
        "add-resource",
        "--site",
        "home",
        "--name",
        "prom",
        "--target",
        "prometheus:9090",
        "--alias",
        "prom.example.com",
    ])
    .await
    .unwrap();
    let before = s.snapshot().await.unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["add-resource", "--site", "nope", "--name", "x", "--target", "a:1"],
            "unknown site 'nope' (known: home)",
        ),
        (&["add-resource", "--site", "home", "--name", "prom", "--target", "a:1"], "already exists"),
        (&["add-resource", "--site", "home", "--name", "x", "--target", "a"], "has no port"),
        (&["add-resource", "--site", "home", "--name", "x", "--target", "a:0"], "not in 1-65535"),
        (&["add-resource", "--site", "home", "--name", "x", "--target", "a:99999"], "not in 1-65535"),
        (
            &["add-resource", "--site", "home", "--name", "x", "--target", "a:1", "--alias", "bad alias"],
            "not a valid DNS name",
        ),
        (
            &[
                "add-resource",
                "--site",
                "home",
                "--name",
                "x",
                "--target",
                "a:1",
                "--alias",
                "prom.example.com",
            ],
            "already used",
        ),
        (&["add-resource", "--site", "home", "--name", "Bad_Name", "--target", "a:1"], "is not valid"),
        (&["site", "add", "home"], "already exists"),
        (&["grant", "--client", "ghost", "--resource", "prom"], "unknown client 'ghost'"),
        (&["grant", "--client", "laptop", "--resource", "ghost"], "unknown resource 'ghost'"),
        (&["rm-resource", "ghost"], "unknown resource"),
        (&["site", "rm", "ghost"], "unknown site"),
    ];
    for (args, want) in cases {
        let err = s.ctl(args).await.unwrap_err().to_string();
        assert!(err.contains(want), "{args:?}: got {err:?}, want {want:?}");
        assert!(!err.contains('\n'), "one line: {err:?}");
    }
    // Token and connection problems.
    let e = ctl(&["--admin-token", "garbage", "sites"]).await.unwrap_err().to_string();
    assert!(e.contains("not a tunnel token"), "{e}");
    let mut wrong = tunnel_core::AdminToken::parse(&s.admin_token()).unwrap();
    wrong.secret = tunnel_core::Secret::from_random([3; 32]);
    let e = ctl(&["--admin-token", &wrong.encode(), "site", "add", "evil"]).await.unwrap_err().to_string();
    assert!(e.contains("wrong admin token"), "{e}");
    let site_token = token(&s, &["site", "add", "tmp"]).await;
    s.ctl(&["site", "rm", "tmp"]).await.unwrap();
    let e = ctl(&["--admin-token", &site_token, "sites"]).await.unwrap_err().to_string();
    assert!(e.contains("this is a join token"), "{e}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut down = tunnel_core::AdminToken::parse(&s.admin_token()).unwrap();
    down.server = closed.to_string();
    let e = ctl(&["--admin-token", &down.encode(), "sites"]).await.unwrap_err().to_string();
    assert!(e.contains("cannot reach the server"), "{e}");
    assert_eq!(s.snapshot().await.unwrap(), before, "refused input changed nothing");
}

#[tokio::test]
async fn an_exhausted_pool_is_a_clear_error() {
    let s = TestServer::start_with(|c| c.overlay_cidr = "100.96.0.0/29".parse().unwrap()).await.unwrap();
    // A /29 has six usable addresses.
    for i in 0..6 {
        s.ctl(&["client", "add", &format!("c{i}")]).await.unwrap();
    }
    let e = s.ctl(&["client", "add", "c6"]).await.unwrap_err().to_string();
    assert!(e.contains("exhausted") && e.contains("100.96.0.0/29"), "{e}");
    // A released address is not handed out again at once.
    let addr =
        s.ctl_json(&["clients", "--json"]).await.unwrap()[0]["overlay_addr"].as_str().unwrap().to_owned();
    s.ctl(&["client", "rm", "c0"]).await.unwrap();
    let e = s.ctl(&["client", "add", "c7"]).await.unwrap_err().to_string();
    assert!(e.contains("released"), "{e}");
    assert!(!s.ctl(&["clients"]).await.unwrap().contains(&addr));
}
