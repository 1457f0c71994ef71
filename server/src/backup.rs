//! Backups of a server's data dir: `tunnel-server backup` and `tunnel-server restore`.
//!
//! A backup is one gzip-compressed tar file (mode 0600: it holds every secret of the server):
//! - `manifest.json` first: format version, server version, creation time, the TLS key's pin, the
//!   database kind, and the size and SHA-256 of every other entry, so a restore tells a damaged or
//!   truncated file from a good one before it touches the data dir;
//! - the key files of the data dir ([`KEY_FILES`]): with them a restored server has the same pin, admin
//!   secret, ticket key and capability key, so every join token, admin token, session ticket and relay
//!   bundle issued before stays valid;
//! - `tunnel.db`, for SQLite: a consistent snapshot taken with `VACUUM INTO` on a connection of its own.
//!   It reads one transaction's view of the database while the server goes on writing (in WAL mode a
//!   reader and the writer run side by side), so the server needs no pause. With PostgreSQL the
//!   database is not in the file: back it up with `pg_dump` beside it.
//!
//! Both ends are atomic. The backup is written to a temporary file beside FILE and renamed over FILE
//! only when complete and synced; on any failure the temporary file and the snapshot are removed. A
//! restore unpacks into a staging dir inside the data dir, checks sizes, checksums, keys and the
//! database, and only then moves the files into place, holding the data dir's lock throughout so no
//! server starts on a half-restored dir.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, Row};

use crate::identity::{self, DataDirLock, Identity};

/// What `manifest.json` says the file is.
pub const FORMAT: &str = "tunnel-server-backup";
/// The manifest format this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's name in the archive; always the first entry.
pub const MANIFEST: &str = "manifest.json";
/// The SQLite database's name in the archive and in a restored data dir.
pub const DB_FILE: &str = "tunnel.db";
/// The key files of a data dir, and whether a data dir must have them. The TLS key, admin secret and
/// ticket key are the server's identity (made at first start); the relay keys are there too on any
/// server of this version, and `admin.token` is rewritten at every start.
pub const KEY_FILES: &[(&str, bool)] = &[
    ("tls.key", true),
    ("admin.secret", true),
    ("ticket.key", true),
    ("capability.key", false),
    ("relay.bundle", false),
    ("admin.token", false),
];

/// Large enough for any manifest; a bigger first entry is not ours.
const MANIFEST_MAX: u64 = 64 * 1024;

/// Which database the backed-up server used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseKind {
    /// A SQLite file: its snapshot is in the backup.
    Sqlite,
    /// PostgreSQL: not in the backup (pg_dump does that).
    Postgres,
}

impl DatabaseKind {
    /// The kind of a `--database` URL (`None`: the default SQLite file).
    pub fn of(url: Option<&str>) -> Result<DatabaseKind> {
        match url {
            None => Ok(DatabaseKind::Sqlite),
            Some(u) if u.starts_with("sqlite:") => Ok(DatabaseKind::Sqlite),
            Some(u) if u.starts_with("postgres:") || u.starts_with("postgresql:") => {
                Ok(DatabaseKind::Postgres)
            }
            Some(_) => bail!("the database URL must start with sqlite:// or postgres://"),
        }
    }
}

/// One file in the backup besides the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    /// Hex SHA-256 of the contents.
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    pub format_version: u32,
    /// The `tunnel-server` version that made the backup.
    pub server_version: String,
    pub created_ms: i64,
    /// The same instant, RFC 3339 (for people reading the manifest).
    pub created: String,
    /// The pin of the TLS key: every token issued by this server carries it.
    pub pin: String,
    pub database: DatabaseKind,
    /// Whether `tunnel.db` is in the file (SQLite only).
    pub database_included: bool,
    /// Every other entry, in archive order.
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// Checks that a manifest read from a file describes a backup this build can restore.
    fn validate(&self) -> Result<()> {
        ensure!(self.format == FORMAT, "its manifest says it is a '{}', not a {FORMAT}", self.format);
        ensure!(
            self.format_version <= FORMAT_VERSION,
            "it was made by tunnel-server {} in backup format {}; this tunnel-server reads format {FORMAT_VERSION} \
             and older: restore it with that version or newer",
            self.server_version,
            self.format_version
        );
        let mut names = BTreeSet::new();
        for f in &self.files {
            ensure!(
                KEY_FILES.iter().any(|(k, _)| *k == f.name) || f.name == DB_FILE,
                "its manifest lists an unexpected file '{}'",
                f.name
            );
            ensure!(names.insert(f.name.as_str()), "its manifest lists '{}' twice", f.name);
        }
        for (k, required) in KEY_FILES {
            ensure!(!required || names.contains(k), "it has no {k}");
        }
        ensure!(
            self.database_included == names.contains(DB_FILE),
            "its manifest and its file list disagree about the database"
        );
        ensure!(
            !self.database_included || self.database == DatabaseKind::Sqlite,
            "its manifest says the database is not SQLite but includes one"
        );
        Ok(())
    }
}

/// Row counts of a database, as a check that it holds what it should (and for people).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DbCounts {
    pub sites: i64,
    pub clients: i64,
    pub resources: i64,
    pub grants: i64,
}

impl std::fmt::Display for DbCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} sites, {} clients, {} resources, {} grants",
            self.sites, self.clients, self.resources, self.grants
        )
    }
}

/// What `backup` needs.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    /// The server's `--data-dir`.
    pub data_dir: PathBuf,
    /// The server's `--database`, if it has one.
    pub database: Option<String>,
    /// The file to write.
    pub to: PathBuf,
}

/// What a backup wrote.
#[derive(Clone, Debug)]
pub struct BackupReport {
    pub path: PathBuf,
    /// The file's size.
    pub bytes: u64,
    pub manifest: Manifest,
    /// Row counts of the snapshot (SQLite only).
    pub counts: Option<DbCounts>,
}

/// Writes a backup of a data dir (and its SQLite database) to `opts.to`, while a server may be running
/// on it. Nothing is left at `opts.to`, nor beside it, unless the whole backup succeeded.
pub async fn backup(opts: &BackupOptions) -> Result<BackupReport> {
    backup_to(opts).await.map_err(one_line)
}

async fn backup_to(opts: &BackupOptions) -> Result<BackupReport> {
    let target = opts.to.clone();
    match fs::metadata(&target) {
        Ok(m) if m.is_dir() => bail!(
            "{} is a directory: give the backup file's name, e.g. {}",
            target.display(),
            target.join("tunnel-backup.tar.gz").display()
        ),
        Ok(m) if !m.is_file() => {
            bail!("{} exists and is not a regular file: not replacing it", target.display())
        }
        _ => {}
    }
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        bail!("cannot write backup {}: directory {} does not exist", target.display(), parent.display());
    }
    let kind = DatabaseKind::of(opts.database.as_deref())?;
    let keys = read_key_files(&opts.data_dir)?;
    let tls_key = keys.iter().find(|(n, _)| *n == "tls.key").map(|(_, b)| b.as_slice()).unwrap_or_default();
    let pin = identity::pin_of_tls_key(std::str::from_utf8(tls_key).unwrap_or_default())
        .with_context(|| format!("{} is damaged", opts.data_dir.join("tls.key").display()))?;

    let created = SystemTime::now();
    // The snapshot goes beside the backup file (the filesystem that must hold the backup anyway), in a
    // private temporary dir removed whatever happens.
    let scratch = tempfile::Builder::new()
        .prefix(".tunnel-backup-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot write backup {}", target.display()))?;
    let (db, counts) = match kind {
        DatabaseKind::Sqlite => {
            let source = sqlite_source(opts.database.as_deref(), &opts.data_dir)?;
            let path = scratch.path().join(DB_FILE);
            snapshot_sqlite(&source, &path).await?;
            let counts = check_database(&path).await.context("the database snapshot failed its check")?;
            (Some(path), Some(counts))
        }
        DatabaseKind::Postgres => (None, None),
    };

    let mut files: Vec<FileEntry> = keys
        .iter()
        .map(|(name, b)| FileEntry { name: (*name).into(), size: b.len() as u64, sha256: sha256_hex(b) })
        .collect();
    if let Some(path) = &db {
        let (size, sha256) = hash_file(path).context("cannot read the database snapshot")?;
        files.push(FileEntry { name: DB_FILE.into(), size, sha256 });
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        server_version: crate::VERSION.into(),
        created_ms: created.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64),
        created: humantime::format_rfc3339_seconds(created).to_string(),
        pin: pin.to_string(),
        database: kind,
        database_included: db.is_some(),
        files,
    };
    let m = manifest.clone();
    let bytes =
        tokio::task::spawn_blocking(move || write_archive(&target, &parent, &m, &keys, db.as_deref()))
            .await
            .context("the backup task failed")??;
    drop(scratch);
    Ok(BackupReport { path: opts.to.clone(), bytes, manifest, counts })
}

/// The key files present in `dir`, in [`KEY_FILES`] order; an error if a required one is missing.
fn read_key_files(dir: &Path) -> Result<Vec<(&'static str, Vec<u8>)>> {
    if !dir.is_dir() {
        bail!("data dir {} does not exist", dir.display());
    }
    let mut out = Vec::new();
    for (name, required) in KEY_FILES {
        let path = dir.join(name);
        match fs::read(&path) {
            Ok(b) => out.push((*name, b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !required => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
                "{} holds no tunnel-server identity ({name} is missing): is it the server's --data-dir?",
                dir.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
    Ok(out)
}

/// How to reach the live SQLite database: the server's own URL, or `DATA_DIR/tunnel.db`.
fn sqlite_source(url: Option<&str>, data_dir: &Path) -> Result<SqliteConnectOptions> {
    let opts = match url {
        Some(u) => SqliteConnectOptions::from_str(u).context("the --database URL is not a SQLite URL")?,
        None => {
            let path = data_dir.join(DB_FILE);
            if !path.is_file() {
                bail!(
                    "{} does not exist: has tunnel-server run with this data dir? (with PostgreSQL, pass --database)",
                    path.display()
                );
            }
            SqliteConnectOptions::new().filename(path)
        }
    };
    // Never create a database, and leave the live one's journal mode and settings as the server set them.
    Ok(opts.create_if_missing(false).busy_timeout(Duration::from_secs(10)))
}

/// `VACUUM INTO`: one read transaction copies the whole database into a new file, a consistent
/// snapshot however much the server writes meanwhile.
async fn snapshot_sqlite(source: &SqliteConnectOptions, to: &Path) -> Result<()> {
    let name = source.get_filename().display().to_string();
    // sqlx's errors repeat their cause in their message: keep the message only.
    let flat = |e: sqlx::Error| anyhow::anyhow!("{e}");
    let mut conn =
        source.connect().await.map_err(flat).with_context(|| format!("cannot open the database {name}"))?;
    let to_str = to.to_str().context("the backup's directory name is not UTF-8")?;
    let result = sqlx::query("VACUUM INTO ?").bind(to_str).execute(&mut conn).await;
    let _ = conn.close().await;
    result.map_err(flat).with_context(|| {
        format!("cannot snapshot the database {name} into {}", to.parent().unwrap_or(to).display())
    })?;
    Ok(())
}

/// Opens a copied database file (never a live one), checks it, and counts what it holds. Also leaves
/// it in rollback-journal mode, so it is one self-contained file.
async fn check_database(path: &Path) -> Result<DbCounts> {
    let opts = SqliteConnectOptions::new().filename(path).create_if_missing(false);
    let mut conn = opts.connect().await.context("cannot open it")?;
    let result = async {
        sqlx::query("PRAGMA journal_mode = DELETE").execute(&mut conn).await?;
        let integrity: String = sqlx::query("PRAGMA integrity_check").fetch_one(&mut conn).await?.try_get(0)?;
        ensure!(integrity == "ok", "SQLite integrity check: {integrity}");
        let dangling = sqlx::query("PRAGMA foreign_key_check").fetch_all(&mut conn).await?;
        ensure!(dangling.is_empty(), "{} rows point at rows that do not exist", dangling.len());
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM nodes WHERE kind = 'site'), (SELECT COUNT(*) FROM nodes WHERE kind = 'client'), \
             (SELECT COUNT(*) FROM resources), (SELECT COUNT(*) FROM grants)",
        )
        .fetch_one(&mut conn)
        .await?;
        Ok(DbCounts { sites: row.try_get(0)?, clients: row.try_get(1)?, resources: row.try_get(2)?, grants: row.try_get(3)? })
    }
    .await;
    let _ = conn.close().await;
    result
}

/// Packs everything into a temporary file beside `target`, syncs it, and renames it over `target`.
/// Returns the file's size.
fn write_archive(
    target: &Path,
    parent: &Path,
    manifest: &Manifest,
    keys: &[(&str, Vec<u8>)],
    db: Option<&Path>,
) -> Result<u64> {
    let cannot = || format!("cannot write backup {}", target.display());
    // Made 0600 by tempfile; removed when dropped unless persisted.
    let tmp = tempfile::Builder::new()
        .prefix(".tunnel-backup-")
        .suffix(".tmp")
        .tempfile_in(parent)
        .with_context(cannot)?;
    let mtime = (manifest.created_ms / 1000).max(0) as u64;
    let header = |size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(size);
        h.set_mode(0o600);
        h.set_mtime(mtime);
        h
    };
    let gz = GzEncoder::new(BufWriter::new(tmp.as_file()), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let json = serde_json::to_vec_pretty(manifest).context("cannot encode the manifest")?;
    tar.append_data(&mut header(json.len() as u64), MANIFEST, json.as_slice()).with_context(cannot)?;
    for (name, bytes) in keys {
        tar.append_data(&mut header(bytes.len() as u64), name, bytes.as_slice()).with_context(cannot)?;
    }
    if let Some(path) = db {
        let entry =
            manifest.files.iter().find(|f| f.name == DB_FILE).context("no database in the manifest")?;
        let f = fs::File::open(path).context("cannot read the database snapshot")?;
        // The snapshot is ours alone, so it cannot change between hashing and packing; `take` keeps the
        // entry exactly the size the header says.
        tar.append_data(&mut header(entry.size), DB_FILE, BufReader::new(f).take(entry.size))
            .with_context(cannot)?;
    }
    let gz = tar.into_inner().with_context(cannot)?;
    let buf = gz.finish().with_context(cannot)?;
    let file = buf.into_inner().map_err(|e| e.into_error()).with_context(cannot)?;
    file.sync_all().with_context(cannot)?;
    let bytes = file.metadata().with_context(cannot)?.len();
    tmp.persist(target).map_err(|e| e.error).with_context(cannot)?;
    sync_dir(parent);
    Ok(bytes)
}

/// What `restore` needs.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// The backup file.
    pub from: PathBuf,
    /// The data dir to restore into.
    pub data_dir: PathBuf,
    /// Restore into a data dir that already has files (those in the backup are replaced).
    pub force: bool,
}

/// What a restore put in place.
#[derive(Clone, Debug)]
pub struct RestoreReport {
    pub data_dir: PathBuf,
    pub manifest: Manifest,
    /// The files written into the data dir.
    pub files: Vec<String>,
    /// Row counts of the restored database (SQLite only).
    pub counts: Option<DbCounts>,
}

/// Restores a backup into `opts.data_dir`: an empty (or missing) dir, or with `force` one whose server
/// is stopped. The data dir is not touched unless the whole file checks out (a dir this made is removed
/// again if the restore fails).
pub async fn restore(opts: &RestoreOptions) -> Result<RestoreReport> {
    let created = !opts.data_dir.exists();
    let result = restore_into(opts).await;
    if result.is_err() && created {
        let _ = fs::remove_dir_all(&opts.data_dir);
    }
    result.map_err(one_line)
}

/// The error with its causes on one line, control characters escaped: a damaged tar header ends up in
/// the message as raw bytes, newlines included.
fn one_line(e: anyhow::Error) -> anyhow::Error {
    let text: String = format!("{e:#}")
        .chars()
        .flat_map(|c| if c.is_control() { c.escape_default().collect() } else { vec![c] })
        .collect();
    anyhow::Error::msg(text)
}

async fn restore_into(opts: &RestoreOptions) -> Result<RestoreReport> {
    let dir = &opts.data_dir;
    if !opts.from.is_file() {
        match fs::metadata(&opts.from) {
            Err(e) => return Err(e).with_context(|| format!("cannot read backup {}", opts.from.display())),
            Ok(_) => bail!("{} is not a file", opts.from.display()),
        }
    }
    if dir.exists() {
        ensure!(dir.is_dir(), "{} exists and is not a directory", dir.display());
        let mut present: Vec<String> = fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != identity::LOCK_FILE)
            .collect();
        present.sort();
        if !present.is_empty() && !opts.force {
            bail!(
                "{} is not empty ({}): restore into an empty data dir, or pass --force to replace the files the \
                 backup holds",
                dir.display(),
                present.join(", ")
            );
        }
    }
    let _lock = match DataDirLock::acquire(dir)? {
        Ok(lock) => lock,
        Err(holder) => bail!(
            "a tunnel-server ({}) is running on {}: stop it before restoring",
            if holder.is_empty() { "or another restore" } else { holder.as_str() },
            dir.display()
        ),
    };
    let staging = tempfile::Builder::new()
        .prefix(".restore-")
        .tempdir_in(dir)
        .with_context(|| format!("cannot write into {}", dir.display()))?;
    let from = opts.from.clone();
    let stage = staging.path().to_owned();
    let manifest = tokio::task::spawn_blocking(move || unpack(&from, &stage))
        .await
        .context("the restore task failed")?
        .with_context(|| format!("{} is not a usable backup", opts.from.display()))?;
    let damaged = || format!("{} is damaged", opts.from.display());
    check_keys(staging.path(), &manifest).with_context(damaged)?;
    let counts = if manifest.database_included {
        Some(check_database(&staging.path().join(DB_FILE)).await.with_context(damaged)?)
    } else {
        None
    };

    // Everything checks out: move it into place. A database's old journal and WAL must go first, or
    // SQLite would replay them into the restored file.
    if manifest.database_included {
        for side in ["-wal", "-shm", "-journal"] {
            let p = dir.join(format!("{DB_FILE}{side}"));
            match fs::remove_file(&p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("cannot remove {}", p.display()))
                }
                _ => {}
            }
        }
    }
    let mut files = Vec::new();
    for f in &manifest.files {
        let to = dir.join(&f.name);
        fs::rename(staging.path().join(&f.name), &to)
            .with_context(|| format!("cannot write {}", to.display()))?;
        files.push(f.name.clone());
    }
    sync_dir(dir);
    Ok(RestoreReport { data_dir: dir.clone(), manifest, files, counts })
}

/// Reads the archive into `staging`, checking every entry against the manifest. Returns the manifest.
fn unpack(from: &Path, staging: &Path) -> Result<Manifest> {
    let file = fs::File::open(from).with_context(|| format!("cannot read backup {}", from.display()))?;
    let mut archive = tar::Archive::new(GzDecoder::new(BufReader::new(file)));
    let manifest = {
        let mut entries = archive.entries().context("it is not a gzip-compressed tar file")?;
        let mut first = entries
            .next()
            .context("it is empty")?
            .context("it is not a tunnel-server backup (not a gzip-compressed tar file, or cut short)")?;
        let name = entry_name(&first)?;
        ensure!(
            name == MANIFEST,
            "it is not a tunnel-server backup (its first entry is '{name}', not {MANIFEST})"
        );
        ensure!(first.size() <= MANIFEST_MAX, "it is not a tunnel-server backup (its manifest is too large)");
        let mut json = Vec::new();
        first.read_to_end(&mut json).context("its manifest is cut short")?;
        let manifest: Manifest = serde_json::from_slice(&json).context("its manifest is not valid")?;
        manifest.validate()?;

        let mut seen = BTreeSet::new();
        for entry in entries {
            let mut entry = entry.context("it is damaged or cut short")?;
            let name = entry_name(&entry)?;
            let want = manifest
                .files
                .iter()
                .find(|f| f.name == name)
                .with_context(|| format!("it holds '{name}', which its manifest does not list"))?;
            ensure!(seen.insert(name.clone()), "it holds '{name}' twice");
            ensure!(
                entry.size() == want.size,
                "{name} is {} bytes, its manifest says {}",
                entry.size(),
                want.size
            );
            let path = staging.join(&name);
            let (size, sha256) =
                copy_hashed(&mut entry, &path).with_context(|| format!("{name} is damaged or cut short"))?;
            ensure!(size == want.size, "{name} is cut short ({size} of {} bytes)", want.size);
            ensure!(sha256 == want.sha256, "{name} does not match its checksum: the file is damaged");
        }
        if let Some(missing) = manifest.files.iter().find(|f| !seen.contains(&f.name)) {
            bail!("{} is missing: the file is cut short", missing.name);
        }
        manifest
    };
    // Read to the end, so gzip checks its trailer (CRC and length) too.
    io::copy(&mut archive.into_inner(), &mut io::sink()).context("it is damaged or cut short at its end")?;
    Ok(manifest)
}

/// An entry's name, which must be a plain file name (no directories, no `..`).
fn entry_name<R: Read>(entry: &tar::Entry<'_, R>) -> Result<String> {
    let path = entry.path().context("an entry has an unreadable name")?;
    let name = path.to_str().context("an entry's name is not UTF-8")?.to_owned();
    ensure!(
        entry.header().entry_type() == tar::EntryType::Regular
            && !name.is_empty()
            && !name.contains(['/', '\\'])
            && name != ".."
            && name != ".",
        "it holds an unexpected entry '{name}'"
    );
    Ok(name)
}

/// Checks that the restored keys are the server's: the TLS key has the manifest's pin, the secrets
/// load as the server loads them, the admin token (if any) matches them, and the relay keys agree.
fn check_keys(dir: &Path, manifest: &Manifest) -> Result<()> {
    let id = Identity::load_or_create(dir, "localhost")?;
    ensure!(
        id.pin.to_string() == manifest.pin,
        "the TLS key's pin is {}, its manifest says {}",
        id.pin,
        manifest.pin
    );
    if let Ok(text) = fs::read_to_string(dir.join("admin.token")) {
        let token =
            tunnel_core::AdminToken::parse(text.trim()).map_err(|e| anyhow::anyhow!("admin.token: {e}"))?;
        ensure!(
            token.pin == id.pin && token.secret == id.admin_secret,
            "admin.token does not match the keys"
        );
    }
    match (dir.join("capability.key").exists(), dir.join("relay.bundle").exists()) {
        (true, true) => {
            crate::relay::RelayKeys::load_or_create(dir)?;
        }
        (false, false) => {}
        _ => bail!("it has only one of capability.key and relay.bundle"),
    }
    Ok(())
}

/// Copies `from` into a new 0600 file at `to`; returns its size and hex SHA-256.
fn copy_hashed(from: &mut impl Read, to: &Path) -> Result<(u64, String)> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let file = opts.open(to).with_context(|| format!("cannot write {}", to.display()))?;
    let mut out = BufWriter::new(file);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).with_context(|| format!("cannot write {}", to.display()))?;
        size += n as u64;
    }
    let file = out
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("cannot write {}", to.display()))?;
    file.sync_all().with_context(|| format!("cannot write {}", to.display()))?;
    Ok((size, hex::encode(hasher.finalize())))
}

fn hash_file(path: &Path) -> io::Result<(u64, String)> {
    let mut f = BufReader::new(fs::File::open(path)?);
    let mut hasher = Sha256::new();
    let size = io::copy(&mut f, &mut hasher)?;
    Ok((size, hex::encode(hasher.finalize())))
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Makes a rename durable. Best effort: not every filesystem syncs directories.
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        let file = |name: &str| FileEntry { name: name.into(), size: 1, sha256: String::new() };
        Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            server_version: "0.1.0".into(),
            created_ms: 0,
            created: String::new(),
            pin: String::new(),
            database: DatabaseKind::Sqlite,
            database_included: true,
            files: ["tls.key", "admin.secret", "ticket.key", DB_FILE].into_iter().map(file).collect(),
        }
    }

    #[test]
    fn manifests_that_do_not_describe_a_restorable_backup_are_refused() {
        assert!(manifest().validate().is_ok());
        type Change = fn(&mut Manifest);
        let cases: &[(&str, Change)] = &[
            ("not a tunnel-server-backup", |m| m.format = "other".into()),
            ("restore it with that version", |m| m.format_version = FORMAT_VERSION + 1),
            ("unexpected file '../etc/passwd'", |m| m.files[0].name = "../etc/passwd".into()),
            ("lists 'tls.key' twice", |m| m.files[1].name = "tls.key".into()),
            ("has no ticket.key", |m| m.files.retain(|f| f.name != "ticket.key")),
            ("disagree about the database", |m| m.database_included = false),
            ("not SQLite but includes one", |m| m.database = DatabaseKind::Postgres),
        ];
        for (want, change) in cases {
            let mut m = manifest();
            change(&mut m);
            let err = format!("{:#}", m.validate().unwrap_err());
            assert!(err.contains(want), "want {want:?}, got {err:?}");
        }
    }

    #[test]
    fn database_urls_have_a_kind() {
        assert_eq!(DatabaseKind::of(None).unwrap(), DatabaseKind::Sqlite);
        assert_eq!(DatabaseKind::of(Some("sqlite:///x/y.db")).unwrap(), DatabaseKind::Sqlite);
        assert_eq!(DatabaseKind::of(Some("postgres://u:p@h/db")).unwrap(), DatabaseKind::Postgres);
        assert_eq!(DatabaseKind::of(Some("postgresql://h/db")).unwrap(), DatabaseKind::Postgres);
        assert!(DatabaseKind::of(Some("mysql://h/db")).is_err());
    }

    #[tokio::test]
    async fn with_postgres_only_the_keys_are_backed_up_and_restored() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let id = Identity::load_or_create(&data, "localhost").unwrap();
        crate::relay::RelayKeys::load_or_create(&data).unwrap();
        let to = tmp.path().join("keys.tar.gz");
        // The database is never contacted: nothing listens at this URL.
        let database = Some("postgres://tunnel:secret@127.0.0.1:1/tunnel".to_owned());
        let report =
            backup(&BackupOptions { data_dir: data.clone(), database, to: to.clone() }).await.unwrap();
        assert_eq!(report.manifest.database, DatabaseKind::Postgres);
        assert!(!report.manifest.database_included && report.counts.is_none());
        assert_eq!(report.manifest.pin, id.pin.to_string());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&to).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let restored = tmp.path().join("restored");
        let r =
            restore(&RestoreOptions { from: to, data_dir: restored.clone(), force: false }).await.unwrap();
        assert!(r.counts.is_none() && !restored.join(DB_FILE).exists());
        let again = Identity::load_or_create(&restored, "elsewhere").unwrap();
        assert_eq!(again.pin, id.pin);
        assert_eq!(again.admin_secret, id.admin_secret);
        assert_eq!(again.ticket_key, id.ticket_key);
        // Nothing else was left beside the backup.
        let mut names: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["data", "keys.tar.gz", "restored"]);
    }

    #[test]
    fn errors_are_one_line_whatever_bytes_they_quote() {
        let e = anyhow::anyhow!("numeric field was not a number: --\n\u{7}--").context("it is damaged");
        assert_eq!(one_line(e).to_string(), "it is damaged: numeric field was not a number: --\\n\\u{7}--");
    }
}
