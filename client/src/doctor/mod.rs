//! `tunnelctl doctor`: walks the chain an operator would check by hand and says where it breaks.
//!
//! The control path: the token and the state dir -> DNS for the server's name -> a TCP connection to it
//! -> its TLS key against the token's pin -> the server accepting this node's credentials. The tunnel,
//! through the running `tunnelctl up` (found through the state dir): a WireGuard handshake with each
//! site -> a TCP connection to each granted resource, made the way applications make it (straight to
//! the overlay address in TUN mode, through the SOCKS5 listener in userspace mode) -> the private names
//! resolving (through the system resolver in TUN mode, the client's DNS listener in userspace mode).
//!
//! The first broken link of the control path ends the walk, except when the server cannot be reached at
//! all: tunnels keep working without it, so they are still checked, from the cached map.
//!
//! Credentials are checked without disturbing the running client: while its control session is up,
//! that session is the proof. Otherwise (it is refused, reconnecting, or not running) doctor logs in
//! once itself with the node's own key and saved ticket, which replaces no live session.

mod control;
mod tunnel;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

/// What `doctor` was asked to check.
#[derive(Debug, Clone)]
pub struct DoctorConfig {
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// Per network operation.
    pub timeout: Duration,
}

/// The result of one check, or of the whole walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    /// Works in part (some resources do not answer).
    Degraded,
    Failed,
    /// Not checked (an earlier link is broken, or there is nothing to check); the detail says why.
    Skipped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Degraded => "degraded",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
        }
    }

    /// The process exit code for this overall outcome: 0 ok, 1 failed, 2 degraded.
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Ok | Outcome::Skipped => 0,
            Outcome::Failed => 1,
            Outcome::Degraded => 2,
        }
    }
}

/// One link of the chain.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// `config`, `dns`, `reach`, `tls`, `credentials`, `client`, `site`, `resource` or `names`.
    pub name: &'static str,
    /// The site or resource a `site` / `resource` step is about.
    pub subject: Option<String>,
    pub status: Outcome,
    /// What was seen.
    pub detail: String,
    /// For a failure: what to do about it.
    pub fix: Option<String>,
}

impl Step {
    fn ok(name: &'static str, detail: impl Into<String>) -> Step {
        Step { name, subject: None, status: Outcome::Ok, detail: detail.into(), fix: None }
    }

    fn failed(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Step {
        Step { name, subject: None, status: Outcome::Failed, detail: detail.into(), fix: Some(fix.into()) }
    }

    fn skipped(name: &'static str, detail: impl Into<String>) -> Step {
        Step { name, subject: None, status: Outcome::Skipped, detail: detail.into(), fix: None }
    }

    fn about(mut self, subject: &str) -> Step {
        self.subject = Some(subject.to_owned());
        self
    }

    fn label(&self) -> String {
        match &self.subject {
            Some(s) => format!("{} {s}", self.name),
            None => self.name.to_owned(),
        }
    }

    /// A failure of one site or resource leaves the others working: it degrades, it does not fail.
    fn is_partial(&self) -> bool {
        matches!(self.name, "site" | "resource") && self.subject.is_some()
    }
}

/// The whole walk.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `ok`, `degraded` or `failed`.
    pub status: Outcome,
    /// One line: what works, or the first thing that does not.
    pub summary: String,
    /// The node's name, from the cached map.
    pub node: Option<String>,
    /// The server the token names.
    pub server: Option<String>,
    /// `tun` or `userspace`, from the running client.
    pub mode: Option<String>,
    pub steps: Vec<Step>,
}

impl Report {
    /// The first step called `name` (about `subject`, when given).
    pub fn step(&self, name: &str, subject: Option<&str>) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name && (subject.is_none() || s.subject.as_deref() == subject))
    }

    /// Prints the report for a person.
    pub fn write_human(&self, out: &mut dyn Write) -> Result<()> {
        let who = match (&self.node, &self.server) {
            (Some(n), Some(s)) => format!("client {n}, server {s}"),
            (None, Some(s)) => format!("server {s}"),
            _ => "no token".to_owned(),
        };
        let mode = self.mode.as_deref().map(|m| format!(" ({m} mode)")).unwrap_or_default();
        writeln!(out, "tunnelctl doctor: {who}{mode}")?;
        let width = self.steps.iter().map(|s| s.label().len()).max().unwrap_or(0);
        for s in &self.steps {
            writeln!(out, "  {:<8}  {:<width$}  {}", s.status.as_str(), s.label(), s.detail)?;
            if let Some(fix) = &s.fix {
                writeln!(out, "  {:<8}  {:<width$}  fix: {fix}", "", "")?;
            }
        }
        writeln!(out, "{}: {}", self.status.as_str(), self.summary)?;
        Ok(())
    }
}

/// `1 site`, `2 sites`.
fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Runs every check and returns the report (never an error: a check that cannot run is a finding).
pub async fn run(cfg: &DoctorConfig) -> Report {
    let mut steps = Vec::new();
    let local = control::config(cfg);
    let (node, server) = (local.node_name.clone(), local.token.as_ref().map(|t| t.server.clone()));
    steps.push(local.step.clone());
    let Some(token) = local.token.clone().filter(|_| local.step.status != Outcome::Failed) else {
        let rest = "not checked: the local configuration is broken (see above)";
        for name in ["dns", "reach", "tls", "credentials", "client"] {
            steps.push(Step::skipped(name, rest));
        }
        return finish(steps, node, server, None, false);
    };
    // The running client's view first: it decides how credentials are checked.
    let daemon = tunnel::daemon(&local, cfg.timeout).await;

    let path = control::server_path(&token, cfg.timeout).await;
    let server_unreachable = path.iter().any(|s| s.status == Outcome::Failed);
    steps.extend(path);
    if server_unreachable {
        let why = "not checked: the server cannot be reached";
        steps.push(Step::skipped("tls", why));
        steps.push(Step::skipped("credentials", why));
    } else {
        let tls = control::tls(&token).await;
        let tls_failed = tls.status == Outcome::Failed;
        steps.push(tls);
        let creds = if tls_failed {
            Step::skipped("credentials", "not checked: the server's TLS key is not the pinned one")
        } else {
            control::credentials(
                &token,
                &local,
                daemon.as_ref().ok().map(tunnel::Daemon::control),
                cfg.timeout,
            )
            .await
        };
        let creds_failed = creds.status == Outcome::Failed;
        steps.push(creds);
        if tls_failed || creds_failed {
            steps.push(Step::skipped("client", "not checked: fix the control path first (see above)"));
            let mode = daemon.as_ref().ok().map(|d| d.mode.clone());
            return finish(steps, node, server, mode, false);
        }
    }
    let mode = daemon.as_ref().ok().map(|d| d.mode.clone());
    steps.extend(tunnel::checks(&local, daemon, cfg.timeout).await);
    finish(steps, node, server, mode, server_unreachable)
}

/// Writes the report (JSON or for a person) and returns its overall outcome.
pub async fn report(cfg: &DoctorConfig, json: bool, out: &mut (dyn Write + Send)) -> Result<Report> {
    let r = run(cfg).await;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&r)?)?;
    } else {
        r.write_human(out)?;
    }
    out.flush()?;
    Ok(r)
}

fn finish(
    steps: Vec<Step>,
    node: Option<String>,
    server: Option<String>,
    mode: Option<String>,
    server_unreachable: bool,
) -> Report {
    let (status, summary) = overall(&steps, server_unreachable);
    Report { status, summary, node, server, mode, steps }
}

/// Failed when a link of the chain is broken or nothing can be reached; degraded when only some sites
/// or resources fail; ok otherwise.
fn overall(steps: &[Step], server_unreachable: bool) -> (Outcome, String) {
    let resources: Vec<&Step> = steps.iter().filter(|s| s.name == "resource").collect();
    let reachable = resources.iter().filter(|s| s.status == Outcome::Ok).count();
    let broken = steps.iter().find(|s| s.status == Outcome::Failed && !s.is_partial());
    if let Some(b) = broken {
        let mut summary = format!("{}: {}", b.label(), b.detail);
        if server_unreachable {
            let tunnel_ok = steps
                .iter()
                .filter(|s| matches!(s.name, "client" | "site" | "resource" | "names"))
                .all(|s| s.status == Outcome::Ok);
            if tunnel_ok && reachable > 0 {
                summary.push_str(" (the tunnels work from the cached map meanwhile)");
            }
        }
        return (Outcome::Failed, summary);
    }
    let down: Vec<String> =
        resources.iter().filter(|s| s.status != Outcome::Ok).filter_map(|s| s.subject.clone()).collect();
    let sites_down: Vec<String> = steps
        .iter()
        .filter(|s| s.name == "site" && s.status == Outcome::Failed)
        .filter_map(|s| s.subject.clone())
        .collect();
    if !down.is_empty() || !sites_down.is_empty() {
        let mut what = Vec::new();
        if !sites_down.is_empty() {
            what.push(format!("no tunnel to site {}", sites_down.join(", ")));
        }
        if !down.is_empty() {
            what.push(format!("not reachable: {}", down.join(", ")));
        }
        if reachable == 0 {
            return (Outcome::Failed, format!("nothing is reachable ({})", what.join("; ")));
        }
        return (
            Outcome::Degraded,
            format!("{}; {reachable} of {} work", what.join("; "), count(resources.len(), "resource")),
        );
    }
    if steps.iter().any(|s| s.status == Outcome::Degraded) {
        let d = steps.iter().find(|s| s.status == Outcome::Degraded).map(Step::label).unwrap_or_default();
        return (Outcome::Degraded, format!("{d} works only in part"));
    }
    let sites = steps.iter().filter(|s| s.name == "site").count();
    (
        Outcome::Ok,
        format!(
            "everything works: {} reachable through {}",
            count(reachable, "resource"),
            count(sites, "site")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(name: &'static str, subject: Option<&str>, status: Outcome) -> Step {
        Step { name, subject: subject.map(str::to_owned), status, detail: "d".into(), fix: None }
    }

    #[test]
    fn overall_outcome() {
        use Outcome::*;
        let base = || vec![st("config", None, Ok), st("reach", None, Ok), st("site", Some("home"), Ok)];
        let with = |extra: Vec<Step>| {
            let mut v = base();
            v.extend(extra);
            overall(&v, false).0
        };
        assert_eq!(with(vec![st("resource", Some("a"), Ok), st("resource", Some("b"), Ok)]), Ok);
        assert_eq!(with(vec![st("resource", Some("a"), Ok), st("resource", Some("b"), Failed)]), Degraded);
        assert_eq!(with(vec![st("resource", Some("a"), Failed)]), Failed, "nothing reachable");
        assert_eq!(with(vec![st("resource", Some("a"), Ok), st("names", None, Failed)]), Failed);
        let (o, summary) = overall(
            &[st("config", None, Ok), st("reach", None, Failed), st("resource", Some("a"), Ok)],
            true,
        );
        assert_eq!(o, Failed);
        assert!(summary.starts_with("reach: ") && summary.contains("cached map"), "{summary}");
        assert_eq!(Degraded.exit_code(), 2);
        assert_eq!(Failed.exit_code(), 1);
        assert_eq!(Ok.exit_code(), 0);
    }
}
