//! `tunnelctl apply FILE`: a declarative config (YAML) made true on the server by `Admin.Apply`, in one
//! transaction, all or nothing.
//!
//! Two calls: a dry run whose plan is printed first, then the real apply (skipped when the plan changes
//! nothing). The server re-plans under its write lock for the real call; if someone changed the
//! server in between, the plan actually applied is printed too. Join tokens of the nodes the apply
//! created are written to `--tokens-dir` (checked to be writable *before* anything is applied, since
//! a token exists only in the reply) or printed after a warning.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::json;
use tunnel_proto::v1 as pb;

use crate::admin;
use crate::table::Table;

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub sites: Vec<NodeSpec>,
    #[serde(default)]
    pub clients: Vec<NodeSpec>,
    #[serde(default)]
    pub resources: Vec<ResourceSpec>,
    #[serde(default)]
    pub grants: Vec<GrantSpec>,
}

/// A site or client.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
}

/// A resource on a site.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceSpec {
    pub name: String,
    pub site: String,
    pub target: String,
    #[serde(default)]
    pub alias: Option<String>,
    /// `tcp` (default) or `http:/PATH`.
    #[serde(default)]
    pub health_check: Option<String>,
}

/// A client's access to resources.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantSpec {
    pub client: String,
    pub resources: Vec<String>,
}

/// Parses a config. Names, targets and references are checked by the server, which sees the whole
/// picture; this only checks the shape.
pub fn parse(text: &str) -> Result<Config> {
    // An empty file is far more likely a mistake (a truncated checkout, a wrong path) than a wish to
    // have nothing; with --prune it would delete everything.
    let value: serde_norway::Value = serde_norway::from_str(text).map_err(|e| anyhow!("{e}"))?;
    if value.is_null() {
        bail!("the file is empty (write `sites: []` to mean a config with nothing in it)");
    }
    serde_norway::from_str(text).map_err(|e| anyhow!("{e}"))
}

impl Config {
    /// The request for `Admin.Apply`.
    pub fn to_request(&self, prune: bool, dry_run: bool) -> pb::ApplyRequest {
        pb::ApplyRequest {
            sites: self.sites.iter().map(|s| pb::SiteSpec { name: s.name.clone() }).collect(),
            clients: self.clients.iter().map(|c| pb::ClientSpec { name: c.name.clone() }).collect(),
            resources: self
                .resources
                .iter()
                .map(|r| pb::ResourceSpec {
                    name: r.name.clone(),
                    site: r.site.clone(),
                    target: r.target.clone(),
                    alias: r.alias.clone().unwrap_or_default(),
                    health_check: r.health_check.clone().unwrap_or_default(),
                })
                .collect(),
            grants: self
                .grants
                .iter()
                .flat_map(|g| {
                    g.resources
                        .iter()
                        .map(|r| pb::GrantSpec { client: g.client.clone(), resource: r.clone() })
                })
                .collect(),
            prune,
            dry_run,
            token_ttl_seconds: 0,
            token_once: false,
        }
    }
}

fn read_config(file: &Path) -> Result<(String, Config)> {
    let (shown, text) = if file == Path::new("-") {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("cannot read the config from standard input")?;
        ("standard input".to_owned(), s)
    } else {
        let s = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read config file {}", file.display()))?;
        (file.display().to_string(), s)
    };
    let cfg =
        parse(&text).map_err(|e| anyhow!("invalid config {shown}: {}", e.to_string().replace('\n', " ")))?;
    Ok((shown, cfg))
}

/// What `tunnelctl apply` was asked (the command line's flags).
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The config file (YAML); `-` reads standard input.
    pub file: PathBuf,
    /// Print the plan only; change nothing.
    pub dry_run: bool,
    /// Also delete what the file does not name.
    pub prune: bool,
    /// Where to write the join tokens of new sites and clients, instead of printing them.
    pub tokens_dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    pub json: bool,
    /// New tokens can join only within this time.
    pub token_ttl: Option<std::time::Duration>,
    /// New tokens can be used for one join only.
    pub token_once: bool,
}

/// Runs `tunnelctl apply`.
pub async fn run(c: &mut admin::Client, a: &Options, out: &mut (dyn Write + Send)) -> Result<()> {
    let (shown, cfg) = read_config(&a.file)?;
    let mut req = cfg.to_request(a.prune, true);
    req.token_ttl_seconds = a.token_ttl.map(|d| d.as_secs()).unwrap_or(0);
    req.token_once = a.token_once;
    if let (Some(dir), false) = (&a.tokens_dir, a.dry_run) {
        prepare_tokens_dir(dir)?;
    }
    let planned = c.apply(req.clone()).await.map_err(admin::status)?.into_inner();
    let changes = planned.steps.iter().any(|s| s.action() != pb::PlanAction::Unchanged);
    if a.dry_run || !changes {
        if a.json {
            return print_json(out, &planned, a.dry_run, &[]);
        }
        print_steps(out, &planned.steps)?;
        writeln!(out, "plan: {}", summary(&planned.steps, false))?;
        if a.dry_run {
            writeln!(out, "dry run: nothing was changed")?;
        } else {
            writeln!(out, "no changes: the server already matches {shown}")?;
        }
        return Ok(());
    }
    if !a.json {
        print_steps(out, &planned.steps)?;
        writeln!(out, "plan: {}", summary(&planned.steps, false))?;
        out.flush()?;
    }
    req.dry_run = false;
    let applied = c.apply(req).await.map_err(admin::status)?.into_inner();
    if !a.json && applied.steps != planned.steps {
        writeln!(out, "note: the server changed between the plan and the apply; this is what was applied:")?;
        print_steps(out, &applied.steps)?;
    }
    let (saved, unsaved) = save_tokens(a.tokens_dir.as_deref(), &applied.tokens);
    if a.json {
        print_json(out, &applied, false, &saved)?;
    } else {
        writeln!(out, "applied: {}", summary(&applied.steps, true))?;
        if !saved.is_empty() {
            let files: Vec<String> = saved.iter().map(|(_, p)| p.display().to_string()).collect();
            writeln!(out, "join tokens written to {}", files.join(", "))?;
        }
    }
    let to_print: Vec<&pb::NewToken> = match (&a.tokens_dir, &unsaved) {
        (None, _) => applied.tokens.iter().collect(),
        (Some(_), Err((failed, _))) => failed.clone(),
        (Some(_), Ok(())) => vec![],
    };
    const WARNING: &str = "warning: these join tokens are secrets, shown this once; keep them safe \
                           (--tokens-dir DIR writes them to files)";
    if !to_print.is_empty() {
        if a.json {
            // They are in the document already (as `join_token`); stdout stays one JSON document.
            eprintln!("{WARNING}");
        } else {
            writeln!(out, "{WARNING}")?;
            let mut t = Table::new(&["KIND", "NAME", "JOIN TOKEN"]);
            for tok in &to_print {
                t.row(vec![kind_name(tok.kind).into(), tok.name.clone(), tok.join_token.clone()]);
            }
            t.write(out)?;
        }
    }
    if let Err((failed, e)) = unsaved {
        bail!(
            "the config was applied, but {} join token(s) could not be written ({e:#}); they are printed above",
            failed.len()
        );
    }
    Ok(())
}

/// Makes sure tokens can be written before anything is applied.
fn prepare_tokens_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(0o700);
        }
        b.create(dir).with_context(|| format!("cannot create the tokens dir {}", dir.display()))?;
    }
    let probe = dir.join(".tunnelctl-write-check");
    tunnel_node::state::write_private(&probe, b"")
        .with_context(|| format!("cannot write join tokens to {}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The file a node's join token goes to. Sites and clients have separate name spaces, so the kind is
/// part of the name.
pub fn token_file(dir: &Path, kind: i32, name: &str) -> PathBuf {
    dir.join(format!("{}-{name}.token", kind_name(kind)))
}

type Unsaved<'a> = std::result::Result<(), (Vec<&'a pb::NewToken>, anyhow::Error)>;

fn save_tokens<'a>(
    dir: Option<&Path>,
    tokens: &'a [pb::NewToken],
) -> (Vec<(&'a pb::NewToken, PathBuf)>, Unsaved<'a>) {
    let Some(dir) = dir else { return (vec![], Ok(())) };
    let mut saved = Vec::new();
    let mut failed = Vec::new();
    let mut first_error = None;
    for t in tokens {
        let path = token_file(dir, t.kind, &t.name);
        match tunnel_node::state::write_private(&path, format!("{}\n", t.join_token).as_bytes()) {
            Ok(()) => saved.push((t, path)),
            Err(e) => {
                first_error.get_or_insert(e);
                failed.push(t);
            }
        }
    }
    match first_error {
        None => (saved, Ok(())),
        Some(e) => (saved, Err((failed, e))),
    }
}

fn kind_name(k: i32) -> &'static str {
    match pb::NodeKind::try_from(k) {
        Ok(pb::NodeKind::Site) => "site",
        Ok(pb::NodeKind::Client) => "client",
        _ => "node",
    }
}

fn action_name(a: pb::PlanAction) -> &'static str {
    match a {
        pb::PlanAction::Create => "create",
        pb::PlanAction::Update => "update",
        pb::PlanAction::Delete => "delete",
        pb::PlanAction::Unchanged => "unchanged",
        pb::PlanAction::Unspecified => "?",
    }
}

fn plan_kind_name(k: pb::PlanKind) -> &'static str {
    match k {
        pb::PlanKind::Site => "site",
        pb::PlanKind::Client => "client",
        pb::PlanKind::Resource => "resource",
        pb::PlanKind::Grant => "grant",
        pb::PlanKind::Unspecified => "?",
    }
}

/// The steps worth a line: every change, and unchanged objects with something to say (those the
/// config does not name). Plain unchanged ones are only counted.
fn print_steps(out: &mut dyn Write, steps: &[pb::PlanStep]) -> Result<()> {
    let shown: Vec<&pb::PlanStep> =
        steps.iter().filter(|s| s.action() != pb::PlanAction::Unchanged || !s.detail.is_empty()).collect();
    if shown.is_empty() {
        return Ok(());
    }
    let mut t = Table::new(&["ACTION", "KIND", "NAME", "DETAIL"]);
    for s in shown {
        t.row(vec![
            action_name(s.action()).into(),
            plan_kind_name(s.kind()).into(),
            s.name.clone(),
            s.detail.clone(),
        ]);
    }
    t.write(out)
}

fn count(steps: &[pb::PlanStep], a: pb::PlanAction) -> usize {
    steps.iter().filter(|s| s.action() == a).count()
}

fn summary(steps: &[pb::PlanStep], done: bool) -> String {
    let (c, u, d) =
        if done { ("created", "updated", "deleted") } else { ("to create", "to update", "to delete") };
    format!(
        "{} {c}, {} {u}, {} {d}, {} unchanged",
        count(steps, pb::PlanAction::Create),
        count(steps, pb::PlanAction::Update),
        count(steps, pb::PlanAction::Delete),
        count(steps, pb::PlanAction::Unchanged)
    )
}

fn print_json(
    out: &mut dyn Write,
    r: &pb::ApplyReply,
    dry_run: bool,
    saved: &[(&pb::NewToken, PathBuf)],
) -> Result<()> {
    let steps: Vec<_> = r
        .steps
        .iter()
        .map(|s| {
            json!({"action": action_name(s.action()), "kind": plan_kind_name(s.kind()), "name": s.name,
                   "detail": s.detail})
        })
        .collect();
    let tokens: Vec<_> = r
        .tokens
        .iter()
        .map(|t| match saved.iter().find(|(s, _)| std::ptr::eq(*s, t)) {
            Some((_, path)) => {
                json!({"kind": kind_name(t.kind), "name": t.name, "file": path.display().to_string()})
            }
            None => json!({"kind": kind_name(t.kind), "name": t.name, "join_token": t.join_token}),
        })
        .collect();
    let v = json!({
        "dry_run": dry_run,
        "applied": r.applied && !dry_run,
        "summary": {
            "create": count(&r.steps, pb::PlanAction::Create),
            "update": count(&r.steps, pb::PlanAction::Update),
            "delete": count(&r.steps, pb::PlanAction::Delete),
            "unchanged": count(&r.steps, pb::PlanAction::Unchanged),
        },
        "steps": steps,
        "tokens": tokens,
    });
    writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
sites:
  - name: home
  - name: k8s
clients:
  - name: laptop
resources:
  - name: periphery
    site: home
    target: periphery:8120
    alias: periphery.private.example.com   # optional
  - name: prom
    site: k8s
    target: prometheus:9090
grants:
  - client: laptop
    resources: [periphery, prom]
"#;

    #[test]
    fn the_documented_example_parses_into_one_request() {
        let r = parse(EXAMPLE).unwrap().to_request(true, false);
        assert_eq!(r.sites.len(), 2);
        assert_eq!(r.resources[0].alias, "periphery.private.example.com");
        assert_eq!(r.resources[1].alias, "", "no alias");
        let grants: Vec<(&str, &str)> =
            r.grants.iter().map(|g| (g.client.as_str(), g.resource.as_str())).collect();
        assert_eq!(grants, vec![("laptop", "periphery"), ("laptop", "prom")]);
        assert!(r.prune && !r.dry_run);
    }

    #[test]
    fn shape_errors_are_one_line_with_a_location() {
        let cases = [
            ("sites:\n  - name: home\n    port: 1\n", "unknown field `port`"),
            ("site:\n  - name: home\n", "unknown field `site`"),
            ("resources:\n  - name: x\n    site: home\n", "missing field `target`"),
            ("grants:\n  - client: laptop\n    resources: periphery\n", "invalid type"),
            ("sites: [\n", "did not find expected"),
            ("", "the file is empty"),
            ("# only a comment\n", "the file is empty"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{e:?}");
        }
        let e = parse("sites:\n  - name: home\n    port: 1\n").unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");
        assert!(parse("sites: []\n").unwrap().sites.is_empty(), "an explicit empty config is fine");
    }

    #[test]
    fn token_files_carry_the_kind() {
        let d = Path::new("/t");
        assert_eq!(token_file(d, pb::NodeKind::Site as i32, "home"), Path::new("/t/site-home.token"));
        assert_eq!(token_file(d, pb::NodeKind::Client as i32, "home"), Path::new("/t/client-home.token"));
    }
}
