//! systemd service units: the `[Service]` directives the deploy units use.

use super::env::Setting;
use super::words::split_words;

/// A unit's `EnvironmentFile=`.
#[derive(Debug, Clone)]
pub struct EnvironmentFile {
    pub path: String,
    /// Written with a leading `-`: a missing file is no error.
    pub optional: bool,
    pub at: String,
}

/// What a unit's `[Service]` section says about starting its process.
#[derive(Debug, Clone, Default)]
pub struct ServiceUnit {
    /// `ExecStart=`: the program (its `-@+!:` prefixes taken off), then the arguments.
    pub exec_start: Vec<String>,
    /// `Environment=`, in order.
    pub environment: Vec<Setting>,
    pub environment_files: Vec<EnvironmentFile>,
    /// `LoadCredential=ID:PATH`: (id, path).
    pub credentials: Vec<(String, String)>,
    /// `StateDirectory=` names (under `/var/lib`).
    pub state_directories: Vec<String>,
    /// `DynamicUser=yes`.
    pub dynamic_user: bool,
    /// `AmbientCapabilities=`, lower case without `CAP_`.
    pub ambient_capabilities: Vec<String>,
    /// `CapabilityBoundingSet=`, the same way; `None` when not set.
    pub capability_bounding_set: Option<Vec<String>>,
}

impl ServiceUnit {
    /// The program `ExecStart=` runs.
    pub fn program(&self) -> &str {
        &self.exec_start[0]
    }

    /// Its arguments.
    pub fn args(&self) -> &[String] {
        &self.exec_start[1..]
    }
}

/// Reads a unit file (`file` names it in messages). Panics on what is not modelled: continued lines,
/// specifiers other than `%d/`, `User=` and groups, inverted capability sets, no `ExecStart=`.
pub fn service_unit(text: &str, file: &str) -> ServiceUnit {
    let mut u = ServiceUnit::default();
    let mut section = String::new();
    for (i, line) in text.lines().enumerate() {
        let (t, at) = (line.trim(), format!("{file}:{}", i + 1));
        if t.is_empty() || t.starts_with(['#', ';']) {
            continue;
        }
        if t.starts_with('[') {
            section = t.to_owned();
            continue;
        }
        let (k, v) = t.split_once('=').unwrap_or_else(|| panic!("{at}: not KEY=VALUE"));
        let (k, v) = (k.trim(), v.trim());
        assert!(!v.ends_with('\\'), "{at}: continued lines are not read here");
        if section != "[Service]" {
            continue;
        }
        match k {
            "ExecStart" => {
                let mut w = split_words(v);
                let p = w.first_mut().unwrap_or_else(|| panic!("{at}: empty ExecStart="));
                *p = p.trim_start_matches(['-', '@', '+', '!', ':']).to_owned();
                u.exec_start = w;
            }
            "Environment" => {
                for w in split_words(v) {
                    let (key, val) = w.split_once('=').unwrap_or_else(|| panic!("{at}: not KEY=VALUE"));
                    assert!(!val.replace("%d/", "").contains('%'), "{at}: a specifier not read here");
                    u.environment.push(Setting::new(key, val, at.clone()));
                }
            }
            "EnvironmentFile" => {
                let (optional, p) = v.strip_prefix('-').map_or((false, v), |p| (true, p));
                u.environment_files.push(EnvironmentFile { path: p.to_owned(), optional, at });
            }
            "LoadCredential" => {
                let (id, src) = v.split_once(':').unwrap_or_else(|| panic!("{at}: not ID:PATH"));
                u.credentials.push((id.to_owned(), src.to_owned()));
            }
            "DynamicUser" => u.dynamic_user = v == "yes",
            "User" | "Group" | "SupplementaryGroups" => panic!("{at}: {k}= is not modelled here"),
            "AmbientCapabilities" => u.ambient_capabilities.extend(caps(v, &at)),
            "CapabilityBoundingSet" => u.capability_bounding_set = Some(caps(v, &at)),
            "StateDirectory" => u.state_directories.extend(v.split_whitespace().map(str::to_owned)),
            _ => {}
        }
    }
    assert!(!u.exec_start.is_empty(), "{file}: no ExecStart=");
    u
}

fn caps(v: &str, at: &str) -> Vec<String> {
    assert!(!v.starts_with('~'), "{at}: inverted capability sets are not modelled");
    v.split_whitespace().map(|c| c.trim_start_matches("CAP_").to_lowercase()).collect()
}
