//! Shared helpers for the end-to-end tests: a real server on loopback with a temporary data dir, the
//! real `tunnelctl` command code, and real nodes speaking `Control.Connect`.

pub mod deploy;
pub mod lab;
pub mod loopback;
pub mod lossy;
pub mod nat;
pub mod services;
pub mod sim;
pub mod wire;
pub mod world;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use tunnel_core::map::NetworkMap;
use tunnel_core::JoinToken;
use tunnel_node::{ControlConfig, ControlSession, SessionError};
use tunnel_server::auth::KdfParams;
use tunnel_server::{RunningServer, ServerConfig};

/// How long a test waits for something that should happen "at once".
pub const PATIENCE: Duration = Duration::from_secs(15);

/// Logs for failing tests: `TUNNEL_LOG=debug cargo test ...`.
pub fn init_logs() {
    let filter = std::env::var("TUNNEL_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// Polls `cond` every 50 ms until it holds; panics naming `what` after [`PATIENCE`].
pub async fn wait_until<F, Fut>(what: &str, cond: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `len` bytes of a fixed pseudo-random pattern: a file to move byte-exact, which compresses badly and
/// shows a shifted or repeated chunk as a difference.
pub fn blob(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

/// A server on loopback with its own temporary data dir.
#[derive(Debug)]
pub struct TestServer {
    pub server: Option<RunningServer>,
    pub dir: tempfile::TempDir,
    pub cfg: ServerConfig,
}

impl TestServer {
    /// A config for a loopback server in `dir`; cheap argon2 so tests spend their time on behaviour.
    pub fn config(dir: PathBuf) -> ServerConfig {
        let mut cfg = ServerConfig::new(dir);
        cfg.listen = "127.0.0.1:0".parse().expect("addr");
        cfg.public_addr = Some("127.0.0.1".into());
        cfg.kdf = KdfParams { m_cost: 256, t_cost: 1 };
        // STUN and the relay (QUIC and TCP) run as in production, on free loopback ports.
        cfg.stun_listen = Some("127.0.0.1:0".parse().expect("addr"));
        cfg.relay_listen = Some("127.0.0.1:0".parse().expect("addr"));
        cfg.relay_tcp_listen = Some("127.0.0.1:0".parse().expect("addr"));
        cfg
    }

    /// Starts a fresh server.
    pub async fn start() -> Result<TestServer> {
        Self::start_with(|_| {}).await
    }

    /// Starts a fresh server after `tweak` adjusts its config.
    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> Result<TestServer> {
        init_logs();
        let dir = tempfile::tempdir()?;
        let mut cfg = Self::config(dir.path().join("data"));
        tweak(&mut cfg);
        let server = tunnel_server::start(cfg.clone()).await?;
        // Restarts reuse the port, so tokens stay valid.
        cfg.listen = server.addr;
        Ok(TestServer { server: Some(server), dir, cfg })
    }

    /// The running server.
    pub fn running(&self) -> &RunningServer {
        self.server.as_ref().expect("server is running")
    }

    /// gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.cfg.listen
    }

    /// The admin token text.
    pub fn admin_token(&self) -> String {
        self.running().admin_token.encode()
    }

    /// Stops the server gracefully.
    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }

    /// Starts it again on the same data dir and port.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match tunnel_server::start(self.cfg.clone()).await {
                Ok(s) => {
                    self.server = Some(s);
                    return Ok(());
                }
                // The port may take a moment to be free again.
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "restart failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs a `tunnelctl` command with this server's admin token; returns what it printed.
    pub async fn ctl(&self, args: &[&str]) -> Result<String> {
        let token = self.admin_token();
        let mut full = vec!["--admin-token", token.as_str()];
        full.extend_from_slice(args);
        ctl(&full).await
    }

    /// `ctl`, expecting JSON output.
    pub async fn ctl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.ctl(args).await?)?)
    }

    /// The whole admin-visible state as JSON (for "nothing changed" checks).
    pub async fn snapshot(&self) -> Result<serde_json::Value> {
        let mut v = serde_json::Map::new();
        for what in ["sites", "clients", "resources", "grants"] {
            let mut j = self.ctl_json(&[what, "--json"]).await?;
            // Presence and last-seen move on their own; they are not configuration.
            if let Some(arr) = j.as_array_mut() {
                for item in arr {
                    if let Some(o) = item.as_object_mut() {
                        o.remove("online");
                        o.remove("last_seen_ms");
                        o.remove("candidates");
                    }
                }
            }
            v.insert(what.into(), j);
        }
        Ok(serde_json::Value::Object(v))
    }
}

/// Runs `tunnelctl` with exactly these arguments (no program name); returns what it printed.
pub async fn ctl(args: &[&str]) -> Result<String> {
    let mut out = Vec::new();
    tunnelctl::cli::run_args(args, &mut out).await?;
    Ok(String::from_utf8(out)?)
}

/// A node speaking the control protocol with a fixed key.
#[derive(Debug)]
pub struct TestNode {
    pub cfg: ControlConfig,
    pub session: ControlSession,
}

impl TestNode {
    /// Joins with the token's secret and waits for the first map.
    pub async fn join(token: &str, key: u8) -> Result<TestNode, SessionError> {
        let cfg = ControlConfig {
            token: JoinToken::parse(token).expect("valid token"),
            // A made-up public key: these nodes log in as nodes before key proofs did.
            private_key: None,
            public_key: tunnel_core::PublicKey([key; 32]),
            version: "test".into(),
            candidates: vec![],
        };
        Self::join_with(cfg, None).await
    }

    /// A node with a real X25519 key pair made from `private` (it proves its key at login).
    pub fn keyed(token: &str, private: [u8; 32]) -> ControlConfig {
        ControlConfig {
            token: JoinToken::parse(token).expect("valid token"),
            private_key: Some(tunnel_node::control::NodeKey(private)),
            public_key: tunnel_core::wg::public_key(private),
            version: "test".into(),
            candidates: vec![],
        }
    }

    /// Logs in with `cfg` (and `ticket`, if given) and waits for the first map.
    pub async fn join_with(cfg: ControlConfig, ticket: Option<&[u8]>) -> Result<TestNode, SessionError> {
        let mut session = ControlSession::open(&cfg, ticket).await?;
        tokio::time::timeout(PATIENCE, session.next_map())
            .await
            .map_err(|_| SessionError::Lost("no map".into()))??;
        Ok(TestNode { cfg, session })
    }

    /// The current map.
    pub fn map(&self) -> &NetworkMap {
        self.session.map.as_ref().expect("a map arrived at join")
    }

    /// Waits until the map satisfies `cond`.
    pub async fn wait_for(&mut self, what: &str, cond: impl Fn(&NetworkMap) -> bool) -> Result<&NetworkMap> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        if cond(self.map()) {
            return Ok(self.map());
        }
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.session.next_map()).await {
                Ok(Ok(m)) if cond(m) => break,
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => anyhow::bail!("waiting for {what}: session ended: {e}"),
                Err(_) => anyhow::bail!("waiting for {what}: timed out; map is {:#?}", self.map()),
            }
        }
        Ok(self.map())
    }

    /// Waits for the session to end and returns why.
    pub async fn wait_end(&mut self) -> SessionError {
        loop {
            match tokio::time::timeout(PATIENCE, self.session.next_map()).await {
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return e,
                Err(_) => return SessionError::Lost("test timed out waiting for the session to end".into()),
            }
        }
    }
}
