//! The server against strangers and compromised nodes: each test is an attack that worked before the
//! hardening work (issue 10) and must not now. A real server on loopback, real TLS and gRPC.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::sync::atomic::Ordering;

use tokio_stream::wrappers::ReceiverStream;
use tunnel_core::map::{Candidate, CandidateKind};
use tunnel_core::JoinToken;
use tunnel_node::{ControlConfig, ControlSession, SessionError};
use tunnel_proto::v1 as pb;
use tunnel_tests::{TestNode, TestServer};

async fn token(s: &TestServer, args: &[&str]) -> String {
    s.ctl(args).await.expect("token command").trim().to_owned()
}

/// Sends `hello` on a raw Connect stream and returns the first thing the server answers.
async fn raw_hello(s: &TestServer, hello: pb::Hello) -> Result<pb::ServerMessage, tonic::Status> {
    let admin = tunnel_core::AdminToken::parse(&s.admin_token()).unwrap();
    let target = tunnel_node::ServerTarget { server: admin.server.clone(), pin: admin.pin };
    let channel = tunnel_node::connect(&target).await.unwrap();
    let mut client = pb::control_client::ControlClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::NodeMessage { msg: Some(pb::node_message::Msg::Hello(hello)) }).await.unwrap();
    let mut inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
    let first = inbound.message().await?;
    drop(tx);
    first.ok_or_else(|| tonic::Status::unknown("stream closed"))
}

#[tokio::test]
async fn a_strangers_node_id_is_stored_bounded_and_a_huge_hello_is_refused_unread() {
    let s = TestServer::start().await.unwrap();
    // 512 KiB of node id: under the inbound limit, so it is read, refused and audited, bounded.
    let hello =
        pb::Hello { node_id: "x".repeat(512 << 10), version: "v".repeat(100_000), ..Default::default() };
    let err = raw_hello(&s, hello).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let audit = s.ctl_json(&["audit", "--json"]).await.unwrap();
    let row =
        audit.as_array().unwrap().iter().find(|e| e["action"] == "login").expect("the denial is audited");
    for field in ["actor", "target", "outcome"] {
        let len = row[field].as_str().unwrap().chars().count();
        assert!(len <= 256, "{field} stored with {len} characters");
    }
    // 2 MiB: over what the control service reads from a node, refused before it is parsed.
    let hello = pb::Hello { node_id: "x".repeat(2 << 20), ..Default::default() };
    let err = raw_hello(&s, hello).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    let audit = s.ctl_json(&["audit", "--json"]).await.unwrap();
    assert_eq!(audit.as_array().unwrap().iter().filter(|e| e["action"] == "login").count(), 1);
}

#[tokio::test]
async fn parallel_guesses_from_one_source_are_charged_before_they_are_checked() {
    let s = TestServer::start().await.unwrap();
    let good = JoinToken::parse(&token(&s, &["site", "add", "home"]).await).unwrap();
    let mut bad = good.clone();
    bad.secret = tunnel_core::Secret::from_random([7; 32]);
    let bad = bad.encode();
    // 30 guesses at once: before, the bucket was only looked at on the way in, so all 30 got to argon2.
    let tries: Vec<_> = (0..30).map(|_| TestNode::join(&bad, 1)).collect();
    let results = futures::future::join_all(tries).await;
    let checked = results
        .iter()
        .filter(|r| matches!(r, Err(SessionError::Rejected(m)) if m.contains("wrong secret")))
        .count();
    let refused =
        results.iter().filter(|r| matches!(r, Err(e) if e.to_string().contains("too many"))).count();
    assert!(checked <= 10, "{checked} guesses reached the secret check (burst is 10)");
    assert_eq!(checked + refused, 30, "{results:?}");
}

#[tokio::test]
async fn a_secret_of_the_wrong_shape_is_refused_before_any_hashing() {
    let s = TestServer::start().await.unwrap();
    let odd = JoinToken::parse(&token(&s, &["client", "add", "odd"]).await).unwrap();
    let before = s.running().shared.gate.stats.refused_malformed.load(Ordering::Relaxed);
    let hello = pb::Hello {
        node_id: odd.node_id.to_string(),
        secret: "x".repeat(4000),
        public_key: vec![3; 32],
        ..Default::default()
    };
    let err = raw_hello(&s, hello).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let after = s.running().shared.gate.stats.refused_malformed.load(Ordering::Relaxed);
    assert_eq!(after, before + 1);
}

#[tokio::test]
async fn wrong_admin_tokens_and_stale_tickets_do_not_lock_out_joins_from_the_same_address() {
    let s = TestServer::start().await.unwrap();
    let t = token(&s, &["site", "add", "home"]).await;
    let mut wrong = tunnel_core::AdminToken::parse(&s.admin_token()).unwrap();
    wrong.secret = tunnel_core::Secret::from_random([9; 32]);
    let wrong = wrong.encode();
    let mut last = String::new();
    for _ in 0..15 {
        last = tunnel_tests::ctl(&["--admin-token", &wrong, "sites"]).await.unwrap_err().to_string();
    }
    assert!(last.contains("too many wrong admin tokens"), "{last}");
    // Stale tickets from the same address (a fleet after a rotation): counted per node, not here.
    let cfg = TestNode::keyed(&t, [5; 32]);
    for _ in 0..15 {
        let e = ControlSession::open(&cfg, Some(&[1u8; 49])).await.unwrap_err();
        assert!(!e.to_string().contains("failed logins"), "{e}");
    }
    // The real node still joins from this address.
    TestNode::join_with(cfg, None).await.unwrap();
}

#[tokio::test]
async fn a_stolen_ticket_without_the_private_key_does_not_log_in() {
    let s = TestServer::start_with(|c| c.login_limits.require_key_proof = true).await.unwrap();
    let t = token(&s, &["client", "add", "victim"]).await;
    let victim = TestNode::join_with(TestNode::keyed(&t, [5; 32]), None).await.unwrap();
    let ticket = victim.session.welcome.session_ticket.clone();
    let victim_pub = victim.cfg.public_key;
    // The thief has the ticket and the victim's public key (every peer sees it), not its private key.
    let mut thief = TestNode::keyed(&t, [6; 32]);
    thief.public_key = victim_pub;
    let e = ControlSession::open(&thief, Some(&ticket)).await.unwrap_err();
    assert!(e.to_string().contains("could not prove"), "{e}");
    // A node that cannot prove (older than key-proof-v1) is refused when the operator requires it.
    let old = ControlConfig { private_key: None, ..thief.clone() };
    let e = ControlSession::open(&old, Some(&ticket)).await.unwrap_err();
    assert!(e.to_string().contains("--require-key-proof"), "{e}");
    // With the join token too: the token is for the node, the key proof for its key.
    let e = ControlSession::open(&thief, None).await.unwrap_err();
    assert!(e.to_string().contains("could not prove"), "{e}");
    assert!(s.running().shared.gate.stats.refused_key_proof.load(Ordering::Relaxed) >= 3);
}

#[tokio::test]
async fn old_nodes_without_a_key_proof_are_accepted_and_counted() {
    let s = TestServer::start().await.unwrap();
    let t = token(&s, &["site", "add", "home"]).await;
    TestNode::join(&t, 1).await.unwrap();
    assert_eq!(s.running().shared.gate.stats.without_key_proof.load(Ordering::Relaxed), 1);
    let t2 = token(&s, &["site", "add", "new"]).await;
    TestNode::join_with(TestNode::keyed(&t2, [4; 32]), None).await.unwrap();
    assert_eq!(s.running().shared.gate.stats.without_key_proof.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_single_use_token_is_used_once_by_concurrent_logins() {
    let s = TestServer::start().await.unwrap();
    let t = token(&s, &["client", "add", "once", "--once"]).await;
    let a = TestNode::join_with(TestNode::keyed(&t, [1; 32]), None);
    let b = TestNode::join_with(TestNode::keyed(&t, [2; 32]), None);
    let (a, b) = tokio::join!(a, b);
    assert_eq!(a.is_ok() as u32 + b.is_ok() as u32, 1, "exactly one login wins: {a:?} / {b:?}");
}

#[tokio::test]
async fn reported_candidates_are_bounded_before_peers_see_them() {
    let s = TestServer::start().await.unwrap();
    let site = token(&s, &["site", "add", "home"]).await;
    let client = token(&s, &["client", "add", "laptop"]).await;
    s.ctl(&["add-resource", "--site", "home", "--name", "web", "--target", "127.0.0.1:80"]).await.unwrap();
    s.ctl(&["grant", "--client", "laptop", "--resource", "web"]).await.unwrap();
    let mut cfg = TestNode::keyed(&site, [3; 32]);
    let c = |addr: String, kind| Candidate { addr: addr.parse().unwrap(), kind };
    cfg.candidates =
        (0..200).map(|i| c(format!("10.9.{}.{}:51820", i / 200, i % 200 + 1), CandidateKind::Lan)).collect();
    // (Loopback is refused too, except from a node on the server's own host, as this one is.)
    for bad in ["224.0.0.251:5353", "[fe80::1]:9", "0.0.0.0:9", "100.96.0.1:51820"] {
        cfg.candidates.insert(0, c(bad.into(), CandidateKind::Reflexive));
    }
    let _site = TestNode::join_with(cfg, None).await.unwrap();
    let mut laptop = TestNode::join_with(TestNode::keyed(&client, [4; 32]), None).await.unwrap();
    let m = laptop
        .wait_for("the site's candidates", |m| m.peers.values().any(|p| !p.candidates.is_empty()))
        .await
        .unwrap();
    let peer = m.peers.values().next().unwrap();
    assert_eq!(peer.candidates.len(), tunnel_core::map::MAX_CANDIDATES_LAN, "{:?}", peer.candidates);
    assert!(
        peer.candidates.iter().all(|c| c.kind == CandidateKind::Lan),
        "no refused address reaches a peer"
    );
    assert!(s.running().shared.gate.stats.candidates_dropped.load(Ordering::Relaxed) >= 200 - 16 + 4);
}

#[tokio::test]
async fn tunnelctl_audit_pages_through_the_log() {
    let s = TestServer::start().await.unwrap();
    for i in 0..7 {
        token(&s, &["site", "add", &format!("s{i}")]).await;
    }
    let all = s.ctl_json(&["audit", "--json", "--limit", "5"]).await.unwrap();
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 5);
    let ids: Vec<i64> = all.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    let last = ids[4].to_string();
    let rest = s.ctl_json(&["audit", "--json", "--before", &last]).await.unwrap();
    let rest: Vec<i64> = rest.as_array().unwrap().iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(rest.len() >= 2 && rest.iter().all(|id| *id < ids[4]), "{rest:?}");
}

#[tokio::test]
async fn grpc_connections_are_capped_per_source() {
    let s = TestServer::start_with(|c| c.conn_limits.per_source = 3).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(s.addr()).await.unwrap());
    }
    // Before, a fourth (and a ten-thousandth) waited for its TLS handshake like any other.
    let mut fourth = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        tokio::io::AsyncReadExt::read(&mut fourth, &mut buf),
    )
    .await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "the fourth connection was kept: {n:?}");
    assert_eq!(s.running().shared.gate.stats.conns_refused.load(Ordering::Relaxed), 1);
    // Slots come back when connections close: tunnelctl gets in again.
    drop(held);
    let deadline = tokio::time::Instant::now() + tunnel_tests::PATIENCE;
    while s.ctl(&["sites"]).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "slots never came back");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn rotating_a_fought_over_identity_gives_the_new_token_a_fresh_login_budget() {
    let s = TestServer::start_with(|c| {
        c.login_limits.node_burst = 2;
        c.login_limits.node_per_minute = 1;
    })
    .await
    .unwrap();
    let t = token(&s, &["client", "add", "laptop"]).await;
    // Two machines with the leaked token take the identity from each other until the budget is spent.
    let mut refused = None;
    for i in 0..4u8 {
        if let Err(e) = TestNode::join_with(TestNode::keyed(&t, [10 + i; 32]), None).await {
            refused = Some(e.to_string());
            break;
        }
    }
    let refused = refused.expect("the per-node budget ran out");
    assert!(refused.contains("too many logins"), "{refused}");
    // The operator rotates; the rightful machine joins with the new token at once (before: it waited
    // out the budget the thief spent, a minute a login here).
    let new = token(&s, &["client", "rotate", "laptop"]).await;
    TestNode::join_with(TestNode::keyed(&new, [20; 32]), None).await.expect("the new token logs in");
}
