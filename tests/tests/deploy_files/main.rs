//! The deploy files, run for real (root; skipped otherwise). Every binary starts with exactly the
//! arguments and TUNNEL_* variables deploy/ gives it, read here out of the files themselves: the
//! Dockerfile's ENV/USER/ENTRYPOINT/CMD/HEALTHCHECK and the `docker run` variants its comments
//! document, the compose `environment:` maps with their `env_file:` (the `.example` files, and a
//! second run with their commented-out examples switched on), and the systemd units' `ExecStart=`,
//! `Environment=`, `EnvironmentFile=` and `LoadCredential=`.
//!
//! Each process gets its own network namespace, so every listen address is bound as written
//! (0.0.0.0:443 included), and runs as the user the platform would run it as: the image's USER,
//! systemd's DynamicUser= with its AmbientCapabilities= and CapabilityBoundingSet=, compose's
//! `sysctls:`. Only the values in [`SUBSTITUTIONS`] are changed, each for the reason it gives.
//! Not modelled: file-system sandboxing (read_only, ProtectSystem=, PrivateTmp=), seccomp filters,
//! Docker's default capability set; `deploy/check.sh` lints those.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use tunnel_tests::deploy::compose::Yaml;
use tunnel_tests::deploy::dockerfile::{docker_run, documented_options, Stage};
use tunnel_tests::deploy::env::{env_file, Setting};
use tunnel_tests::deploy::unit::service_unit;
use tunnel_tests::lab::{binaries, Lab};

mod launch;
mod run;

use launch::*;
use run::*;

// --- what the test changes, and why ------------------------------------------------------------

/// How a written value is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum With {
    /// The binaries this test built (the prefix is replaced).
    Binaries,
    /// The same path under the process's own scratch dir.
    ScratchDir,
    /// The process's credentials dir, filled from `LoadCredential=` as systemd does.
    Credentials,
    /// A join token the test's server issued for this process.
    JoinToken,
    /// The lab address of the server this process runs as.
    ServerAddr,
    /// A shim on PATH (HEALTHCHECK commands only).
    Shim,
    /// The example file beside it (compose `env_file:` names only).
    Example,
}

#[derive(Debug)]
struct Substitution {
    written: &'static str,
    with: With,
    why: &'static str,
}

/// Every value not passed verbatim. Ports, listen addresses, log formats, limits, TTLs, example
/// relay host names and every other setting reach the binaries exactly as the files write them.
const SUBSTITUTIONS: &[Substitution] = &[
    Substitution {
        written: "/usr/local/bin/",
        with: With::Binaries,
        why: "where the images (bare ENTRYPOINT names resolve there) and units install the binaries",
    },
    Substitution {
        written: "/var/lib/",
        with: With::ScratchDir,
        why: "state dirs, never the machine's; made as the platform makes them (image dir with its volume, \
              StateDirectory=), owned by the user the process runs as",
    },
    Substitution {
        written: "/etc/tunnel/",
        with: With::ScratchDir,
        why: "operator-installed files (tokens, relay bundle, env files), never the machine's",
    },
    Substitution {
        written: "/run/secrets/",
        with: With::ScratchDir,
        why: "mounted secrets: a file holding this process's join token or relay bundle",
    },
    Substitution {
        written: "%d/",
        with: With::Credentials,
        why: "systemd's credentials dir, filled from LoadCredential= (sources under /etc/tunnel/, above)",
    },
    Substitution {
        written: "tjn1.REPLACE",
        with: With::JoinToken,
        why: "a placeholder for a real join token",
    },
    Substitution {
        written: "vps.example.com",
        with: With::ServerAddr,
        why: "the example public host name resolves nowhere; nodes must dial the test's server",
    },
    Substitution {
        written: "busybox",
        with: With::Shim,
        why: "the image's static busybox is not on test machines: the shim runs sh for `sh`, curl for `wget`",
    },
    Substitution {
        written: "env_file: NAME",
        with: With::Example,
        why: "the operator makes NAME by copying NAME.example, as the compose files say",
    },
];

/// Settings the files leave to the operator (and say so): (launch, key, value, why).
const OPERATOR_SUPPLIED: &[(&str, &str, &str, &str)] = &[
    (
        "drelay",
        "TUNNEL_RELAY_BUNDLE_FILE",
        "/run/secrets/relay.bundle",
        "the Dockerfile runs a relay 'with TUNNEL_RELAY_BUNDLE_FILE naming a mounted copy' of relay.bundle",
    ),
    (
        "dclient",
        "TUNNEL_TOKEN_FILE",
        "/run/secrets/token",
        "the client image needs a token; this is the path of the Dockerfile's own `docker run` example",
    ),
];

/// Commented-out examples that cannot run on a test machine, and why.
const NOT_RUN_HERE: &[(&str, &str)] = &[("TUNNEL_DATABASE", "a postgres:// URL needs a PostgreSQL server")];

/// Variables the binaries read that are not flags (so not in `--help`).
const NOT_FLAGS: &[&str] = &["TUNNEL_LOG"];

/// What Docker does for every container that the Dockerfile relies on (its comment says so).
/// Compose services get only their own `sysctls:` (the compose file sets it for Podman's sake).
const DOCKER_SYSCTLS: &[(&str, &str)] = &[("net.ipv4.ip_unprivileged_port_start", "0")];

/// The first uid systemd hands out for DynamicUser=.
const DYNAMIC_UID: u32 = 61184;

/// PATH as Debian images and systemd set it.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const DOCKERFILE: &str = "deploy/Dockerfile";

const BUSYBOX_SHIM: &str = r#"#!/bin/sh
# Stands in for busybox in HEALTHCHECK commands: `sh` and `wget -q -O FILE URL` only.
cmd=$1; shift
case $cmd in
sh) exec sh "$@" ;;
wget)
    out=-
    while [ $# -gt 1 ]; do
        case $1 in -q) ;; -O) shift; out=$1 ;; *) echo "busybox shim: wget $1" >&2; exit 2 ;; esac
        shift
    done
    exec curl -fsS --noproxy '*' --max-time 5 -o "$out" "$1" ;;
*) echo "busybox shim: no $cmd" >&2; exit 2 ;;
esac
"#;

#[test]
fn the_binaries_start_with_the_settings_the_deploy_files_give_them() {
    let Some(mut lab) = Lab::new() else { return };
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.2}s] {what}", t0.elapsed().as_secs_f64());
    let files = Files::new();
    let launches = files.launches();
    for s in SUBSTITUTIONS {
        eprintln!("substituted: {} -> {:?}: {}", s.written, s.with, s.why);
    }
    for (l, k, v, why) in OPERATOR_SUPPLIED {
        eprintln!("operator-supplied for {l}: {k}={v}: {why}");
    }
    for (k, why) in NOT_RUN_HERE {
        eprintln!("not run: the commented-out {k} example ({why})");
    }
    let bin = binaries();
    step("binaries built");
    check_settings_are_read(&bin, &launches);
    let resolv_before = std::fs::read("/etc/resolv.conf").ok();

    // Processes running as other users reach their own dirs under the scratch dir.
    std::fs::set_permissions(lab.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let shim = lab.dir.path().join("shim");
    std::fs::create_dir_all(&shim).unwrap();
    std::fs::write(shim.join("busybox"), BUSYBOX_SHIM).unwrap();
    std::fs::set_permissions(shim.join("busybox"), std::fs::Permissions::from_mode(0o755)).unwrap();

    // A namespace per process, each with its own resolv.conf (`ip netns exec` mounts it over
    // /etc/resolv.conf, so a client rewriting it never touches the machine's). The nameserver is
    // unreachable: example host names fail at once.
    let mut ns = BTreeMap::new();
    for l in &launches {
        let n = lab.ns(l.name);
        let etc = Path::new("/etc/netns").join(&n);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("resolv.conf"), "nameserver 192.0.2.53\n").unwrap();
        ns.insert(l.name, n);
    }
    // Each server's public address (on its loopback), and a link to every process that joins it.
    let mut addr: BTreeMap<&str, String> = BTreeMap::new();
    for (i, l) in launches.iter().filter(|l| l.role() == Role::Server).enumerate() {
        let a = format!("10.{}.0.1", 71 + i);
        let out = lab.exec(&ns[l.name], &["ip", "addr", "add", &format!("{a}/32"), "dev", "lo"]);
        assert!(out.status.success(), "ip addr: {}", String::from_utf8_lossy(&out.stderr));
        addr.insert(l.name, a);
    }
    let mut links: BTreeMap<&str, usize> = BTreeMap::new();
    for l in launches.iter().filter(|l| matches!(l.role(), Role::Agent | Role::Client)) {
        let s = l.joins.expect("a server to join");
        let n = {
            let c = links.entry(s).or_default();
            *c += 1;
            *c
        };
        let net = addr[s].trim_end_matches(".0.1").to_owned();
        let (here, there) = (format!("{net}.{n}.1"), format!("{net}.{n}.2"));
        lab.link(
            &ns[s],
            &format!("p{n}"),
            &format!("{here}/24"),
            &ns[l.name],
            "eth0",
            &format!("{there}/24"),
        );
        let out = lab.exec(&ns[l.name], &["ip", "route", "add", &format!("{}/32", addr[s]), "via", &here]);
        assert!(out.status.success(), "ip route: {}", String::from_utf8_lossy(&out.stderr));
    }
    step("namespaces up");

    // Servers first: the others need their tokens and relay bundle.
    let mut runs: Vec<Running> = vec![];
    for l in launches.iter().filter(|l| l.role() == Role::Server) {
        runs.push(start(&mut lab, &bin, l, &ns[l.name], None, None, addr.get(l.name).map(String::as_str)));
    }
    let tunnelctl = bin.join("tunnelctl").to_string_lossy().into_owned();
    let mut admin: BTreeMap<&str, String> = BTreeMap::new();
    for r in &runs {
        let data =
            r.var("TUNNEL_DATA_DIR").unwrap_or_else(|| panic!("{}: no TUNNEL_DATA_DIR", r.launch.from));
        let token = Path::new(data).join("admin.token").to_string_lossy().into_owned();
        wait_for(&mut lab, r, "its admin token and relay bundle", 30, |_| {
            (Path::new(&token).exists() && Path::new(data).join("relay.bundle").exists())
                .then_some(())
                .ok_or_else(String::new)
        });
        admin.insert(r.launch.name, token);
    }
    let servers: BTreeMap<&str, usize> = runs.iter().enumerate().map(|(i, r)| (r.launch.name, i)).collect();
    for l in launches.iter().filter(|l| l.role() != Role::Server) {
        let s = l.joins.expect("a server");
        let server = &runs[servers[s]];
        let (token, bundle) = match l.role() {
            Role::Relay => {
                let data = server.var("TUNNEL_DATA_DIR").unwrap();
                (None, Some(std::fs::read(Path::new(data).join("relay.bundle")).unwrap()))
            }
            role => {
                let kind = if role == Role::Agent { "site" } else { "client" };
                let args = [tunnelctl.as_str(), "--admin-token-file", &admin[s], kind, "add", l.name];
                let mut got = None;
                wait_for(&mut lab, server, "its admin API answers", 30, |lab| {
                    let out = lab.exec(&server.ns, &args);
                    got = Some(String::from_utf8_lossy(&out.stdout).trim().to_owned());
                    out.status
                        .success()
                        .then_some(())
                        .ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
                });
                (got, None)
            }
        };
        let run = start(
            &mut lab,
            &bin,
            l,
            &ns[l.name],
            token.as_deref(),
            bundle.as_deref(),
            addr.get(s).map(String::as_str),
        );
        runs.push(run);
    }
    step("all started");

    for r in &runs {
        wait_for(&mut lab, r, "serving /healthz (and connected, for nodes)", 40, |lab| ready(lab, r));
    }
    step("all serve /healthz; agents and clients connected");
    for r in &runs {
        check(&mut lab, r, &shim);
    }
    step("health checks, listeners, published ports, TUN and DNS modes");
    for r in &runs {
        if let Some(st) = lab.try_wait(r.idx) {
            panic!("{}", rejected(&lab, r, &format!("exited ({st}) after it started")));
        }
    }
    assert!(
        std::fs::read("/etc/resolv.conf").ok() == resolv_before,
        "the machine's /etc/resolv.conf changed"
    );
}
