//! `tunnelctl apply`: a declarative config made true on a real server (TLS, gRPC, SQLite in a temp dir)
//! through the real command code, with real nodes on `Control.Connect` watching their maps.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tunnel_core::JoinToken;
use tunnel_node::SessionError;
use tunnel_server::store::{ApplyBatch, ResourceRow, Store};
use tunnel_tests::{TestNode, TestServer};

const BASE: &str = r#"
# The whole configuration, as a GitOps repository would hold it.
sites:
  - name: home
  - name: k8s
clients:
  - name: laptop
resources:
  - name: periphery
    site: home
    target: periphery:8120
    alias: periphery.private.example.com
  - name: prom
    site: k8s
    target: prometheus:9090
grants:
  - client: laptop
    resources: [periphery, prom]
"#;

fn write(s: &TestServer, name: &str, text: &str) -> String {
    let p = s.dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

fn tokens_dir(s: &TestServer) -> PathBuf {
    s.dir.path().join("tokens")
}

fn names(v: &Value) -> Vec<&str> {
    v.as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap()).collect()
}

fn token_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().file_name().into_string().unwrap()).collect(),
        Err(_) => vec![],
    };
    v.sort();
    v
}

fn read_token(dir: &Path, file: &str) -> String {
    let path = dir.join(file);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{file} is private");
    let t = std::fs::read_to_string(path).unwrap();
    JoinToken::parse(&t).unwrap();
    t.trim().to_owned()
}

/// Whether `out` has a table row starting with these cells (columns are padded, so compare words).
fn has_row(out: &str, cells: &[&str]) -> bool {
    let want = cells.join(" ");
    out.lines().any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ").starts_with(&want))
}

async fn audit_actions(s: &TestServer) -> Vec<(String, String)> {
    let a = s.ctl_json(&["audit", "--json", "--limit", "1000"]).await.unwrap();
    a.as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap().to_owned(), e["target"].as_str().unwrap().to_owned()))
        .collect()
}

#[tokio::test]
async fn apply_converges_a_fresh_server_and_a_second_apply_changes_nothing() {
    let s = TestServer::start().await.unwrap();
    let cfg = write(&s, "tunnel.yaml", BASE);
    let dir = tokens_dir(&s);
    let dir_s = dir.to_str().unwrap();
    let out = s.ctl(&["apply", &cfg, "--tokens-dir", dir_s]).await.unwrap();
    assert!(out.starts_with("ACTION"), "the plan comes first: {out}");
    assert!(out.contains("plan: 7 to create, 0 to update, 0 to delete, 0 unchanged"), "{out}");
    assert!(out.contains("applied: 7 created, 0 updated, 0 deleted, 0 unchanged"), "{out}");
    assert!(
        has_row(
            &out,
            &[
                "create",
                "resource",
                "periphery",
                "on site home: periphery:8120, alias periphery.private.example.com"
            ]
        ),
        "{out}"
    );
    assert!(!out.contains("tjn1"), "with --tokens-dir no token is printed: {out}");

    let sites = s.ctl_json(&["sites", "--json"]).await.unwrap();
    assert_eq!(names(&sites), vec!["home", "k8s"]);
    assert_eq!(names(&s.ctl_json(&["clients", "--json"]).await.unwrap()), vec!["laptop"]);
    let res = s.ctl_json(&["resources", "--json"]).await.unwrap();
    assert_eq!(names(&res), vec!["periphery", "prom"]);
    assert_eq!(res[0]["site"], "home");
    assert_eq!(res[0]["target"], "periphery:8120");
    assert_eq!(res[0]["alias"], "periphery.private.example.com");
    assert_eq!(res[1]["site"], "k8s");
    assert_eq!(res[1]["clients"], serde_json::json!(["laptop"]));
    assert_eq!(s.ctl_json(&["grants", "--json"]).await.unwrap().as_array().unwrap().len(), 2);

    // One token file per new node, private, naming that node.
    assert_eq!(token_files(&dir), vec!["client-laptop.token", "site-home.token", "site-k8s.token"]);
    let home = read_token(&dir, "site-home.token");
    assert_eq!(JoinToken::parse(&home).unwrap().node_id.to_string(), sites[0]["id"].as_str().unwrap());
    let laptop = read_token(&dir, "client-laptop.token");
    let _home = TestNode::join(&home, 1).await.unwrap();
    let client = TestNode::join(&laptop, 2).await.unwrap();
    let m = client.map();
    assert!(m.resources.contains_key("periphery") && m.resources.contains_key("prom"), "{m:?}");
    assert_eq!(m.peers.len(), 2, "both sites are the laptop's peers");

    // Again: nothing changes, no token is issued, nothing is written.
    let before = s.snapshot().await.unwrap();
    let out = s.ctl(&["apply", &cfg, "--tokens-dir", dir_s]).await.unwrap();
    assert!(out.contains("plan: 0 to create, 0 to update, 0 to delete, 7 unchanged"), "{out}");
    assert!(out.contains("no changes: the server already matches"), "{out}");
    assert!(!out.contains("ACTION"), "no step worth a line: {out}");
    assert_eq!(s.snapshot().await.unwrap(), before);
    assert_eq!(read_token(&dir, "client-laptop.token"), laptop, "token files are left alone");
    let j = s.ctl_json(&["apply", &cfg, "--json"]).await.unwrap();
    assert_eq!(j["applied"], false);
    assert_eq!(j["summary"]["unchanged"], 7);
    assert!(j["steps"].as_array().unwrap().iter().all(|st| st["action"] == "unchanged"), "{j}");
    assert_eq!(j["tokens"], serde_json::json!([]));

    // The audit log has the apply and each change, once.
    let audit = audit_actions(&s).await;
    assert_eq!(audit.iter().filter(|(a, _)| a == "apply").count(), 1, "{audit:?}");
    assert!(audit.contains(&("apply: site create".into(), "k8s".into())), "{audit:?}");
    assert!(audit.contains(&("apply: grant create".into(), "laptop -> prom".into())), "{audit:?}");
}

#[tokio::test]
async fn apply_updates_in_place_and_pushes_deltas_to_connected_nodes() {
    let s = TestServer::start().await.unwrap();
    let cfg = write(&s, "tunnel.yaml", BASE);
    // Without --tokens-dir, the JSON document carries the tokens.
    let j = s.ctl_json(&["apply", &cfg, "--json"]).await.unwrap();
    assert_eq!(j["applied"], true);
    let token = |kind: &str, name: &str| {
        j["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["kind"] == kind && t["name"] == name)
            .map(|t| t["join_token"].as_str().unwrap().to_owned())
            .unwrap()
    };
    let mut home = TestNode::join(&token("site", "home"), 1).await.unwrap();
    let mut k8s = TestNode::join(&token("site", "k8s"), 2).await.unwrap();
    let mut laptop = TestNode::join(&token("client", "laptop"), 3).await.unwrap();
    let res = s.ctl_json(&["resources", "--json"]).await.unwrap();
    let (periphery_addr, prom_addr) = (res[0]["overlay_addr"].clone(), res[1]["overlay_addr"].clone());
    let keys = || async {
        let v = s.ctl_json(&["sites", "--json"]).await.unwrap();
        v.as_array().unwrap().iter().map(|n| (n["id"].clone(), n["public_key"].clone())).collect::<Vec<_>>()
    };
    let keys_before = keys().await;

    // periphery gets a new target and loses its alias, prom moves to home, loki is new on k8s.
    let changed = BASE
        .replace("target: periphery:8120\n    alias: periphery.private.example.com", "target: periphery:9000")
        .replace("site: k8s\n    target: prometheus:9090", "site: home\n    target: prometheus:9090")
        .replace("grants:", "  - name: loki\n    site: k8s\n    target: loki:3100\ngrants:")
        .replace("[periphery, prom]", "[periphery, prom, loki]");
    let cfg2 = write(&s, "tunnel2.yaml", &changed);
    let out = s.ctl(&["apply", &cfg2]).await.unwrap();
    assert!(out.contains("plan: 2 to create, 2 to update, 0 to delete, 5 unchanged"), "{out}");
    assert!(
        has_row(
            &out,
            &[
                "update",
                "resource",
                "periphery",
                "target periphery:8120 -> periphery:9000, alias periphery.private.example.com -> (none)"
            ]
        ),
        "{out}"
    );
    assert!(has_row(&out, &["update", "resource", "prom", "site k8s -> home (new address)"]), "{out}");
    assert!(!out.contains("warning"), "no new node, no token: {out}");

    let res = s.ctl_json(&["resources", "--json"]).await.unwrap();
    assert_eq!(names(&res), vec!["loki", "periphery", "prom"]);
    assert_eq!(res[1]["overlay_addr"], periphery_addr, "same site: the address stays");
    assert_ne!(res[2]["overlay_addr"], prom_addr, "another site: a new address");
    assert_eq!(res[2]["clients"], serde_json::json!(["laptop"]), "the grant moved with it");
    assert_eq!(keys().await, keys_before, "nodes are never re-keyed");

    // Every affected node hears about it.
    let new_prom = res[2]["overlay_addr"].as_str().unwrap().to_owned();
    home.wait_for("periphery's new target and prom", |m| {
        m.resources.get("periphery").and_then(|r| r.target.as_deref()) == Some("periphery:9000")
            && m.resources.contains_key("prom")
    })
    .await
    .unwrap();
    k8s.wait_for("prom gone, loki here", |m| {
        !m.resources.contains_key("prom") && m.resources.contains_key("loki")
    })
    .await
    .unwrap();
    laptop
        .wait_for("loki, and prom at its new address", |m| {
            m.resources.contains_key("loki")
                && m.resources.get("prom").is_some_and(|r| r.overlay_addr.to_string() == new_prom)
                && m.resources
                    .get("periphery")
                    .is_some_and(|r| r.dns_names == vec!["periphery.tunnel.internal"])
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn prune_removes_what_the_file_no_longer_names() {
    let s = TestServer::start().await.unwrap();
    let dir = tokens_dir(&s);
    let dir_s = dir.to_str().unwrap();
    s.ctl(&["apply", &write(&s, "tunnel.yaml", BASE), "--tokens-dir", dir_s]).await.unwrap();
    let mut k8s = TestNode::join(&read_token(&dir, "site-k8s.token"), 1).await.unwrap();
    let mut laptop = TestNode::join(&read_token(&dir, "client-laptop.token"), 2).await.unwrap();
    let k8s_id = JoinToken::parse(&read_token(&dir, "site-k8s.token")).unwrap().node_id;
    assert!(laptop.map().peers.contains_key(&k8s_id));

    let smaller = r#"
sites:
  - name: home
clients:
  - name: laptop
resources:
  - name: periphery
    site: home
    target: periphery:8120
    alias: periphery.private.example.com
grants:
  - client: laptop
    resources: [periphery]
"#;
    let cfg = write(&s, "smaller.yaml", smaller);
    // Without --prune what the file does not name is kept, and the plan says so.
    let before = s.snapshot().await.unwrap();
    let out = s.ctl(&["apply", &cfg]).await.unwrap();
    assert!(
        has_row(&out, &["unchanged", "site", "k8s", "not in the config; kept (prune deletes it)"]),
        "{out}"
    );
    assert!(has_row(&out, &["unchanged", "grant", "laptop -> prom", "not in the config; kept"]), "{out}");
    assert!(out.contains("no changes"), "{out}");
    assert_eq!(s.snapshot().await.unwrap(), before);

    let out = s.ctl(&["apply", &cfg, "--prune"]).await.unwrap();
    assert!(out.contains("applied: 0 created, 0 updated, 3 deleted, 4 unchanged"), "{out}");
    for row in
        [["delete", "site", "k8s"], ["delete", "resource", "prom"], ["delete", "grant", "laptop -> prom"]]
    {
        assert!(has_row(&out, &row), "{row:?} in {out}");
    }
    assert_eq!(names(&s.ctl_json(&["sites", "--json"]).await.unwrap()), vec!["home"]);
    assert_eq!(names(&s.ctl_json(&["resources", "--json"]).await.unwrap()), vec!["periphery"]);
    let grants = s.ctl_json(&["grants", "--json"]).await.unwrap();
    assert_eq!(grants.as_array().unwrap().len(), 1);
    assert_eq!(grants[0]["resource"], "periphery");

    // The pruned site's session ends at once; the client loses it and its resource.
    assert!(matches!(k8s.wait_end().await, SessionError::Revoked(r) if r.contains("removed")));
    laptop
        .wait_for("k8s and prom gone", |m| {
            !m.peers.contains_key(&k8s_id) && !m.resources.contains_key("prom")
        })
        .await
        .unwrap();
    assert!(laptop.map().resources.contains_key("periphery"));
    let audit = audit_actions(&s).await;
    assert!(audit.contains(&("apply: site delete".into(), "k8s".into())), "{audit:?}");

    // Pruning again finds nothing to do.
    let out = s.ctl(&["apply", &cfg, "--prune"]).await.unwrap();
    assert!(out.contains("no changes"), "{out}");
    // And an explicit empty config with --prune empties the server.
    let out = s.ctl(&["apply", &write(&s, "empty.yaml", "sites: []\n"), "--prune"]).await.unwrap();
    assert!(out.contains("applied: 0 created, 0 updated, 4 deleted, 0 unchanged"), "{out}");
    assert_eq!(s.ctl_json(&["clients", "--json"]).await.unwrap(), serde_json::json!([]));
}

#[tokio::test]
async fn dry_run_shows_the_plan_and_changes_nothing() {
    let s = TestServer::start().await.unwrap();
    let cfg = write(&s, "tunnel.yaml", BASE);
    let dir = tokens_dir(&s);
    let dir_s = dir.to_str().unwrap();
    let empty = s.snapshot().await.unwrap();
    let out = s.ctl(&["apply", &cfg, "--dry-run", "--tokens-dir", dir_s]).await.unwrap();
    assert!(has_row(&out, &["create", "site", "home", "a join token is issued"]), "{out}");
    assert!(has_row(&out, &["create", "grant", "laptop -> prom"]), "{out}");
    assert!(out.contains("plan: 7 to create, 0 to update, 0 to delete, 0 unchanged"), "{out}");
    assert!(out.contains("dry run: nothing was changed"), "{out}");
    assert!(!out.contains("tjn1"));
    assert_eq!(s.snapshot().await.unwrap(), empty);
    assert!(token_files(&dir).is_empty(), "a dry run writes no token");

    s.ctl(&["apply", &cfg]).await.unwrap();
    let before = s.snapshot().await.unwrap();
    let changed = BASE.replace("prometheus:9090", "prometheus:9091").replace("  - name: k8s\n", "");
    let changed = changed.replace("site: k8s", "site: home");
    let cfg2 = write(&s, "changed.yaml", &changed);
    let j = s.ctl_json(&["apply", &cfg2, "--dry-run", "--prune", "--json"]).await.unwrap();
    assert_eq!(j["dry_run"], true);
    assert_eq!(j["applied"], false);
    assert_eq!(j["summary"]["update"], 1);
    assert_eq!(j["summary"]["delete"], 1);
    let steps: Vec<(&str, &str)> = j["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|st| st["action"] != "unchanged")
        .map(|st| (st["action"].as_str().unwrap(), st["name"].as_str().unwrap()))
        .collect();
    assert_eq!(steps, vec![("delete", "k8s"), ("update", "prom")]);
    assert_eq!(s.snapshot().await.unwrap(), before, "a dry run changed nothing");
    let audit = audit_actions(&s).await;
    assert_eq!(audit.iter().filter(|(a, _)| a == "apply").count(), 1, "dry runs leave no audit entry");
}

#[tokio::test]
async fn an_invalid_file_is_refused_with_one_line_and_nothing_changes() {
    let s = TestServer::start().await.unwrap();
    s.ctl(&["apply", &write(&s, "tunnel.yaml", BASE)]).await.unwrap();
    let before = s.snapshot().await.unwrap();
    let dir = tokens_dir(&s);
    let dir_s = dir.to_str().unwrap();
    let changes_audited = |a: &[(String, String)]| a.iter().filter(|(x, _)| x.starts_with("apply: ")).count();
    let audited_before = changes_audited(&audit_actions(&s).await);
    // Each file would also create a site if any part of it were applied.
    let with_extra = |text: &str| text.replace("  - name: k8s\n", "  - name: k8s\n  - name: extra\n");
    let cases: Vec<(String, &str)> = vec![
        (
            with_extra(BASE).replace("grants:", "  - name: prom\n    site: home\n    target: x:1\ngrants:"),
            "duplicate resource 'prom'",
        ),
        (
            with_extra(BASE).replace("[periphery, prom]", "[periphery, ghost]"),
            "grant laptop -> ghost: unknown resource 'ghost' (the config names: periphery, prom)",
        ),
        (
            with_extra(BASE)
                .replace("    target: prometheus:9090", "    target: prometheus:9090\n    port: 9090"),
            "unknown field `port`",
        ),
        (
            with_extra(BASE).replace("site: k8s", "site: k9s"),
            "resource 'prom': unknown site 'k9s' (the config names: extra, home, k8s)",
        ),
        (with_extra(BASE).replace("prometheus:9090", "prometheus"), "target 'prometheus' has no port"),
        (
            with_extra(BASE).replace(
                "target: prometheus:9090",
                "target: prometheus:9090\n    alias: periphery.private.example.com",
            ),
            "resource 'prom': alias periphery.private.example.com is already used by resource 'periphery'",
        ),
        (
            with_extra(BASE).replace("  - name: laptop\n", "  - name: laptop\n  - name: laptop\n"),
            "duplicate client 'laptop'",
        ),
        ("sites: [home\n".into(), "invalid config"),
        ("\n# nothing\n".into(), "the file is empty"),
    ];
    for (text, want) in &cases {
        let cfg = write(&s, "bad.yaml", text);
        for extra in [&[][..], &["--prune"][..]] {
            let mut args = vec!["apply", cfg.as_str(), "--tokens-dir", dir_s];
            args.extend_from_slice(extra);
            let e = s.ctl(&args).await.unwrap_err().to_string();
            assert!(e.contains(want), "{want:?} not in {e:?}");
            assert!(!e.contains('\n'), "one line: {e:?}");
            assert_eq!(s.snapshot().await.unwrap(), before, "{want}: nothing changed");
        }
    }
    assert!(token_files(&dir).is_empty(), "no token was issued");
    // Every problem of a file is reported at once.
    let two =
        with_extra(BASE).replace("[periphery, prom]", "[periphery, ghost]").replace("site: k8s", "site: k9s");
    let e = s.ctl(&["apply", &write(&s, "bad.yaml", &two)]).await.unwrap_err().to_string();
    assert!(e.starts_with("config refused, nothing was changed: 2 problems: "), "{e}");
    assert!(e.contains("unknown resource 'ghost'") && e.contains("unknown site 'k9s'"), "{e}");
    let audit = audit_actions(&s).await;
    assert_eq!(changes_audited(&audit), audited_before, "no change was audited");
    assert!(audit.iter().any(|(a, _)| a == "apply --dry-run"), "refusals are audited: {audit:?}");
}

/// A second handle on the server's database adds resource "zzz" on site home (target `z:1`)
/// behind the server's back; returns that handle.
async fn other_writer_adds_zzz(s: &TestServer) -> Store {
    let home_id = s.ctl_json(&["sites", "--json"]).await.unwrap()[0]["id"].as_str().unwrap().to_owned();
    let other = Store::open(None, &s.cfg.data_dir).await.unwrap();
    let zzz = ResourceRow {
        name: "zzz".into(),
        site_id: home_id,
        target: "z:1".into(),
        alias: None,
        overlay_addr: "100.96.255.200".into(),
        created_ms: 1,
        health_check: None,
    };
    other.apply(&ApplyBatch { insert_resources: vec![zzz], ..Default::default() }, 1).await.unwrap();
    other
}

#[tokio::test]
async fn a_failure_inside_the_transaction_rolls_back_everything() {
    let s = TestServer::start().await.unwrap();
    s.ctl(&["apply", &write(&s, "tunnel.yaml", BASE)]).await.unwrap();
    let before = s.snapshot().await.unwrap();
    // Another writer (as a second replica sharing the database would be) adds a resource behind this
    // server's back: the server plans "zzz" as new and finds the clash only in the database, after
    // the new site and client rows are already written in the same transaction.
    let other = other_writer_adds_zzz(&s).await;
    let bigger = BASE
        .replace("  - name: k8s\n", "  - name: k8s\n  - name: extra\n")
        .replace("  - name: laptop\n", "  - name: laptop\n  - name: ci\n")
        .replace(
            "grants:",
            "  - name: aaa\n    site: extra\n    target: a:1\n  - name: zzz\n    site: home\n    target: z:1\ngrants:\n  - client: ci\n    resources: [aaa, zzz]",
        );
    let cfg = write(&s, "bigger.yaml", &bigger);
    let dir = tokens_dir(&s);
    let e = s.ctl(&["apply", &cfg, "--tokens-dir", dir.to_str().unwrap()]).await.unwrap_err().to_string();
    assert!(e.contains("adding a resource") && e.contains("nothing was changed"), "{e}");
    assert!(!e.contains('\n'), "one line: {e:?}");
    assert_eq!(s.snapshot().await.unwrap(), before, "the model is untouched");
    let db = other.load(0).await.unwrap();
    let nodes: Vec<&str> = db.nodes.iter().map(|n| n.name.as_str()).collect();
    assert!(!nodes.contains(&"extra") && !nodes.contains(&"ci"), "the node rows rolled back: {nodes:?}");
    let resources: Vec<&str> = db.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(resources, vec!["periphery", "prom", "zzz"]);
    assert_eq!(db.grants.len(), 2);
    assert!(token_files(&dir).is_empty(), "no token for nodes that do not exist");

    // With the clash gone the same file applies whole.
    other.apply(&ApplyBatch { delete_resources: vec!["zzz".into()], ..Default::default() }, 0).await.unwrap();
    other.close().await;
    let out = s.ctl(&["apply", &cfg, "--tokens-dir", dir.to_str().unwrap(), "--once"]).await.unwrap();
    assert!(out.contains("applied: 6 created"), "{out}");
    assert_eq!(token_files(&dir), vec!["client-ci.token", "site-extra.token"]);
    let ci = s.ctl_json(&["clients", "--json"]).await.unwrap();
    assert_eq!(ci[0]["name"], "ci");
    assert_eq!(ci[0]["resources"], serde_json::json!(["aaa", "zzz"]));
    assert_eq!(ci[0]["join_once"], true, "--once limits the new tokens");
    assert_eq!(ci[1]["join_once"], false, "and leaves existing nodes alone");
}

/// A single operation commits through the same transaction as an apply: when the database refuses
/// it (here another writer took the name behind this server's back), the one-line error says
/// nothing was changed, and neither the model nor the database holds any part of it.
#[tokio::test]
async fn a_single_operation_refused_by_the_database_changes_nothing() {
    let s = TestServer::start().await.unwrap();
    s.ctl(&["apply", &write(&s, "tunnel.yaml", BASE)]).await.unwrap();
    let other = other_writer_adds_zzz(&s).await;
    let before = s.snapshot().await.unwrap();
    let e = s
        .ctl(&["add-resource", "--site", "home", "--name", "zzz", "--target", "z:2"])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("adding a resource") && e.contains("nothing was changed"), "{e}");
    assert!(!e.contains('\n'), "one line: {e:?}");
    assert_eq!(s.snapshot().await.unwrap(), before, "the model is untouched");
    let db = other.load(0).await.unwrap();
    let zzz: Vec<&str> = db.resources.iter().filter(|r| r.name == "zzz").map(|r| r.target.as_str()).collect();
    assert_eq!(zzz, vec!["z:1"], "only the other writer's row");
    other.close().await;
}
