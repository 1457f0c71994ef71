//! What a node keeps on disk (`--state-dir`): its session ticket and its last network map, so it can
//! start and keep serving while the server is down. Secret files are written 0600 and replaced
//! atomically, so a crash mid-write never leaves a half file.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tunnel_core::map::NetworkMap;

/// A node's state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating, mode 0700) the state directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<StateDir> {
        let dir = dir.into();
        fs::create_dir_all(&dir).with_context(|| format!("cannot create state dir {}", dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o700));
        }
        Ok(StateDir { dir })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The cached map, if one is there and readable.
    pub fn load_map(&self) -> Option<NetworkMap> {
        let text = fs::read_to_string(self.dir.join("map.json")).ok()?;
        match serde_json::from_str(&text) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an unreadable cached map");
                None
            }
        }
    }

    /// Caches the map.
    pub fn save_map(&self, map: &NetworkMap) -> Result<()> {
        write_private(&self.dir.join("map.json"), serde_json::to_string_pretty(map)?.as_bytes())
    }

    /// The saved session ticket.
    pub fn load_ticket(&self) -> Option<Vec<u8>> {
        fs::read(self.dir.join("session.ticket")).ok().filter(|t| !t.is_empty())
    }

    /// Saves the session ticket.
    pub fn save_ticket(&self, ticket: &[u8]) -> Result<()> {
        write_private(&self.dir.join("session.ticket"), ticket)
    }
}

/// Writes a file readable by its owner only, replacing it atomically.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(contents).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("cannot write {}", tmp.display()))?;
    }
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

impl StateDir {
    /// The node's WireGuard private key, made on first use and kept 0600. It never leaves this disk.
    pub fn private_key(&self) -> Result<[u8; 32]> {
        use base64::Engine as _;
        if let Some(key) = self.load_private_key()? {
            return Ok(key);
        }
        let path = self.dir.join("private.key");
        let mut key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
        write_private(&path, base64::engine::general_purpose::STANDARD.encode(key).as_bytes())?;
        Ok(key)
    }

    /// The node's private key if one was made already (never makes one).
    pub fn load_private_key(&self) -> Result<Option<[u8; 32]>> {
        use base64::Engine as _;
        let path = self.dir.join("private.key");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .with_context(|| format!("{} is damaged", path.display()))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("{} is damaged (expected 32 bytes)", path.display()))?;
        Ok(Some(key))
    }

    /// Records where this node's status listener is, for `tunnelctl status`.
    pub fn save_status_addr(&self, addr: std::net::SocketAddr) -> Result<()> {
        write_private(&self.dir.join("status.addr"), addr.to_string().as_bytes())
    }

    /// Where this node's status listener is.
    pub fn status_addr(&self) -> Option<std::net::SocketAddr> {
        fs::read_to_string(self.dir.join("status.addr")).ok()?.trim().parse().ok()
    }
}
