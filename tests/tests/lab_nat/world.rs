//! The lab world of every scenario: the topology, the real binaries on it, and what the tests read
//! back from them (`/status`, transfers, relay counters).

use super::*;

/// Which node's `/status` to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Who {
    Client,
    Agent,
}

impl Who {
    pub(crate) fn metrics_port(self) -> u16 {
        match self {
            Who::Client => 9182,
            Who::Agent => 9181,
        }
    }

    /// The name of the one peer each end has.
    pub(crate) fn peer_name(self) -> &'static str {
        match self {
            Who::Client => SITE_NAME,
            Who::Agent => CLIENT_NAME,
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Who::Client => "client",
            Who::Agent => "agent",
        }
    }
}

/// Where the relay runs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Relay {
    /// Embedded in the control server (UDP 21820, TCP 4443 on 203.0.113.10).
    Embedded,
    /// A standalone `tunnel-server relay` on 203.0.113.20; the server runs with its own relay off.
    Standalone { capability_ttl: &'static str },
}

/// One scenario's world: the topology, the processes, the file to move.
#[derive(Debug)]
pub(crate) struct World {
    pub(crate) net: Internet,
    pub(crate) bin: PathBuf,
    pub(crate) clock: Clock,
    pub(crate) blob: Vec<u8>,
    pub(crate) data: PathBuf,
    pub(crate) server: Option<usize>,
    pub(crate) fetches: usize,
}

pub(crate) fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

impl World {
    /// Builds the topology and brings everything up: the service, the server (and the standalone
    /// relay), the site and client records, the agent (with `agent_args`) and the TUN client, whose
    /// resolver is pointed at itself. `None` when not root.
    pub(crate) fn up(opts: &Options, relay: Relay, agent_args: &[&str]) -> Option<World> {
        let clock = Clock::start();
        let net = Internet::build(opts)?;
        let bin = binaries();
        let data = net.lab.dir.path().join("server");
        let blob = tunnel_tests::blob(BLOB_LEN);
        let mut w = World { net, bin, clock, blob, data, server: None, fetches: 0 };
        w.step("topology built, binaries ready");

        // The service on site A's LAN.
        let www = w.net.lab.dir.path().join("www");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("big.bin"), &w.blob).unwrap();
        let (svc, www_s) = (w.net.svc.clone(), www.to_string_lossy().into_owned());
        let svc_ip = nat::SVC_IP.to_string();
        let port = HTTP_PORT.to_string();
        w.net.lab.spawn(
            &svc,
            "http",
            &["python3", "-m", "http.server", &port, "--bind", &svc_ip, "--directory", &www_s],
            &[],
        );

        w.start_server(relay);
        if let Relay::Standalone { .. } = relay {
            w.start_relay();
        }
        let (site_tok, client_tok) = w.configure();
        w.step("server configured");
        w.start_agent(&site_tok, agent_args);
        w.start_client(&client_tok);
        w.step("client up, resolv.conf pointed at it");
        Some(w)
    }

    pub(crate) fn step(&self, what: &str) {
        self.clock.step(what);
    }

    pub(crate) fn b(&self, name: &str) -> String {
        self.bin.join(name).to_string_lossy().into_owned()
    }

    pub(crate) fn start_server(&mut self, relay: Relay) {
        let data_s = self.data.to_string_lossy().into_owned();
        let srv = self.net.srv.clone();
        let at = |port: u16| sock(nat::SERVER_IP, port).to_string();
        let mut args: Vec<String> = vec![
            self.b("tunnel-server"),
            "--data-dir".into(),
            data_s,
            "--listen".into(),
            at(GRPC_PORT),
            "--public-addr".into(),
            nat::SERVER_IP.to_string(),
            "--stun-listen".into(),
            at(STUN_PORT),
            "--metrics-listen".into(),
            "127.0.0.1:9180".into(),
        ];
        match relay {
            Relay::Embedded => args.extend([
                "--relay-listen".into(),
                at(RELAY_UDP_PORT),
                "--relay-tcp-listen".into(),
                at(RELAY_TCP_PORT),
            ]),
            Relay::Standalone { capability_ttl } => args.extend([
                "--relay-listen".into(),
                "off".into(),
                "--relay-tcp-listen".into(),
                "off".into(),
                "--external-relay".into(),
                format!("{},{}", sock(nat::RELAY_IP, RELAY_UDP_PORT), sock(nat::RELAY_IP, RELAY_TCP_PORT)),
                "--capability-ttl".into(),
                capability_ttl.into(),
            ]),
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.server = Some(self.net.lab.spawn(&srv, "server", &refs, &[]));
        let admin = self.data.join("admin.token");
        self.wait("the server's admin token", 30, |_| admin.exists());
        self.wait("the server to answer", 30, |w| w.ctl_try(&["info"]).is_some());
        self.step("server up");
    }

    pub(crate) fn start_relay(&mut self) {
        let bundle = self.data.join("relay.bundle");
        self.wait("the server's relay bundle", 30, |_| bundle.exists());
        let rly = self.net.rly.clone().expect("the topology has a relay host");
        let args = [
            self.b("tunnel-server"),
            "relay".into(),
            "--bundle-file".into(),
            bundle.to_string_lossy().into_owned(),
            "--relay-listen".into(),
            sock(nat::RELAY_IP, RELAY_UDP_PORT).to_string(),
            "--relay-tcp-listen".into(),
            sock(nat::RELAY_IP, RELAY_TCP_PORT).to_string(),
            "--metrics-listen".into(),
            "127.0.0.1:9190".into(),
        ];
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.net.lab.spawn(&rly, "relay", &refs, &[]);
        self.wait("the standalone relay's metrics listener", 30, |w| {
            w.net
                .exec(&rly, &["curl", "-sf", "--max-time", "2", "http://127.0.0.1:9190/metrics"])
                .status
                .success()
        });
        self.step("standalone relay up");
    }

    /// `tunnelctl --admin-token-file .. ARGS` in the server's namespace; `None` when it fails.
    pub(crate) fn ctl_try(&self, args: &[&str]) -> Option<String> {
        let admin = self.data.join("admin.token").to_string_lossy().into_owned();
        let ctl = self.b("tunnelctl");
        let mut full = vec![ctl.as_str(), "--admin-token-file", admin.as_str()];
        full.extend_from_slice(args);
        let out = self.net.exec(&self.net.srv, &full);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub(crate) fn ctl(&self, args: &[&str]) -> String {
        self.ctl_try(args).unwrap_or_else(|| self.fail(&format!("tunnelctl {args:?} failed")))
    }

    /// The site, the client, the resource, the grant; returns the two join-token files.
    pub(crate) fn configure(&self) -> (PathBuf, PathBuf) {
        let site = self.ctl(&["site", "add", SITE_NAME]);
        let client = self.ctl(&["client", "add", CLIENT_NAME]);
        let target = sock(nat::SVC_IP, HTTP_PORT).to_string();
        self.ctl(&["add-resource", "--site", SITE_NAME, "--name", "web", "--target", &target]);
        self.ctl(&["grant", "--client", CLIENT_NAME, "--resource", "web"]);
        let dir = self.net.lab.dir.path();
        let (site_file, client_file) = (dir.join("site.token"), dir.join("client.token"));
        std::fs::write(&site_file, site.trim()).unwrap();
        std::fs::write(&client_file, client.trim()).unwrap();
        (site_file, client_file)
    }

    pub(crate) fn start_agent(&mut self, token: &Path, extra: &[&str]) {
        let state = self.net.lab.dir.path().join("agent").to_string_lossy().into_owned();
        let mut args = vec![
            self.b("tunnel-agent"),
            "--token-file".into(),
            token.to_string_lossy().into_owned(),
            "--state-dir".into(),
            state,
            "--metrics-listen".into(),
            format!("127.0.0.1:{}", Who::Agent.metrics_port()),
        ];
        args.extend(extra.iter().map(|s| (*s).to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = self.net.agent.clone();
        self.net.lab.spawn(&agent, "agent", &refs, &[]);
        self.wait("the agent's /status", 30, |w| w.status(Who::Agent).is_some());
        self.step("agent up");
    }

    /// The TUN client, pointing the namespace's resolv.conf at itself.
    pub(crate) fn start_client(&mut self, token: &Path) {
        let etc = Path::new("/etc/netns").join(&self.net.cli);
        std::fs::create_dir_all(&etc).unwrap();
        // An upstream nobody answers at: only private names are looked up here.
        std::fs::write(etc.join("resolv.conf"), "nameserver 192.0.2.53\n").unwrap();
        let state = self.net.lab.dir.path().join("client").to_string_lossy().into_owned();
        let args = [
            self.b("tunnelctl"),
            "up".into(),
            "--token-file".into(),
            token.to_string_lossy().into_owned(),
            "--state-dir".into(),
            state,
            "--metrics-listen".into(),
            format!("127.0.0.1:{}", Who::Client.metrics_port()),
            "--dns-mode".into(),
            "resolv-conf".into(),
        ];
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let cli = self.net.cli.clone();
        self.net.lab.spawn(&cli, "client", &refs, &[]);
        let resolv = etc.join("resolv.conf");
        self.wait("the client to point resolv.conf at itself", 30, |_| {
            std::fs::read_to_string(&resolv).unwrap_or_default().contains("managed by tunnelctl up")
        });
    }

    // ---- observing ----

    /// A node's `/status` document.
    pub(crate) fn status(&self, who: Who) -> Option<NodeStatus> {
        let ns = match who {
            Who::Client => &self.net.cli,
            Who::Agent => &self.net.agent,
        };
        let url = format!("http://127.0.0.1:{}/status", who.metrics_port());
        let out = self.net.exec(ns, &["curl", "-sf", "--max-time", "2", &url]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The node's one peer (the site for the client, the client for the agent).
    pub(crate) fn peer(&self, who: Who) -> Option<PeerStatus> {
        let mut peers = self.status(who)?.peers;
        match peers.iter().position(|p| p.name == who.peer_name()) {
            Some(i) => Some(peers.swap_remove(i)),
            None if peers.len() == 1 => peers.pop(),
            None => None,
        }
    }

    pub(crate) fn path(&self, who: Who) -> String {
        self.peer(who).map_or_else(|| "(no peer)".into(), |p| p.path.as_str().to_owned())
    }

    /// The peer's endpoint as an address, if it reports one.
    pub(crate) fn endpoint(&self, who: Who) -> Option<SocketAddrV4> {
        self.peer(who)?.endpoint?.parse().ok()
    }

    /// Waits until the node reports one of `want` as its peer's path; returns the peer.
    pub(crate) fn wait_path(&self, who: Who, want: &[&str], secs: u64) -> Option<PeerStatus> {
        let took = self.wait(&format!("the {}'s path to be one of {want:?}", who.label()), secs, |w| {
            want.contains(&w.path(who).as_str())
        });
        let peer = self.peer(who);
        self.step(&format!(
            "{} path {} after {:.1}s: {peer:?}",
            who.label(),
            self.path(who),
            took.as_secs_f64()
        ));
        peer
    }

    /// Checks both ends report `want` now.
    pub(crate) fn assert_path(&self, want: &str, when: &str) {
        for who in [Who::Client, Who::Agent] {
            let got = self.path(who);
            if got != want {
                self.fail(&format!("{when}: the {} reports path {got:?}, expected {want:?}", who.label()));
            }
        }
    }

    /// Polls `cond` every 100 ms until it holds; fails with the whole context after `secs`. Returns
    /// how long it took.
    pub(crate) fn wait(&self, what: &str, secs: u64, mut cond: impl FnMut(&World) -> bool) -> Duration {
        poll(secs, Duration::from_millis(100), || cond(self))
            .unwrap_or_else(|| self.fail(&format!("timed out after {secs} s waiting for {what}")))
    }

    /// Fails the test with `msg`, both nodes' status, the routers' rules and tables and the logs.
    pub(crate) fn fail(&self, msg: &str) -> ! {
        let mut s = String::new();
        for who in [Who::Client, Who::Agent] {
            let st = self
                .status(who)
                .and_then(|v| serde_json::to_string(&v).ok())
                .unwrap_or_else(|| "(no answer)".into());
            s.push_str(&format!("--- {} /status: {st}\n", who.label()));
        }
        s.push_str(&self.net.diagnostics());
        for log in ["server", "relay", "agent", "client"] {
            let text = self.net.lab.log(log);
            if !text.is_empty() {
                s.push_str(&format!("--- {log} log (tail):\n{}\n", tail(&text, 150)));
            }
        }
        panic!("{msg}\n{s}");
    }

    // ---- traffic ----

    /// Fetches the file by name in the foreground and checks it byte for byte.
    pub(crate) fn fetch(&mut self) -> Duration {
        self.fetches += 1;
        let out = self.net.lab.dir.path().join(format!("fetch{}.bin", self.fetches));
        let out_s = out.to_string_lossy().into_owned();
        let url = format!("http://{RESOURCE}:{HTTP_PORT}/big.bin");
        let start = Instant::now();
        let r = self.net.exec(&self.net.cli, &["curl", "-sS", "--max-time", "120", "-o", &out_s, &url]);
        let took = start.elapsed();
        if !r.status.success() {
            self.fail(&format!("curl {url}: {}", String::from_utf8_lossy(&r.stderr)));
        }
        self.check_file(&out, "the foreground transfer");
        self.step(&format!(
            "{} MB fetched byte-exact in {:.1}s ({:.0} Mbit/s)",
            BLOB_LEN / 1_000_000,
            took.as_secs_f64(),
            BLOB_LEN as f64 * 8.0 / 1e6 / took.as_secs_f64()
        ));
        took
    }

    pub(crate) fn check_file(&self, out: &Path, what: &str) {
        if let Err(e) = check_file(out, &self.blob) {
            self.fail(&format!("{what}: {e}"));
        }
    }

    /// Starts fetching the file in the background at `rate` (curl's `--limit-rate`).
    pub(crate) fn fetch_bg(&mut self, rate: &str) -> Fetch {
        self.fetches += 1;
        let url = format!("http://{RESOURCE}:{HTTP_PORT}/big.bin");
        let cli = self.net.cli.clone();
        Fetch::start(&mut self.net.lab, &cli, self.fetches, &url, &["--limit-rate", rate])
    }

    /// Waits for a background transfer to end and checks it byte for byte.
    pub(crate) fn finish(&mut self, f: &Fetch, secs: u64, what: &str) {
        if let Err(e) = f.finish(&mut self.net.lab, secs, &self.blob) {
            self.fail(&format!("{what}: {e}"));
        }
        self.step(&format!("{what}: complete and byte-exact"));
    }

    /// The largest ping the MTU allows (1280 - 20 - 8), DF set, to the resource by name: it must come
    /// back whole.
    pub(crate) fn ping_full_size(&self) {
        let out = self.net.exec(
            &self.net.cli,
            &["ping", "-c", "3", "-i", "0.2", "-W", "2", "-M", "do", "-s", "1252", RESOURCE],
        );
        let said =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() || !said.contains("1260 bytes from") {
            self.fail(&format!("full-size ping (path {}): {said}", self.path(Who::Client)));
        }
        self.step(&format!("full-size pings pass (path {})", self.path(Who::Client)));
    }

    /// A foreground transfer over `path`, which both ends must still report afterwards; the client's
    /// relay counters must show the file went through the relay (or, on a direct path, that it did not).
    pub(crate) fn transfer_over(&mut self, path: &str) {
        let relay_rx = |w: &World| w.peer(Who::Client).map_or(0, |p| p.relay_rx_bytes);
        let before = relay_rx(self);
        self.fetch();
        self.assert_path(path, "after the transfer");
        let relayed = relay_rx(self).saturating_sub(before);
        let relayed_ok =
            if path == "relay" { relayed >= BLOB_LEN as u64 } else { relayed < BLOB_LEN as u64 / 10 };
        if !relayed_ok {
            self.fail(&format!(
                "path {path}, yet the client's relay_rx_bytes grew by {relayed} in a {BLOB_LEN}-byte transfer"
            ));
        }
    }

    /// The usual checks of one scenario once the path is settled: the file, the path, the big pings.
    pub(crate) fn transfer_and_ping(&mut self, path: &str) {
        self.transfer_over(path);
        self.ping_full_size();
        self.assert_path(path, "after the pings");
    }
}
