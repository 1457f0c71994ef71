//! Network-namespace lab (root): `tunnelctl doctor` against a TUN client. With `--dns-mode off` the
//! tunnel works but the system resolver does not know the private names, and doctor must say exactly
//! that; with `--dns-mode resolv-conf` every link is ok.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;

use serde_json::Value;
use tunnel_core::status::{LinkState, NodeStatus};
use tunnel_tests::lab::{binaries, Lab};

fn step<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {r:#}"))
}

#[test]
fn doctor_finds_a_system_resolver_that_does_not_point_at_the_tun_client() {
    let Some(mut lab) = Lab::new() else { return };
    let t0 = std::time::Instant::now();
    let step_done = |what: &str| eprintln!("[{:>6.2}s] {what}", t0.elapsed().as_secs_f64());
    let bin = binaries();
    let b = |name: &str| bin.join(name).to_string_lossy().into_owned();
    let c = lab.ns("c");
    let a = lab.ns("a");
    lab.link(&c, "eth0", "192.0.2.2/24", &a, "pub0", "192.0.2.1/24");
    // The client machine's resolver: nothing listens there, so names it is asked fail fast.
    let etc = Path::new("/etc/netns").join(&c);
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();

    // The service, on the site's own loopback.
    lab.spawn(&a, "http", &["python3", "-m", "http.server", "8080", "--bind", "127.0.0.1"], &[]);
    step_done("server spawned");
    let srv = lab.start_server(&bin, &a, "192.0.2.1");
    let ctl = |lab: &Lab, args: &[&str]| srv.ctl(lab, args);
    step_done("server answers");
    let site_file = lab.dir.path().join("site.token");
    let client_file = lab.dir.path().join("client.token");
    std::fs::write(&site_file, ctl(&lab, &["site", "add", "lan"])).unwrap();
    std::fs::write(&client_file, ctl(&lab, &["client", "add", "laptop"])).unwrap();
    ctl(&lab, &["add-resource", "--site", "lan", "--name", "web", "--target", "127.0.0.1:8080"]);
    ctl(&lab, &["grant", "--client", "laptop", "--resource", "web"]);
    let agent_state = lab.dir.path().join("agent").to_string_lossy().into_owned();
    lab.spawn(
        &a,
        "agent",
        &[&b("tunnel-agent"), "--token-file", &site_file.to_string_lossy(), "--state-dir", &agent_state],
        &[],
    );

    step_done("configured, agent spawned");
    let client_state = lab.dir.path().join("client").to_string_lossy().into_owned();
    let token_s = client_file.to_string_lossy().into_owned();
    let up = |lab: &mut Lab, log: &str, dns_mode: &str| {
        let idx = lab.spawn(
            &c,
            log,
            &[
                &b("tunnelctl"),
                "up",
                "--token-file",
                &token_s,
                "--state-dir",
                &client_state,
                "--dns-mode",
                dns_mode,
            ],
            &[],
        );
        lab.wait("the TUN client to be up", 30, || {
            let out = lab.exec(&c, &[&b("tunnelctl"), "status", "--json", "--state-dir", &client_state]);
            let st: Option<NodeStatus> = serde_json::from_slice(&out.stdout).ok();
            st.is_some_and(|s| {
                s.client.is_some_and(|c| c.mode() == "tun") && s.control == Some(LinkState::Connected)
            })
        });
        idx
    };
    let doctor = |lab: &Lab| -> (Value, i32) {
        let out = lab.exec(
            &c,
            &[&b("tunnelctl"), "doctor", "--token-file", &token_s, "--state-dir", &client_state, "--json"],
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        });
        (v, out.status.code().unwrap_or(-1))
    };

    // --dns-mode off: the tunnel works, the names do not resolve through the system.
    let client = up(&mut lab, "client-off", "off");
    let (r, code) = doctor(&lab);
    assert_eq!((r["status"].as_str(), code), (Some("failed"), 1), "{r:#}\n{}", lab.log("client-off"));
    assert_eq!(r["mode"], "tun");
    for name in ["reach", "tls", "credentials", "client", "site", "resource"] {
        assert_eq!(step(&r, name)["status"], "ok", "{name}: {r:#}");
    }
    step_done("client (dns off) up and doctored");
    let names = step(&r, "names");
    assert_eq!(names["status"], "failed", "{r:#}");
    let detail = names["detail"].as_str().unwrap();
    assert!(detail.contains("system resolver does not point at the client"), "{detail}");
    assert!(detail.contains("web.tunnel.internal"), "{detail}");
    assert!(names["fix"].as_str().unwrap().contains("--dns-mode off"), "{names}");
    lab.stop(client);

    // --dns-mode resolv-conf: every link is ok.
    step_done("client stopped");
    let client = up(&mut lab, "client-rc", "resolv-conf");
    let (r, code) = doctor(&lab);
    assert_eq!((r["status"].as_str(), code), (Some("ok"), 0), "{r:#}\n{}", lab.log("client-rc"));
    step_done("client (resolv-conf) up and doctored");
    assert!(step(&r, "names")["detail"].as_str().unwrap().contains("system resolver"), "{r:#}");
    lab.stop(client);
}
