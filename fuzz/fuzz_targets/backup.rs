//! Backup files (server/src/backup.rs): `backup::restore`, the public entry point that reads a
//! backup file (gzip, tar, `manifest.json`, checksums, keys, database) into a data dir. Its parser
//! (`unpack`) is private, so each input is written to a file and restored into a fresh data dir.
//!
//! The first input byte picks the form of the rest: bit 0 set means the rest is an *uncompressed*
//! tar stream, whose header checksums the target repairs before gzipping it, so the fuzzer works on
//! the tar entries and the manifest JSON instead of breaking the deflate stream; bit 0 clear means the
//! rest is the file as is.
//!
//! Checks: no panic or hang; a refused restore leaves no data dir behind (the target hands `restore`
//! a path that does not exist yet); errors are one line (the documented contract of `restore`).
#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tunnel_fuzz::{runtime, Input};
use tunnel_server::backup::{self, RestoreOptions};

/// Where the files go: a tmpfs when there is one (restore syncs every file it writes).
fn scratch() -> &'static tempfile::TempDir {
    static D: OnceLock<tempfile::TempDir> = OnceLock::new();
    D.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" };
        tempfile::Builder::new()
            .prefix("tunnel-fuzz-backup-")
            .tempdir_in(base)
            .unwrap_or_else(|e| panic!("no scratch dir: {e}"))
    })
}

/// Fills in the checksum field of every tar header it can walk to.
fn fix_tar(tar: &mut [u8]) {
    let mut at = 0usize;
    while at + 512 <= tar.len() {
        let h = &mut tar[at..at + 512];
        if h.iter().all(|b| *b == 0) {
            break;
        }
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        let field = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(field.as_bytes());
        let size = std::str::from_utf8(&h[124..136])
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim_matches(|c: char| c == '\0' || c == ' '), 8).ok())
            .unwrap_or(0);
        let Some(next) = usize::try_from(size).ok().and_then(|s| s.checked_add(511)).map(|s| s / 512 * 512)
        else {
            break;
        };
        at = match at.checked_add(512 + next) {
            Some(n) => n,
            None => break,
        };
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.u8();
    let rest = input.rest();
    let file_bytes = if mode & 1 == 1 {
        let mut tar = rest.to_vec();
        fix_tar(&mut tar);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let _ = gz.write_all(&tar);
        gz.finish().unwrap_or_else(|e| panic!("gzip into memory failed: {e}"))
    } else {
        rest.to_vec()
    };

    let case = tempfile::tempdir_in(scratch().path()).unwrap_or_else(|e| panic!("no case dir: {e}"));
    let from = case.path().join("backup.tar.gz");
    std::fs::write(&from, &file_bytes).unwrap_or_else(|e| panic!("cannot write the input file: {e}"));
    let data_dir = case.path().join("data");
    let opts = RestoreOptions { from, data_dir: data_dir.clone(), force: false };
    match runtime().block_on(backup::restore(&opts)) {
        Ok(report) => {
            assert!(data_dir.is_dir());
            assert!(report.files.iter().any(|f| f == "tls.key"), "restored without a TLS key");
        }
        Err(e) => {
            assert!(!data_dir.exists(), "a refused restore left its data dir behind: {e}");
            let text = e.to_string();
            assert!(!text.contains('\n'), "a restore error is not one line: {text:?}");
        }
    }
});
