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

// --- the processes -------------------------------------------------------------------------------

/// Who the process runs as.
#[derive(Debug, Clone, Default)]
struct RunAs {
    /// None: root.
    uid: Option<u32>,
    ambient: Vec<String>,
    bounding: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Server,
    Relay,
    Agent,
    Client,
}

/// A process as the deploy files start it.
#[derive(Debug, Clone)]
struct Launch {
    /// Namespace and log name.
    name: &'static str,
    /// Which files, for messages.
    from: String,
    program: String,
    args: Vec<String>,
    /// Merged in the platform's precedence order: the last writer of a key wins.
    env: BTreeMap<String, Setting>,
    /// systemd `EnvironmentFile=`: (path, optional, where).
    env_files: Vec<(String, bool, String)>,
    user: RunAs,
    sysctls: Vec<(String, String)>,
    /// Dirs the platform makes for the process, owned by its user.
    state_dirs: Vec<String>,
    /// systemd `LoadCredential=`: (id, source).
    credentials: Vec<(String, String)>,
    healthcheck: Option<(Vec<String>, String)>,
    /// Compose `ports:`: (container port, protocol, where).
    published: Vec<(u16, String, String)>,
    /// The server whose token (agents, clients) or relay bundle (relays) it uses.
    joins: Option<&'static str>,
    /// Settings from this file may be meant for another command of the same image.
    foreign_ok: Option<&'static str>,
}

impl Launch {
    fn new(name: &'static str, from: String, joins: Option<&'static str>) -> Launch {
        Launch {
            name,
            from,
            program: String::new(),
            args: vec![],
            env: BTreeMap::new(),
            env_files: vec![],
            user: RunAs::default(),
            sysctls: vec![],
            state_dirs: vec![],
            credentials: vec![],
            healthcheck: None,
            published: vec![],
            joins,
            foreign_ok: None,
        }
    }

    fn set(&mut self, settings: impl IntoIterator<Item = Setting>) {
        for s in settings {
            self.env.insert(s.key.clone(), s);
        }
    }

    fn role(&self) -> Role {
        let base = self.program.rsplit('/').next().unwrap_or_default();
        match (base, self.args.first().map(String::as_str)) {
            ("tunnel-server", Some("relay")) => Role::Relay,
            ("tunnel-server", None) => Role::Server,
            ("tunnel-agent", None) => Role::Agent,
            ("tunnelctl", Some("up")) => Role::Client,
            _ => panic!(
                "{}: runs `{} {}`, which this test does not know",
                self.from,
                self.program,
                self.args.join(" ")
            ),
        }
    }
}

// --- reading the files -----------------------------------------------------------------------------

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

struct Files {
    root: PathBuf,
    stages: BTreeMap<String, Stage>,
}

impl Files {
    fn new() -> Files {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
        let stages = tunnel_tests::deploy::dockerfile::stages(
            &std::fs::read_to_string(root.join(DOCKERFILE)).unwrap(),
            DOCKERFILE,
        );
        Files { root, stages }
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root.join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
    }

    fn stage(&self, name: &str) -> &Stage {
        self.stages.get(name).unwrap_or_else(|| panic!("{DOCKERFILE}: no stage '{name}'"))
    }

    /// A container of a stage's image, as it starts with no arguments.
    fn container(
        &self,
        name: &'static str,
        target: &str,
        from: String,
        joins: Option<&'static str>,
    ) -> Launch {
        let s = self.stage(target);
        let mut l = Launch::new(name, from, joins);
        let (program, args) =
            s.entrypoint.split_first().unwrap_or_else(|| panic!("{DOCKERFILE}: {target}: no ENTRYPOINT"));
        (l.program, l.args) = (program.clone(), args.iter().chain(&s.cmd).cloned().collect());
        l.set(s.env.iter().cloned());
        l.user.uid = match s.user.as_deref().map(|u| u.split(':').next().unwrap()) {
            None | Some("0" | "root") => None,
            Some(u) => {
                Some(u.parse().unwrap_or_else(|_| panic!("{DOCKERFILE}: {target}: USER {u}: not numeric")))
            }
        };
        l.state_dirs = s.owned_dirs.clone();
        l.healthcheck = s.healthcheck.clone();
        l
    }

    fn compose(
        &self,
        name: &'static str,
        file: &str,
        service: &str,
        examples: bool,
        joins: Option<&'static str>,
    ) -> Launch {
        let doc = Yaml::parse(&self.read(file));
        let svc = doc
            .get("services")
            .and_then(|s| s.get(service))
            .unwrap_or_else(|| panic!("{file}: no {service}"));
        for key in ["command", "entrypoint", "user", "environment_file"] {
            assert!(
                svc.get(key).is_none(),
                "{file}: services.{service}.{key} is not read by this test yet: teach it"
            );
        }
        let build = svc.get("build").unwrap_or_else(|| panic!("{file}: services.{service} has no build"));
        let dir = Path::new(file).parent().unwrap();
        let df = normalize(
            &dir.join(build.get("context").unwrap().str()).join(build.get("dockerfile").unwrap().str()),
        );
        assert!(
            df == Path::new(DOCKERFILE),
            "{file}: services.{service}.build names {df:?}, not {DOCKERFILE}"
        );
        let target = build.get("target").unwrap().str();
        let what = if examples { " with the env file's commented-out examples" } else { "" };
        let from = format!("{file} services.{service}{what} ({DOCKERFILE} target {target})");
        let mut l = self.container(name, target, from, joins);
        // Docker's order: the image's ENV, then env_file, then environment.
        for f in svc.get("env_file").map(Yaml::items).unwrap_or_default() {
            let example = dir.join(format!("{f}.example")).to_string_lossy().into_owned();
            let (on, off) = env_file(&self.read(&example), &example);
            l.set(on);
            if examples {
                l.set(off.into_iter().filter(|s| !NOT_RUN_HERE.iter().any(|(k, _)| *k == s.key)));
            }
        }
        for (k, v, n) in svc.get("environment").map(Yaml::pairs).unwrap_or_default() {
            assert!(!v.contains("${"), "{file}:{n}: interpolation is not read by this test");
            l.set([Setting::new(&k, &v, format!("{file}:{n}"))]);
        }
        l.sysctls = svc
            .get("sysctls")
            .map(Yaml::pairs)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v, _)| (k, v))
            .collect();
        if let Some(Yaml::List(ports)) = svc.get("ports") {
            for (p, n) in ports {
                let (spec, proto) = p.split_once('/').unwrap_or((p, "tcp"));
                let port = spec
                    .rsplit(':')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap_or_else(|_| panic!("{file}:{n}: port '{p}'"));
                l.published.push((port, proto.to_owned(), format!("{file}:{n}")));
            }
        }
        l
    }

    fn unit(&self, name: &'static str, file: &str, joins: Option<&'static str>) -> Launch {
        let u = service_unit(&self.read(file), file);
        let mut l = Launch::new(name, file.to_owned(), joins);
        (l.program, l.args) = (u.program().to_owned(), u.args().to_vec());
        l.set(u.environment);
        l.env_files = u.environment_files.into_iter().map(|f| (f.path, f.optional, f.at)).collect();
        l.credentials = u.credentials;
        if u.dynamic_user {
            l.user.uid = Some(DYNAMIC_UID);
        }
        l.user.ambient = u.ambient_capabilities;
        l.user.bounding = u.capability_bounding_set;
        l.state_dirs = u.state_directories.iter().map(|d| format!("/var/lib/{d}")).collect();
        l
    }

    /// The server image run as a relay, as the Dockerfile's comment describes it.
    fn docker_relay(&self, name: &'static str, joins: Option<&'static str>) -> Launch {
        let notes: String = self.stage("server").notes.iter().map(|(c, _)| format!("{c} ")).collect();
        let missing = "deploy/Dockerfile: the server stage no longer says how to run a relay (command `...` with TUNNEL_...)";
        let start = notes.find("command `").expect(missing) + "command `".len();
        let cmd = &notes[start..start + notes[start..].find('`').expect(missing)];
        let var: String = notes[start..]
            .split_whitespace()
            .find(|w| w.starts_with("TUNNEL_"))
            .expect(missing)
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let from = format!("{DOCKERFILE} target server with command `{cmd}`");
        let mut l = self.container(name, "server", from, joins);
        l.args.extend(cmd.split_whitespace().map(str::to_owned));
        l.sysctls = DOCKER_SYSCTLS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        l.foreign_ok = Some(DOCKERFILE);
        l.set(operator_supplied(name));
        assert!(
            l.env.contains_key(&var),
            "OPERATOR_SUPPLIED has no {var} for {name}, which {DOCKERFILE} asks for"
        );
        l
    }

    /// The client image: as it starts by default, or in TUN mode as its `docker run` comment says.
    fn docker_client(&self, name: &'static str, tun: bool, joins: Option<&'static str>) -> Launch {
        let stage = self.stage("client");
        let from =
            format!("{DOCKERFILE} target client{}", if tun { ", its `docker run` for TUN mode" } else { "" });
        let mut l = self.container(name, "client", from, joins);
        l.sysctls = DOCKER_SYSCTLS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if tun {
            let (user, env) = docker_run(stage, DOCKERFILE)
                .unwrap_or_else(|| panic!("{DOCKERFILE}: client: no `docker run` example"));
            if let Some(u) = user {
                l.user.uid = Some(u.parse().unwrap()).filter(|&u| u != 0);
            }
            l.set(env);
        } else {
            l.set(documented_options(stage, DOCKERFILE));
            l.set(operator_supplied(name));
        }
        l
    }

    /// Every process the deploy files describe, and the server each joins.
    fn launches(&self) -> Vec<Launch> {
        let (server, agent) = ("deploy/docker-compose.yml", "deploy/agent/docker-compose.yml");
        vec![
            self.compose("srv", server, "server", false, None),
            self.compose("srvx", server, "server", true, None),
            self.unit("usrv", "deploy/systemd/tunnel-server.service", None),
            self.unit("urelay", "deploy/systemd/tunnel-relay.service", Some("srv")),
            self.docker_relay("drelay", Some("srv")),
            self.compose("agent", agent, "agent", false, Some("srv")),
            self.compose("agentx", agent, "agent", true, Some("srvx")),
            self.unit("uagent", "deploy/systemd/tunnel-agent.service", Some("srv")),
            self.unit("uclient", "deploy/systemd/tunnel-client.service", Some("srv")),
            self.docker_client("dclient", false, Some("srv")),
            self.docker_client("dclienttun", true, Some("srv")),
        ]
    }
}

fn operator_supplied(name: &str) -> Vec<Setting> {
    OPERATOR_SUPPLIED
        .iter()
        .filter(|(l, ..)| *l == name)
        .map(|(_, k, v, _)| Setting::new(k, v, "OPERATOR_SUPPLIED in this test"))
        .collect()
}

// --- running them ----------------------------------------------------------------------------------

/// What a substitution needs to know about one process.
struct Sub<'a> {
    bin: &'a Path,
    root: &'a Path,
    token: Option<&'a str>,
    server: Option<&'a str>,
}

impl Sub<'_> {
    fn apply(&self, v: &str) -> String {
        for s in SUBSTITUTIONS {
            let hit = match s.with {
                With::Binaries => v.strip_prefix(s.written).map(|rest| self.bin.join(rest)),
                With::ScratchDir => v.starts_with(s.written).then(|| self.root.join(&v[1..])),
                With::Credentials => {
                    v.strip_prefix(s.written).map(|rest| self.root.join("credentials").join(rest))
                }
                With::JoinToken if v.starts_with(s.written) => {
                    return self.token.expect("a join token for a process that joins").to_owned()
                }
                With::ServerAddr if v.contains(s.written) => {
                    return v.replace(s.written, self.server.expect("a lab address for the server"))
                }
                _ => None,
            };
            if let Some(p) = hit {
                return p.to_string_lossy().into_owned();
            }
        }
        v.to_owned()
    }
}

/// A started process.
struct Running {
    launch: Launch,
    ns: String,
    /// What it really got, after substitution.
    env: BTreeMap<String, String>,
    idx: usize,
}

impl Running {
    fn var(&self, key: &str) -> Option<&str> {
        self.env.get(key).map(String::as_str)
    }

    fn url(&self, path: &str) -> String {
        let v = self
            .var("TUNNEL_METRICS_LISTEN")
            .unwrap_or_else(|| panic!("{}: no TUNNEL_METRICS_LISTEN", self.launch.from));
        let mut a: SocketAddr =
            v.parse().unwrap_or_else(|_| panic!("{}: TUNNEL_METRICS_LISTEN={v}", self.launch.from));
        if a.ip().is_unspecified() {
            a.set_ip(Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{a}{path}")
    }
}

fn own(p: &Path, uid: Option<u32>, mode: u32) {
    if uid.is_some() {
        std::os::unix::fs::chown(p, uid, uid).unwrap();
    }
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn write_secret(p: &Path, data: &[u8], uid: Option<u32>) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
    own(p, uid, 0o400);
}

/// Prepares what the platform would (dirs, secrets, credentials, sysctls) and starts the process.
fn start(
    lab: &mut Lab,
    bin: &Path,
    l: &Launch,
    ns: &str,
    token: Option<&str>,
    bundle: Option<&[u8]>,
    server: Option<&str>,
) -> Running {
    let root = lab.dir.path().join(l.name);
    std::fs::create_dir_all(&root).unwrap();
    let sub = Sub { bin, root: &root, token, server };
    let uid = l.user.uid;
    for d in &l.state_dirs {
        let p = PathBuf::from(sub.apply(d));
        std::fs::create_dir_all(&p).unwrap();
        own(&p, uid, 0o700);
    }
    let secret: Option<Vec<u8>> = match l.role() {
        Role::Agent | Role::Client => token.map(|t| format!("{t}\n").into_bytes()),
        Role::Relay => bundle.map(<[u8]>::to_vec),
        Role::Server => None,
    };
    // systemd copies each LoadCredential= source into a dir only the service reads.
    if !l.credentials.is_empty() {
        let dir = root.join("credentials");
        for (id, src) in &l.credentials {
            let data = secret
                .as_deref()
                .unwrap_or_else(|| panic!("{}: a credential {id} for a process with no secret", l.from));
            write_secret(Path::new(&sub.apply(src)), data, None);
            write_secret(&dir.join(id), data, uid);
        }
        own(&dir, uid, 0o500);
    }
    let mut env: BTreeMap<String, String> =
        l.env.values().map(|s| (s.key.clone(), sub.apply(&s.value))).collect();
    // systemd: EnvironmentFile= wins over Environment=. A fresh install has none of them.
    for (p, optional, at) in &l.env_files {
        match std::fs::read_to_string(sub.apply(p)) {
            Ok(text) => env.extend(env_file(&text, p).0.into_iter().map(|s| (s.key, sub.apply(&s.value)))),
            Err(_) if *optional => {}
            Err(e) => panic!("{at}: EnvironmentFile={p} is required, and a fresh install has none ({e})"),
        }
    }
    // Mounted secrets the settings name.
    for (k, v) in &env {
        let p = Path::new(v);
        if k.ends_with("_FILE") && p.starts_with(&root) && !p.exists() {
            if let Some(data) = &secret {
                write_secret(p, data, uid);
            }
        }
    }
    for (k, v) in &l.sysctls {
        let out = lab.exec(ns, &["sysctl", "-w", &format!("{k}={v}")]);
        assert!(out.status.success(), "{}: sysctl {k}={v}: {}", l.from, String::from_utf8_lossy(&out.stderr));
    }
    let program = sub.apply(&if l.program.starts_with('/') {
        l.program.clone()
    } else {
        format!("/usr/local/bin/{}", l.program)
    });
    assert!(
        Path::new(&program).starts_with(bin),
        "{}: runs {}, not a binary of this workspace",
        l.from,
        l.program
    );

    let mut argv: Vec<String> = vec![];
    // With systemd-resolved on this machine, `auto` DNS mode would ask it (over D-Bus, in the root
    // namespace) to configure a link of the lab: hide it, so `auto` means resolv.conf, which `ip netns
    // exec` has replaced with the namespace's own file.
    if l.role() == Role::Client && Path::new("/run/systemd/resolve/io.systemd.Resolve").exists() {
        argv.extend(
            ["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /run/systemd/resolve && exec \"$@\"", "sh"]
                .map(String::from),
        );
    }
    argv.extend(["env".into(), "-i".into(), format!("PATH={PATH}")]);
    argv.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    let u = &l.user;
    if u.uid.is_some() || u.bounding.is_some() {
        argv.push("setpriv".into());
        if let Some(b) = &u.bounding {
            argv.push(format!(
                "--bounding-set=-all{}",
                b.iter().map(|c| format!(",+{c}")).collect::<String>()
            ));
        }
        if let Some(uid) = u.uid {
            argv.extend([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()]);
        }
        if !u.ambient.is_empty() {
            let c = u.ambient.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(",");
            argv.extend([format!("--inh-caps={c}"), format!("--ambient-caps={c}")]);
        }
        argv.push("--".into());
    }
    argv.push(program);
    argv.extend(l.args.iter().map(|a| sub.apply(a)));
    let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let written: Vec<String> = l.env.values().map(|s| format!("{}={}", s.key, s.value)).collect();
    let cmd: Vec<&str> =
        std::iter::once(l.program.as_str()).chain(l.args.iter().map(String::as_str)).collect();
    eprintln!("{}: `{}` {} with {}", l.name, cmd.join(" "), privileges(l), written.join(" "));
    let idx = lab.spawn(ns, l.name, &refs, &[]);
    Running { launch: l.clone(), ns: ns.to_owned(), env, idx }
}

/// Why a process failed: the settings its output names (so, the one it rejects), all of its settings,
/// and its output.
fn rejected(lab: &Lab, r: &Running, what: &str) -> String {
    let log = lab.log(r.launch.name);
    let line = |s: &Setting| {
        let got = &r.env[&s.key];
        let shown = if s.key == "TUNNEL_TOKEN" { "<join token>" } else { got.as_str() };
        let sub = if got == &s.value { String::new() } else { format!("   (given as {shown})") };
        format!("  {}: {}={}{sub}\n", s.at, s.key, s.value)
    };
    let named: String = r
        .launch
        .env
        .values()
        .filter(|s| {
            let flag = format!("--{}", s.key.trim_start_matches("TUNNEL_").to_lowercase().replace('_', "-"));
            let got = &r.env[&s.key];
            mentions(&log, &s.key)
                || mentions(&log, &flag)
                || log.contains(&format!("'{}'", s.value))
                || (got != &s.value && log.contains(got.as_str()))
        })
        .map(line)
        .collect();
    let all: String = r.launch.env.values().map(line).collect();
    let verdict = if named.is_empty() {
        "Its output names none of its settings.".to_owned()
    } else {
        format!("It rejects a setting: its output names\n{named}")
    };
    format!(
        "{} ({}) {what}.\n{verdict}\nEverything it was given:\n{all}It ran {}.\nIts output:\n{log}",
        r.launch.name,
        r.launch.from,
        privileges(&r.launch)
    )
}

/// Whether `text` names `word` (not as part of a longer name).
fn mentions(text: &str, word: &str) -> bool {
    let name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    text.match_indices(word).any(|(i, _)| !text[i + word.len()..].starts_with(name))
}

/// Who a process runs as, with which capabilities and sysctls.
fn privileges(l: &Launch) -> String {
    let u = &l.user;
    let mut s = u.uid.map_or("as root".into(), |u| format!("as uid {u}"));
    if !u.ambient.is_empty() {
        let _ = write!(s, ", ambient capabilities {}", u.ambient.join(" "));
    }
    if let Some(b) = &u.bounding {
        let _ = write!(s, ", bounding set {{{}}}", b.join(" "));
    }
    for (k, v) in &l.sysctls {
        let _ = write!(s, ", sysctl {k}={v}");
    }
    s
}

/// Polls `cond` for a started process, failing with [`rejected`] if it exits first.
fn wait_for(
    lab: &mut Lab,
    r: &Running,
    what: &str,
    secs: u64,
    mut cond: impl FnMut(&Lab) -> Result<(), String>,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(st) = lab.try_wait(r.idx) {
            panic!("{}", rejected(lab, r, &format!("exited ({st}) before {what}")));
        }
        match cond(lab) {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => {
                panic!("{}", rejected(lab, r, &format!("{what}: not after {secs} s ({e})")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// `curl` inside a namespace: (HTTP status, body).
fn curl(lab: &Lab, ns: &str, url: &str) -> (String, String) {
    let out = lab.exec(ns, &["curl", "-s", "--noproxy", "*", "--max-time", "3", "-w", "\n%{http_code}", url]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_owned(), body.to_owned())
}

/// Serves /healthz with 200; agents and clients also report `control.state == "connected"`.
fn ready(lab: &Lab, r: &Running) -> Result<(), String> {
    let (code, body) = curl(lab, &r.ns, &r.url("/healthz"));
    if code != "200" {
        return Err(format!("GET {} answered '{code}' {body}", r.url("/healthz")));
    }
    if matches!(r.launch.role(), Role::Agent | Role::Client) {
        let (_, body) = curl(lab, &r.ns, &r.url("/status"));
        let st: Option<tunnel_core::status::NodeStatus> = serde_json::from_str(&body).ok();
        let control = st.and_then(|s| s.control);
        if control != Some(tunnel_core::status::LinkState::Connected) {
            return Err(format!("/status control is {control:?}"));
        }
    }
    Ok(())
}

/// (protocol, local address) of every listening socket in a namespace.
fn listeners(lab: &Lab, ns: &str) -> Vec<(String, String)> {
    let out = lab.exec(ns, &["ss", "-Hlntu"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 5).then(|| (w[0].to_owned(), w[4].to_owned()))
        })
        .collect()
}

/// What the files promise beyond /healthz: the health check passes, every listener they configure is
/// bound, every published port is reachable, the TLS relay runs, the client's TUN mode and DNS mode.
fn check(lab: &mut Lab, r: &Running, shim: &Path) {
    let l = &r.launch;
    if let Some((cmd, at)) = &l.healthcheck {
        let mut argv = vec!["env".to_owned(), "-i".into(), format!("PATH={}:{PATH}", shim.display())];
        argv.extend(r.env.iter().map(|(k, v)| format!("{k}={v}")));
        argv.extend(cmd.iter().cloned());
        let out = lab.exec(&r.ns, &argv.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            out.status.success(),
            "{at}: the HEALTHCHECK of {} fails in a container with its settings: {}",
            l.from,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ss = listeners(lab, &r.ns);
    let shown = || ss.iter().map(|(p, a)| format!("{p} {a}")).collect::<Vec<_>>().join(", ");
    for s in l.env.values() {
        let v = &r.env[&s.key];
        let bound = if s.key.ends_with("_LISTEN") || s.key == "TUNNEL_SOCKS5" {
            v.parse::<SocketAddr>().ok().map(|a| ss.iter().any(|(_, l)| *l == a.to_string()))
        } else if s.key.ends_with("_LISTEN_PORT") && v != "0" {
            Some(ss.iter().any(|(_, l)| l.ends_with(&format!(":{v}"))))
        } else {
            None
        };
        assert!(
            bound != Some(false),
            "{}: {}={}: {} binds nothing there; it listens on {}",
            s.at,
            s.key,
            s.value,
            l.name,
            shown()
        );
    }
    for (port, proto, at) in &l.published {
        // Docker forwards a published port to the container's own address, never its loopback.
        let wild = [format!("0.0.0.0:{port}"), format!("*:{port}"), format!("[::]:{port}")];
        assert!(
            ss.iter().any(|(p, a)| p == proto && wild.contains(a)),
            "{at}: publishes {port}/{proto}, but {} ({}) listens there on no address Docker forwards to: {}",
            l.name,
            l.from,
            shown()
        );
    }
    let log = lab.log(l.name);
    if l.role() == Role::Server {
        assert!(
            !log.contains("relay over TCP not started"),
            "{}: the relay over TLS on tcp/443 did not start as {}:\n{log}",
            l.from,
            l.user.uid.map_or("root".into(), |u| format!("uid {u}"))
        );
    }
    if l.role() == Role::Client && r.var("TUNNEL_USERSPACE") != Some("true") {
        let dev = r.var("TUNNEL_TUN_NAME").unwrap_or("tunnel0").to_owned();
        wait_for(lab, r, &format!("TUN mode: device {dev}"), 15, |lab| {
            let out = lab.exec(&r.ns, &["ip", "link", "show", "dev", &dev]);
            out.status
                .success()
                .then_some(())
                .ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
        });
        if matches!(r.var("TUNNEL_DNS_MODE").unwrap_or("auto"), "auto" | "resolv-conf") {
            let conf = Path::new("/etc/netns").join(&r.ns).join("resolv.conf");
            wait_for(lab, r, "its DNS in the namespace's resolv.conf", 15, |_| {
                let text = std::fs::read_to_string(&conf).unwrap_or_default();
                text.contains("managed by tunnelctl up").then_some(()).ok_or(text)
            });
        }
    }
}

/// The `[env: TUNNEL_*]` names in a command's `--help`.
fn help_vars(bin: &Path, program: &str, args: &[String]) -> Vec<String> {
    let base = program.rsplit('/').next().unwrap();
    let out =
        std::process::Command::new(bin.join(base)).args(args).arg("--help").env_clear().output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("env: ")
        .skip(1)
        .map(|s| {
            s.chars().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_').collect()
        })
        .collect()
}

/// Every variable a file sets is one the binary reads: clap ignores unknown variables, so a typo
/// would otherwise start fine and do nothing.
fn check_settings_are_read(bin: &Path, launches: &[Launch]) {
    let mut problems = String::new();
    for l in launches {
        let known = help_vars(bin, &l.program, &l.args);
        for s in l.env.values() {
            let foreign = l.foreign_ok.is_some_and(|f| s.at.starts_with(f));
            if !known.contains(&s.key) && !NOT_FLAGS.contains(&s.key.as_str()) && !foreign {
                let _ = writeln!(
                    problems,
                    "{}: {} is not read by `{} {}` ({})",
                    s.at,
                    s.key,
                    l.program,
                    l.args.join(" "),
                    l.from
                );
            }
        }
    }
    assert!(problems.is_empty(), "settings no binary reads (not in its --help):\n{problems}");
}

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
