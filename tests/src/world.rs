//! What every lab world (`lab_nat`, `runbook`) does the same way around its own scenario: a clock
//! that timestamps the steps, polling a condition, and transfers by curl running in the background
//! and checked byte for byte. Each world turns an `Err` here into its own failure report (its nodes'
//! status, its logs), so these return the reason instead of panicking.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::lab::Lab;

/// Timestamps on a test's progress lines, from when the world was made.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub t0: Instant,
}

impl Clock {
    /// Starts now.
    pub fn start() -> Clock {
        Clock { t0: Instant::now() }
    }

    /// Prints `[  12.34s] what` to stderr (shown with the failure, or with `--nocapture`).
    pub fn step(&self, what: &str) {
        eprintln!("[{:>6.2}s] {what}", self.t0.elapsed().as_secs_f64());
    }
}

/// Polls `cond` every `every` until it holds; how long that took, or `None` after `secs`.
pub fn poll(secs: u64, every: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A curl transfer running in the background in a lab namespace, writing to a file.
#[derive(Debug)]
pub struct Fetch {
    /// The process, for [`Lab::try_wait`].
    pub idx: usize,
    pub out: PathBuf,
    /// Its log name (curl's stderr), for [`Lab::log`].
    pub log: String,
}

impl Fetch {
    /// Starts `curl -sS --max-time 180 -o fetchN.bin ARGS.. URL` in `ns`; `n` numbers the world's
    /// transfers (file and log `fetchN`).
    pub fn start(lab: &mut Lab, ns: &str, n: usize, url: &str, args: &[&str]) -> Fetch {
        let out = lab.dir.path().join(format!("fetch{n}.bin"));
        let log = format!("fetch{n}");
        let out_s = out.to_string_lossy().into_owned();
        let mut argv = vec!["curl", "-sS", "--max-time", "180", "-o", &out_s];
        argv.extend_from_slice(args);
        argv.push(url);
        let idx = lab.spawn(ns, &log, &argv, &[]);
        Fetch { idx, out, log }
    }

    /// Bytes arrived so far.
    pub fn bytes(&self) -> u64 {
        std::fs::metadata(&self.out).map(|m| m.len()).unwrap_or(0)
    }

    /// Waits up to `secs` for curl to end; then checks it succeeded and the file is `blob`.
    pub fn finish(&self, lab: &mut Lab, secs: u64, blob: &[u8]) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let status = loop {
            if let Some(st) = lab.try_wait(self.idx) {
                break st;
            }
            if Instant::now() > deadline {
                return Err(format!("still running after {secs} s ({} bytes so far)", self.bytes()));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if !status.success() {
            return Err(format!("curl {status}: {}", lab.log(&self.log)));
        }
        check_file(&self.out, blob)
    }
}

/// Whether the file at `out` is exactly `blob` (it is removed either way: transfers are large).
pub fn check_file(out: &Path, blob: &[u8]) -> Result<(), String> {
    let got = std::fs::read(out).unwrap_or_default();
    let _ = std::fs::remove_file(out);
    if got == blob {
        return Ok(());
    }
    let first_diff = got.iter().zip(blob).position(|(a, b)| a != b);
    Err(format!("{} bytes arrived, {} expected, first difference at {first_diff:?}", got.len(), blob.len()))
}
