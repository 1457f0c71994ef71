//! The server's own secrets, kept in `--data-dir`: the TLS key (whose pin every token carries), the admin
//! secret, and the key that signs session tickets. Made on first start, read on every later one.
//!
//! Only the key is kept, not the certificate: a fresh self-signed certificate is made from it at every
//! start, so certificates never expire under anyone and the pin stays the same.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::RngCore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tunnel_core::{AdminToken, KeyPin, Secret};

/// The server's keys and secrets.
pub struct Identity {
    /// DER of a self-signed certificate for the TLS key.
    pub cert_der: CertificateDer<'static>,
    /// PKCS#8 DER of the TLS key.
    key_der: Vec<u8>,
    /// SHA-256 of the TLS key's SubjectPublicKeyInfo.
    pub pin: KeyPin,
    /// The admin secret.
    pub admin_secret: Secret,
    /// Key for session-ticket MACs.
    pub ticket_key: [u8; 32],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("pin", &self.pin).finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads the identity from `dir`, making whatever is missing.
    pub fn load_or_create(dir: &Path, cert_name: &str) -> Result<Identity> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create data dir {}", dir.display()))?;
        let key_path = dir.join("tls.key");
        let key_pair = match read_key_file(&key_path)? {
            Some(pem) => {
                let pem = String::from_utf8(pem)
                    .map_err(|_| anyhow::anyhow!("TLS key {} is damaged", key_path.display()))?;
                parse_tls_key(&pem).with_context(|| format!("TLS key {} is damaged", key_path.display()))?
            }
            None => {
                let kp = rcgen::KeyPair::generate().context("cannot generate the TLS key")?;
                write_secret_file(&key_path, kp.serialize_pem().as_bytes())?;
                kp
            }
        };
        let pin = KeyPin::of_spki(&key_pair.public_key_der());
        let mut params = rcgen::CertificateParams::new(vec![cert_name.to_owned()])
            .context("cannot build the TLS certificate")?;
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = params.self_signed(&key_pair).context("cannot sign the TLS certificate")?;

        let admin_path = dir.join("admin.secret");
        let admin_secret = match read_key_file(&admin_path)? {
            Some(s) => Secret::new(String::from_utf8_lossy(&s).trim()),
            None => {
                let mut b = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut b);
                let s = Secret::from_random(b);
                write_secret_file(&admin_path, s.expose().as_bytes())?;
                s
            }
        };

        let ticket_path = dir.join("ticket.key");
        let ticket_key = match read_key_file(&ticket_path)? {
            Some(b) if b.len() == 32 => b.try_into().unwrap_or([0; 32]),
            Some(_) => anyhow::bail!("{} is damaged (expected 32 bytes)", ticket_path.display()),
            None => {
                let mut b = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut b);
                write_secret_file(&ticket_path, &b)?;
                b
            }
        };

        Ok(Identity {
            cert_der: cert.der().clone(),
            key_der: key_pair.serialize_der(),
            pin,
            admin_secret,
            ticket_key,
        })
    }

    /// The TLS private key.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Writes `DIR/admin.token` for `server` (`HOST:PORT`) and returns the token.
    pub fn write_admin_token(&self, dir: &Path, server: &str) -> Result<AdminToken> {
        let token =
            AdminToken { server: server.to_owned(), secret: self.admin_secret.clone(), pin: self.pin };
        write_secret_file(&admin_token_path(dir), format!("{}\n", token.encode()).as_bytes())?;
        Ok(token)
    }
}

/// Reads a PEM TLS key as the server keeps it in `DATA_DIR/tls.key`.
pub fn parse_tls_key(pem: &str) -> Result<rcgen::KeyPair> {
    Ok(rcgen::KeyPair::from_pem(pem)?)
}

/// The pin (SHA-256 of the SubjectPublicKeyInfo) of a PEM TLS key: what every token carries.
pub fn pin_of_tls_key(pem: &str) -> Result<KeyPin> {
    Ok(KeyPin::of_spki(&parse_tls_key(pem)?.public_key_der()))
}

/// `DATA_DIR/server.lock`, held while a server runs on the data dir (and while a restore writes into
/// it), so neither can pull files from under the other. It is an advisory `flock`: the kernel drops it
/// when the process ends, so a crashed server leaves no stale lock behind. The file holds the pid of the
/// holder, for the error message of whoever finds it taken.
#[derive(Debug)]
pub struct DataDirLock {
    _file: fs::File,
}

/// The lock file's name inside the data dir.
pub const LOCK_FILE: &str = "server.lock";

impl DataDirLock {
    /// Takes the lock, creating the data dir and the file if needed. `Ok(Err(holder))` when someone
    /// else holds it; `holder` is what the file says about them (a pid), possibly empty.
    pub fn acquire(dir: &Path) -> Result<std::result::Result<DataDirLock, String>> {
        create_private_dir(dir)?;
        let path = dir.join(LOCK_FILE);
        let mut opts = fs::OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts.open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        #[cfg(unix)]
        {
            use rustix::fs::{flock, FlockOperation};
            if let Err(e) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
                if e == rustix::io::Errno::WOULDBLOCK {
                    let holder = fs::read_to_string(&path).unwrap_or_default().trim().to_owned();
                    return Ok(Err(holder));
                }
                return Err(std::io::Error::from(e))
                    .with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        // Only the holder writes: a reader that finds the lock taken sees the holder's pid.
        let _ = file.set_len(0).and_then(|()| writeln!(file, "pid {}", std::process::id()));
        Ok(Ok(DataDirLock { _file: file }))
    }
}

/// Creates `dir` (and its parents) if missing; a dir this makes is private to its owner (0700).
pub fn create_private_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).with_context(|| format!("cannot create data dir {}", dir.display()))
}

/// Where the admin token is written.
pub fn admin_token_path(dir: &Path) -> PathBuf {
    dir.join("admin.token")
}

/// Writes a file readable by its owner only, replacing it atomically.
/// The contents of a key file, or `None` when it does not exist (and only then: any other error is a
/// refusal to start, because making a new key over one that could not be read would void every token
/// and ticket the server ever issued).
pub fn read_key_file(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!(
            "cannot read {}: {e}; not starting, since a new key would invalidate every token (fix the file's permissions or restore it)",
            path.display()
        )),
    }
}

pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path(), "localhost").unwrap();
        let b = Identity::load_or_create(dir.path(), "other-name").unwrap();
        assert_eq!(a.pin, b.pin, "the pin survives a restart, even with a new certificate name");
        assert_eq!(a.admin_secret, b.admin_secret);
        assert_eq!(a.ticket_key, b.ticket_key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join("tls.key")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let c = Identity::load_or_create(tempfile::tempdir().unwrap().path(), "localhost").unwrap();
        assert_ne!(a.pin, c.pin);
        assert_eq!(pin_of_tls_key(&fs::read_to_string(dir.path().join("tls.key")).unwrap()).unwrap(), a.pin);
    }

    #[test]
    fn a_key_that_cannot_be_read_stops_the_start_instead_of_being_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path(), "localhost").unwrap();
        // Any read error other than "not found" (here: EISDIR; on a real server EIO, EACCES).
        let ticket = dir.path().join("ticket.key");
        fs::remove_file(&ticket).unwrap();
        fs::create_dir(&ticket).unwrap();
        fs::write(ticket.join("x"), b"x").unwrap();
        let e = Identity::load_or_create(dir.path(), "localhost").unwrap_err().to_string();
        assert!(e.contains("cannot read") && e.contains("not starting"), "{e}");
        assert!(ticket.join("x").exists() && ticket.is_dir(), "nothing was replaced");
        let _ = a;
        let relay_dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(relay_dir.path().join("capability.key").join("x")).unwrap();
        let e = crate::relay::RelayKeys::load_or_create(relay_dir.path()).unwrap_err().to_string();
        assert!(e.contains("cannot read") && e.contains("not starting"), "{e}");
    }

    #[test]
    fn one_holder_of_the_data_dir_lock_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = DataDirLock::acquire(&data).unwrap().unwrap();
        let holder = DataDirLock::acquire(&data).unwrap().unwrap_err();
        assert_eq!(holder, format!("pid {}", std::process::id()));
        drop(first);
        DataDirLock::acquire(&data).unwrap().unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
        }
    }
}
