//! Pointing the system's resolver at the client's DNS listener, and putting it back.
//!
//! - `resolved`: per-link DNS server and routing domains (`~zone`, `~alias-parent`) on the TUN link,
//!   through `resolvectl`; systemd-resolved forgets them when the link goes away.
//! - `resolv-conf`: `/etc/resolv.conf` is rewritten *in place* (it may be a bind mount, so no rename),
//!   with a marker line; the original is kept in the state dir and written back on exit, and at the
//!   next start if the client crashed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Marks our edit of resolv.conf.
pub const MARKER: &str = "# managed by tunnelctl up";

/// How to configure the system resolver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DnsMode {
    /// systemd-resolved if it runs, else resolv.conf.
    Auto,
    /// systemd-resolved per-link configuration.
    Resolved,
    /// Rewrite /etc/resolv.conf (restored on exit).
    ResolvConf,
    /// Leave the system alone.
    Off,
}

/// What was changed, so it can be undone.
#[derive(Debug)]
pub enum Applied {
    Nothing,
    Resolved { link: String },
    ResolvConf { path: PathBuf, backup: PathBuf },
}

impl Applied {
    /// The `--dns-mode` this amounts to (`off`, `resolved`, `resolv-conf`), as `/status` shows it.
    pub fn mode_name(&self) -> &'static str {
        match self {
            Applied::Nothing => "off",
            Applied::Resolved { .. } => "resolved",
            Applied::ResolvConf { .. } => "resolv-conf",
        }
    }
}

/// Whether systemd-resolved is running here.
pub fn resolved_running() -> bool {
    Path::new("/run/systemd/resolve/io.systemd.Resolve").exists()
        && Command::new("resolvectl").arg("status").output().map(|o| o.status.success()).unwrap_or(false)
}

/// Puts back a resolv.conf left edited by a crashed client.
pub fn recover(resolv: &Path, backup: &Path) -> Result<()> {
    let current = std::fs::read_to_string(resolv).unwrap_or_default();
    // An empty file is what an interrupted rewrite can leave: ours to repair too. The backup is never
    // deleted here; the next `apply` replaces it with whatever the system has then.
    if (current.contains(MARKER) || current.trim().is_empty()) && backup.exists() {
        let orig = std::fs::read(backup).context("cannot read the saved resolv.conf")?;
        write_in_place(resolv, &orig)?;
        tracing::warn!(path = %resolv.display(), "restored resolv.conf left edited by an earlier run");
    } else if current.contains(MARKER) {
        bail!(
            "{} was edited by another `tunnelctl up` (it carries the marker), and {} holds no saved original: \
             stop the other client, or restore the file by hand",
            resolv.display(),
            backup.display()
        );
    }
    Ok(())
}

/// Rewrites a file in place (it may be a bind mount, so no rename): write over the old bytes first and
/// cut the length after, so an interruption never leaves the file empty.
fn write_in_place(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::{Seek, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.seek(std::io::SeekFrom::Start(0))?;
    f.write_all(contents)?;
    f.set_len(contents.len() as u64)?;
    f.sync_all()?;
    Ok(())
}

/// The resolv.conf text pointing at `ns`, keeping the original's search and options lines.
pub fn rewritten(original: &str, ns: std::net::Ipv4Addr) -> String {
    let mut out = format!("{MARKER}; the original is restored when it exits\nnameserver {ns}\n");
    for l in original.lines() {
        let t = l.trim_start();
        if t.starts_with("search") || t.starts_with("domain") || t.starts_with("options") {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// Configures the resolver.
pub fn apply(
    mode: DnsMode,
    link: &str,
    ns: std::net::Ipv4Addr,
    domains: &[String],
    resolv: &Path,
    backup: &Path,
) -> Result<Applied> {
    let mode = match mode {
        DnsMode::Auto if resolved_running() => DnsMode::Resolved,
        DnsMode::Auto => DnsMode::ResolvConf,
        m => m,
    };
    match mode {
        DnsMode::Off | DnsMode::Auto => Ok(Applied::Nothing),
        DnsMode::Resolved => {
            run("resolvectl", &["dns", link, &ns.to_string()])?;
            let mut args = vec!["domain".to_string(), link.to_string()];
            args.extend(domains.iter().map(|d| format!("~{d}")));
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            run("resolvectl", &refs)?;
            Ok(Applied::Resolved { link: link.into() })
        }
        DnsMode::ResolvConf => {
            let original =
                std::fs::read(resolv).with_context(|| format!("cannot read {}", resolv.display()))?;
            let text = String::from_utf8_lossy(&original);
            if !text.contains(MARKER) {
                crate::up::write_private_file(backup, &original)?;
            }
            write_in_place(resolv, rewritten(&text, ns).as_bytes())?;
            Ok(Applied::ResolvConf { path: resolv.to_owned(), backup: backup.to_owned() })
        }
    }
}

/// Keeps resolved's routing domains in step with the map.
pub fn update_domains(applied: &Applied, domains: &[String]) -> Result<()> {
    if let Applied::Resolved { link } = applied {
        let mut args = vec!["domain".to_string(), link.clone()];
        args.extend(domains.iter().map(|d| format!("~{d}")));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run("resolvectl", &refs)?;
    }
    Ok(())
}

/// Undoes what [`apply`] did.
pub fn undo(applied: &Applied) -> Result<()> {
    match applied {
        Applied::Nothing => Ok(()),
        Applied::Resolved { link } => run("resolvectl", &["revert", link]),
        Applied::ResolvConf { path, backup } => {
            // Put the original back only over our own edit: if something else (dhclient,
            // NetworkManager, an operator) rewrote the file since, its version is newer than ours.
            let current = std::fs::read_to_string(path).unwrap_or_default();
            if current.contains(MARKER) || current.trim().is_empty() {
                let orig = std::fs::read(backup).context("cannot read the saved resolv.conf")?;
                write_in_place(path, &orig)?;
            } else {
                tracing::warn!(
                    path = %path.display(),
                    "resolv.conf was rewritten by something else while the client ran; leaving that version"
                );
            }
            let _ = std::fs::remove_file(backup);
            Ok(())
        }
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("cannot run {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_keeps_search_and_options_and_recovery_restores() {
        let orig = "nameserver 192.0.2.53\nsearch corp.example\noptions ndots:2\n";
        let new = rewritten(orig, "100.96.0.2".parse().unwrap());
        assert!(new.starts_with(MARKER));
        assert!(new.contains("nameserver 100.96.0.2\n") && !new.contains("192.0.2.53"));
        assert!(new.contains("search corp.example") && new.contains("options ndots:2"));
        let dir = tempfile::tempdir().unwrap();
        let (resolv, backup) = (dir.path().join("resolv.conf"), dir.path().join("resolv.conf.orig"));
        std::fs::write(&resolv, orig).unwrap();
        let applied =
            apply(DnsMode::ResolvConf, "tun0", "100.96.0.2".parse().unwrap(), &[], &resolv, &backup).unwrap();
        assert!(std::fs::read_to_string(&resolv).unwrap().contains(MARKER));
        // A crash: the next start puts the original back.
        recover(&resolv, &backup).unwrap();
        assert_eq!(std::fs::read_to_string(&resolv).unwrap(), orig);
        let _ = applied;
        let applied =
            apply(DnsMode::ResolvConf, "tun0", "100.96.0.2".parse().unwrap(), &[], &resolv, &backup).unwrap();
        undo(&applied).unwrap();
        assert_eq!(std::fs::read_to_string(&resolv).unwrap(), orig);
        assert!(!backup.exists());
        // Rewritten by something else (a DHCP client) while the client ran: that version stays.
        let applied =
            apply(DnsMode::ResolvConf, "tun0", "100.96.0.2".parse().unwrap(), &[], &resolv, &backup).unwrap();
        std::fs::write(&resolv, "nameserver 192.0.2.99\n").unwrap();
        undo(&applied).unwrap();
        assert_eq!(std::fs::read_to_string(&resolv).unwrap(), "nameserver 192.0.2.99\n");
        assert!(!backup.exists());
    }
}
