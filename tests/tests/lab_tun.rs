//! Network-namespace lab (root): a client in one namespace in TUN mode, the site agent (and the server)
//! in a second, the resource's services in a third on the site's LAN. The client machine reaches the
//! service by name through its *system* resolver, with full-size packets, bulk TCP and UDP, and its
//! `/etc/resolv.conf` is put back when the client exits.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use tunnel_tests::lab::{binaries, Lab};

const UDP_ECHO: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.9.0.2", 7007))
while True:
    d, a = s.recvfrom(2048)
    s.sendto(d, a)
"#;

const UDP_ASK: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
addr = (socket.gethostbyname("echo.tunnel.internal"), 7007)
for _ in range(20):
    s.sendto(b"polo", addr)
    try:
        d, _ = s.recvfrom(2048)
        print(d.decode())
        sys.exit(0)
    except socket.timeout:
        pass
sys.exit(1)
"#;

/// The machine's "real" resolver: answers every A query with 192.0.2.99.
const UPSTREAM_DNS: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("192.0.2.1", 53))
while True:
    q, a = s.recvfrom(512)
    end = 12
    while q[end] != 0:
        end += q[end] + 1
    question = q[12:end + 5]
    qtype = q[end + 1:end + 3]
    header = q[:2] + b"\x81\x80" + b"\x00\x01" + (b"\x00\x01" if qtype == b"\x00\x01" else b"\x00\x00") + b"\x00\x00\x00\x00"
    answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + bytes([192, 0, 2, 99]) if qtype == b"\x00\x01" else b""
    s.sendto(header + question + answer, a)
"#;

#[test]
fn tun_client_reaches_a_lan_service_by_name_through_the_system_resolver() {
    let Some(mut lab) = Lab::new() else { return };
    let t0 = std::time::Instant::now();
    let step = |what: &str| eprintln!("[{:>6.2}s] {what}", t0.elapsed().as_secs_f64());
    let bin = binaries();
    let b = |name: &str| bin.join(name).to_string_lossy().into_owned();
    let c = lab.ns("c");
    let a = lab.ns("a");
    let s = lab.ns("s");
    lab.link(&c, "eth0", "192.0.2.2/24", &a, "pub0", "192.0.2.1/24");
    lab.link(&a, "lan0", "10.9.0.1/24", &s, "eth0", "10.9.0.2/24");

    // The client machine's own resolver configuration, to be restored at the end.
    let etc = std::path::Path::new("/etc/netns").join(&c);
    std::fs::create_dir_all(&etc).unwrap();
    let original = "nameserver 192.0.2.1\nsearch corp.example\n";
    std::fs::write(etc.join("resolv.conf"), original).unwrap();

    // Services on the site LAN.
    let www = lab.dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let blob: Vec<u8> = (0..20_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    std::fs::write(www.join("big.bin"), &blob).unwrap();
    let www_s = www.to_string_lossy().into_owned();
    lab.spawn(
        &s,
        "http",
        &["python3", "-m", "http.server", "8080", "--bind", "10.9.0.2", "--directory", &www_s],
        &[],
    );
    lab.spawn(&s, "udp", &["python3", "-c", UDP_ECHO], &[]);
    lab.spawn(&a, "upstream-dns", &["python3", "-c", UPSTREAM_DNS], &[]);

    step("services started");
    // The control server (in the agent's namespace, on its public side).
    let srv = lab.start_server(&bin, &a, "192.0.2.1");
    let ctl = |lab: &Lab, args: &[&str]| srv.ctl(lab, args);
    let site_tok = ctl(&lab, &["site", "add", "lan"]);
    let client_tok = ctl(&lab, &["client", "add", "laptop"]);
    ctl(&lab, &["add-resource", "--site", "lan", "--name", "web", "--target", "10.9.0.2:8080"]);
    ctl(&lab, &["add-resource", "--site", "lan", "--name", "echo", "--target", "10.9.0.2:7007"]);
    ctl(&lab, &["grant", "--client", "laptop", "--resource", "web"]);
    ctl(&lab, &["grant", "--client", "laptop", "--resource", "echo"]);
    let site_file = lab.dir.path().join("site.token");
    let client_file = lab.dir.path().join("client.token");
    std::fs::write(&site_file, site_tok).unwrap();
    std::fs::write(&client_file, client_tok).unwrap();

    step("server configured");
    let agent_state = lab.dir.path().join("agent").to_string_lossy().into_owned();
    lab.spawn(
        &a,
        "agent",
        &[&b("tunnel-agent"), "--token-file", &site_file.to_string_lossy(), "--state-dir", &agent_state],
        &[],
    );
    let client_state = lab.dir.path().join("client").to_string_lossy().into_owned();
    let client = lab.spawn(
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
            "resolv-conf",
        ],
        &[],
    );
    lab.wait("the client to point resolv.conf at itself", 30, || {
        std::fs::read_to_string(etc.join("resolv.conf"))
            .unwrap_or_default()
            .contains("managed by tunnelctl up")
    });

    step("client up, resolv.conf pointed");
    // By name, through the system resolver (curl -> getaddrinfo -> resolv.conf -> the client's DNS).
    let out_path = lab.dir.path().join("out.bin");
    let out_s = out_path.to_string_lossy().into_owned();
    let fetch = lab.exec(
        &c,
        &["curl", "-sS", "--max-time", "60", "-o", &out_s, "http://web.tunnel.internal:8080/big.bin"],
    );
    assert!(
        fetch.status.success(),
        "curl: {}\nclient log:\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&fetch.stderr),
        lab.log("client"),
        lab.log("agent")
    );
    assert!(std::fs::read(&out_path).unwrap() == blob, "20 MB fetched byte-exact");

    step("20 MB fetched");
    // Other names go to the resolver the machine had before.
    let public = lab.exec(&c, &["getent", "ahostsv4", "www.example.org"]);
    let said = String::from_utf8_lossy(&public.stdout);
    assert!(
        said.contains("192.0.2.99"),
        "forwarded upstream: {said}{}",
        String::from_utf8_lossy(&public.stderr)
    );

    // The largest ping the MTU allows (1280 - 20 - 8), with DF set: it passes whole.
    let ping = lab.exec(&c, &["ping", "-c", "3", "-W", "2", "-M", "do", "-s", "1252", "web.tunnel.internal"]);
    assert!(ping.status.success(), "full-size ping: {}", String::from_utf8_lossy(&ping.stdout));
    // One byte more does not fit.
    let too_big =
        lab.exec(&c, &["ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1253", "web.tunnel.internal"]);
    let said =
        format!("{}{}", String::from_utf8_lossy(&too_big.stdout), String::from_utf8_lossy(&too_big.stderr));
    assert!(
        !too_big.status.success() && said.contains("1280"),
        "one byte over the MTU must not pass: {said}"
    );

    step("pings done");
    // UDP echo by name.
    let udp = lab.exec(&c, &["python3", "-c", UDP_ASK]);
    assert_eq!(
        String::from_utf8_lossy(&udp.stdout).trim(),
        "polo",
        "{}",
        String::from_utf8_lossy(&udp.stderr)
    );

    step("udp done");
    // The client exits on SIGTERM and puts resolv.conf back.
    lab.stop(client);
    assert_eq!(std::fs::read_to_string(etc.join("resolv.conf")).unwrap(), original);
    step("client stopped, resolv.conf restored");
}
