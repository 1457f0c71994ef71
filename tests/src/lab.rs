//! The network-namespace lab: real hosts, links, routers and processes on one machine.
//!
//! Every namespace is named with a per-run prefix, and [`Lab`]'s `Drop` kills every process in them
//! and deletes them, also when the test fails. Links are made directly inside their namespaces
//! (`ip -n A link add X type veth peer name Y netns B`), so the root namespace never sees an interface
//! of the lab. Addresses are TEST-NET and 10.x only.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A lab; dropped, it leaves nothing behind.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
    /// Scratch directory for state dirs, logs, files.
    pub dir: tempfile::TempDir,
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

impl Lab {
    /// A new lab, or `None` (with a note on stderr) when not running as root.
    pub fn new() -> Option<Lab> {
        let uid = Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("CI=true but not root: the namespace lab cannot run");
            }
            eprintln!("skipping the namespace lab: it needs root");
            return None;
        }
        let prefix = format!("t{}{:x}", std::process::id() % 10000, rand::random::<u16>());
        Some(Lab { prefix, namespaces: vec![], children: vec![], dir: tempfile::tempdir().ok()? })
    }

    /// Makes namespace `short` (full name: prefix + short) with loopback up; returns its full name.
    pub fn ns(&mut self, short: &str) -> String {
        let name = format!("{}{short}", self.prefix);
        run(Command::new("ip").args(["netns", "add", &name]));
        self.namespaces.push(name.clone());
        run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        name
    }

    /// A veth link between two namespaces, each end named and addressed (`ADDR/PREFIX`).
    pub fn link(&mut self, a: &str, a_if: &str, a_addr: &str, b: &str, b_if: &str, b_addr: &str) {
        run(Command::new("ip")
            .args(["-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b]));
        for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
            run(Command::new("ip").args(["-n", ns, "addr", "add", addr, "dev", ifname]));
            run(Command::new("ip").args(["-n", ns, "link", "set", ifname, "up"]));
        }
    }

    /// A veth pair between two namespaces with no addresses (e.g. to enslave one end to a bridge).
    pub fn veth(&mut self, a: &str, a_if: &str, b: &str, b_if: &str) {
        run(Command::new("ip")
            .args(["-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b]));
        run(Command::new("ip").args(["-n", a, "link", "set", a_if, "up"]));
        run(Command::new("ip").args(["-n", b, "link", "set", b_if, "up"]));
    }

    /// Runs a command in a namespace and waits for it.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        Command::new("ip").args(["netns", "exec", ns]).args(args).output().expect("ip netns exec")
    }

    /// Starts a long-running process in a namespace; its output goes to `DIR/<log>.log`.
    pub fn spawn(&mut self, ns: &str, log: &str, args: &[&str], env: &[(&str, &str)]) -> usize {
        let path = self.dir.path().join(format!("{log}.log"));
        let f = std::fs::File::create(&path).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log"))
            .stderr(f)
            .spawn()
            .expect("spawn");
        self.children.push(child);
        self.children.len() - 1
    }

    /// Sends SIGTERM to a spawned process and waits for it to exit.
    pub fn stop(&mut self, idx: usize) -> std::process::ExitStatus {
        let child = &mut self.children[idx];
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills a spawned process with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill(&mut self, idx: usize) {
        let child = &mut self.children[idx];
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The exit status of a spawned process, if it has exited.
    pub fn try_wait(&mut self, idx: usize) -> Option<std::process::ExitStatus> {
        self.children[idx].try_wait().ok().flatten()
    }

    /// The path of log `name` (what [`Lab::spawn`] writes and [`Lab::log`] reads).
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// A log's text.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Polls `cond` until it holds or `secs` pass.
    pub fn wait(&self, what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
        }
    }
}

/// The project's binaries, built if needed (the lab runs real processes).
pub fn binaries() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // `cargo test` gives the test its package's CARGO_PKG_* (and similar) variables; build scripts that
    // watch them (ring's) would see a change and rebuild half the tree. Build as from a plain shell.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_TARGET_TMPDIR",
            "CARGO_PRIMARY_",
        ]
        .iter()
        .any(|p| k.starts_with(p))
        {
            cmd.env_remove(k.as_ref());
        }
    }
    let st = cmd
        .current_dir(&root)
        // The same feature set as `cargo test --workspace`, so this is a no-op after it.
        .args(["build", "-q", "--workspace", "--bins"])
        .status()
        .expect("cargo build");
    assert!(st.success(), "building the binaries for the lab failed");
    let exe = std::env::current_exe().expect("test exe");
    // target/<profile>/deps/<test> -> target/<profile>
    exe.parent().and_then(Path::parent).expect("target dir").to_owned()
}

/// A control server running in a lab namespace, and `tunnelctl` admin calls against it.
#[derive(Debug)]
pub struct LabServer {
    ns: String,
    tunnelctl: String,
    admin: String,
}

impl Lab {
    /// Starts the `tunnel-server` from `bin` in namespace `ns`, gRPC on `IP:8443` (STUN and the relay on
    /// their default ports), metrics on 127.0.0.1:9180, and waits until it answers admin calls.
    pub fn start_server(&mut self, bin: &Path, ns: &str, ip: &str) -> LabServer {
        let data = self.dir.path().join("server");
        let server = bin.join("tunnel-server").to_string_lossy().into_owned();
        let data_s = data.to_string_lossy().into_owned();
        let listen = format!("{ip}:8443");
        let args = [
            server.as_str(),
            "--data-dir",
            &data_s,
            "--listen",
            &listen,
            "--public-addr",
            ip,
            "--metrics-listen",
            "127.0.0.1:9180",
        ];
        self.spawn(ns, "server", &args, &[]);
        let admin = data.join("admin.token");
        self.wait("the server's admin token", 30, || admin.exists());
        let s = LabServer {
            ns: ns.to_owned(),
            tunnelctl: bin.join("tunnelctl").to_string_lossy().into_owned(),
            admin: admin.to_string_lossy().into_owned(),
        };
        self.wait("the server to answer", 30, || {
            self.exec(ns, &[&s.tunnelctl, "--admin-token-file", &s.admin, "info"]).status.success()
        });
        s
    }
}

impl LabServer {
    /// `tunnelctl --admin-token-file ADMIN ARGS` in the server's namespace; its stdout. Panics (the
    /// test fails) when the command fails.
    pub fn ctl(&self, lab: &Lab, args: &[&str]) -> String {
        let mut full = vec![self.tunnelctl.as_str(), "--admin-token-file", self.admin.as_str()];
        full.extend_from_slice(args);
        let out = lab.exec(&self.ns, &full);
        assert!(out.status.success(), "tunnelctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
