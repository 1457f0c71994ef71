//! The storage suite, run against SQLite always and against PostgreSQL when
//! `TUNNEL_TEST_POSTGRES_URL` is set (CI sets it; under `CI=true` a missing URL is a failure, so the
//! PostgreSQL half can never be skipped silently there).

use super::*;

fn node(id: &str, kind: &str, name: &str, addr: &str) -> NodeRow {
    NodeRow {
        id: id.into(),
        kind: kind.into(),
        name: name.into(),
        overlay_addr: addr.into(),
        public_key: None,
        secret_hash: "$argon2id$x".into(),
        generation: 1,
        join_expires_ms: 0,
        join_once: true,
        join_used: false,
        created_ms: 10,
        last_seen_ms: 0,
        version: String::new(),
    }
}

/// A fresh, empty database for one test on each backend available.
async fn stores() -> Vec<(Store, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let mut v = vec![(Store::open(None, dir.path()).await.unwrap(), Some(dir))];
    match std::env::var("TUNNEL_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => {
            // One database per test, so tests run in parallel without seeing each other.
            let admin = Store::open(Some(&url), std::path::Path::new("/nonexistent")).await.unwrap();
            let db = format!("tunnel_t_{}", rand::random::<u64>());
            sqlx::query(&format!("CREATE DATABASE {db}")).execute(&admin.pool).await.unwrap();
            admin.close().await;
            let base = url.rsplit_once('/').map(|(b, _)| b).unwrap();
            v.push((
                Store::open(Some(&format!("{base}/{db}")), std::path::Path::new("/nonexistent"))
                    .await
                    .unwrap(),
                None,
            ));
        }
        _ => assert!(
            std::env::var("CI").map(|v| v != "true").unwrap_or(true),
            "CI=true but TUNNEL_TEST_POSTGRES_URL is unset: the PostgreSQL storage tests would be skipped"
        ),
    }
    v
}

#[tokio::test]
async fn nodes_resources_grants_round_trip() {
    for (s, _dir) in stores().await {
        s.insert_node(&node("n1", "site", "home", "100.96.0.1")).await.unwrap();
        s.insert_node(&node("n2", "client", "laptop", "100.96.0.2")).await.unwrap();
        let r = ResourceRow {
            name: "prom".into(),
            site_id: "n1".into(),
            target: "prometheus:9090".into(),
            alias: Some("prom.example.com".into()),
            overlay_addr: "100.96.0.3".into(),
            created_ms: 11,
            health_check: Some("http:/-/ready".into()),
        };
        s.insert_resource(&r).await.unwrap();
        s.insert_grant(&GrantRow { client_id: "n2".into(), resource_name: "prom".into(), created_ms: 12 })
            .await
            .unwrap();
        assert!(s.record_join(&join("n2", 1, "a2V5", true)).await.unwrap());
        assert!(
            !s.record_join(&JoinRecord { spend_once: false, ..join("n2", 7, "b3Zz", true) }).await.unwrap(),
            "a stale generation writes nothing"
        );
        assert!(
            !s.record_join(&join("n2", 1, "b3Zz", true)).await.unwrap(),
            "a single-use secret is spent once: the second login writes nothing"
        );
        let snap = s.load(0).await.unwrap();
        assert_eq!(snap.nodes.len(), 2, "{:?}", s.backend());
        let laptop = snap.nodes.iter().find(|n| n.id == "n2").unwrap();
        assert_eq!(laptop.public_key.as_deref(), Some("a2V5"));
        assert!(laptop.join_used && laptop.join_once);
        assert_eq!(laptop.version, "0.1.0");
        assert_eq!(snap.resources, vec![r]);
        assert_eq!(snap.grants.len(), 1);
    }
}

#[tokio::test]
async fn uniqueness_is_enforced_by_the_database_too() {
    for (s, _dir) in stores().await {
        s.insert_node(&node("n1", "site", "home", "100.96.0.1")).await.unwrap();
        assert!(
            s.insert_node(&node("n9", "site", "home", "100.96.0.9")).await.is_err(),
            "same kind and name"
        );
        assert!(s.insert_node(&node("n8", "client", "x", "100.96.0.1")).await.is_err(), "same address");
        s.insert_node(&node("n7", "client", "home", "100.96.0.7")).await.unwrap();
        assert_eq!(s.load(0).await.unwrap().nodes.len(), 2);
    }
}

#[tokio::test]
async fn removing_a_site_takes_its_resources_and_grants_and_quarantines_addresses() {
    for (s, _dir) in stores().await {
        s.insert_node(&node("n1", "site", "home", "100.96.0.1")).await.unwrap();
        s.insert_node(&node("n2", "client", "laptop", "100.96.0.2")).await.unwrap();
        for (name, addr) in [("a", "100.96.0.3"), ("b", "100.96.0.4")] {
            s.insert_resource(&ResourceRow {
                name: name.into(),
                site_id: "n1".into(),
                target: "h:1".into(),
                alias: None,
                overlay_addr: addr.into(),
                created_ms: 1,
                health_check: None,
            })
            .await
            .unwrap();
            s.insert_grant(&GrantRow { client_id: "n2".into(), resource_name: name.into(), created_ms: 1 })
                .await
                .unwrap();
        }
        let removed = s.delete_node("n1", 1000).await.unwrap();
        assert_eq!(removed.resources, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(removed.grants, 2);
        let snap = s.load(0).await.unwrap();
        assert_eq!(snap.nodes.len(), 1);
        assert!(snap.resources.is_empty() && snap.grants.is_empty());
        let mut released: Vec<String> = snap.released.iter().map(|(a, _)| a.clone()).collect();
        released.sort();
        assert_eq!(released, vec!["100.96.0.1", "100.96.0.3", "100.96.0.4"]);
        // Past the quarantine the records are pruned on load.
        assert!(s.load(2000).await.unwrap().released.is_empty());
    }
}

#[tokio::test]
async fn rotation_resets_join_limits_and_audit_keeps_order() {
    for (s, _dir) in stores().await {
        let mut n = node("n1", "site", "home", "100.96.0.1");
        n.join_used = true;
        s.insert_node(&n).await.unwrap();
        let rotated = SecretRow {
            id: "n1".into(),
            secret_hash: "$argon2id$new".into(),
            generation: 2,
            join_expires_ms: 5000,
            join_once: false,
        };
        s.update_secret(&rotated).await.unwrap();
        let row = s.load(0).await.unwrap().nodes.remove(0);
        assert_eq!(
            (row.secret_hash.as_str(), row.generation, row.join_expires_ms),
            ("$argon2id$new", 2, 5000)
        );
        assert!(!row.join_used && !row.join_once);
        for i in 0..3 {
            s.audit(&AuditRow {
                at_ms: i,
                actor: "admin".into(),
                action: format!("a{i}"),
                target: "t".into(),
                source: "127.0.0.1:1".into(),
                outcome: "ok".into(),
            })
            .await
            .unwrap();
        }
        let log = s.list_audit(2, 0).await.unwrap();
        assert_eq!(log.iter().map(|e| e.row.action.as_str()).collect::<Vec<_>>(), vec!["a2", "a1"]);
        // The next page starts below the last id seen.
        let rest = s.list_audit(2, log[1].id).await.unwrap();
        assert_eq!(rest.iter().map(|e| e.row.action.as_str()).collect::<Vec<_>>(), vec!["a0"]);
        assert_eq!(s.prune_audit(2).await.unwrap(), 2, "entries written before 2 ms are gone");
        assert_eq!(s.list_audit(10, 0).await.unwrap().len(), 1);
        s.set_meta("overlay_cidr", "100.96.0.0/16").await.unwrap();
        s.set_meta("overlay_cidr", "100.97.0.0/16").await.unwrap();
        assert_eq!(s.meta("overlay_cidr").await.unwrap().as_deref(), Some("100.97.0.0/16"));
    }
}

#[tokio::test]
async fn audit_fields_are_stored_bounded() {
    for (s, _dir) in stores().await {
        let huge = "x".repeat(4 << 20);
        s.audit(&AuditRow {
            at_ms: 1,
            actor: format!("node:{huge}"),
            action: "login".into(),
            target: huge.clone(),
            source: "192.0.2.1:9".into(),
            outcome: "denied\nforged line".into(),
        })
        .await
        .unwrap();
        let e = s.list_audit(1, 0).await.unwrap().remove(0).row;
        assert_eq!(e.target.chars().count(), super::AUDIT_FIELD_MAX);
        assert_eq!(e.actor.chars().count(), super::AUDIT_FIELD_MAX);
        assert!(e.target.ends_with('…'));
        assert_eq!(e.outcome, "denied?forged line", "no control characters reach the log");
    }
}

fn join<'a>(id: &'a str, generation: i64, key: &'a str, once: bool) -> JoinRecord<'a> {
    JoinRecord {
        id,
        generation,
        public_key: key,
        join_used: true,
        spend_once: once,
        version: "0.1.0",
        now_ms: 99,
    }
}

fn resource(name: &str, site: &str, alias: Option<&str>, addr: &str) -> ResourceRow {
    ResourceRow {
        name: name.into(),
        site_id: site.into(),
        target: "h:1".into(),
        alias: alias.map(str::to_owned),
        overlay_addr: addr.into(),
        created_ms: 1,
        health_check: None,
    }
}

#[tokio::test]
async fn an_apply_batch_lands_whole_with_moves_and_alias_swaps() {
    for (s, _dir) in stores().await {
        s.insert_node(&node("n1", "site", "home", "100.96.0.1")).await.unwrap();
        s.insert_node(&node("n2", "client", "laptop", "100.96.0.2")).await.unwrap();
        s.insert_resource(&resource("a", "n1", Some("a.example.com"), "100.96.0.3")).await.unwrap();
        s.insert_resource(&resource("b", "n1", Some("b.example.com"), "100.96.0.4")).await.unwrap();
        s.insert_resource(&resource("gone", "n1", None, "100.96.0.5")).await.unwrap();
        s.insert_grant(&GrantRow { client_id: "n2".into(), resource_name: "a".into(), created_ms: 1 })
            .await
            .unwrap();
        s.insert_grant(&GrantRow { client_id: "n2".into(), resource_name: "gone".into(), created_ms: 1 })
            .await
            .unwrap();
        let b = ApplyBatch {
            delete_grants: vec![("n2".into(), "gone".into())],
            delete_resources: vec!["gone".into()],
            insert_nodes: vec![node("n3", "site", "k8s", "100.96.0.6")],
            // a and b swap aliases; a moves to the new site with a new address; the old site goes.
            update_resources: vec![
                resource("a", "n3", Some("b.example.com"), "100.96.0.7"),
                resource("b", "n3", Some("a.example.com"), "100.96.0.4"),
            ],
            delete_nodes: vec!["n1".into()],
            insert_resources: vec![resource("c", "n3", None, "100.96.0.8")],
            insert_grants: vec![GrantRow {
                client_id: "n2".into(),
                resource_name: "c".into(),
                created_ms: 9,
            }],
            // And the client's secret is rotated in the same transaction.
            rotate_secrets: vec![SecretRow {
                id: "n2".into(),
                secret_hash: "$argon2id$rotated".into(),
                generation: 2,
                join_expires_ms: 77,
                join_once: true,
            }],
        };
        s.apply(&b, 1000).await.unwrap();
        let snap = s.load(0).await.unwrap();
        let names: Vec<&str> = snap.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, vec!["laptop", "k8s"], "{:?}", s.backend());
        let laptop = &snap.nodes[0];
        assert_eq!(
            (laptop.secret_hash.as_str(), laptop.generation, laptop.join_expires_ms, laptop.join_once),
            ("$argon2id$rotated", 2, 77, true),
            "{:?}",
            s.backend()
        );
        let res: Vec<(&str, &str, Option<&str>, &str)> = snap
            .resources
            .iter()
            .map(|r| (r.name.as_str(), r.site_id.as_str(), r.alias.as_deref(), r.overlay_addr.as_str()))
            .collect();
        assert_eq!(
            res,
            vec![
                ("a", "n3", Some("b.example.com"), "100.96.0.7"),
                ("b", "n3", Some("a.example.com"), "100.96.0.4"),
                ("c", "n3", None, "100.96.0.8"),
            ]
        );
        let mut grants: Vec<&str> = snap.grants.iter().map(|g| g.resource_name.as_str()).collect();
        grants.sort();
        assert_eq!(grants, vec!["a", "c"], "a's grant survived its move");
        let mut released: Vec<&str> = snap.released.iter().map(|(a, _)| a.as_str()).collect();
        released.sort();
        assert_eq!(released, vec!["100.96.0.1", "100.96.0.3", "100.96.0.5"]);
    }
}

#[tokio::test]
async fn a_failure_midway_through_an_apply_batch_changes_nothing() {
    for (s, _dir) in stores().await {
        s.insert_node(&node("n1", "site", "home", "100.96.0.1")).await.unwrap();
        s.insert_resource(&resource("a", "n1", None, "100.96.0.3")).await.unwrap();
        let before = s.load(0).await.unwrap();
        let b = ApplyBatch {
            delete_resources: vec!["a".into()],
            insert_nodes: vec![node("n2", "client", "laptop", "100.96.0.2")],
            update_resources: vec![],
            delete_nodes: vec![],
            // The last statement breaks a constraint: everything before it must roll back.
            insert_resources: vec![
                resource("b", "n1", None, "100.96.0.4"),
                resource("b", "n1", None, "100.96.0.5"),
            ],
            ..Default::default()
        };
        let e = s.apply(&b, 1000).await.unwrap_err().to_string();
        assert!(e.contains("adding a resource"), "{e}");
        let after = s.load(0).await.unwrap();
        assert_eq!(after.nodes, before.nodes, "{:?}", s.backend());
        assert_eq!(after.resources, before.resources);
        assert!(after.released.is_empty(), "the deletion's quarantine record rolled back too");
    }
}

#[test]
fn urls_are_redacted() {
    assert_eq!(redact_url("postgres://u:secret@h/db"), "postgres://u:***@h/db");
    assert_eq!(redact_url("sqlite:///x.db"), "sqlite:///x.db");
}

#[tokio::test]
async fn sqlite_syncs_every_commit() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(None, dir.path()).await.unwrap();
    // 2 = FULL: a power loss cannot undo a revoke or an `rm` the operator saw succeed.
    let mode: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(&s.pool).await.unwrap();
    assert_eq!(mode, 2);
}
