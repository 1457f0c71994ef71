//! Namespace lab (root) against a REAL systemd-resolved: the client machine's namespace gets its own
//! `/run` (a tmpfs in a private mount namespace), a private system D-Bus on it, and
//! `systemd-resolved` talking to that bus; `tunnelctl up --dns-mode resolved` (and `auto`) runs in the
//! same network and mount namespaces. Checked through `resolvectl`: the TUN link carries the client's
//! DNS server and the `~zone` / alias-parent routing domains (also when the map grows), names resolve
//! through resolved (`resolvectl query`, and getaddrinfo through resolved's stub at 127.0.0.53), and
//! the link settings are gone after SIGTERM.
//!
//! systemd-resolved is used from the system if it is installed, else taken from the distribution's
//! package *without installing it*: `apt-get download` + `dpkg-deb -x` into the lab's scratch dir.
//! (`apt-get install systemd-resolved` would replace the host's /etc/resolv.conf with a symlink to
//! resolved's stub, which is not running on the host.) The `systemd-resolve` user, if the host lacks
//! it, is added to copies of /etc/passwd and /etc/group bind-mounted inside the private mount
//! namespace only. Nothing outside the lab's namespaces is changed.
//!
//! Skipped (with a note) when not root, or when systemd-resolved cannot be found or fetched; when it
//! is there but does not start, the test skips too, except under CI=true, where it fails.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;

use tunnel_tests::lab::{binaries, Lab};

/// Runs in the client's namespace: private /run, private system bus, resolved. Writes its own PID
/// (the process whose mount namespace the rest of the test enters) once everything is started.
/// Args: $1 dbus config, $2 systemd-resolved, $3 pid file, $4 passwd copy or "", $5 group copy or "".
const HOLDER: &str = r#"
set -e
mount -t tmpfs -o mode=0755 lab-run /run
mkdir -p /run/dbus /run/systemd
if [ -n "$4" ]; then mount --bind "$4" /etc/passwd; mount --bind "$5" /etc/group; fi
dbus-daemon --config-file="$1" --nofork --nopidfile &
i=0
while [ ! -S /run/dbus/system_bus_socket ]; do
  i=$((i+1)); [ $i -lt 100 ] || { echo "dbus-daemon did not start" >&2; exit 1; }
  sleep 0.1
done
SYSTEMD_LOG_LEVEL=debug "$2" &
echo $$ > "$3"
wait
"#;

/// Where systemd-resolved and resolvectl come from.
struct Resolved {
    daemon: PathBuf,
    /// Directory holding `resolvectl`, put first on PATH.
    bin_dir: PathBuf,
    /// The package's D-Bus policy directory when extracted (the system's is read anyway).
    policy_dir: Option<PathBuf>,
}

fn skip_or_fail(what: &str, fail_in_ci: bool) -> Option<Resolved> {
    if fail_in_ci && std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true: {what}");
    }
    eprintln!("skipping the systemd-resolved lab: {what}");
    None
}

/// The system's systemd-resolved, or the package's files extracted into `dir`.
fn find_resolved(dir: &Path) -> Option<Resolved> {
    let daemon = Path::new("/lib/systemd/systemd-resolved");
    let which = Command::new("sh").args(["-c", "command -v resolvectl"]).output();
    if daemon.exists() {
        if let Ok(o) = which {
            if o.status.success() {
                let ctl = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
                return Some(Resolved {
                    daemon: daemon.to_owned(),
                    bin_dir: ctl.parent().unwrap().to_owned(),
                    policy_dir: None,
                });
            }
        }
    }
    let pkg = dir.join("pkg");
    std::fs::create_dir_all(&pkg).unwrap();
    let dl = Command::new("apt-get")
        .args(["-q", "-o", "APT::Sandbox::User=root", "download", "systemd-resolved"])
        .current_dir(&pkg)
        .output();
    let debs: Vec<PathBuf> = std::fs::read_dir(&pkg)
        .map(|d| {
            d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "deb")).collect()
        })
        .unwrap_or_default();
    let Some(deb) = debs.first() else {
        let why = match dl {
            Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
            Err(e) => e.to_string(),
        };
        return skip_or_fail(
            &format!("systemd-resolved is not installed and cannot be downloaded: {why}"),
            false,
        );
    };
    let root = dir.join("resolved-root");
    let x = Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root).status();
    if !x.map(|s| s.success()).unwrap_or(false) {
        return skip_or_fail("cannot unpack the systemd-resolved package", false);
    }
    Some(Resolved {
        daemon: root.join("lib/systemd/systemd-resolved"),
        bin_dir: root.join("usr/bin"),
        policy_dir: Some(root.join("usr/share/dbus-1/system.d")),
    })
}

/// Lines of `resolvectl ARGS` in the private namespaces, stdout+stderr, and whether it succeeded.
fn resolvectl(lab: &Lab, ns: &str, holder: &str, path_env: &str, args: &[&str]) -> (bool, String) {
    let mut full = vec!["env", path_env, "nsenter", "-t", holder, "-m", "--", "resolvectl"];
    full.extend_from_slice(args);
    let out = lab.exec(ns, &full);
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn tun_client_configures_a_real_systemd_resolved_and_reverts_it() {
    let Some(mut lab) = Lab::new() else { return };
    let t0 = std::time::Instant::now();
    let step = |what: &str| eprintln!("[{:>6.2}s] {what}", t0.elapsed().as_secs_f64());
    let Some(resolved) = find_resolved(lab.dir.path()) else { return };
    let path_env =
        format!("PATH={}:{}", resolved.bin_dir.display(), std::env::var("PATH").unwrap_or_default());

    let bin = binaries();
    let b = |name: &str| bin.join(name).to_string_lossy().into_owned();
    let c = lab.ns("c");
    let a = lab.ns("a");
    let s = lab.ns("s");
    lab.link(&c, "eth0", "192.0.2.2/24", &a, "pub0", "192.0.2.1/24");
    lab.link(&a, "lan0", "10.9.0.1/24", &s, "eth0", "10.9.0.2/24");

    // The client machine uses resolved's stub, as a systemd-resolved machine does.
    let etc = Path::new("/etc/netns").join(&c);
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.53\noptions edns0\n").unwrap();

    // The private bus: the system bus configuration, plus the package's policy when extracted.
    let bus_conf = lab.dir.path().join("bus.conf");
    let extra = resolved
        .policy_dir
        .as_ref()
        .map(|d| format!("  <includedir>{}</includedir>\n", d.display()))
        .unwrap_or_default();
    std::fs::write(
        &bus_conf,
        format!(
            "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"\n \
             \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n<busconfig>\n  \
             <include>/usr/share/dbus-1/system.conf</include>\n{extra}</busconfig>\n"
        ),
    )
    .unwrap();
    // resolved drops privileges to `systemd-resolve`: give it one, inside the namespace only.
    let has_user =
        Command::new("getent").args(["passwd", "systemd-resolve"]).output().unwrap().status.success();
    let (passwd, group) = if has_user {
        (String::new(), String::new())
    } else {
        let p = lab.dir.path().join("passwd");
        let g = lab.dir.path().join("group");
        let mut pt = std::fs::read_to_string("/etc/passwd").unwrap();
        pt.push_str("systemd-resolve:x:991:991:systemd Resolver:/:/usr/sbin/nologin\n");
        let mut gt = std::fs::read_to_string("/etc/group").unwrap();
        gt.push_str("systemd-resolve:x:991:\n");
        std::fs::write(&p, pt).unwrap();
        std::fs::write(&g, gt).unwrap();
        (p.to_string_lossy().into_owned(), g.to_string_lossy().into_owned())
    };
    let pid_file = lab.dir.path().join("holder.pid");
    let holder_idx = lab.spawn(
        &c,
        "resolved",
        &[
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            HOLDER,
            "holder",
            &bus_conf.to_string_lossy(),
            &resolved.daemon.to_string_lossy(),
            &pid_file.to_string_lossy(),
            &passwd,
            &group,
        ],
        &[],
    );
    // Up when resolvectl, in the private namespaces, gets an answer.
    let started = std::time::Instant::now();
    let mut holder = String::new();
    let mut last = String::new();
    let up = loop {
        if holder.is_empty() {
            holder = std::fs::read_to_string(&pid_file).unwrap_or_default().trim().to_owned();
        }
        if !holder.is_empty() {
            let (ok, said) = resolvectl(&lab, &c, &holder, &path_env, &["status"]);
            let varlink =
                Path::new("/proc").join(&holder).join("root/run/systemd/resolve/io.systemd.Resolve");
            if ok && varlink.exists() {
                break true;
            }
            last = said;
        }
        if lab.try_wait(holder_idx).is_some() || started.elapsed() > std::time::Duration::from_secs(20) {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    if !up {
        let what = format!(
            "systemd-resolved ({}) did not start in the lab: {last}\n{}",
            resolved.daemon.display(),
            lab.log("resolved")
        );
        skip_or_fail(&what, true);
        return;
    }
    step("private dbus + systemd-resolved up");
    let rctl = |lab: &Lab, args: &[&str]| resolvectl(lab, &c, &holder, &path_env, args);

    // A service on the site LAN, and the server + agent as in lab_tun.
    let www = lab.dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello through resolved\n").unwrap();
    let www_s = www.to_string_lossy().into_owned();
    lab.spawn(
        &s,
        "http",
        &["python3", "-m", "http.server", "8080", "--bind", "10.9.0.2", "--directory", &www_s],
        &[],
    );
    let srv = lab.start_server(&bin, &a, "192.0.2.1");
    let ctl = |lab: &Lab, args: &[&str]| srv.ctl(lab, args);
    let site_tok = ctl(&lab, &["site", "add", "lan"]);
    let client_tok = ctl(&lab, &["client", "add", "laptop"]);
    ctl(
        &lab,
        &[
            "add-resource",
            "--site",
            "lan",
            "--name",
            "web",
            "--target",
            "10.9.0.2:8080",
            "--alias",
            "web.corp.example",
        ],
    );
    ctl(&lab, &["grant", "--client", "laptop", "--resource", "web"]);
    let site_file = lab.dir.path().join("site.token");
    let client_file = lab.dir.path().join("client.token");
    std::fs::write(&site_file, site_tok).unwrap();
    std::fs::write(&client_file, client_tok).unwrap();
    let agent_state = lab.dir.path().join("agent").to_string_lossy().into_owned();
    lab.spawn(
        &a,
        "agent",
        &[&b("tunnel-agent"), "--token-file", &site_file.to_string_lossy(), "--state-dir", &agent_state],
        &[],
    );
    step("server + agent up");

    let client_state = lab.dir.path().join("client").to_string_lossy().into_owned();
    let client_file_s = client_file.to_string_lossy().into_owned();
    for (round, mode) in ["resolved", "auto"].into_iter().enumerate() {
        let log = format!("client-{mode}");
        let client = lab.spawn(
            &c,
            &log,
            &[
                "env",
                &path_env,
                "nsenter",
                "-t",
                &holder,
                "-m",
                "--",
                &b("tunnelctl"),
                "up",
                "--token-file",
                &client_file_s,
                "--state-dir",
                &client_state,
                "--dns-mode",
                mode,
            ],
            &[],
        );
        let mut status = serde_json::Value::Null;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
        while std::time::Instant::now() < deadline {
            assert!(lab.try_wait(client).is_none(), "the client ({mode}) exited:\n{}", lab.log(&log));
            let out = lab.exec(
                &c,
                &[
                    "nsenter",
                    "-t",
                    &holder,
                    "-m",
                    "--",
                    &b("tunnelctl"),
                    "status",
                    "--json",
                    "--state-dir",
                    &client_state,
                ],
            );
            if out.status.success() {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                    if v.pointer("/client/dns_mode").is_some() {
                        status = v;
                        break;
                    }
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        assert!(!status.is_null(), "the client ({mode}) did not come up:\n{}", lab.log(&log));
        assert_eq!(
            status.pointer("/client/dns_mode").and_then(|v| v.as_str()),
            Some("resolved"),
            "--dns-mode {mode} must end up in resolved mode: {status}"
        );
        let dns = status.pointer("/client/dns").and_then(|v| v.as_str()).unwrap().to_owned();
        let dns_ip = dns.rsplit_once(':').unwrap().0.to_owned();
        step(&format!("client up with --dns-mode {mode}, DNS on {dns}"));

        // The link: the client's DNS server and the routing domains.
        let (ok, link) = rctl(&lab, &["status", "tunnel0"]);
        assert!(ok, "resolvectl status tunnel0: {link}");
        eprintln!("resolvectl status tunnel0:\n{link}");
        assert!(link.contains(&format!("DNS Servers: {dns_ip}")), "the link's DNS server: {link}");
        assert!(link.contains("~tunnel.internal"), "the zone as a routing domain: {link}");
        assert!(link.contains("~corp.example"), "the alias's parent as a routing domain: {link}");
        let (ok, domains) = rctl(&lab, &["domain", "tunnel0"]);
        assert!(ok && domains.contains("~tunnel.internal") && domains.contains("~corp.example"), "{domains}");
        let (ok, servers) = rctl(&lab, &["dns", "tunnel0"]);
        assert!(ok && servers.contains(&dns_ip), "{servers}");

        // Names resolve through resolved, to the resource's overlay address.
        let (ok, q) = rctl(&lab, &["query", "--cache=no", "web.tunnel.internal"]);
        assert!(ok && q.contains("100."), "resolvectl query web.tunnel.internal: {q}\n{}", lab.log(&log));
        eprintln!("resolvectl query web.tunnel.internal:\n{q}");
        assert!(q.contains("link: tunnel0"), "answered over the tunnel link: {q}");
        let (ok, q) = rctl(&lab, &["query", "--cache=no", "web.corp.example"]);
        assert!(ok && q.contains("100.") && q.contains("link: tunnel0"), "the alias: {q}");
        // getaddrinfo -> /etc/resolv.conf -> resolved's stub -> the link -> the client; then HTTP over the
        // tunnel.
        let out = lab
            .exec(&c, &["nsenter", "-t", &holder, "-m", "--", "getent", "ahostsv4", "web.tunnel.internal"]);
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success() && said.starts_with("100."), "getent through the stub: {said}");
        let fetch = lab.exec(
            &c,
            &[
                "nsenter",
                "-t",
                &holder,
                "-m",
                "--",
                "curl",
                "-sS",
                "--max-time",
                "20",
                "http://web.corp.example:8080/hello.txt",
            ],
        );
        assert_eq!(
            String::from_utf8_lossy(&fetch.stdout),
            "hello through resolved\n",
            "curl by alias: {}\nclient log:\n{}",
            String::from_utf8_lossy(&fetch.stderr),
            lab.log(&log)
        );
        step("names resolve through resolved");

        // The map grows: a resource with an alias under a new domain, and the link follows.
        if round == 0 {
            ctl(
                &lab,
                &[
                    "add-resource",
                    "--site",
                    "lan",
                    "--name",
                    "db",
                    "--target",
                    "10.9.0.2:8080",
                    "--alias",
                    "db.other.example",
                ],
            );
            ctl(&lab, &["grant", "--client", "laptop", "--resource", "db"]);
        }
        lab.wait("the new alias's domain on the link", 30, || {
            rctl(&lab, &["domain", "tunnel0"]).1.contains("~other.example")
        });
        let (_, domains) = rctl(&lab, &["domain", "tunnel0"]);
        assert!(domains.contains("~tunnel.internal") && domains.contains("~corp.example"), "{domains}");
        let (ok, q) = rctl(&lab, &["query", "--cache=no", "db.other.example"]);
        assert!(ok && q.contains("100.") && q.contains("link: tunnel0"), "the new alias: {q}");
        step("routing domains follow the map");

        // SIGTERM: the client reverts the link (before its TUN device goes away) and exits.
        let st = lab.stop(client);
        assert!(st.success(), "the client ({mode}) exit: {st:?}\n{}", lab.log(&log));
        let client_log = lab.log(&log);
        assert!(
            client_log.contains("system DNS configuration restored"),
            "resolvectl revert must succeed on exit:\n{client_log}"
        );
        let (_, all_domains) = rctl(&lab, &["domain"]);
        let (_, all_dns) = rctl(&lab, &["dns"]);
        let (_, all_status) = rctl(&lab, &["status"]);
        eprintln!("after exit: resolvectl domain:\n{all_domains}resolvectl dns:\n{all_dns}");
        assert!(
            !all_domains.contains("tunnel.internal")
                && !all_domains.contains("example")
                && !all_dns.contains(&dns_ip)
                && !all_status.contains(&dns_ip),
            "settings left after exit:\n{all_domains}\n{all_dns}\n{all_status}"
        );
        step(&format!("client ({mode}) stopped, resolved has nothing left"));
    }
    let resolved_log = lab.log("resolved");
    assert!(lab.try_wait(holder_idx).is_none(), "systemd-resolved's holder exited:\n{resolved_log}");
}
