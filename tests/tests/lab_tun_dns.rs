//! Network-namespace lab (root): a TUN client's DNS listener, on its overlay address, answers the
//! client host itself and a container on one of its bridges, and not a LAN neighbour that routes the
//! overlay through the client host.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use tunnel_tests::lab::{binaries, Lab};

/// Asks `sys.argv[1]`:53 for `web.tunnel.internal` A; prints `answer N` (N answers) or `timeout`.
const ASK: &str = r#"
import socket, sys
q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x06tunnel\x08internal\x00\x00\x01\x00\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
for _ in range(3):
    s.sendto(q, (sys.argv[1], 53))
    try:
        d, _ = s.recvfrom(2048)
        print("answer", int.from_bytes(d[6:8], "big"))
        sys.exit(0)
    except socket.timeout:
        pass
print("timeout")
"#;

fn run(lab: &Lab, ns: &str, args: &[&str]) {
    let out = lab.exec(ns, args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn tun_dns_answers_the_host_and_its_containers_not_the_lan() {
    let Some(mut lab) = Lab::new() else { return };
    let bin = binaries();
    let b = |name: &str| bin.join(name).to_string_lossy().into_owned();
    // c: the client host; a: the site agent and the server; n: a LAN neighbour of c; k: a container
    // on a bridge of c.
    let c = lab.ns("c");
    let a = lab.ns("a");
    let n = lab.ns("n");
    let k = lab.ns("k");
    lab.link(&c, "eth0", "192.0.2.2/24", &a, "pub0", "192.0.2.1/24");
    lab.link(&c, "eth1", "10.66.0.1/24", &n, "eth0", "10.66.0.2/24");
    run(&lab, &c, &["ip", "link", "add", "br-test", "type", "bridge"]);
    run(&lab, &c, &["ip", "addr", "add", "10.77.0.1/24", "dev", "br-test"]);
    run(&lab, &c, &["ip", "link", "set", "br-test", "up"]);
    lab.veth(&c, "vk0", &k, "eth0");
    run(&lab, &c, &["ip", "link", "set", "vk0", "master", "br-test"]);
    run(&lab, &k, &["ip", "addr", "add", "10.77.0.2/24", "dev", "eth0"]);
    run(&lab, &k, &["ip", "route", "add", "default", "via", "10.77.0.1"]);
    run(&lab, &n, &["ip", "route", "add", "default", "via", "10.66.0.1"]);
    run(&lab, &c, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);

    let srv = lab.start_server(&bin, &a, "192.0.2.1");
    let site_tok = srv.ctl(&lab, &["site", "add", "lan"]);
    let client_tok = srv.ctl(&lab, &["client", "add", "laptop"]);
    srv.ctl(&lab, &["add-resource", "--site", "lan", "--name", "web", "--target", "127.0.0.1:8080"]);
    srv.ctl(&lab, &["grant", "--client", "laptop", "--resource", "web"]);
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
    let client_state = lab.dir.path().join("client").to_string_lossy().into_owned();
    lab.spawn(
        &c,
        "client",
        &[
            &b("tunnelctl"),
            "up",
            "--token-file",
            &client_file.to_string_lossy(),
            "--state-dir",
            &client_state,
            "--dns-mode",
            "off",
        ],
        &[],
    );
    let mut overlay = String::new();
    lab.wait("the client's TUN device", 30, || {
        let out = lab.exec(&c, &["ip", "-o", "-4", "addr", "show", "dev", "tunnel0"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        overlay = text
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .unwrap_or_default()
            .to_owned();
        !overlay.is_empty()
    });
    let ask = |ns: &str| {
        let out = lab.exec(ns, &["python3", "-c", ASK, &overlay]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    lab.wait("the client's DNS listener", 30, || ask(&c).starts_with("answer"));
    // The neighbour's route is fine: it reaches the client host's services on that address.
    let ping = lab.exec(&n, &["ping", "-c", "1", "-W", "2", &overlay]);
    assert!(ping.status.success(), "the neighbour routes to the overlay address through the client host");
    assert_eq!(ask(&c), "answer 1", "the host itself");
    assert_eq!(ask(&k), "answer 1", "a container on the host's bridge");
    assert_eq!(ask(&n), "timeout", "a LAN neighbour gets nothing\nclient log:\n{}", lab.log("client"));
    let metrics = lab.exec(&c, &["curl", "-sS", "http://127.0.0.1:9182/metrics"]);
    let text = String::from_utf8_lossy(&metrics.stdout);
    let refused = text
        .lines()
        .find_map(|l| l.strip_prefix("tunnel_node_dns_refused_total{reason=\"source\"} "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(refused.is_some_and(|r| r >= 1), "counted in /metrics:\n{text}");
}
