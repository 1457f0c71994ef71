//! Backups: `tunnel-server backup` of a live server under write load, `tunnel-server restore` into a new
//! data dir, and a server started from it that serves the same state with every old token valid.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tunnel_core::JoinToken;
use tunnel_server::backup::{self, BackupOptions, RestoreOptions};
use tunnel_tests::{ctl, TestNode, TestServer, PATIENCE};

async fn token(s: &TestServer, args: &[&str]) -> String {
    let out = s.ctl(args).await.unwrap();
    JoinToken::parse(out.trim()).unwrap();
    out.trim().to_owned()
}

/// Starts a server on `data_dir` at `listen` (port 0: any), retrying while the port is still taken.
async fn serve(dir: tempfile::TempDir, data_dir: PathBuf, listen: SocketAddr) -> TestServer {
    let mut cfg = TestServer::config(data_dir);
    cfg.listen = listen;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tunnel_server::start(cfg.clone()).await {
            Ok(s) => {
                cfg.listen = s.addr;
                return TestServer { server: Some(s), dir, cfg };
            }
            Err(e)
                if tokio::time::Instant::now() < deadline && format!("{e:#}").contains("cannot listen") =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the restored server does not start: {e:#}"),
        }
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => vec![],
    };
    v.sort();
    v
}

fn one_line(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    assert!(!s.contains('\n'), "a one-line error: {s:?}");
    s
}

/// One admin change the writer made.
#[derive(Clone, Debug)]
enum Op {
    Site(String),
    Client(String),
    Resource { name: String, site: String },
    Grant { client: String, resource: String },
    RmResource(String),
}

/// The configuration as names: what the admin API lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Config {
    sites: BTreeSet<String>,
    clients: BTreeSet<String>,
    /// resource -> site
    resources: BTreeMap<String, String>,
    grants: BTreeSet<(String, String)>,
}

impl Config {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Site(n) => {
                self.sites.insert(n.clone());
            }
            Op::Client(n) => {
                self.clients.insert(n.clone());
            }
            Op::Resource { name, site } => {
                self.resources.insert(name.clone(), site.clone());
            }
            Op::Grant { client, resource } => {
                self.grants.insert((client.clone(), resource.clone()));
            }
            Op::RmResource(n) => {
                self.resources.remove(n);
                self.grants.retain(|(_, r)| r != n);
            }
        }
    }

    /// What a server serves, read with `admin_token`.
    async fn served(admin_token: &str) -> Config {
        let list = |what: &'static str| async move {
            let out = ctl(&["--admin-token", admin_token, what, "--json"]).await.unwrap();
            serde_json::from_str::<serde_json::Value>(&out).unwrap().as_array().unwrap().clone()
        };
        let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap().to_owned();
        Config {
            sites: list("sites").await.iter().map(|v| s(v, "name")).collect(),
            clients: list("clients").await.iter().map(|v| s(v, "name")).collect(),
            resources: list("resources").await.iter().map(|v| (s(v, "name"), s(v, "site"))).collect(),
            grants: list("grants").await.iter().map(|v| (s(v, "client"), s(v, "resource"))).collect(),
        }
    }

    /// Every grant's client and resource exist, and every resource's site.
    fn is_consistent(&self) -> bool {
        self.resources.values().all(|s| self.sites.contains(s))
            && self.grants.iter().all(|(c, r)| self.clients.contains(c) && self.resources.contains_key(r))
    }
}

/// A task making admin changes in a loop, one at a time, recording each one that succeeded and when
/// it was in flight.
struct Writer {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<(Op, Instant, Instant)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(admin_token: String) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop2, log2) = (stop.clone(), log.clone());
        let task = tokio::spawn(async move {
            let t = admin_token.as_str();
            let mut i = 0usize;
            while !stop2.load(Ordering::Relaxed) {
                let (s, r, c) = (format!("s{i}"), format!("r{i}"), format!("c{i}"));
                let target = format!("host{i}:80");
                let mut steps: Vec<(Vec<&str>, Op)> = vec![
                    (vec!["site", "add", &s], Op::Site(s.clone())),
                    (
                        vec!["add-resource", "--site", &s, "--name", &r, "--target", &target],
                        Op::Resource { name: r.clone(), site: s.clone() },
                    ),
                    (vec!["client", "add", &c], Op::Client(c.clone())),
                    (
                        vec!["grant", "--client", &c, "--resource", &r],
                        Op::Grant { client: c.clone(), resource: r.clone() },
                    ),
                    (
                        vec!["grant", "--client", &c, "--resource", "base"],
                        Op::Grant { client: c.clone(), resource: "base".into() },
                    ),
                ];
                // Deletions too: the snapshot must not catch a resource half gone.
                let old = format!("r{}", i.saturating_sub(1));
                if i % 3 == 2 {
                    steps.push((vec!["rm-resource", &old], Op::RmResource(old.clone())));
                }
                for (args, op) in steps {
                    let started = Instant::now();
                    let mut full = vec!["--admin-token", t];
                    full.extend(args);
                    ctl(&full).await.unwrap_or_else(|e| panic!("writer: {full:?}: {e:#}"));
                    log2.lock().unwrap().push((op, started, Instant::now()));
                }
                i += 1;
            }
        });
        Writer { stop, log, task }
    }

    fn done(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    async fn finish(self) -> Vec<(Op, Instant, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        Arc::try_unwrap(self.log).unwrap().into_inner().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_write_load_restores_to_a_server_with_the_same_state_and_valid_tokens() {
    let mut s = TestServer::start().await.unwrap();
    let admin = s.admin_token();
    let pin = s.running().admin_token.pin;
    let site_tok = token(&s, &["site", "add", "home"]).await;
    let client_tok = token(&s, &["client", "add", "laptop"]).await;
    s.ctl(&["add-resource", "--site", "home", "--name", "base", "--target", "127.0.0.1:9"]).await.unwrap();
    s.ctl(&["grant", "--client", "laptop", "--resource", "base"]).await.unwrap();
    // The site has joined (its key is registered); the client's token has never been used.
    let site = TestNode::join(&site_tok, 1).await.unwrap();
    drop(site);
    let mut base = Config::default();
    for op in [
        Op::Site("home".into()),
        Op::Client("laptop".into()),
        Op::Resource { name: "base".into(), site: "home".into() },
        Op::Grant { client: "laptop".into(), resource: "base".into() },
    ] {
        base.apply(&op);
    }

    let writer = Writer::start(admin.clone());
    // Let the database grow a little first, so the snapshot has pages to copy while writes go on.
    let deadline = Instant::now() + PATIENCE;
    while writer.done() < 40 {
        assert!(Instant::now() < deadline, "the writer is stuck");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = s.dir.path().join("backup.tar.gz");
    let opts = BackupOptions { data_dir: s.cfg.data_dir.clone(), database: None, to: out.clone() };
    let committed_before = writer.done();
    let started = Instant::now();
    let report = backup::backup(&opts).await.unwrap();
    let ended = Instant::now();
    // Keep writing a little after the backup, then stop.
    let after = writer.done();
    while writer.done() < after + 5 {
        assert!(Instant::now() < deadline + PATIENCE, "the writer is stuck");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = writer.finish().await;
    assert!(
        log.iter().any(|(_, from, to)| *from < ended && *to > started),
        "a write was in flight while the backup ran"
    );
    assert_eq!(report.manifest.pin, pin.to_string());
    let original = Config::served(&admin).await;
    let original_json = s.snapshot().await.unwrap();
    let listen = s.addr();
    // The old machine goes away; the new one takes over its address (tokens name it).
    s.stop().await;

    let new_machine = tempfile::tempdir().unwrap();
    let data = new_machine.path().join("data");
    let restored =
        backup::restore(&RestoreOptions { from: out.clone(), data_dir: data.clone(), force: false })
            .await
            .unwrap();
    assert_eq!(restored.manifest, report.manifest);
    assert_eq!(restored.counts, report.counts);
    let r = serve(new_machine, data, listen).await;
    assert_eq!(r.running().admin_token.pin, pin, "same key, same pin");
    assert_eq!(r.admin_token(), admin, "the admin token is the same");

    // The old admin token works, and the state is one the server was in while the backup ran: all that
    // was committed before it started, then a prefix of what the writer did during it.
    let got = Config::served(&admin).await;
    assert!(got.is_consistent(), "{got:?}");
    let counts = restored.counts.unwrap();
    assert_eq!(
        (counts.sites, counts.clients, counts.resources, counts.grants),
        (
            got.sites.len() as i64,
            got.clients.len() as i64,
            got.resources.len() as i64,
            got.grants.len() as i64
        )
    );
    let mut model = base.clone();
    let mut matched = None;
    for (k, (op, _, _)) in log.iter().enumerate() {
        if k >= committed_before && model == got {
            matched = Some(k);
            break;
        }
        model.apply(op);
    }
    if matched.is_none() && model == got {
        matched = Some(log.len());
    }
    let k = matched.unwrap_or_else(|| {
        panic!("the restored state is no state the server was in after {committed_before} writes: {got:?}")
    });
    assert!(k >= committed_before && k <= log.len());
    // What the restored server says about each thing is what the original said (ids, addresses, ...).
    let restored_json = r.snapshot().await.unwrap();
    for what in ["sites", "clients", "resources"] {
        let by_name = |j: &serde_json::Value| -> BTreeMap<String, serde_json::Value> {
            j[what]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| {
                    let mut v = v.clone();
                    // Lists of resources and clients follow later writes; the rest must not move.
                    v.as_object_mut().unwrap().remove("resources");
                    v.as_object_mut().unwrap().remove("clients");
                    (v["name"].as_str().unwrap().to_owned(), v)
                })
                .collect()
        };
        let (old, new) = (by_name(&original_json), by_name(&restored_json));
        for (name, v) in &new {
            if let Some(o) = old.get(name) {
                assert_eq!(v, o, "{what} {name}");
            }
        }
        assert!(new.keys().all(|n| old.contains_key(n) || what == "resources"), "{what}: {new:?}");
    }
    assert!(got.sites.is_subset(&original.sites) && got.clients.is_subset(&original.clients));

    // Join tokens made before the backup work: the site (same key as before) and the client (first
    // join), and the client is granted what it was granted.
    let site_id = JoinToken::parse(&site_tok).unwrap().node_id;
    let _site = TestNode::join(&site_tok, 1).await.unwrap();
    let mut client = TestNode::join(&client_tok, 2).await.unwrap();
    let m = client
        .wait_for("the granted resource and its site", |m| {
            m.resources.contains_key("base") && m.peers.contains_key(&site_id)
        })
        .await
        .unwrap();
    assert_eq!(m.peers[&site_id].public_key, Some(tunnel_core::PublicKey([1; 32])));
    // And the restored server takes new changes.
    r.ctl(&["site", "add", "after-restore"]).await.unwrap();
}

#[tokio::test]
async fn restore_refuses_a_used_dir_a_running_server_and_a_damaged_file() {
    let s = TestServer::start().await.unwrap();
    token(&s, &["site", "add", "home"]).await;
    let file = s.dir.path().join("b.tar.gz");
    let opts = BackupOptions { data_dir: s.cfg.data_dir.clone(), database: None, to: file.clone() };
    let report = backup::backup(&opts).await.unwrap();
    let work = tempfile::tempdir().unwrap();

    // A data dir with files in it: refused unless --force, and left as it was.
    let used = work.path().join("used");
    std::fs::create_dir(&used).unwrap();
    std::fs::write(used.join("stray.txt"), "keep me").unwrap();
    let restore = |from: &Path, dir: &Path, force: bool| {
        let o = RestoreOptions { from: from.to_owned(), data_dir: dir.to_owned(), force };
        async move { backup::restore(&o).await }
    };
    let e = one_line(&restore(&file, &used, false).await.unwrap_err());
    assert!(e.contains("not empty") && e.contains("--force"), "{e}");
    assert_eq!(names(&used), ["stray.txt"]);
    let r = restore(&file, &used, true).await.unwrap();
    assert_eq!(r.manifest.pin, report.manifest.pin);
    assert!(names(&used).contains(&"stray.txt".to_owned()) && names(&used).contains(&"tunnel.db".to_owned()));

    // The data dir of a running server: refused even with --force, and the server is untouched.
    let e = one_line(&restore(&file, &s.cfg.data_dir, true).await.unwrap_err());
    assert!(e.contains("is running") && e.contains("stop it"), "{e}");
    assert_eq!(s.ctl_json(&["sites", "--json"]).await.unwrap()[0]["name"], "home");
    // And a server does not start on a data dir another server holds.
    let e = tunnel_server::start(TestServer::config(s.cfg.data_dir.clone())).await.unwrap_err();
    assert!(one_line(&e).contains("is using the data dir"), "{e:#}");

    // Damaged files: cut short anywhere, a flipped byte, something else entirely. Each is refused with
    // a one-line reason and leaves no data dir behind.
    let good = std::fs::read(&file).unwrap();
    let len = good.len();
    let mut bad: Vec<(String, Vec<u8>)> = [0, 10, 100, len / 4, len / 2, len - 100, len - 8, len - 1]
        .into_iter()
        .map(|n| (format!("cut at {n} of {len}"), good[..n].to_vec()))
        .collect();
    for at in [len / 3, len / 2, len - 20] {
        let mut b = good.clone();
        b[at] ^= 0x55;
        bad.push((format!("byte {at} flipped"), b));
    }
    bad.push(("not a backup".into(), b"hello, I am a text file\n".repeat(100)));
    for (what, bytes) in bad {
        let f = work.path().join("damaged.tar.gz");
        std::fs::write(&f, &bytes).unwrap();
        let dir = work.path().join("fresh");
        let e = restore(&f, &dir, false).await.expect_err(&what);
        let e = one_line(&e);
        assert!(e.contains("damaged.tar.gz is not a usable backup"), "{what}: {e}");
        assert!(!dir.exists(), "{what}: a failed restore leaves no data dir");
    }
    // A missing file.
    let e = one_line(
        &restore(&work.path().join("nope.tar.gz"), &work.path().join("x"), false).await.unwrap_err(),
    );
    assert!(e.contains("cannot read backup") && e.contains("No such file"), "{e}");
}

#[tokio::test]
async fn a_backup_to_an_unwritable_place_fails_cleanly_and_leaves_nothing() {
    let s = TestServer::start().await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let backup_to = |to: PathBuf| {
        let o = BackupOptions { data_dir: s.cfg.data_dir.clone(), database: None, to };
        async move { backup::backup(&o).await }
    };
    // No such directory.
    let e = one_line(&backup_to(work.path().join("missing/b.tar.gz")).await.unwrap_err());
    assert!(e.contains("cannot write backup") && e.contains("does not exist"), "{e}");
    // A directory, or something that is not a regular file, is never replaced.
    let e = one_line(&backup_to(work.path().to_owned()).await.unwrap_err());
    assert!(e.contains("is a directory"), "{e}");
    #[cfg(unix)]
    {
        let e = one_line(&backup_to("/dev/null".into()).await.unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
    }
    // Not a data dir.
    let e = one_line(
        &backup::backup(&BackupOptions {
            data_dir: work.path().to_owned(),
            database: None,
            to: work.path().join("b.tar.gz"),
        })
        .await
        .unwrap_err(),
    );
    assert!(e.contains("no tunnel-server identity"), "{e}");
    assert_eq!(names(work.path()), Vec::<String>::new());
    // A directory we may not write into (root may write anywhere: then there is nothing to test here;
    // the real binary's test fills the "disk" instead).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let ro = work.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o500)).unwrap();
        if std::fs::write(ro.join("probe"), "x").is_err() {
            let e = one_line(&backup_to(ro.join("b.tar.gz")).await.unwrap_err());
            assert!(e.contains("cannot write backup") && e.contains("ermission denied"), "{e}");
            assert_eq!(names(&ro), Vec::<String>::new());
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
}

#[test]
fn the_tunnel_server_binary_backs_up_a_live_server_restores_it_and_survives_a_full_disk() {
    use std::process::Command;
    let bin = tunnel_tests::lab::binaries().join("tunnel-server");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(TestServer::start()).unwrap();
    rt.block_on(async {
        token(&s, &["site", "add", "home"]).await;
        token(&s, &["client", "add", "laptop"]).await;
        s.ctl(&["add-resource", "--site", "home", "--name", "web", "--target", "web:80"]).await.unwrap();
        s.ctl(&["grant", "--client", "laptop", "--resource", "web"]).await.unwrap();
    });
    let pin = s.running().admin_token.pin.to_string();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("b.tar.gz");
    let run = |cmd: &mut Command| {
        // Every command names its data dir (by flag or TUNNEL_DATA_DIR): never the default one.
        let out = cmd.env_remove("TUNNEL_DATABASE").output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // Backup of the running server, through flags.
    let (ok, stdout, stderr) = run(Command::new(&bin).args([
        "backup",
        "--data-dir",
        s.cfg.data_dir.to_str().unwrap(),
        "--to",
        file.to_str().unwrap(),
    ]));
    assert!(ok, "{stderr}");
    assert!(stdout.contains(&format!("pin: {pin}")), "{stdout}");
    assert!(stdout.contains("1 sites, 1 clients, 1 resources, 1 grants"), "{stdout}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }

    // Restore, through env vars.
    let data = work.path().join("restored");
    let (ok, stdout, stderr) = run(Command::new(&bin)
        .arg("restore")
        .env("TUNNEL_RESTORE_FROM", &file)
        .env("TUNNEL_DATA_DIR", &data));
    assert!(ok, "{stderr}");
    assert!(stdout.contains(&format!("pin: {pin}")) && stdout.contains("tunnel.db"), "{stdout}");
    // Again: the dir is not empty now.
    let (ok, _, stderr) = run(Command::new(&bin).args([
        "restore",
        "--from",
        file.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]));
    assert!(!ok && stderr.trim().lines().count() == 1 && stderr.contains("--force"), "{stderr}");

    // A server started on the restored dir serves what the original served.
    let want = rt.block_on(s.snapshot()).unwrap();
    let r = rt.block_on(serve(tempfile::tempdir().unwrap(), data, "127.0.0.1:0".parse().unwrap()));
    assert_eq!(r.running().admin_token.pin.to_string(), pin);
    assert_eq!(rt.block_on(r.snapshot()).unwrap(), want);

    // The disk fills up while a backup is written over an older one: the command fails with one line,
    // the older backup is intact, and nothing else is left beside it. (SIGXFSZ ignored: writes past the
    // file size limit fail with EFBIG, as they would with ENOSPC on a full disk.)
    #[cfg(unix)]
    {
        let dir = work.path().join("full");
        std::fs::create_dir(&dir).unwrap();
        let old = dir.join("b.tar.gz");
        std::fs::write(&old, "the previous backup").unwrap();
        let script = format!(
            "trap '' XFSZ; ulimit -f 2; exec '{}' backup --data-dir '{}' --to '{}'",
            bin.display(),
            s.cfg.data_dir.display(),
            old.display()
        );
        let (ok, _, stderr) = run(Command::new("sh").args(["-c", &script]));
        assert!(!ok, "the backup must fail");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "the previous backup");
        assert_eq!(names(&dir), ["b.tar.gz"]);
    }
    drop(r);
    drop(s);
}
