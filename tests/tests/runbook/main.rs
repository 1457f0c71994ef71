//! `deploy/RUNBOOK.md`, run (root; skipped otherwise). Every block of the runbook tagged
//! `` ```sh rb:ID@HOST `` is taken out of the file and run on that host of a small namespace network
//! (`tunnel_tests::nat`: the server on 203.0.113.10, a standalone relay on 203.0.113.20, the site's
//! agent and its service behind a NAT router, the client behind another), against the real binaries,
//! at the point of the procedure where the runbook says to run it; its output is checked against the
//! `` ```text rb:ID `` block after it (`<...>` and `...` match anything, whitespace runs are equal,
//! each expected line must appear, in order, inside an output line). The test then checks what the
//! runbook promises around it (a transfer that survives, a path that comes back, a token refused).
//! Every tagged block is run by exactly one test here (`every_runbook_block_is_run`), so the runbook
//! and this file cannot drift apart: change a command there and it runs as changed here.
//!
//! How the runbook's world is played:
//! - Hosts are namespaces; each has a scratch root, and the paths the runbook names under
//!   `/etc/tunnel`, `/var/lib/tunnel-*`, `/var/backups`, `/root` and `/usr/local/bin` are rooted there
//!   (in the commands, and back again in their output). Commands run with `sh -c`, with that
//!   `/usr/local/bin` (links to the binaries just built) first on PATH, the `export`s of the
//!   runbook's `rb:setup.admin` block on the server, and `TUNNEL_STATE_DIR` / `TUNNEL_DATA_DIR` set
//!   to the rooted defaults (what `tunnelctl status` or `tunnel-server backup` read by default).
//! - Names resolve through `/etc/netns/NS/hosts`: `vps.example.com` is the server, `relay1.example.com`
//!   the relay, `stun.example.net` a coturn `turnserver --stun-only` on the relay host (the runbook's
//!   "second STUN server elsewhere").
//! - `systemctl start|stop|restart|is-active UNIT` and `journalctl -u UNIT [-n N]` are played here: a
//!   unit is started with what `deploy/systemd/UNIT.service` says (`ExecStart=`, `Environment=`,
//!   `EnvironmentFile=`, `LoadCredential=` copied into a credentials dir at start, `StateDirectory=`),
//!   stopped with SIGTERM, and its journal is its output. The lab's `/etc/tunnel/*.env` hold only
//!   what the runbook's deployment says (server: public address, embedded relay off, the external
//!   relay; client: `TUNNEL_DNS_MODE=resolv-conf`, as there is no systemd-resolved here).
//! - What happens *to* the deployment (a crash, a NAT that changes, a leaked token in use, a machine
//!   that dies) is done by the test, outside the runbook.
//!
//! `RUNBOOK_PRINT=1` prints every block's output (to copy into the runbook when it changes);
//! `TUNNEL_LOG=debug` makes the processes' logs (shown on failure) more talkative.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tunnel_core::status::NodeStatus;
use tunnel_tests::deploy::env::env_file;
use tunnel_tests::deploy::unit::{service_unit, ServiceUnit};
use tunnel_tests::lab::binaries;
use tunnel_tests::nat::{self, Internet, Nat, Options, Side};
use tunnel_tests::world::{poll, tail, Clock, Fetch};

mod blocks;
mod world;

use blocks::*;
use world::*;

const RUNBOOK: &str = include_str!("../../../deploy/RUNBOOK.md");
const UNITS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/systemd");

/// The runbook's blocks each test runs; together, every tagged block (checked without root).
const SERVER_IDS: &[&str] = &[
    "setup.admin",
    "server-down.doctor",
    "server-down.status",
    "server-down.server",
    "server-down.fix",
    "server-down.verify-server",
    "server-down.verify-client",
    "upgrade.before",
    "upgrade.install",
    "upgrade.verify",
    "upgrade.verify-client",
    "restore.backup",
    "restore.restore",
    "restore.refuse",
    "restore.start",
    "restore.verify-server",
    "restore.verify-client",
];
const NETWORK_IDS: &[&str] = &[
    "setup.admin",
    "punch.status",
    "punch.stun",
    "punch.force-relay",
    "punch.verify",
    "relay-down.client",
    "relay-down.relay",
    "relay-down.fix",
    "relay-down.verify-relay",
    "relay-down.verify-client",
];
const CLIENT_IDS: &[&str] = &[
    "setup.admin",
    "dns.doctor",
    "dns.listener",
    "dns.mode",
    "dns.fix",
    "dns.verify",
    "site-down.server",
    "site-down.doctor",
    "site-down.site",
    "site-down.fix",
    "site-down.verify-server",
    "site-down.verify-client",
    "leak.audit",
    "leak.rotate",
    "leak.install",
    "leak.verify-client",
    "leak.verify-server",
    "leak.admin",
    "leak.admin-verify",
];

/// The file the resource serves (fetched byte-exact across the events).
const BLOB_LEN: usize = 12_000_000;
const INDEX: &str = "hello from web\n";
/// The file, sent by the service at 1.5 MB/s, and at 200 kB/s: a transfer that is surely in flight
/// when something happens (a client-side rate limit would not do: kernel and SOCKS buffers take
/// megabytes ahead).
const SLOW: &str = "slow.bin";
const CRAWL: &str = "crawl.bin";

/// The resource: `/` answers [`INDEX`], `/slow.bin` and `/crawl.bin` the blob at 1.5 MB/s and
/// 200 kB/s. argv: BIND_IP PORT DIR.
const SERVICE: &str = r#"
import http.server, os, sys, time
root = sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        name, rate = {"/": ("index.html", 0), "/slow.bin": ("big.bin", 1.5e6), "/crawl.bin": ("big.bin", 2e5)}.get(self.path, (None, 0))
        if name is None:
            self.send_error(404)
            return
        data = open(os.path.join(root, name), "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        chunk, start = 65536, time.monotonic()
        for off in range(0, len(data), chunk):
            self.wfile.write(data[off:off + chunk])
            if rate:
                ahead = (off + chunk) / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"#;
/// The second client's (userspace, relay only) listeners, on the client host.
const OPS_SOCKS: &str = "127.0.0.1:1081";
const OPS_METRICS: &str = "127.0.0.1:9184";

// ---- the tests ---------------------------------------------------------------------------------

#[test]
fn every_runbook_block_is_run() {
    let blocks = blocks();
    let in_doc: BTreeSet<&str> = blocks.keys().map(String::as_str).collect();
    let run: BTreeSet<&str> = SERVER_IDS.iter().chain(NETWORK_IDS).chain(CLIENT_IDS).copied().collect();
    assert_eq!(in_doc, run, "tagged runbook blocks vs the blocks the lab tests run");
    assert!(blocks.values().filter(|b| b.expected.is_some()).count() > 20, "outputs are shown and checked");
    // The matcher itself.
    assert!(check_output(
        "  ok   site home  tunnel up: <path> via <...>\n...\nfailed: <x>\n",
        "x\n  ok        site home     tunnel up: direct via 1.2.3.4:5\nz\nfailed: reach\n"
    )
    .is_ok());
    assert!(check_output("a\nb\n", "b\na\n").is_err());
    assert!(check_output("home  yes  now\n", "home  100.96.0.1  no  2026\n").is_err());
}

/// 1. Control server down, 8. Upgrading the server, 7. Restoring the server from a backup.
#[test]
fn runbook_server_down_upgrade_and_restore() {
    let Some(mut w) = World::up("server procedures") else { return };
    // A second client that always goes through the relay (userspace, --force-relay), for a relayed
    // transfer across the upgrade.
    let ops = w.admin(&["client", "add", "ops"]);
    w.admin(&["grant", "--client", "ops", "--resource", "web"]);
    w.write("client", "/root/ops.token", &ops);
    let (tok, state) = (w.path("client", "/root/ops.token"), w.net.lab.dir.path().join("ops-state"));
    let cli = w.host("client").ns.clone();
    let args = [
        w.bin.join("tunnelctl").to_string_lossy().into_owned(),
        "up".into(),
        "--userspace".into(),
        "--force-relay".into(),
        "--token-file".into(),
        tok.to_string_lossy().into_owned(),
        "--state-dir".into(),
        state.to_string_lossy().into_owned(),
        "--socks5".into(),
        OPS_SOCKS.into(),
        "--dns-listen".into(),
        "127.0.0.1:5354".into(),
        "--metrics-listen".into(),
        OPS_METRICS.into(),
    ];
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    w.net.lab.spawn(&cli, "ops", &refs, &[]);
    let ops_get = |w: &World| {
        w.sh(
            "client",
            &format!("curl -fsS --max-time 3 --socks5-hostname {OPS_SOCKS} http://web.tunnel.internal:8080/"),
        )
        .out == INDEX
    };
    let ops_path = |w: &World| {
        let r = w.sh("client", &format!("curl -fsS --max-time 2 http://{OPS_METRICS}/status"));
        let st: Option<NodeStatus> = serde_json::from_str(&r.out).ok();
        st.and_then(|s| s.peers.into_iter().next()).map_or(String::new(), |p| p.path.as_str().to_owned())
    };
    w.wait("the relayed client to fetch through the relay", 45, |w| ops_get(w) && ops_path(w) == "relay");
    w.wait_path("client", "direct", 45);

    // ---- 1. Control server down ----
    w.crash("tunnel-server");
    w.step("server killed");
    w.wait("the client to find the server gone", 10, |w| {
        w.status("client").and_then(|s| s.control).is_some_and(|c| c.reason().contains("cannot reach"))
    });
    let r = w.run("server-down.doctor");
    assert_eq!(r.code, 1, "doctor exits 1 while the server is down");
    w.run("server-down.status");
    assert!(w.get(10), "the tunnel works without the server");
    let r = w.run("server-down.server");
    assert!(r.out.starts_with("failed\n"), "is-active of a crashed unit");
    w.run("server-down.fix");
    w.run_until("server-down.verify-server", 40);
    w.run_until("server-down.verify-client", 40);
    assert!(w.get(10) && ops_get(&w), "both clients work after the restart");

    // ---- 8. Upgrading the server without cutting tunnels ----
    std::fs::copy(w.bin.join("tunnel-server"), w.path("server", "/root/tunnel-server.new")).unwrap();
    w.run_until("upgrade.before", 40);
    let direct = w.fetch_bg(SLOW, &[]);
    let relayed = w.fetch_bg(SLOW, &["--socks5-hostname", OPS_SOCKS]);
    w.wait("both transfers under way", 30, |_| direct.bytes() > 2_000_000 && relayed.bytes() > 2_000_000);
    let relay_bytes = |w: &World| -> u64 {
        let m = w.sh("relay", "curl -fsS http://127.0.0.1:9183/metrics").out;
        m.lines().find_map(|l| l.strip_prefix("tunnel_relay_bytes_total ")?.trim().parse().ok()).unwrap_or(0)
    };
    let relayed_before = relay_bytes(&w);
    w.run("upgrade.install");
    w.step(&format!("server upgraded ({} and {} bytes fetched)", direct.bytes(), relayed.bytes()));
    w.run_until("upgrade.verify", 40);
    w.finish(&direct, 60, "the direct transfer across the upgrade");
    w.finish(&relayed, 60, "the relayed transfer across the upgrade");
    let grew = relay_bytes(&w) - relayed_before;
    if grew < (BLOB_LEN as u64) / 2 {
        let ops = w.sh("client", &format!("curl -fsS http://{OPS_METRICS}/status")).out;
        let m = w.sh("relay", "curl -fsS http://127.0.0.1:9183/metrics").out;
        w.fail(&format!("the relayed transfer did not go through the relay ({grew} bytes, before {relayed_before}); ops: {ops}\n{m}"));
    }
    assert_eq!(w.path_of("client"), "direct", "the direct client stayed direct");
    w.run_until("upgrade.verify-client", 40);

    // ---- 7. Restoring the server from a backup ----
    w.run("restore.backup");
    // A client added after the backup: the restored server does not know it.
    let phone = w.admin(&["client", "add", "phone"]);
    w.write("client", "/root/phone.token", &phone);
    // The machine dies: its process, then its network.
    w.crash("tunnel-server");
    let old = w.host("server").ns.clone();
    let out = w.net.exec(&old, &["ip", "link", "del", "wan0"]);
    assert!(out.status.success());
    let backup = std::fs::read_dir(w.path("server", "/var/backups")).unwrap().next().unwrap().unwrap().path();
    let env = std::fs::read(w.path("server", "/etc/tunnel/server.env")).unwrap();
    // The new machine: same address, empty disk; the unit, its env file and the backup copied over.
    let new = w.net.lab.ns("srv2");
    let inet = w.net.inet.clone();
    w.net.lab.veth(&inet, "p-srv2", &new, "wan0");
    for args in [
        vec!["ip", "-n", &inet, "link", "set", "p-srv2", "master", "br0"],
        vec!["ip", "-n", &new, "addr", "add", "203.0.113.10/24", "dev", "wan0"],
    ] {
        assert!(Command::new(args[0]).args(&args[1..]).status().unwrap().success(), "{args:?}");
    }
    // The new machine takes over the address: the neighbours learn its MAC (as a gratuitous ARP
    // would tell them).
    for ns in [w.net.site.ns.clone(), w.net.router(Side::Client).ns.clone(), w.host("relay").ns.clone()] {
        let _ = w.net.exec(&ns, &["ip", "neigh", "flush", "all"]);
    }
    w.add_host("server", &new, "server2");
    w.take_env_block();
    w.write_bytes("server", "/etc/tunnel/server.env", &env);
    std::fs::copy(&backup, w.path("server", "/root/tunnel-backup.tar.gz")).unwrap();
    let runs = w.units["tunnel-server"].runs;
    let mut u = unit("tunnel-server");
    (u.runs, u.journal_from) = (runs, runs + 1);
    w.units.insert("tunnel-server".into(), u);
    w.step("the server's machine is replaced");
    w.run("restore.restore");
    let r = w.run("restore.refuse");
    assert_eq!(r.code, 1, "restore refuses a data dir with files");
    w.run("restore.start");
    w.run_until("restore.verify-server", 45);
    w.run_until("restore.verify-client", 45);
    assert!(w.get(10) && ops_get(&w), "both clients work with the restored server");
    let r = w.sh("client", "tunnelctl doctor --token-file /root/phone.token --state-dir /root/phone-state");
    assert!(r.out.contains("is not known to this server"), "a client added after the backup: {}", r.out);
    w.ran_exactly(SERVER_IDS);
}

/// 4. Hole punching fails on a network, 2. Relay down.
#[test]
fn runbook_hole_punching_and_relay_down() {
    let Some(mut w) = World::up("network procedures") else { return };
    let stun_tools = have("turnutils_natdiscovery") && have("turnserver");
    if stun_tools {
        // A second STUN server, "elsewhere": coturn on the relay host.
        let rly = w.host("relay").ns.clone();
        let db = w.net.lab.dir.path().join("turndb").to_string_lossy().into_owned();
        let pid = w.net.lab.dir.path().join("turnserver.pid").to_string_lossy().into_owned();
        w.net.lab.spawn(
            &rly,
            "coturn",
            &[
                "turnserver",
                "-n",
                "--stun-only",
                "--no-cli",
                "--no-tls",
                "--no-dtls",
                "-L",
                "203.0.113.20",
                "-p",
                "3478",
                "--db",
                &db,
                "--log-file",
                "stdout",
                "--pidfile",
                &pid,
            ],
            &[],
        );
    }

    // ---- 4. Hole punching fails on a network ----
    w.wait_path("client", "direct", 45);
    if stun_tools {
        // On the cone NAT the client's network had so far, both STUN servers see one public port.
        let r = w.run_unchecked("punch.stun");
        let ports = reflexive_ports(&r.out);
        assert_eq!(ports.len(), 1, "a cone NAT shows every STUN server one port:\n{}", r.out);
    }
    w.client_nat(Nat::Symmetric);
    w.step("the client's router is now a symmetric NAT");
    w.wait_path("client", "relay", 30);
    w.run("punch.status");
    if stun_tools {
        let r = w.run("punch.stun");
        let ports = reflexive_ports(&r.out);
        assert_eq!(ports.len(), 2, "a symmetric NAT shows each STUN server its own port:\n{}", r.out);
    }
    w.run("punch.force-relay");
    w.run_until("punch.verify", 30);
    assert_eq!(w.relay_up("client"), Some(true));

    // ---- 2. Relay down ----
    let f = w.fetch_bg(SLOW, &[]);
    w.wait("the transfer to be under way", 30, |_| f.bytes() > 1_000_000);
    w.crash("tunnel-relay");
    let killed = Instant::now();
    w.step(&format!("relay killed ({} bytes fetched)", f.bytes()));
    std::thread::sleep(Duration::from_secs(1));
    let stalled = f.bytes();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(f.bytes(), stalled, "nothing passes while the relay is down");
    assert!(!w.get(3), "no new connection through a dead relay");
    w.wait("the client to notice the relay is gone", 45, |w| w.relay_up("client") == Some(false));
    w.step(&format!("the client says relay: down {:.1}s after the kill", killed.elapsed().as_secs_f64()));
    w.run("relay-down.client");
    let r = w.run("relay-down.relay");
    assert!(r.out.starts_with("failed\n") && !r.ok(), "the relay is down: {}", r.out);
    w.run("relay-down.fix");
    w.run_until("relay-down.verify-relay", 30);
    w.run_until("relay-down.verify-client", 30);
    w.finish(&f, 90, "the transfer across the relay's outage");
    // Without coturn installed the STUN block is skipped above (CI installs it).
    let ids: Vec<&str> = NETWORK_IDS.iter().copied().filter(|id| stun_tools || *id != "punch.stun").collect();
    w.ran_exactly(&ids);
}

/// 5. Private names do not resolve, 3. A site unreachable, 6. A leaked token.
#[test]
fn runbook_names_site_down_and_leaked_token() {
    let Some(mut w) = World::up("client procedures") else { return };
    let have_dig = have("dig");
    w.wait_path("client", "direct", 45);
    let resolv = Path::new("/etc/netns").join(&w.host("client").ns).join("resolv.conf");

    // ---- 5. Private names do not resolve ----
    // Something (NetworkManager with its local dnsmasq, say) rewrites resolv.conf under the client.
    let dhcp = "nameserver 127.0.0.1\nsearch corp.example\n";
    std::fs::write(&resolv, dhcp).unwrap();
    let r = w.run("dns.doctor");
    assert_eq!(r.code, 1);
    if have_dig {
        w.run("dns.listener");
    } else {
        w.ran.insert("dns.listener".into());
    }
    w.run("dns.mode");
    w.run("dns.fix");
    w.wait("the restarted client to point resolv.conf at itself", 30, |_| {
        std::fs::read_to_string(&resolv).unwrap_or_default().contains("managed by tunnelctl up")
    });
    // On its way out the client left the DHCP client's version alone, and took it as the original.
    let saved = std::fs::read_to_string(w.path("client", "/var/lib/tunnel-client/resolv.conf.orig")).unwrap();
    assert_eq!(saved, dhcp, "the original the restarted client keeps");
    w.run_until("dns.verify", 20);
    let now = std::fs::read_to_string(&resolv).unwrap();
    assert!(now.contains("managed by tunnelctl up") && now.contains("search corp.example"), "{now}");

    // ---- 3. A site unreachable ----
    w.crash("tunnel-agent");
    w.step("agent killed");
    w.run_until("site-down.server", 20);
    // The client hears of it (a map update) before anyone could type the next command.
    let map = w.path("client", "/var/lib/tunnel-client/map.json");
    w.wait("the client's map to say the site is offline", 10, |_| {
        let m: Value =
            serde_json::from_str(&std::fs::read_to_string(&map).unwrap_or_default()).unwrap_or_default();
        m["peers"].as_object().is_some_and(|p| p.values().all(|p| p["online"] == false))
    });
    let r = w.run("site-down.doctor");
    assert_eq!(r.code, 1);
    let r = w.run("site-down.site");
    assert!(r.out.starts_with("failed\n"));
    w.run("site-down.fix");
    w.run_until("site-down.verify-server", 30);
    w.run_until("site-down.verify-client", 30);

    // ---- 6. A leaked token ----
    // The rightful client's transfer, cut by the rotation.
    let f = w.fetch_bg(CRAWL, &[]);
    w.wait("the transfer to be under way", 30, |_| f.bytes() > 200_000);
    // Someone else uses the client's token, from the relay host, while the client runs.
    std::fs::copy(w.path("client", "/etc/tunnel/client.token"), w.net.lab.dir.path().join("leaked.token"))
        .unwrap();
    let rly = w.host("relay").ns.clone();
    let (leaked, thief_state) =
        (w.net.lab.dir.path().join("leaked.token"), w.net.lab.dir.path().join("thief"));
    let args = [
        w.bin.join("tunnelctl").to_string_lossy().into_owned(),
        "up".into(),
        "--userspace".into(),
        "--token-file".into(),
        leaked.to_string_lossy().into_owned(),
        "--state-dir".into(),
        thief_state.to_string_lossy().into_owned(),
    ];
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    w.net.lab.spawn(&rly, "thief", &refs, &[]);
    w.wait("a login from the thief's address", 30, |w| {
        w.sh("server", "tunnelctl audit --limit 20").out.contains("203.0.113.20:")
    });
    w.run_until("leak.audit", 20);
    // Rotate; as the runbook says, again if a login in flight left a key behind.
    let mut r = w.run_unchecked("leak.rotate");
    for _ in 0..2 {
        if r.out.contains("\"public_key\":\"\"") {
            break;
        }
        w.step("a login in flight left its key behind: rotating again, as the runbook says");
        r = w.run_unchecked("leak.rotate");
    }
    let exp = w.blocks["leak.rotate"].expected.clone().unwrap_or_default();
    if let Err(e) = check_output(&exp, &r.out) {
        w.fail(&format!("rb:leak.rotate: {e}\n{}", r.out));
    }
    std::thread::sleep(Duration::from_secs(1));
    let cut = f.bytes();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(f.bytes(), cut, "the rotation cut the live session's tunnel");
    assert!(!w.get(3), "no new connection with the old identity");
    let r = w.sh(
        "relay",
        &format!("tunnelctl doctor --token-file {} --state-dir {}", leaked.display(), thief_state.display()),
    );
    assert!(
        r.out.contains("wrong secret") || r.out.contains("no longer valid"),
        "the old token is refused: {}",
        r.out
    );
    // The new token to the rightful machine.
    let new = std::fs::read(w.path("server", "/root/laptop.token")).unwrap();
    w.write_bytes("client", "/root/laptop.token", &new);
    w.run("leak.install");
    w.run_until("leak.verify-client", 40);
    w.run_until("leak.verify-server", 10);
    // The admin token.
    w.run("leak.admin");
    w.run_until("leak.admin-verify", 30);
    let _ = w.net.lab.try_wait(f.idx);
    w.ran_exactly(CLIENT_IDS);
}
