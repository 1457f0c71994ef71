//! The control-path links: the token and state dir, DNS for the server, TCP to it, its TLS key, and
//! whether it accepts this node.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use tunnel_core::map::{NetworkMap, NodeKind};
use tunnel_core::{JoinToken, TokenError};
use tunnel_node::tls::{self, ConnectError, ServerTarget};
use tunnel_node::{ControlConfig, ControlSession, SessionError, StateDir};

use super::{DoctorConfig, Step};

/// What the local checks found, for the later links.
#[derive(Debug, Clone)]
pub(super) struct Local {
    pub step: Step,
    pub token: Option<JoinToken>,
    pub state_dir: PathBuf,
    /// The state dir, when it exists and can be read.
    pub state: Option<StateDir>,
    /// The cached network map.
    pub map: Option<NetworkMap>,
    pub node_name: Option<String>,
}

const FIX_ROTATE: &str = "get a new token with `tunnelctl client rotate NAME` (on the server's side) and \
                          restart `tunnelctl up` with it";

fn read_token(cfg: &DoctorConfig) -> Result<JoinToken, Step> {
    let text = match (&cfg.token, &cfg.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| {
            Step::failed(
                "config",
                format!("cannot read the token file {}: {e}", f.display()),
                "check the path, and run doctor as a user that may read it (the systemd unit keeps the \
                 token in /etc/tunnel/client.token, readable by root)",
            )
        })?,
        (None, None) => return Err(Step::failed(
            "config",
            "no token: doctor needs the client's join token to know the server and its key",
            "pass --token-file FILE (or --token, or set TUNNEL_TOKEN_FILE / TUNNEL_TOKEN) with the token \
                 `tunnelctl up` runs with",
        )),
    };
    JoinToken::parse(&text).map_err(|e| {
        let fix = match e {
            TokenError::AdminWhereJoinExpected => {
                "this is the server's admin token; use the client's join token (`tunnelctl client add NAME` \
                 printed it)"
                    .to_owned()
            }
            _ => format!(
                "copy the whole token again (one line, as `tunnelctl client add` printed it), or {FIX_ROTATE}"
            ),
        };
        Step::failed("config", format!("invalid join token: {e}"), fix)
    })
}

fn age(t: SystemTime) -> String {
    let secs = SystemTime::now().duration_since(t).map(|d| d.as_secs()).unwrap_or(0);
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// The token, the state dir and the cached map.
pub(super) fn config(cfg: &DoctorConfig) -> Local {
    let mut local = Local {
        step: Step::ok("config", ""),
        token: None,
        state_dir: cfg.state_dir.clone(),
        state: None,
        map: None,
        node_name: None,
    };
    let token = match read_token(cfg) {
        Ok(t) => t,
        Err(step) => {
            local.step = step;
            return local;
        }
    };
    let dir = cfg.state_dir.display().to_string();
    let mut detail = format!("token for node {} on {} (pin {})", token.node_id, token.server, token.pin);
    local.token = Some(token.clone());
    if !cfg.state_dir.exists() {
        detail.push_str(&format!("; no state dir at {dir} yet (has `tunnelctl up` run with it?)"));
        local.step = Step::ok("config", detail);
        return local;
    }
    if let Err(e) = std::fs::read_dir(&cfg.state_dir) {
        local.step = Step::failed(
            "config",
            format!("cannot read the state dir {dir}: {e}"),
            "run doctor as the user `tunnelctl up` runs as (sudo for the system service), or pass the \
             --state-dir it uses",
        );
        return local;
    }
    let state = match StateDir::open(&cfg.state_dir) {
        Ok(s) => s,
        Err(e) => {
            local.step = Step::failed(
                "config",
                format!("cannot open the state dir {dir}: {e:#}"),
                "run doctor as the user `tunnelctl up` runs as, or pass the --state-dir it uses",
            );
            return local;
        }
    };
    let map_path = state.path().join("map.json");
    match std::fs::read_to_string(&map_path) {
        Err(_) => detail.push_str(&format!(
            "; state dir {dir}: no cached map yet (the client has not reached the server from here)"
        )),
        Ok(text) => match serde_json::from_str::<NetworkMap>(&text) {
            Err(e) => detail.push_str(&format!(
                "; state dir {dir}: the cached map is damaged ({e}); `tunnelctl up` fetches a new one when \
                 the server answers"
            )),
            Ok(map) if map.node_id != token.node_id => {
                local.step = Step::failed(
                    "config",
                    format!(
                        "the state dir {dir} belongs to node {} ({}), but the token is for node {}",
                        map.node_id, map.node_name, token.node_id
                    ),
                    "pass the --state-dir that `tunnelctl up` uses with this token, or the token it was \
                     started with",
                );
                local.state = Some(state);
                return local;
            }
            Ok(map) => {
                let saved = std::fs::metadata(&map_path)
                    .and_then(|m| m.modified())
                    .map(|t| format!(", saved {} ago", age(t)))
                    .unwrap_or_default();
                let sites = map.peers.values().filter(|p| p.kind == NodeKind::Site).count();
                detail.push_str(&format!(
                    "; state dir {dir}: cached map version {} for client {} ({} on {}{saved})",
                    map.version,
                    map.node_name,
                    super::count(map.resources.len(), "resource"),
                    super::count(sites, "site")
                ));
                local.node_name = Some(map.node_name.clone());
                local.map = Some(map);
            }
        },
    }
    local.state = Some(state);
    local.step = Step::ok("config", detail);
    local
}

/// `HOST` of `HOST:PORT` (IPv6 brackets removed).
fn host_of(server: &str) -> &str {
    match server.rsplit_once(':') {
        Some((h, _)) => h.trim_matches(['[', ']']),
        None => server,
    }
}

/// DNS for the server's name, then a TCP connection to it.
pub(super) async fn server_path(token: &JoinToken, timeout: Duration) -> Vec<Step> {
    let host = host_of(&token.server).to_owned();
    let addrs: Vec<SocketAddr> = if let Ok(ip) = host.parse::<IpAddr>() {
        let port = token.server.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(8443);
        let step = Step::ok("dns", format!("{host} is an IP address: nothing to resolve"));
        return vec![step, reach(&token.server, &[SocketAddr::new(ip, port)], timeout).await];
    } else {
        match tokio::time::timeout(timeout, tokio::net::lookup_host(token.server.clone())).await {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => {
                return vec![Step::failed(
                    "dns",
                    format!("cannot resolve the server's name {host}: {e}"),
                    dns_fix(),
                )]
            }
            Err(_) => {
                return vec![Step::failed(
                    "dns",
                    format!("no answer for the server's name {host} within {}s", timeout.as_secs()),
                    dns_fix(),
                )]
            }
        }
    };
    if addrs.is_empty() {
        return vec![Step::failed("dns", format!("the server's name {host} has no address"), dns_fix())];
    }
    let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    vec![
        Step::ok("dns", format!("{host} resolves to {}", list.join(", "))),
        reach(&token.server, &addrs, timeout).await,
    ]
}

fn dns_fix() -> String {
    "this machine's resolver cannot find the server: check /etc/resolv.conf and that the name has a public \
     A/AAAA record. Tokens carry the server's --public-addr; if that name is wrong, restart the server with \
     the right one and make new tokens (`tunnelctl client rotate NAME`). Tunnels keep working meanwhile"
        .to_owned()
}

async fn reach(server: &str, addrs: &[SocketAddr], timeout: Duration) -> Step {
    let mut last = String::new();
    for a in addrs {
        let t0 = Instant::now();
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(a)).await {
            Ok(Ok(_)) => {
                return Step::ok(
                    "reach",
                    format!("{a} accepts TCP connections ({} ms)", t0.elapsed().as_millis()),
                )
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                last = format!(
                    "nothing listens on {a} (connection refused): the server is not running, or listens \
                     on another address"
                );
            }
            Ok(Err(e)) => last = format!("cannot connect to {a}: {e}"),
            Err(_) => {
                last = format!(
                    "no answer from {a} within {}s: a firewall drops the packets, or the host is down",
                    timeout.as_secs()
                )
            }
        }
    }
    Step::failed(
        "reach",
        last,
        format!(
            "start the server (`systemctl status tunnel-server` on its host) and make sure {server} is open \
             to this machine (firewall, security group). Established tunnels keep working meanwhile; \
             changes wait until it is back"
        ),
    )
}

/// TLS with the token's pin.
pub(super) async fn tls(token: &JoinToken) -> Step {
    let target = ServerTarget { server: token.server.clone(), pin: token.pin };
    match tls::connect(&target).await {
        Ok(_) => Step::ok("tls", format!("the server proves it holds the pinned key {}", token.pin)),
        Err(e @ ConnectError::PinMismatch { .. }) => Step::failed(
            "tls",
            format!("wrong fingerprint: {e}"),
            format!(
                "the server's TLS key is not the one the token pins: the server was reinstalled without its \
                 data dir, or this is not your server. Restore the server's data dir from a backup, or {FIX_ROTATE}"
            ),
        ),
        Err(e @ ConnectError::Tls { .. }) => Step::failed(
            "tls",
            e.to_string(),
            "something other than the tunnel server answers on this port, or a proxy in front of it \
             terminates TLS (it must pass TLS through unchanged); check the server's --listen and any \
             proxy or load balancer",
        ),
        Err(e @ ConnectError::Unreachable { .. }) => Step::failed(
            "tls",
            e.to_string(),
            "the server stopped answering during the checks; run doctor again",
        ),
    }
}

fn rejected_fix(reason: &str) -> String {
    if reason.contains("not known") {
        "this client was removed on the server (`tunnelctl client rm`), or the token belongs to another \
         server: ask the operator to add it again (`tunnelctl client add NAME`) and restart \
         `tunnelctl up` with the new token"
            .to_owned()
    } else if reason.contains("already registered") {
        "another node registered this machine's key: each node needs its own --state-dir (its own key)"
            .to_owned()
    } else {
        format!("the client's secret was rotated or its token expired or was used up: {FIX_ROTATE}")
    }
}

/// Whether the server accepts this node. While the running client holds a session, that is the answer
/// (logging in again would replace its session). Otherwise doctor logs in once, with the node's own key
/// and its saved ticket, the way `tunnelctl up` would.
/// `daemon_control` is the running client's control link as its `/status` says, `(state, reason)`.
pub(super) async fn credentials(
    token: &JoinToken,
    local: &Local,
    daemon_control: Option<(&str, &str)>,
    timeout: Duration,
) -> Step {
    let daemon_state = daemon_control;
    if let Some(("connected", _)) = daemon_state {
        return Step::ok(
            "credentials",
            "the running `tunnelctl up` holds a control session: the server accepts this node",
        );
    }
    let dir = local.state_dir.display();
    let state = match &local.state {
        Some(s) => s.clone(),
        None => match StateDir::open(&local.state_dir) {
            Ok(s) => s,
            Err(e) => {
                return Step::skipped(
                    "credentials",
                    format!(
                        "not checked: cannot keep the node's key in {dir} ({e:#}); doctor logs in only with \
                         the key `tunnelctl up` uses"
                    ),
                )
            }
        },
    };
    let mut notes = Vec::new();
    let key = match state.load_private_key() {
        Ok(Some(k)) => k,
        Ok(None) => match state.private_key() {
            Ok(k) => {
                notes
                    .push(format!("made the node's key in {dir}, as `tunnelctl up` does at its first start"));
                k
            }
            Err(e) => return Step::skipped("credentials", format!("not checked: {e:#}")),
        },
        Err(e) => return Step::skipped("credentials", format!("not checked: {e:#}")),
    };
    let cfg = ControlConfig {
        token: token.clone(),
        private_key: Some(tunnel_node::control::NodeKey(key)),
        public_key: tunnel_core::wg::public_key(key),
        version: env!("CARGO_PKG_VERSION").into(),
        candidates: vec![],
    };
    let ticket = state.load_ticket();
    let login = |ticket: Option<Vec<u8>>| {
        let cfg = cfg.clone();
        async move {
            match tokio::time::timeout(timeout * 2, ControlSession::open(&cfg, ticket.as_deref())).await {
                Ok(r) => r,
                Err(_) => Err(SessionError::Lost(format!(
                    "the server did not answer the login within {}s (overloaded?)",
                    (timeout * 2).as_secs()
                ))),
            }
        }
    };
    let mut result = login(ticket.clone()).await;
    let mut how = if ticket.is_some() { "its saved session ticket" } else { "its join secret" };
    if ticket.is_some() && matches!(result, Err(SessionError::Rejected(_))) {
        // A stale ticket (rotated secret, restored server): `up` falls back to the join secret too.
        result = login(None).await;
        how = "its join secret (the saved ticket was refused)";
    }
    match result {
        Ok(session) => {
            if ticket.is_none() {
                if let Err(e) = state.save_ticket(&session.welcome.session_ticket) {
                    tracing::debug!(error = %e, "cannot save the session ticket");
                }
            }
            drop(session);
            let mut detail = format!("the server accepted this node (logged in with {how})");
            match daemon_state {
                Some(("rejected", reason)) => notes.push(format!(
                    "the running `tunnelctl up` was refused earlier ({reason}) and retries within 5 minutes; \
                     restart it to reconnect now"
                )),
                Some((s, _)) => {
                    notes.push(format!("the running `tunnelctl up` is {s}; it reconnects by itself"))
                }
                None => {}
            }
            for n in notes {
                detail.push_str("; ");
                detail.push_str(&n);
            }
            Step::ok("credentials", detail)
        }
        Err(SessionError::Rejected(reason)) | Err(SessionError::Revoked(reason)) => Step::failed(
            "credentials",
            format!("the server refused this node: {reason}"),
            rejected_fix(&reason),
        ),
        Err(SessionError::Connect(e)) => Step::failed(
            "credentials",
            e.to_string(),
            "the server stopped answering during the checks; run doctor again",
        ),
        Err(e) => {
            let text = e.to_string();
            let fix = if text.contains("too many failed") {
                "wait a minute: the server limits failed logins per address"
            } else {
                "run doctor again; if it persists, see the server's log (`journalctl -u tunnel-server`)"
            };
            Step::failed("credentials", format!("the login did not complete: {text}"), fix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Outcome;

    #[test]
    fn hosts() {
        assert_eq!(host_of("vps.example.com:8443"), "vps.example.com");
        assert_eq!(host_of("[2001:db8::1]:8443"), "2001:db8::1");
        assert_eq!(host_of("127.0.0.1:1"), "127.0.0.1");
    }

    #[test]
    fn refusals_get_the_fix_that_matches() {
        assert!(rejected_fix("node n1 is not known to this server: it was removed").contains("client add"));
        assert!(rejected_fix("wrong secret for this node").contains("client rotate"));
        assert!(rejected_fix("this join token has expired").contains("client rotate"));
    }

    #[test]
    fn token_problems_are_config_failures_with_a_fix() {
        let cfg = |token: Option<&str>| DoctorConfig {
            token: token.map(str::to_owned),
            token_file: None,
            state_dir: "/nonexistent/doctor-test".into(),
            timeout: Duration::from_secs(1),
        };
        let none = config(&cfg(None));
        assert_eq!(none.step.status, Outcome::Failed);
        assert!(none.step.fix.as_deref().unwrap_or("").contains("--token-file"));
        let bad = config(&cfg(Some("tjn1.garbage")));
        assert_eq!(bad.step.status, Outcome::Failed);
        assert!(bad.step.detail.contains("invalid join token"), "{}", bad.step.detail);
    }
}
