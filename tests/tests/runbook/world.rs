use super::*;

// ---- units -------------------------------------------------------------------------------------

/// A unit as `deploy/systemd/NAME.service` says, and how its runs went.
#[derive(Debug)]
pub(crate) struct Unit {
    pub(crate) host: String,
    pub(crate) spec: ServiceUnit,
    pub(crate) proc: Option<usize>,
    /// Stopped by `systemctl stop` (else an exit is a failure).
    pub(crate) stopped: bool,
    /// Runs so far (each logs to `NAME-RUN`), and the first one this host's journal shows.
    pub(crate) runs: usize,
    pub(crate) journal_from: usize,
}

pub(crate) fn unit_host(name: &str) -> &'static str {
    match name {
        "tunnel-server" => "server",
        "tunnel-relay" => "relay",
        "tunnel-agent" => "site",
        "tunnel-client" => "client",
        _ => panic!("no unit {name}"),
    }
}

/// Reads `deploy/systemd/NAME.service`.
pub(crate) fn unit(name: &str) -> Unit {
    let path = Path::new(UNITS_DIR).join(format!("{name}.service"));
    let spec = service_unit(&std::fs::read_to_string(&path).unwrap(), &path.to_string_lossy());
    Unit { host: unit_host(name).into(), spec, proc: None, stopped: true, runs: 0, journal_from: 1 }
}

// ---- the world ---------------------------------------------------------------------------------

#[derive(Debug)]
pub(crate) struct Host {
    pub(crate) ns: String,
    pub(crate) root: PathBuf,
    pub(crate) env: Vec<(String, String)>,
}

/// The output of a block (or a command) with the host roots taken out again.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    pub(crate) code: i32,
    pub(crate) out: String,
}

impl Run {
    pub(crate) fn ok(&self) -> bool {
        self.code == 0
    }
}

#[derive(Debug)]
pub(crate) struct World {
    pub(crate) net: Internet,
    pub(crate) bin: PathBuf,
    pub(crate) clock: Clock,
    pub(crate) blocks: BTreeMap<String, Block>,
    pub(crate) hosts: BTreeMap<String, Host>,
    pub(crate) units: BTreeMap<String, Unit>,
    pub(crate) ran: BTreeSet<String>,
    pub(crate) blob: Vec<u8>,
    pub(crate) fetches: usize,
    pub(crate) print: bool,
}

pub(crate) fn sock(ip: std::net::Ipv4Addr, port: u16) -> String {
    format!("{ip}:{port}")
}

pub(crate) const HOSTS_FILE: &str = "127.0.0.1 localhost\n203.0.113.10 vps.example.com\n\
                          203.0.113.20 relay1.example.com stun.example.net\n";

impl World {
    /// The network, the server and its relay, site `home` with resource `web` and client `laptop`
    /// granted it, all as the runbook's deployment has them and up. `None` when not root.
    pub(crate) fn up(name: &str) -> Option<World> {
        let clock = Clock::start();
        let mut opts = Options::new(Nat::Cone, Nat::Cone);
        opts.relay_host = true;
        let net = Internet::build(&opts)?;
        let bin = binaries();
        let blob = tunnel_tests::blob(BLOB_LEN);
        let mut w = World {
            net,
            bin,
            clock,
            blocks: blocks(),
            hosts: BTreeMap::new(),
            units: BTreeMap::new(),
            ran: BTreeSet::new(),
            blob,
            fetches: 0,
            print: std::env::var("RUNBOOK_PRINT").is_ok_and(|v| v == "1"),
        };
        w.step(&format!("{name}: topology built, binaries ready"));
        for (host, ns) in [
            ("server", w.net.srv.clone()),
            ("relay", w.net.rly.clone().unwrap()),
            ("site", w.net.agent.clone()),
            ("client", w.net.cli.clone()),
        ] {
            w.add_host(host, &ns, host);
        }
        let svc_etc = Path::new("/etc/netns").join(&w.net.svc);
        std::fs::create_dir_all(&svc_etc).unwrap();
        std::fs::write(svc_etc.join("hosts"), HOSTS_FILE).unwrap();
        // The client machine's resolver: an upstream nobody answers at.
        let etc = Path::new("/etc/netns").join(&w.net.cli);
        std::fs::write(etc.join("resolv.conf"), "nameserver 192.0.2.53\n").unwrap();
        for name in ["tunnel-server", "tunnel-relay", "tunnel-agent", "tunnel-client"] {
            w.units.insert(name.into(), unit(name));
        }

        // The service on the site's LAN.
        let www = w.net.lab.dir.path().join("www");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("big.bin"), &w.blob).unwrap();
        std::fs::write(www.join("index.html"), INDEX).unwrap();
        let (svc, www_s, ip) =
            (w.net.svc.clone(), www.to_string_lossy().into_owned(), nat::SVC_IP.to_string());
        w.net.lab.spawn(&svc, "http", &["python3", "-c", SERVICE, &ip, "8080", &www_s], &[]);

        // The server, as the runbook's deployment runs it.
        w.write(
            "server",
            "/etc/tunnel/server.env",
            "TUNNEL_PUBLIC_ADDR=vps.example.com\nTUNNEL_RELAY_LISTEN=off\nTUNNEL_RELAY_TCP_LISTEN=off\n\
             TUNNEL_EXTERNAL_RELAYS=relay1.example.com:21820,relay1.example.com:443\n",
        );
        w.systemctl("start", "tunnel-server");
        w.wait_server();
        // The relay, with the server's bundle.
        let bundle = std::fs::read(w.path("server", "/var/lib/tunnel-server/relay.bundle")).unwrap();
        w.write_bytes("relay", "/etc/tunnel/relay.bundle", &bundle);
        w.systemctl("start", "tunnel-relay");
        w.wait("the relay's /healthz", 30, |w| w.sh("relay", "curl -fsS http://127.0.0.1:9183/healthz").ok());
        w.step("server and relay up");

        w.take_env_block();
        let site = w.admin(&["site", "add", "home"]);
        w.write("site", "/etc/tunnel/site.token", &site);
        let client = w.admin(&["client", "add", "laptop"]);
        w.write("client", "/etc/tunnel/client.token", &client);
        w.admin(&["add-resource", "--site", "home", "--name", "web", "--target", &sock(nat::SVC_IP, 8080)]);
        w.admin(&["grant", "--client", "laptop", "--resource", "web"]);
        w.write("client", "/etc/tunnel/client.env", "TUNNEL_DNS_MODE=resolv-conf\n");
        w.systemctl("start", "tunnel-agent");
        w.systemctl("start", "tunnel-client");
        let resolv = etc.join("resolv.conf");
        w.wait("the client to point resolv.conf at itself", 30, |_| {
            std::fs::read_to_string(&resolv).unwrap_or_default().contains("managed by tunnelctl up")
        });
        w.wait("the client's control link", 30, |w| w.control("client") == "connected");
        w.wait("the site's control link", 30, |w| w.control("site") == "connected");
        w.step("site and client up");
        Some(w)
    }

    pub(crate) fn add_host(&mut self, host: &str, ns: &str, root_name: &str) {
        let root = self.net.lab.dir.path().join(format!("h-{root_name}"));
        for d in ["etc/tunnel", "var/lib", "var/backups", "root", "usr/local/bin", "run/credentials"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for b in ["tunnel-server", "tunnel-agent", "tunnelctl"] {
            std::os::unix::fs::symlink(self.bin.join(b), root.join("usr/local/bin").join(b)).unwrap();
        }
        let etc = Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("hosts"), HOSTS_FILE).unwrap();
        let r = root.to_string_lossy().into_owned();
        let path = format!("{r}/usr/local/bin:{}", std::env::var("PATH").unwrap_or_default());
        let env = vec![
            ("PATH".into(), path),
            (
                "TUNNEL_STATE_DIR".into(),
                format!("{r}/var/lib/tunnel-{}", if host == "site" { "agent" } else { "client" }),
            ),
            ("TUNNEL_DATA_DIR".into(), format!("{r}/var/lib/tunnel-server")),
        ];
        self.hosts.insert(host.into(), Host { ns: ns.into(), root, env });
    }

    pub(crate) fn step(&self, what: &str) {
        self.clock.step(what);
    }

    pub(crate) fn host(&self, host: &str) -> &Host {
        self.hosts.get(host).unwrap_or_else(|| panic!("no host {host}"))
    }

    /// A runbook path on a host, rooted in its scratch dir.
    pub(crate) fn path(&self, host: &str, p: &str) -> PathBuf {
        PathBuf::from(self.rooted(host, p))
    }

    /// The runbook's paths in `text`, rooted in the host's scratch dir.
    pub(crate) fn rooted(&self, host: &str, text: &str) -> String {
        let r = self.host(host).root.to_string_lossy().into_owned();
        let mut s = text.to_owned();
        for p in ["/etc/tunnel", "/var/lib/tunnel-", "/var/backups", "/root/", "/usr/local/bin"] {
            s = s.replace(p, &format!("{r}{p}"));
        }
        s
    }

    /// The host roots taken out of `text` again.
    pub(crate) fn unrooted(&self, text: &str) -> String {
        let mut s = text.to_owned();
        for h in self.hosts.values() {
            s = s.replace(&*h.root.to_string_lossy(), "");
        }
        s
    }

    pub(crate) fn write(&self, host: &str, p: &str, text: &str) {
        self.write_bytes(host, p, text.as_bytes());
    }

    pub(crate) fn write_bytes(&self, host: &str, p: &str, data: &[u8]) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.path(host, p);
        std::fs::write(&path, data).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// `sh -c TEXT` on a host (paths rooted), stderr merged into stdout.
    pub(crate) fn sh(&self, host: &str, text: &str) -> Run {
        let h = self.host(host);
        let script = format!("exec 2>&1\n{}", self.rooted(host, text));
        let out = Command::new("ip")
            .args(["netns", "exec", &h.ns, "sh", "-c", &script])
            .envs(h.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("ip netns exec");
        Run {
            code: out.status.code().unwrap_or(-1),
            out: self.unrooted(&String::from_utf8_lossy(&out.stdout)),
        }
    }

    /// An admin command on the server, which must succeed; its output.
    pub(crate) fn admin(&self, args: &[&str]) -> String {
        let r = self.sh("server", &format!("tunnelctl {}", args.join(" ")));
        if !r.ok() {
            self.fail(&format!("tunnelctl {args:?}: {}", r.out));
        }
        r.out
    }

    /// The `export`s of the runbook's `rb:setup.admin` block, for every later command on the server.
    pub(crate) fn take_env_block(&mut self) {
        let b = self.blocks["setup.admin"].clone();
        for l in b.commands.lines() {
            if let Some((k, v)) = l.trim().strip_prefix("export ").and_then(|kv| kv.split_once('=')) {
                let v = self.rooted(&b.host, v);
                self.hosts.get_mut(&b.host).unwrap().env.push((k.into(), v));
            }
        }
        self.ran.insert("setup.admin".into());
    }

    pub(crate) fn wait_server(&self) {
        let admin = self.path("server", "/var/lib/tunnel-server/admin.token");
        self.wait("the server's admin token", 30, |_| admin.exists());
        self.wait("the server to answer", 30, |w| {
            w.sh("server", "tunnelctl --admin-token-file /var/lib/tunnel-server/admin.token info").ok()
        });
    }

    // ---- systemd, played ----

    pub(crate) fn unit_running(&mut self, name: &str) -> bool {
        let u = &self.units[name];
        match u.proc {
            Some(idx) => self.net.lab.try_wait(idx).is_none(),
            None => false,
        }
    }

    /// Runs `systemctl VERB UNIT`; what it prints.
    pub(crate) fn systemctl(&mut self, verb: &str, name: &str) -> Run {
        let running = self.unit_running(name);
        match verb {
            "start" => {
                if !running {
                    self.start_unit(name);
                }
            }
            "stop" => {
                if let Some(idx) = self.units[name].proc.filter(|_| running) {
                    self.net.lab.stop(idx);
                }
                self.units.get_mut(name).unwrap().stopped = true;
            }
            "restart" => {
                if let Some(idx) = self.units[name].proc.filter(|_| running) {
                    self.net.lab.stop(idx);
                }
                self.start_unit(name);
            }
            "is-active" => {
                let state = if running {
                    "active"
                } else if self.units[name].stopped {
                    "inactive"
                } else {
                    "failed"
                };
                return Run { code: if running { 0 } else { 3 }, out: format!("{state}\n") };
            }
            v => panic!("systemctl {v}: not played by this test"),
        }
        Run { code: 0, out: String::new() }
    }

    pub(crate) fn start_unit(&mut self, name: &str) {
        let u = &self.units[name];
        let host = u.host.clone();
        let creds = self.host(&host).root.join(format!("run/credentials/{name}"));
        let _ = std::fs::create_dir_all(&creds);
        for (id, src) in &u.spec.credentials {
            std::fs::copy(self.path(&host, src), creds.join(id))
                .unwrap_or_else(|e| panic!("{name}: LoadCredential={id}:{src}: {e}"));
        }
        for d in &u.spec.state_directories {
            let _ = std::fs::create_dir_all(self.path(&host, &format!("/var/lib/{d}")));
        }
        let cred_s = creds.to_string_lossy().into_owned();
        let mut env: Vec<(String, String)> = u
            .spec
            .environment
            .iter()
            .map(|s| (s.key.clone(), self.rooted(&host, &s.value.replace("%d", &cred_s))))
            .collect();
        for f in &u.spec.environment_files {
            let path = self.path(&host, &f.path);
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let (settings, _) = env_file(&text, &path.to_string_lossy());
            env.extend(settings.into_iter().map(|s| (s.key, self.rooted(&host, &s.value))));
        }
        let args: Vec<String> = u.spec.exec_start.iter().map(|a| self.rooted(&host, a)).collect();
        let runs = u.runs + 1;
        let log = format!("{name}-{runs}");
        let ns = self.host(&host).ns.clone();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let idx = self.net.lab.spawn(&ns, &log, &refs, &env_refs);
        let u = self.units.get_mut(name).unwrap();
        u.proc = Some(idx);
        u.stopped = false;
        u.runs = runs;
    }

    /// The unit's journal: the output of all its runs, colour codes taken out.
    pub(crate) fn journal(&self, name: &str) -> String {
        let mut s = String::new();
        let u = &self.units[name];
        for n in u.journal_from..=u.runs {
            s.push_str(&self.net.lab.log(&format!("{name}-{n}")));
        }
        let mut out = String::with_capacity(s.len());
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
                continue;
            }
            out.push(c);
        }
        self.unrooted(&out)
    }

    /// Kills a unit's process (SIGKILL): a crash, or the machine going away.
    pub(crate) fn crash(&mut self, name: &str) {
        if let Some(idx) = self.units[name].proc {
            self.net.lab.kill(idx);
        }
        self.units.get_mut(name).unwrap().stopped = false;
    }

    // ---- running the runbook ----

    /// Runs block `id` as the runbook says; its output, not checked.
    pub(crate) fn run_unchecked(&mut self, id: &str) -> Run {
        let b = self.blocks.get(id).unwrap_or_else(|| panic!("the runbook has no block rb:{id}")).clone();
        self.ran.insert(id.into());
        let mut out = String::new();
        let mut code = 0;
        let mut shell = String::new();
        let flush = |w: &World, shell: &mut String, out: &mut String, code: &mut i32| {
            if !shell.trim().is_empty() {
                let r = w.sh(&b.host, shell);
                out.push_str(&r.out);
                *code = r.code;
            }
            shell.clear();
        };
        for line in b.commands.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first().copied() {
                Some("systemctl") => {
                    flush(self, &mut shell, &mut out, &mut code);
                    let (verb, unit) = (words[1], words[2]);
                    assert_eq!(unit_host(unit), b.host, "rb:{id}: {unit} does not run on {}", b.host);
                    let r = self.systemctl(verb, unit);
                    out.push_str(&r.out);
                    code = r.code;
                }
                Some("journalctl") => {
                    flush(self, &mut shell, &mut out, &mut code);
                    let unit = words.iter().position(|w| *w == "-u").map(|i| words[i + 1]).unwrap();
                    let n = words
                        .iter()
                        .position(|w| *w == "-n")
                        .map_or(usize::MAX, |i| words[i + 1].parse().unwrap());
                    let j = self.journal(unit);
                    let lines: Vec<&str> = j.lines().collect();
                    for l in &lines[lines.len().saturating_sub(n)..] {
                        out.push_str(l);
                        out.push('\n');
                    }
                    code = 0;
                }
                _ => {
                    shell.push_str(line);
                    shell.push('\n');
                }
            }
        }
        flush(self, &mut shell, &mut out, &mut code);
        if self.print {
            eprintln!("----- rb:{id}@{} (exit {code})\n{out}-----", b.host);
        }
        Run { code, out }
    }

    /// Runs block `id` and checks its output against the runbook's.
    pub(crate) fn run(&mut self, id: &str) -> Run {
        let r = self.run_unchecked(id);
        if let Some(exp) = self.blocks[id].expected.clone() {
            if let Err(e) = check_output(&exp, &r.out) {
                self.fail(&format!(
                    "rb:{id}: the output differs from the runbook's: {e}\n--- output (exit {}):\n{}",
                    r.code, r.out
                ));
            }
        }
        r
    }

    /// Runs block `id` until its output is the runbook's and it exits 0 (a state that takes a moment).
    pub(crate) fn run_until(&mut self, id: &str, secs: u64) -> Run {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let start = Instant::now();
        loop {
            let r = self.run_unchecked(id);
            let checked = match &self.blocks[id].expected {
                Some(exp) => check_output(exp, &r.out),
                None => Ok(()),
            };
            match checked {
                Ok(()) if r.ok() => {
                    self.step(&format!(
                        "rb:{id} as the runbook says after {:.1}s",
                        start.elapsed().as_secs_f64()
                    ));
                    return r;
                }
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(500)),
                Err(e) => self
                    .fail(&format!("rb:{id} after {secs}s: {e}\n--- output (exit {}):\n{}", r.code, r.out)),
                Ok(()) => self.fail(&format!("rb:{id} after {secs}s: exit {}\n{}", r.code, r.out)),
            }
        }
    }

    /// Checks this test ran exactly `ids`.
    pub(crate) fn ran_exactly(&self, ids: &[&str]) {
        let want: BTreeSet<String> = ids.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(self.ran, want, "the runbook blocks this test ran");
    }

    // ---- observing ----

    /// A node's `/status` (`tunnelctl status --json` on its host).
    pub(crate) fn status(&self, host: &str) -> Option<NodeStatus> {
        let r = self.sh(host, "tunnelctl status --json");
        serde_json::from_str(&r.out).ok()
    }

    /// The state of the host's control link (`connected`, ...), or `(no answer)`.
    pub(crate) fn control(&self, host: &str) -> String {
        let st = self.status(host).and_then(|s| s.control);
        st.map_or_else(|| "(no answer)".into(), |c| c.state().to_owned())
    }

    pub(crate) fn relay_up(&self, host: &str) -> Option<bool> {
        self.status(host).map(|s| s.relay.up)
    }

    pub(crate) fn path_of(&self, host: &str) -> String {
        let peer = self.status(host).and_then(|s| s.peers.into_iter().next());
        peer.map_or_else(|| "(no peer)".into(), |p| p.path.as_str().to_owned())
    }

    /// Polls `cond` every 200 ms; fails with the context after `secs`.
    pub(crate) fn wait(&self, what: &str, secs: u64, mut cond: impl FnMut(&World) -> bool) -> Duration {
        poll(secs, Duration::from_millis(200), || cond(self))
            .unwrap_or_else(|| self.fail(&format!("timed out after {secs} s waiting for {what}")))
    }

    /// A GET through the tunnel by name from the client host (the TUN client): whether it worked.
    pub(crate) fn get(&self, max_time: u32) -> bool {
        let r =
            self.sh("client", &format!("curl -fsS --max-time {max_time} http://web.tunnel.internal:8080/"));
        r.ok() && r.out == INDEX
    }

    /// Waits for the client's path to the site to be `want`, sending a request now and then (paths
    /// are made on demand).
    pub(crate) fn wait_path(&self, host: &str, want: &str, secs: u64) {
        let took = self.wait(&format!("the {host}'s path to be {want}"), secs, |w| {
            if w.path_of(host) == want {
                return true;
            }
            let _ = w.get(2);
            w.path_of(host) == want
        });
        self.step(&format!("{host} path {want} after {:.1}s", took.as_secs_f64()));
    }

    /// Starts fetching the file (sent slowly) in the background, from the client host; `via` adds
    /// curl arguments (a SOCKS5 proxy).
    pub(crate) fn fetch_bg(&mut self, file: &str, via: &[&str]) -> Fetch {
        self.fetches += 1;
        let url = format!("http://web.tunnel.internal:8080/{file}");
        let cli = self.host("client").ns.clone();
        Fetch::start(&mut self.net.lab, &cli, self.fetches, &url, via)
    }

    /// Waits for a background transfer to end and checks it byte for byte.
    pub(crate) fn finish(&mut self, f: &Fetch, secs: u64, what: &str) {
        if let Err(e) = f.finish(&mut self.net.lab, secs, &self.blob) {
            self.fail(&format!("{what}: {e}"));
        }
        self.step(&format!("{what}: complete and byte-exact"));
    }

    /// Fails with `msg`, the nodes' status and every log.
    pub(crate) fn fail(&self, msg: &str) -> ! {
        let mut s = String::new();
        for host in ["client", "site"] {
            s.push_str(&format!("--- {host} status: {}\n", self.sh(host, "tunnelctl status --json").out));
        }
        for n in 1..=self.fetches {
            s.push_str(&format!("--- fetch{n}: {}\n", self.net.lab.log(&format!("fetch{n}"))));
        }
        for name in self.units.keys() {
            s.push_str(&format!("--- journal of {name} (tail):\n{}\n", tail(&self.journal(name), 60)));
        }
        panic!("{msg}\n{s}");
    }

    // ---- things that happen to the deployment ----

    /// The client's router becomes a symmetric NAT (a new random public port per destination) and
    /// forgets its mappings: the client moved to a network where punching cannot work.
    pub(crate) fn client_nat(&self, nat: Nat) {
        let ns = &self.net.router(Side::Client).ns;
        let random = if nat == Nat::Symmetric { " fully-random" } else { "" };
        let script =
            format!("flush chain ip nat post\nadd rule ip nat post oifname \"wan0\" masquerade{random}\n");
        let path = self.net.lab.dir.path().join("client-nat.nft");
        std::fs::write(&path, script).unwrap();
        for args in [vec!["nft", "-f", &*path.to_string_lossy()], vec!["conntrack", "-F"]] {
            let out = self.net.exec(ns, &args);
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// `UDP reflexive addr: IP:PORT` lines of `turnutils_natdiscovery` output.
pub(crate) fn reflexive_ports(out: &str) -> Vec<u16> {
    let mut ports: Vec<u16> = out
        .lines()
        .filter_map(|l| l.split("UDP reflexive addr:").nth(1))
        .filter_map(|a| a.trim().rsplit(':').next()?.parse().ok())
        .collect();
    ports.dedup();
    ports
}

/// Whether a program is installed; outside CI a missing one skips what needs it.
pub(crate) fn have(cmd: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("CI").as_deref() == Ok("true") {
        panic!("{cmd} is not installed (CI installs it: see .ci/run)");
    }
    ok
}
