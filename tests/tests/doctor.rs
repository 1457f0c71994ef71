//! `tunnelctl doctor` on loopback (no root): a real server, a site agent and a userspace client, and
//! each link of the chain broken in turn. Doctor must name the broken link, keep checking the tunnels
//! when only the server is away, and never disturb the running client's session.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use serde_json::Value;
use tunnel_core::{JoinToken, KeyPin};
use tunnel_node::LinkState;
use tunnel_tests::loopback::{Loopback, Resource};
use tunnel_tests::{services, wait_until, TestServer};

/// The loopback network and its services (aborting one closes its port).
struct Net {
    lo: Loopback,
    services: Vec<tokio::task::JoinHandle<()>>,
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

/// Server; site `home` with `web` (alias web.private.example.com) and `db`; client `laptop` granted
/// both, running in userspace mode.
async fn net() -> Net {
    let server = TestServer::start().await.unwrap();
    let (web, web_task) = services::greeter().await;
    let (db, db_task) = services::greeter().await;
    let resources =
        [Resource::granted("web", web).alias("web.private.example.com"), Resource::granted("db", db)];
    Net { lo: Loopback::start(server, &resources).await, services: vec![web_task, db_task] }
}

/// Runs `tunnelctl doctor --json` against the client's state dir; returns the report and exit code.
async fn doctor_with(n: &Net, token: &str, json: bool) -> (String, i32) {
    let dir = n.client_dir.path().to_str().unwrap();
    let mut args = vec!["doctor", "--token", token, "--state-dir", dir, "--timeout", "10"];
    if json {
        args.push("--json");
    }
    let mut out = Vec::new();
    let code = match tunnelctl::cli::run_args(&args, &mut out).await {
        Ok(()) => 0,
        Err(e) => {
            e.downcast_ref::<tunnelctl::cli::Exit>().unwrap_or_else(|| panic!("doctor failed: {e:#}")).code
        }
    };
    (String::from_utf8(out).unwrap(), code)
}

async fn doctor(n: &Net, token: &str) -> (Value, i32) {
    let (out, code) = doctor_with(n, token, true).await;
    (serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}")), code)
}

fn step<'a>(r: &'a Value, name: &str, subject: Option<&str>) -> &'a Value {
    r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name && (subject.is_none() || s["subject"].as_str() == subject))
        .unwrap_or_else(|| panic!("no step {name} {subject:?} in {r:#}"))
}

fn status_of<'a>(r: &'a Value, name: &str, subject: Option<&str>) -> &'a str {
    step(r, name, subject)["status"].as_str().unwrap()
}

/// Node logins the server recorded for `laptop`.
async fn logins(n: &Net) -> usize {
    let audit = n.server.ctl_json(&["audit", "--json", "--limit", "1000"]).await.unwrap();
    audit.as_array().unwrap().iter().filter(|e| e["action"] == "login" && e["actor"] == "node:laptop").count()
}

#[tokio::test]
async fn every_link_ok_and_the_running_session_is_left_alone() {
    let n = net().await;
    let before = logins(&n).await;
    let (r, code) = doctor(&n, &n.client_token).await;
    assert_eq!((r["status"].as_str(), code), (Some("ok"), 0), "{r:#}");
    for (name, subject) in [
        ("config", None),
        ("dns", None),
        ("reach", None),
        ("tls", None),
        ("credentials", None),
        ("client", None),
        ("site", Some("home")),
        ("resource", Some("web")),
        ("resource", Some("db")),
        ("names", None),
    ] {
        assert_eq!(status_of(&r, name, subject), "ok", "{name} {subject:?}: {r:#}");
    }
    assert_eq!(r["mode"], "userspace");
    assert_eq!(r["node"], "laptop");
    let names = step(&r, "names", None)["detail"].as_str().unwrap();
    assert!(names.contains("web.private.example.com") && names.contains("not expected"), "{names}");
    // The running client's session was the proof: doctor did not log in (which would replace it).
    assert_eq!(logins(&n).await, before, "doctor logged in while `up` held a session");
    assert_eq!(*n.client.as_ref().unwrap().node.link.borrow(), LinkState::Connected);

    // The same for a person.
    let (text, code) = doctor_with(&n, &n.client_token, false).await;
    assert_eq!(code, 0);
    assert!(
        text.contains("resource web") && text.lines().last().unwrap().starts_with("ok: everything works"),
        "{text}"
    );
}

#[tokio::test]
async fn server_stopped_fails_the_control_path_but_the_tunnels_are_still_checked() {
    let mut n = net().await;
    n.server.stop().await;
    let (r, code) = doctor(&n, &n.client_token).await;
    assert_eq!((r["status"].as_str(), code), (Some("failed"), 1), "{r:#}");
    let reach = step(&r, "reach", None);
    assert_eq!(reach["status"], "failed", "{r:#}");
    assert!(reach["detail"].as_str().unwrap().contains("connection refused"), "{reach}");
    assert!(reach["fix"].as_str().unwrap().contains("start the server"), "{reach}");
    assert_eq!(status_of(&r, "tls", None), "skipped");
    assert_eq!(status_of(&r, "credentials", None), "skipped");
    // Tunnels do not need the server: they are checked from the cached map, and they work.
    for (name, subject) in
        [("client", None), ("site", Some("home")), ("resource", Some("web")), ("names", None)]
    {
        assert_eq!(status_of(&r, name, subject), "ok", "{name}: {r:#}");
    }
    assert!(r["summary"].as_str().unwrap().contains("cached map"), "{r:#}");
}

#[tokio::test]
async fn a_token_with_another_pin_fails_at_tls_with_the_fingerprint_reason() {
    let n = net().await;
    let mut token = JoinToken::parse(&n.client_token).unwrap();
    token.pin = KeyPin([7; 32]);
    let (r, code) = doctor(&n, &token.encode()).await;
    assert_eq!((r["status"].as_str(), code), (Some("failed"), 1), "{r:#}");
    assert_eq!(status_of(&r, "reach", None), "ok");
    let tls = step(&r, "tls", None);
    assert_eq!(tls["status"], "failed", "{r:#}");
    assert!(tls["detail"].as_str().unwrap().contains("wrong fingerprint"), "{tls}");
    assert!(tls["detail"].as_str().unwrap().contains(&KeyPin([7; 32]).to_string()), "{tls}");
    assert!(tls["fix"].as_str().unwrap().contains("tunnelctl client rotate"), "{tls}");
    // The walk stops at the broken link.
    assert_eq!(status_of(&r, "credentials", None), "skipped");
    assert!(r["summary"].as_str().unwrap().starts_with("tls:"), "{r:#}");
}

#[tokio::test]
async fn a_removed_client_fails_at_credentials() {
    let n = net().await;
    n.server.ctl(&["client", "rm", "laptop"]).await.unwrap();
    wait_until("the running client to be refused", || async {
        matches!(*n.client.as_ref().unwrap().node.link.borrow(), LinkState::Rejected(_))
    })
    .await;
    let (r, code) = doctor(&n, &n.client_token).await;
    assert_eq!((r["status"].as_str(), code), (Some("failed"), 1), "{r:#}");
    assert_eq!(status_of(&r, "tls", None), "ok");
    let creds = step(&r, "credentials", None);
    assert_eq!(creds["status"], "failed", "{r:#}");
    assert!(creds["detail"].as_str().unwrap().contains("not known to this server"), "{creds}");
    assert!(creds["fix"].as_str().unwrap().contains("tunnelctl client add"), "{creds}");
    assert_eq!(status_of(&r, "client", None), "skipped");
}

#[tokio::test]
async fn a_stopped_target_degrades_and_names_the_resource() {
    let mut n = net().await;
    let db = n.services.remove(1);
    db.abort();
    let _ = db.await;
    let (r, code) = doctor(&n, &n.client_token).await;
    assert_eq!((r["status"].as_str(), code), (Some("degraded"), 2), "{r:#}");
    let step_db = step(&r, "resource", Some("db"));
    assert_eq!(step_db["status"], "failed", "{r:#}");
    assert!(step_db["fix"].as_str().unwrap().contains("service behind db is down"), "{step_db}");
    assert_eq!(status_of(&r, "resource", Some("web")), "ok");
    assert_eq!(status_of(&r, "site", Some("home")), "ok");
    assert!(r["summary"].as_str().unwrap().contains("not reachable: db"), "{r:#}");
}

#[tokio::test]
async fn without_a_running_client_doctor_logs_in_itself_with_the_nodes_own_key() {
    let mut n = net().await;
    let key_of_laptop = |clients: &Value| {
        clients.as_array().unwrap().iter().find(|c| c["name"] == "laptop").unwrap()["public_key"].clone()
    };
    let key = key_of_laptop(&n.server.ctl_json(&["clients", "--json"]).await.unwrap());
    drop(n.client.take());
    let before = logins(&n).await;
    let (r, code) = doctor(&n, &n.client_token).await;
    assert_eq!((r["status"].as_str(), code), (Some("failed"), 1), "{r:#}");
    let creds = step(&r, "credentials", None);
    assert_eq!(creds["status"], "ok", "{r:#}");
    assert!(creds["detail"].as_str().unwrap().contains("saved session ticket"), "{creds}");
    assert_eq!(logins(&n).await, before + 1);
    // Logged in as the node itself: its key on the server did not change.
    assert_eq!(key_of_laptop(&n.server.ctl_json(&["clients", "--json"]).await.unwrap()), key);
    let client = step(&r, "client", None);
    assert_eq!(client["status"], "failed");
    assert!(client["detail"].as_str().unwrap().contains("not running"), "{client}");
    assert!(client["fix"].as_str().unwrap().contains("tunnelctl up"), "{client}");
    assert_eq!(status_of(&r, "resource", None), "skipped");
}
