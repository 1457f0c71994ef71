use super::*;

// --- running them ----------------------------------------------------------------------------------

/// What a substitution needs to know about one process.
pub(crate) struct Sub<'a> {
    pub(crate) bin: &'a Path,
    pub(crate) root: &'a Path,
    pub(crate) token: Option<&'a str>,
    pub(crate) server: Option<&'a str>,
}

impl Sub<'_> {
    pub(crate) fn apply(&self, v: &str) -> String {
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
pub(crate) struct Running {
    pub(crate) launch: Launch,
    pub(crate) ns: String,
    /// What it really got, after substitution.
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) idx: usize,
}

impl Running {
    pub(crate) fn var(&self, key: &str) -> Option<&str> {
        self.env.get(key).map(String::as_str)
    }

    pub(crate) fn url(&self, path: &str) -> String {
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

pub(crate) fn own(p: &Path, uid: Option<u32>, mode: u32) {
    if uid.is_some() {
        std::os::unix::fs::chown(p, uid, uid).unwrap();
    }
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub(crate) fn write_secret(p: &Path, data: &[u8], uid: Option<u32>) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
    own(p, uid, 0o400);
}

/// Prepares what the platform would (dirs, secrets, credentials, sysctls) and starts the process.
pub(crate) fn start(
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
pub(crate) fn rejected(lab: &Lab, r: &Running, what: &str) -> String {
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
pub(crate) fn mentions(text: &str, word: &str) -> bool {
    let name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    text.match_indices(word).any(|(i, _)| !text[i + word.len()..].starts_with(name))
}

/// Who a process runs as, with which capabilities and sysctls.
pub(crate) fn privileges(l: &Launch) -> String {
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
pub(crate) fn wait_for(
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
pub(crate) fn curl(lab: &Lab, ns: &str, url: &str) -> (String, String) {
    let out = lab.exec(ns, &["curl", "-s", "--noproxy", "*", "--max-time", "3", "-w", "\n%{http_code}", url]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_owned(), body.to_owned())
}

/// Serves /healthz with 200; agents and clients also report `control.state == "connected"`.
pub(crate) fn ready(lab: &Lab, r: &Running) -> Result<(), String> {
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
pub(crate) fn listeners(lab: &Lab, ns: &str) -> Vec<(String, String)> {
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
pub(crate) fn check(lab: &mut Lab, r: &Running, shim: &Path) {
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
pub(crate) fn help_vars(bin: &Path, program: &str, args: &[String]) -> Vec<String> {
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
pub(crate) fn check_settings_are_read(bin: &Path, launches: &[Launch]) {
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
