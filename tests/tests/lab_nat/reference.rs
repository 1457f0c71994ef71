//! wireguard-go on the same lossy topology: the reference figure for scenario 9.

use super::*;

/// The reference for scenario 9 (a benchmark, not a check: `cargo test -p tunnel-tests --test
/// lab_nat wireguard_go_on_the_lossy_wan -- --ignored --nocapture`, as root with wireguard-go and
/// wg installed): wireguard-go with kernel forwarding on the same topology and the same 3% loss on
/// both WANs, the agent's host forwarding a UDP port from site A's router, 24 MB from the same
/// service. It prints how long that takes.
#[test]
#[ignore]
fn wireguard_go_on_the_lossy_wan() {
    let have = |cmd: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {cmd}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("wireguard-go") || !have("wg") {
        eprintln!("skipped: needs wireguard-go and wg");
        return;
    }
    let mut opts = Options::new(Nat::Cone, Nat::Cone);
    opts.site_port_forward = Some(SITE_PORT);
    let Some(mut net) = Internet::build(&opts) else { return };
    let dir = net.lab.dir.path().to_owned();
    let blob = tunnel_tests::blob(BLOB_LEN);
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(dir.join("www/big.bin"), &blob).unwrap();
    let (svc, www) = (net.svc.clone(), dir.join("www").to_string_lossy().into_owned());
    let (svc_ip, http) = (nat::SVC_IP.to_string(), HTTP_PORT.to_string());
    net.lab.spawn(
        &svc,
        "http",
        &["python3", "-m", "http.server", &http, "--bind", &svc_ip, "--directory", &www],
        &[],
    );
    let key = |name: &str| -> (String, String) {
        let private = std::process::Command::new("wg").arg("genkey").output().unwrap();
        let path = dir.join(format!("{name}.key"));
        std::fs::write(&path, &private.stdout).unwrap();
        let mut pubkey = std::process::Command::new("wg")
            .arg("pubkey")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(pubkey.stdin.as_mut().unwrap(), &private.stdout).unwrap();
        let out = pubkey.wait_with_output().unwrap();
        (path.to_string_lossy().into_owned(), String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let ((akey, apub), (ckey, cpub)) = (key("agent"), key("client"));
    // Different interface names: the two wireguard-go sockets share /run/wireguard.
    let (agent, cli) = (net.agent.clone(), net.cli.clone());
    net.lab.spawn(&agent, "wg-agent", &["wireguard-go", "-f", "wga0"], &[]);
    net.lab.spawn(&cli, "wg-client", &["wireguard-go", "-f", "wgc0"], &[]);
    let run = |ns: &str, args: &[&str]| {
        let out = net.exec(ns, args);
        assert!(out.status.success(), "{args:?} in {ns}: {}", String::from_utf8_lossy(&out.stderr));
    };
    net.lab.wait("the wireguard-go interfaces", 10, || {
        net.exec(&agent, &["ip", "link", "show", "wga0"]).status.success()
            && net.exec(&cli, &["ip", "link", "show", "wgc0"]).status.success()
    });
    let port = SITE_PORT.to_string();
    run(
        &agent,
        &[
            "wg",
            "set",
            "wga0",
            "listen-port",
            &port,
            "private-key",
            &akey,
            "peer",
            &cpub,
            "allowed-ips",
            "10.200.0.2/32",
        ],
    );
    run(&agent, &["ip", "addr", "add", "10.200.0.1/24", "dev", "wga0"]);
    run(&agent, &["ip", "link", "set", "wga0", "mtu", "1420", "up"]);
    run(&agent, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    run(&svc, &["ip", "route", "add", "10.200.0.0/24", "via", &nat::AGENT_IP.to_string()]);
    let endpoint = sock(nat::SITE_WAN_IP, SITE_PORT).to_string();
    run(
        &cli,
        &[
            "wg",
            "set",
            "wgc0",
            "private-key",
            &ckey,
            "peer",
            &apub,
            "allowed-ips",
            "10.200.0.1/32,10.1.0.0/24",
            "endpoint",
            &endpoint,
            "persistent-keepalive",
            "25",
        ],
    );
    run(&cli, &["ip", "addr", "add", "10.200.0.2/24", "dev", "wgc0"]);
    run(&cli, &["ip", "link", "set", "wgc0", "mtu", "1420", "up"]);
    run(&cli, &["ip", "route", "add", "10.1.0.0/24", "dev", "wgc0"]);
    net.set_wan_loss(3.0);
    let out = dir.join("wg.bin").to_string_lossy().into_owned();
    let url = format!("http://{svc_ip}:{HTTP_PORT}/big.bin");
    // The service answering through the tunnel (python's server may still be starting).
    net.lab.wait("the service through wireguard-go", 30, || {
        net.exec(&cli, &["curl", "-sSfI", "--max-time", "2", &url]).status.success()
    });
    let start = Instant::now();
    let r = net.exec(&cli, &["curl", "-sS", "--max-time", "120", "-o", &out, &url]);
    let took = start.elapsed();
    assert!(r.status.success(), "curl over wireguard-go: {}", String::from_utf8_lossy(&r.stderr));
    assert!(std::fs::read(&out).unwrap() == blob, "byte-exact over wireguard-go");
    eprintln!(
        "wireguard-go, 3% loss on both WANs: {} MB in {:.1}s ({:.0} Mbit/s)",
        BLOB_LEN / 1_000_000,
        took.as_secs_f64(),
        BLOB_LEN as f64 * 8.0 / 1e6 / took.as_secs_f64()
    );
}
